//! Numeric error codes carried in `ErrorBody` and `Kicked`. The numbers are protocol: never
//! renumber, only append.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The bytes are not a frame: bad length, unknown kind, or an archive that fails
    /// validation. The connection is closed.
    MalformedFrame = 1,
    /// The hello named a protocol version this node does not speak. Closed.
    UnsupportedVersion = 2,
    /// A frame that needs a login arrived before one. Closed.
    NotAuthenticated = 3,
    /// Wrong user, password or token. Closed.
    AuthFailed = 4,
    /// The recipient of a send does not exist. The connection stays open.
    UnknownUser = 5,
    /// A field is over its limit (text, name, page size). The connection stays open.
    TooLarge = 6,
    /// The node is overloaded; retry later with the same client message id.
    Busy = 7,
    /// The store is full; the message was not stored.
    StorageFull = 8,
    /// The store failed; the message was not stored.
    StorageFailed = 9,
    /// A well-formed frame that is not allowed now (a second hello, a server-only kind). Closed.
    ProtocolViolation = 10,
    /// No traffic within the idle timeout or the handshake deadline. Closed.
    Timeout = 11,
    /// Another connection logged in as the same user and device (sent in `Kicked`).
    ReplacedByNewLogin = 12,
    /// A field has an invalid value (empty name, zero client message id). Stays open.
    InvalidArgument = 13,
    /// The node is shutting down.
    ShuttingDown = 14,
    /// No group has this id. The connection stays open.
    UnknownGroup = 15,
    /// The caller is not a member of the group (or the conversation), or a named user is
    /// not a member where one must be. The connection stays open.
    NotMember = 16,
    /// Only the group's owner may do this. The connection stays open.
    NotOwner = 17,
    /// The group would exceed `GROUP_MEMBERS_MAX` members, or a user `USER_GROUPS_MAX`
    /// groups. The connection stays open.
    GroupFull = 18,
    /// The upload would exceed the user's or the node's file quota. The connection stays
    /// open.
    QuotaExceeded = 19,
    /// No file (or no upload in progress on this connection) has this id.
    UnknownFile = 20,
    /// An upload's bytes do not match what its start announced (size or SHA-256), or a
    /// chunk's offset is not where the upload stands. The connection stays open.
    FileMismatch = 21,
    /// Too many failed password logins for this account or from this address: the login
    /// was refused without checking the password. The message says how many ms to wait.
    /// Closed (it answers a `Login`).
    Throttled = 22,
    /// The device's tokens were revoked (its logout, a revoke from another device, a
    /// password change): sent in `Kicked` to every connection it closes. Log in with the
    /// password again.
    Revoked = 23,
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            1 => MalformedFrame,
            2 => UnsupportedVersion,
            3 => NotAuthenticated,
            4 => AuthFailed,
            5 => UnknownUser,
            6 => TooLarge,
            7 => Busy,
            8 => StorageFull,
            9 => StorageFailed,
            10 => ProtocolViolation,
            11 => Timeout,
            12 => ReplacedByNewLogin,
            13 => InvalidArgument,
            14 => ShuttingDown,
            15 => UnknownGroup,
            16 => NotMember,
            17 => NotOwner,
            18 => GroupFull,
            19 => QuotaExceeded,
            20 => UnknownFile,
            21 => FileMismatch,
            22 => Throttled,
            23 => Revoked,
            _ => return None,
        })
    }

    /// Whether the node closes the connection after sending this error.
    pub fn closes_connection(self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            MalformedFrame
                | UnsupportedVersion
                | NotAuthenticated
                | AuthFailed
                | ProtocolViolation
                | Timeout
                | ReplacedByNewLogin
                | ShuttingDown
                | Throttled
                | Revoked
        )
    }

    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedFrame => "malformed_frame",
            UnsupportedVersion => "unsupported_version",
            NotAuthenticated => "not_authenticated",
            AuthFailed => "auth_failed",
            UnknownUser => "unknown_user",
            TooLarge => "too_large",
            Busy => "busy",
            StorageFull => "storage_full",
            StorageFailed => "storage_failed",
            ProtocolViolation => "protocol_violation",
            Timeout => "timeout",
            ReplacedByNewLogin => "replaced_by_new_login",
            InvalidArgument => "invalid_argument",
            ShuttingDown => "shutting_down",
            UnknownGroup => "unknown_group",
            NotMember => "not_member",
            NotOwner => "not_owner",
            GroupFull => "group_full",
            QuotaExceeded => "quota_exceeded",
            UnknownFile => "unknown_file",
            FileMismatch => "file_mismatch",
            Throttled => "throttled",
            Revoked => "revoked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 1..=23u16 {
            let e = ErrorCode::from_u16(code).unwrap();
            assert_eq!(e as u16, code);
            assert!(!e.name().is_empty());
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(24), None);
    }
}
