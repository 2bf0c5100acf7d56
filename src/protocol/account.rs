//! Account frames (kinds 42–45): logout, password change, and the list of a user's devices
//! with revocation. Each change bumps a generation that every token carries (`auth`), so
//! the tokens it revokes fail at their next login, and the node kicks the connections it
//! revokes with `Kicked { code: revoked }`.

use rkyv::{Archive, Deserialize, Serialize};

/// Client → node: revoke this device's tokens (`everywhere`: every device's of the user)
/// and close its connections, this one included, with `Kicked { code: revoked }`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logout {
    pub everywhere: bool,
}

/// Client → node: replace the password (`old` must match). Every token of the user is
/// revoked and every connection of the user, this one included, is closed with
/// `Kicked { code: revoked }`: log in again with `new`. A wrong `old` is answered
/// `auth_failed` (closes) and counts as a failed login.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChangePassword {
    pub old: String,
    pub new: String,
}

/// Client → node: list the user's devices; with `revoke` nonempty, first revoke that
/// device's tokens and close its connections. Answered by `DevicesPage`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    pub revoke: String,
}

/// One device of a user: a name that has acknowledged entries, is online, or was revoked.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceItem {
    pub name: String,
    /// Highest seq the device acknowledged (advisory, like `LoginOk.acked_seq`).
    pub acked_seq: u64,
    /// Connections of this device logged in now.
    pub online: bool,
    /// The device asking.
    pub current: bool,
}

/// Node → client: the devices, by name.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DevicesPage {
    pub devices: Vec<DeviceItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_sizes_match_the_documentation() {
        use std::mem::size_of;
        assert_eq!(size_of::<ArchivedLogout>(), 1);
        assert_eq!(size_of::<ArchivedChangePassword>(), 16);
        assert_eq!(size_of::<ArchivedDevices>(), 8);
        assert_eq!(size_of::<ArchivedDeviceItem>(), 18);
        assert_eq!(size_of::<ArchivedDevicesPage>(), 8);
    }
}
