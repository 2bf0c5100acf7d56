//! The shard's side of account requests: logout, password change and the device list,
//! and the kicks that follow a revocation.
//!
//! A revocation is a write (`storage::account`): once it commits, the shard that asked
//! kicks every connection it revokes, on any shard (the online directory names them), with
//! `Kicked { code: revoked }`. A password change first checks the old password and hashes
//! the new one on the login threads, throttled like a login.

use super::Shard;
use super::login::PasswordCheck;
use super::mailbox::KickWhy;
use crate::ids::ConnId;
use crate::protocol::{DeviceItem, DevicesPage, ErrorCode, Kind};
use crate::session::{Identity, Request};
use crate::storage::{AccountChange, AccountOp, Origin, Revoked, WriteOp};

impl Shard {
    /// Account requests. Returns the request back if it is not one of them.
    pub(super) fn handle_account_request(
        &mut self,
        conn_id: ConnId,
        request: Request,
    ) -> Option<Request> {
        let identity = self.conn_mut(conn_id)?.identity().cloned()?;
        match request {
            Request::Logout {
                request_id,
                everywhere,
            } => {
                let change = if everywhere {
                    AccountChange::RevokeAll
                } else {
                    AccountChange::RevokeDevice {
                        device: identity.device.clone(),
                    }
                };
                self.submit_account(conn_id, request_id, &identity, change);
            }
            Request::Devices {
                request_id,
                revoke: Some(device),
            } => {
                let change = AccountChange::RevokeDevice { device };
                self.submit_account(conn_id, request_id, &identity, change);
            }
            Request::Devices {
                request_id,
                revoke: None,
            } => self.answer_devices(conn_id, request_id, None),
            Request::ChangePassword {
                request_id,
                old,
                new,
            } => self.change_password(conn_id, request_id, &identity, old, new),
            other => return Some(other),
        }
        None
    }

    fn submit_account(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        identity: &Identity,
        change: AccountChange,
    ) {
        let op = WriteOp::Account(Box::new(AccountOp {
            origin: Origin {
                shard: self.id,
                conn: conn_id,
                request_id,
            },
            user: identity.user,
            change,
        }));
        self.submit(conn_id, request_id, op);
    }

    fn change_password(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        identity: &Identity,
        old: String,
        new: String,
    ) {
        let found = self.ctx.store.read().and_then(|view| {
            let record = view.user_by_name(&identity.name)?;
            let generations = view.generations(identity.user, &identity.device)?;
            Ok(record.map(|r| (r, generations.0)))
        });
        let (record, user_generation) = match found {
            Ok(Some(found)) => found,
            Ok(None) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    "the account is gone",
                );
            }
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        };
        self.check_password(PasswordCheck {
            shard: self.id,
            conn: conn_id,
            request_id,
            account: Some(record.id),
            name: record.name,
            device: identity.device.clone(),
            password: old,
            phc_hash: record.password_hash,
            user_generation,
            new_password: Some(new),
        });
    }

    /// The login threads checked the old password of a password change (and hashed the
    /// new one).
    pub(super) fn password_change_checked(&mut self, verdict: super::login::LoginVerdict) {
        let address = self.peer(verdict.conn);
        let (Some(account), true) = (verdict.account, verdict.valid) else {
            self.ctx.throttle.failed(verdict.account, address);
            // Closes, like a failed login: the caller proved nothing.
            return self.refuse_login(
                verdict.conn,
                verdict.request_id,
                ErrorCode::AuthFailed,
                "wrong password",
            );
        };
        let Some(Some(password_hash)) = verdict.new_hash else {
            return self.answer_error(
                verdict.conn,
                verdict.request_id,
                ErrorCode::StorageFailed,
                "hashing the new password failed",
            );
        };
        let Some(identity) = self
            .conn_mut(verdict.conn)
            .and_then(|c| c.identity().cloned())
        else {
            return;
        };
        debug_assert_eq!(identity.user, account);
        let change = AccountChange::Password {
            name: verdict.name,
            password_hash,
        };
        self.submit_account(verdict.conn, verdict.request_id, &identity, change);
    }

    /// A revocation committed: kick what it revoked (on every shard), and answer the
    /// requester with the device list if it is still connected.
    pub(super) fn revoked(&mut self, conn_id: ConnId, request_id: u32, revoked: Revoked) {
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.inflight = conn.inflight.saturating_sub(1);
        }
        let mut online = Vec::new();
        self.ctx.directory.connections_of(revoked.user, &mut online);
        for presence in online {
            if revoked
                .device
                .as_deref()
                .is_none_or(|device| *presence.device == *device)
            {
                self.kick(presence.shard, presence.conn, KickWhy::Revoked(revoked.why));
            }
        }
        if self
            .conn_mut(conn_id)
            .is_some_and(|c| c.is_authenticated() && !c.is_closing())
        {
            // The revoked device's connections are closing: not online any more.
            self.answer_devices(conn_id, request_id, revoked.device.as_deref());
        }
    }

    /// Answers `DevicesPage`; `closing` names a device whose connections are being closed.
    fn answer_devices(&mut self, conn_id: ConnId, request_id: u32, closing: Option<&str>) {
        let Some(identity) = self.conn_mut(conn_id).and_then(|c| c.identity().cloned()) else {
            return;
        };
        let stored = self
            .ctx
            .store
            .read()
            .and_then(|view| view.devices(identity.user));
        let mut known = match stored {
            Ok(known) => known,
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        };
        let mut online = Vec::new();
        self.ctx
            .directory
            .connections_of(identity.user, &mut online);
        for presence in &online {
            known.entry(presence.device.to_string()).or_insert(0);
        }
        // A page holds every device; bounded by what fits a frame.
        let devices = known
            .into_iter()
            .take(crate::limits::DEVICES_PAGE_MAX)
            .map(|(name, acked_seq)| DeviceItem {
                online: closing != Some(name.as_str()) && online.iter().any(|p| *p.device == *name),
                current: name == identity.device,
                name,
                acked_seq,
            })
            .collect();
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply(Kind::DevicesPage, request_id, &DevicesPage { devices });
        }
        self.mark_dirty(conn_id);
    }
}
