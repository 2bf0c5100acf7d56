//! The account on the client: logout, password change, the device list and revoking a
//! device (kinds 42–45). A logout or password change ends with the node closing the
//! connection (`Kicked { code: revoked }`); the blocking calls treat that as success.

use std::time::Instant;

use super::blocking::{BlockingClient, ClientError};
use super::session::ClientSession;
use super::store::ClientStore;
use super::team::{OnLost, TeamAnswer};
use crate::limits::{DEVICE_NAME_SIZE_MAX, PASSWORD_SIZE_MAX};
use crate::protocol::{self, ChangePassword, DeviceItem, Devices, ErrorCode, Kind, Logout};

impl<S: ClientStore> ClientSession<S> {
    /// Sends a `Logout`. None when not established.
    pub fn logout(&mut self, everywhere: bool, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::Logout, id, &Logout { everywhere });
        })
    }

    /// Sends a `ChangePassword`. None when not established.
    pub fn change_password(&mut self, old: &str, new: &str, now: Instant) -> Option<u32> {
        let frame = ChangePassword {
            old: old.to_owned(),
            new: new.to_owned(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::ChangePassword, id, &frame);
        })
    }

    /// Sends a `Devices` request (`revoke` empty: just the list). None when not
    /// established.
    pub fn devices(&mut self, revoke: &str, now: Instant) -> Option<u32> {
        let frame = Devices {
            revoke: revoke.to_owned(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::Devices, id, &frame);
        })
    }
}

impl<S: ClientStore> BlockingClient<S> {
    /// Logs this device out (`everywhere`: every device of the user): its tokens stop
    /// working and the node closes its connections. The session is over afterwards.
    pub fn logout(&mut self, everywhere: bool) -> Result<(), ClientError> {
        revoked_is_done(self.team_call(OnLost::Fail, |s, now| s.logout(everywhere, now)))
    }

    /// Changes the password. Every token of the user stops working and the node closes
    /// every connection of the user, this one included: log in again with `new`.
    /// Errors: `AuthFailed` for a wrong `old` (counted like a failed login).
    pub fn change_password(&mut self, old: &str, new: &str) -> Result<(), ClientError> {
        if new.is_empty() || new.len() > PASSWORD_SIZE_MAX {
            return Err(ClientError::Invalid(
                "the new password must be 1..=256 bytes",
            ));
        }
        let answer = self.team_call(OnLost::Fail, |s, now| s.change_password(old, new, now));
        match answer {
            // The node closes the connection on a wrong old password.
            Err(ClientError::RequestFailed { code, message })
                if code == ErrorCode::AuthFailed as u16 =>
            {
                Err(ClientError::AuthFailed { code, message })
            }
            other => revoked_is_done(other),
        }
    }

    /// The user's devices; with `revoke`, first revokes that device (its tokens stop
    /// working, its connections are closed). Revoking this device ends the session.
    pub fn devices(&mut self, revoke: Option<&str>) -> Result<Vec<DeviceItem>, ClientError> {
        let revoke = revoke.unwrap_or("");
        if revoke.len() > DEVICE_NAME_SIZE_MAX {
            return Err(ClientError::Invalid("device name too long"));
        }
        match self.team_call(OnLost::Fail, |s, now| s.devices(revoke, now)) {
            Ok(TeamAnswer::Devices(page)) => Ok(page.devices),
            Ok(_) => Err(ClientError::Unexpected),
            Err(ClientError::Kicked { code, .. }) if code == ErrorCode::Revoked as u16 => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }
}

/// A logout or password change is done when the node closes the connection with
/// `revoked`.
fn revoked_is_done(answer: Result<TeamAnswer, ClientError>) -> Result<(), ClientError> {
    match answer {
        Err(ClientError::Kicked { code, .. }) if code == ErrorCode::Revoked as u16 => Ok(()),
        Ok(TeamAnswer::Devices(_)) => Ok(()),
        Ok(_) => Err(ClientError::Unexpected),
        Err(e) => Err(e),
    }
}
