//! Authentication: password hashing (argon2id) and signed login tokens (HMAC-SHA256).
//!
//! A password is hashed once, at first login on a device; reconnects present a token the
//! node signed, checked with one HMAC, so a reconnect storm costs microseconds per client
//! instead of an argon2 run each. This module must not touch the store, the network or the
//! clock: callers pass stored hashes and `now_ms` in.

mod password;
mod throttle;
mod token;

pub use password::{
    ARGON2_M_COST_KIB, ARGON2_P_COST, ARGON2_T_COST, AuthError, hash_password, verify_password,
};
pub use throttle::LoginThrottle;
pub use token::{TOKEN_KEY_SIZE, TokenClaims, TokenError, TokenKey};
