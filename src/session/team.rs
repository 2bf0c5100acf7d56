//! Parsing and answering the team-messaging frames (groups, group sends, history, the
//! conversation list, read marks) of an established connection. Same rules as the core
//! frames: every payload is validated in place before a field is read; a bad field is
//! answered with an error code and the connection stays open.

use super::{FrameError, Request, write_error};
use crate::limits::{
    GROUP_MEMBERS_MAX, GROUP_NAME_SIZE_MAX, MESSAGE_TEXT_SIZE_MAX, PRESENCE_WATCH_MAX,
    USER_NAME_SIZE_MAX,
};
use crate::protocol::{
    self, ArchivedConversations, ArchivedGroupList, ArchivedGroupOp, ArchivedGroupQuery,
    ArchivedGroupSend, ArchivedHistory, ArchivedPresenceQuery, ArchivedPresenceSubscribe,
    ArchivedRead, ArchivedTyping, ErrorCode, FrameHeader, Kind, group_op,
};

/// Whether `kind` is a team request a client may send once logged in.
pub(super) fn is_team_request(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::GroupOp
            | Kind::GroupQuery
            | Kind::GroupList
            | Kind::GroupSend
            | Kind::History
            | Kind::Conversations
            | Kind::Read
            | Kind::PresenceSubscribe
            | Kind::PresenceQuery
            | Kind::Typing
    )
}

/// Validates one team request and hands it to the shard, or answers its error.
pub(super) fn handle_frame(
    out: &mut Vec<u8>,
    header: FrameHeader,
    payload: &[u8],
    requests: &mut Vec<Request>,
) -> Result<(), FrameError> {
    let id = header.request_id;
    let malformed = |e: protocol::DecodeError| (id, ErrorCode::MalformedFrame, e.to_string());
    match header.kind {
        Kind::GroupOp => {
            let op =
                protocol::access::<ArchivedGroupOp>(header.kind, payload).map_err(malformed)?;
            if !(group_op::CREATE..=group_op::RENAME).contains(&op.op) {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "unknown group operation",
                );
                return Ok(());
            }
            if op.name.len() > GROUP_NAME_SIZE_MAX {
                write_error(out, id, ErrorCode::TooLarge, "group name too long");
                return Ok(());
            }
            // Create and rename name the group: NFC, not empty, no outer whitespace or
            // control characters (`names`).
            let mut name = op.name.as_str().to_owned();
            if op.op == group_op::CREATE || op.op == group_op::RENAME {
                match crate::names::normalize(&name, GROUP_NAME_SIZE_MAX) {
                    Ok(nfc) => name = nfc,
                    Err(crate::names::NameError::TooLong) => {
                        write_error(out, id, ErrorCode::TooLarge, "group name too long");
                        return Ok(());
                    }
                    Err(e) => {
                        let message = format!("group name {e}");
                        write_error(out, id, ErrorCode::InvalidArgument, &message);
                        return Ok(());
                    }
                }
            }
            if op.users.len() > GROUP_MEMBERS_MAX {
                write_error(out, id, ErrorCode::GroupFull, "too many users named");
                return Ok(());
            }
            if op
                .users
                .iter()
                .any(|u| u.is_empty() || u.len() > USER_NAME_SIZE_MAX)
            {
                write_error(out, id, ErrorCode::UnknownUser, "no such user");
                return Ok(());
            }
            requests.push(Request::GroupOp {
                request_id: id,
                op: op.op,
                group_id: op.group_id.to_native(),
                name,
                users: op.users.iter().map(|u| u.as_str().to_owned()).collect(),
            });
        }
        Kind::GroupQuery => {
            let q =
                protocol::access::<ArchivedGroupQuery>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::GroupQuery {
                request_id: id,
                group_id: q.group_id.to_native(),
            });
        }
        Kind::GroupList => {
            let q =
                protocol::access::<ArchivedGroupList>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::GroupList {
                request_id: id,
                after_group_id: q.after_group_id.to_native(),
                limit: q.limit.to_native(),
            });
        }
        Kind::GroupSend => {
            let send =
                protocol::access::<ArchivedGroupSend>(header.kind, payload).map_err(malformed)?;
            if send.text.len() > MESSAGE_TEXT_SIZE_MAX {
                write_error(out, id, ErrorCode::TooLarge, "message text too long");
                return Ok(());
            }
            if send.client_msg_id.to_native() == 0 {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "client_msg_id must be nonzero",
                );
                return Ok(());
            }
            requests.push(Request::GroupSend {
                request_id: id,
                group_id: send.group_id.to_native(),
                client_msg_id: send.client_msg_id.to_native(),
                text: send.text.as_str().to_owned(),
            });
        }
        Kind::History => {
            let q = protocol::access::<ArchivedHistory>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::History {
                request_id: id,
                conv: q.conv.to_native(),
                before_seq: q.before_seq.to_native(),
                limit: q.limit.to_native(),
            });
        }
        Kind::Conversations => {
            let q = protocol::access::<ArchivedConversations>(header.kind, payload)
                .map_err(malformed)?;
            requests.push(Request::Conversations {
                request_id: id,
                offset: q.offset.to_native(),
                limit: q.limit.to_native(),
            });
        }
        Kind::Read => {
            let q = protocol::access::<ArchivedRead>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::Read {
                request_id: id,
                conv: q.conv.to_native(),
                up_to_seq: q.up_to_seq.to_native(),
            });
        }
        Kind::PresenceSubscribe | Kind::PresenceQuery => {
            let users = if header.kind == Kind::PresenceSubscribe {
                &protocol::access::<ArchivedPresenceSubscribe>(header.kind, payload)
                    .map_err(malformed)?
                    .users
            } else {
                &protocol::access::<ArchivedPresenceQuery>(header.kind, payload)
                    .map_err(malformed)?
                    .users
            };
            if users.len() > PRESENCE_WATCH_MAX {
                write_error(out, id, ErrorCode::TooLarge, "too many users named");
                return Ok(());
            }
            if users
                .iter()
                .any(|u| u.is_empty() || u.len() > USER_NAME_SIZE_MAX)
            {
                write_error(out, id, ErrorCode::UnknownUser, "no such user");
                return Ok(());
            }
            let users = users.iter().map(|u| u.as_str().to_owned()).collect();
            requests.push(if header.kind == Kind::PresenceSubscribe {
                Request::PresenceSubscribe {
                    request_id: id,
                    users,
                }
            } else {
                Request::PresenceQuery {
                    request_id: id,
                    users,
                }
            });
        }
        Kind::Typing => {
            let q = protocol::access::<ArchivedTyping>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::Typing {
                request_id: id,
                conv: q.conv.to_native(),
            });
        }
        kind => unreachable!("{kind:?} is not a team request"),
    }
    Ok(())
}
