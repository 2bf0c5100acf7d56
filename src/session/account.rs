//! Parsing the account frames of an established connection: logout, password change and
//! the device list. Validated in place; a bad field is answered with an error code.

use super::{FrameError, Request, write_error};
use crate::limits::{DEVICE_NAME_SIZE_MAX, PASSWORD_SIZE_MAX};
use crate::protocol::{
    self, ArchivedChangePassword, ArchivedDevices, ArchivedLogout, ErrorCode, FrameHeader, Kind,
};

pub(super) fn is_account_request(kind: Kind) -> bool {
    matches!(kind, Kind::Logout | Kind::ChangePassword | Kind::Devices)
}

pub(super) fn handle_frame(
    out: &mut Vec<u8>,
    header: FrameHeader,
    payload: &[u8],
    requests: &mut Vec<Request>,
) -> Result<(), FrameError> {
    let id = header.request_id;
    let malformed = |e: protocol::DecodeError| (id, ErrorCode::MalformedFrame, e.to_string());
    match header.kind {
        Kind::Logout => {
            let logout =
                protocol::access::<ArchivedLogout>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::Logout {
                request_id: id,
                everywhere: logout.everywhere,
            });
        }
        Kind::ChangePassword => {
            let change = protocol::access::<ArchivedChangePassword>(header.kind, payload)
                .map_err(malformed)?;
            if change.new.is_empty() || change.new.len() > PASSWORD_SIZE_MAX {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "the new password must be 1..=256 bytes",
                );
                return Ok(());
            }
            if change.old.len() > PASSWORD_SIZE_MAX {
                // Cannot match: the store holds hashes of bounded passwords only.
                return Err((id, ErrorCode::AuthFailed, "wrong password".into()));
            }
            requests.push(Request::ChangePassword {
                request_id: id,
                old: change.old.as_str().to_owned(),
                new: change.new.as_str().to_owned(),
            });
        }
        Kind::Devices => {
            let devices =
                protocol::access::<ArchivedDevices>(header.kind, payload).map_err(malformed)?;
            let revoke = match devices.revoke.as_str() {
                "" => None,
                name => match crate::names::normalize(name, DEVICE_NAME_SIZE_MAX) {
                    Ok(name) => Some(name),
                    Err(e) => {
                        let message = format!("bad device name: {e}");
                        write_error(out, id, ErrorCode::InvalidArgument, &message);
                        return Ok(());
                    }
                },
            };
            requests.push(Request::Devices {
                request_id: id,
                revoke,
            });
        }
        other => unreachable!("{other:?} is not an account request"),
    }
    Ok(())
}
