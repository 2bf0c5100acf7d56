//! Password hashes: argon2id, stored as PHC strings (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
//!
//! Hashing is deliberately slow and memory-hard; it runs only when a user is created or a
//! device logs in with its password. Verification must never panic, whatever the stored
//! string or the offered password.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::limits::PASSWORD_SIZE_MAX;

/// Argon2id memory cost in KiB (19 MiB), iterations and lanes: the OWASP minimum for
/// argon2id. Sized for an edge box: one hash takes tens of milliseconds and 19 MiB on a
/// Raspberry Pi-class board, and only password logins pay it.
pub const ARGON2_M_COST_KIB: u32 = 19_456;
pub const ARGON2_T_COST: u32 = 2;
pub const ARGON2_P_COST: u32 = 1;

/// Salt bytes per hash (the PHC recommendation).
const SALT_SIZE: usize = 16;

/// Costs a stored hash may ask for before verification refuses to run it. A hash is taken
/// from the store, but a hand-edited one asking for gigabytes must not take the node's
/// memory with it. Four times our own costs leaves room for raising them later.
const VERIFY_M_COST_KIB_MAX: u32 = 4 * ARGON2_M_COST_KIB;
const VERIFY_T_COST_MAX: u32 = 4 * ARGON2_T_COST;
const VERIFY_P_COST_MAX: u32 = 4;

const PARAMS: Params = match Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None) {
    Ok(params) => params,
    Err(_) => panic!("argon2 parameters out of range"),
};

#[derive(Debug)]
pub enum AuthError {
    /// The password is empty or longer than `PASSWORD_SIZE_MAX`.
    InvalidPassword(&'static str),
    /// The OS random source failed while generating a salt.
    Salt(getrandom::Error),
    /// argon2 refused to hash.
    Hash(argon2::password_hash::Error),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::InvalidPassword(what) => write!(f, "invalid password: {what}"),
            AuthError::Salt(error) => write!(f, "generating a password salt failed: {error}"),
            AuthError::Hash(error) => write!(f, "hashing a password failed: {error}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Hashes `password` with argon2id and a fresh random salt; returns the PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.is_empty() {
        return Err(AuthError::InvalidPassword("empty"));
    }
    if password.len() > PASSWORD_SIZE_MAX {
        return Err(AuthError::InvalidPassword("too long"));
    }
    let mut salt = [0u8; SALT_SIZE];
    getrandom::fill(&mut salt).map_err(AuthError::Salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(AuthError::Hash)?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS);
    let hash = argon2
        .hash_password(password.as_bytes(), &salt)
        .map_err(AuthError::Hash)?;
    Ok(hash.to_string())
}

/// Whether `password` matches `phc_hash`. False for a malformed hash, a hash that is not
/// argon2id, a hash with costs past the verify bounds, and an over-long password.
pub fn verify_password(password: &str, phc_hash: &str) -> bool {
    // Refuse before hashing: an over-long password cannot match a stored hash (the store
    // only holds hashes of bounded passwords) and would only cost time.
    if password.len() > PASSWORD_SIZE_MAX {
        return false;
    }
    let Ok(hash) = PasswordHash::new(phc_hash) else {
        return false;
    };
    if hash.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    if params.m_cost() > VERIFY_M_COST_KIB_MAX
        || params.t_cost() > VERIFY_T_COST_MAX
        || params.p_cost() > VERIFY_P_COST_MAX
    {
        return false;
    }
    // The verifier takes algorithm, version and costs from the hash itself.
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horse!", &hash));
        assert!(!verify_password("", &hash));
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("same").unwrap();
        let b = hash_password("same").unwrap();
        assert_ne!(a, b);
        assert!(verify_password("same", &a));
        assert!(verify_password("same", &b));
    }

    #[test]
    fn garbage_hash_is_false_not_panic() {
        for garbage in [
            "",
            "$",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$",
            "$argon2id$v=99$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaA",
            "$argon2id$v=19$m=0,t=0,p=0$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo",
            "$scrypt$ln=16,r=8,p=1$c2FsdHNhbHQ$aGFzaA",
            "\u{0}\u{ffff}",
        ] {
            assert!(!verify_password("pw", garbage), "{garbage:?}");
        }
    }

    #[test]
    fn hash_with_excessive_cost_is_refused() {
        let hash = hash_password("pw").unwrap();
        let greedy = hash.replace("m=19456", "m=4194304");
        assert!(PasswordHash::new(&greedy).is_ok());
        assert!(!verify_password("pw", &greedy));
    }

    #[test]
    fn other_argon2_variant_is_refused() {
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, PARAMS);
        let hash = argon2i.hash_password(b"pw", &salt).unwrap().to_string();
        assert!(hash.starts_with("$argon2i$"));
        assert!(!verify_password("pw", &hash));
    }

    #[test]
    fn password_bounds() {
        assert!(matches!(
            hash_password(""),
            Err(AuthError::InvalidPassword(_))
        ));
        let long = "p".repeat(PASSWORD_SIZE_MAX + 1);
        assert!(matches!(
            hash_password(&long),
            Err(AuthError::InvalidPassword(_))
        ));
        let max = "p".repeat(PASSWORD_SIZE_MAX);
        let hash = hash_password(&max).unwrap();
        assert!(verify_password(&max, &hash));
        assert!(!verify_password(&long, &hash));
    }
}
