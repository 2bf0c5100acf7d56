//! Login tokens: `v2.<user_id>.<user_gen>.<device_gen>.<expires_at_ms>.<hex>`, where `<hex>`
//! is the HMAC-SHA256 of `v2.<user_id>.<user_gen>.<device_gen>.<expires_at_ms>`, a newline
//! and the device name the token was issued to.
//!
//! The node signs a token at login and checks it on reconnect with one HMAC: no store
//! lookup of sessions, no argon2 run. A token is bound to its device (the name is signed,
//! not written out), and carries the user's and the device's generation at issue: the node
//! bumps them to revoke (logout, password change, device revoke), and a token whose
//! generations are not the current ones is refused. The key lives in `node.secret` in the
//! data folder, so tokens survive a restart. Verification must never panic on what a client
//! sends, and compares MACs in constant time.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::UserId;
use crate::limits::{TOKEN_LIFETIME_MS, TOKEN_SIZE_MAX};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the token key.
pub const TOKEN_KEY_SIZE: usize = 32;

/// File holding the key, inside the data folder.
const SECRET_FILE_NAME: &str = "node.secret";
/// Mode of the key file: readable by the node's user only.
const SECRET_FILE_MODE: u32 = 0o600;

const TOKEN_VERSION: &str = "v2";
/// Hex digits of an HMAC-SHA256 tag.
const MAC_HEX_LEN: usize = 64;
/// Digits of the largest u64.
const U64_DIGITS_MAX: usize = 20;
/// Longest token `issue` can produce: version, four u64s, the tag and five dots.
const TOKEN_LEN_MAX: usize = TOKEN_VERSION.len() + 4 * U64_DIGITS_MAX + MAC_HEX_LEN + 5;
const _: () = assert!(TOKEN_LEN_MAX < TOKEN_SIZE_MAX);
/// SHA-256 block size: an HMAC key shorter than this is zero-padded to it.
const HMAC_BLOCK_SIZE: usize = 64;
const _: () = assert!(TOKEN_KEY_SIZE <= HMAC_BLOCK_SIZE);

/// Why a token was refused. The login answer is the same for all three (`auth_failed`);
/// the distinction is for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the token format (wrong shape, version, number or hex).
    Malformed,
    /// Well-formed, but not signed by this node's key.
    BadSignature,
    /// Signed by this node, past its expiry.
    Expired,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "token signature does not match",
            TokenError::Expired => "token expired",
        })
    }
}

impl std::error::Error for TokenError {}

/// What a token says: whose it is and the generations it was issued under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenClaims {
    pub user: UserId,
    /// The user's generation at issue (bumped by a password change or logout everywhere).
    pub user_generation: u64,
    /// The device's generation at issue (bumped by its logout or revoke).
    pub device_generation: u64,
}

/// The node's token signing key.
pub struct TokenKey {
    /// HMAC state with the key already absorbed; cloned per token so the key schedule is
    /// computed once.
    mac: HmacSha256,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Loads the key from `data_dir/node.secret`, creating the file (32 random bytes, mode
    /// 0600) if it does not exist. Two processes racing to create it end up with the same
    /// key: the file appears whole through a hard link that fails if another one won, and
    /// the loser reads the winner's file. A file of the wrong length is an error, never
    /// silently replaced (that would log out every device).
    pub fn load_or_create(data_dir: &Path) -> io::Result<TokenKey> {
        let path = data_dir.join(SECRET_FILE_NAME);
        match read_key_file(&path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            loaded => return loaded,
        }
        fs::create_dir_all(data_dir)?;
        let mut key = [0u8; TOKEN_KEY_SIZE];
        let mut tmp_tag = [0u8; 8];
        getrandom::fill(&mut key).map_err(random_failed)?;
        getrandom::fill(&mut tmp_tag).map_err(random_failed)?;
        // A name of our own, so concurrent creators never write the same temporary file.
        let tmp = data_dir.join(format!(
            "{SECRET_FILE_NAME}.tmp.{}.{:016x}",
            std::process::id(),
            u64::from_le_bytes(tmp_tag)
        ));
        let written = write_new_file(&tmp, &key);
        // Unlike rename, link never replaces an existing file: the first creator wins and
        // every other one sees `AlreadyExists`.
        let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
        // The temporary name has served its purpose either way. A leftover only wastes 32
        // bytes and is never read, so failing to remove it does not fail the load.
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                // Make the new name itself durable, not just the file's contents.
                File::open(data_dir)?.sync_all()?;
                Ok(TokenKey::from_bytes(key))
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => read_key_file(&path),
            Err(error) => Err(error),
        }
    }

    pub fn from_bytes(key: [u8; TOKEN_KEY_SIZE]) -> TokenKey {
        // HMAC zero-pads a key shorter than the hash block, so the padded block is the same
        // key; building from the full block is infallible where `new_from_slice` is not.
        let mut block = [0u8; HMAC_BLOCK_SIZE];
        block[..TOKEN_KEY_SIZE].copy_from_slice(&key);
        let block: &Key<HmacSha256> = (&block).into();
        TokenKey {
            mac: <HmacSha256 as KeyInit>::new(block),
        }
    }

    /// Signs a token for `claims` and `device`, valid until `now_ms + TOKEN_LIFETIME_MS`.
    /// Returns the token and its expiry.
    pub fn issue(&self, claims: TokenClaims, device: &str, now_ms: u64) -> (String, u64) {
        let expires_at_ms = now_ms.saturating_add(TOKEN_LIFETIME_MS);
        let mut token = String::with_capacity(TOKEN_LEN_MAX);
        // Writing into a String cannot fail.
        let _ = write!(
            token,
            "{TOKEN_VERSION}.{}.{}.{}.{expires_at_ms}",
            claims.user.0, claims.user_generation, claims.device_generation
        );
        let tag = self.sign(token.as_bytes(), device);
        token.push('.');
        for byte in tag {
            token.push(HEX_DIGITS[usize::from(byte >> 4)] as char);
            token.push(HEX_DIGITS[usize::from(byte & 0x0f)] as char);
        }
        debug_assert!(token.len() <= TOKEN_LEN_MAX);
        (token, expires_at_ms)
    }

    /// Checks a token's form, signature for `device` (constant-time) and expiry, in that
    /// order, and returns its claims. The caller compares the generations with the
    /// current ones.
    pub fn verify(
        &self,
        token: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<TokenClaims, TokenError> {
        if token.len() > TOKEN_LEN_MAX {
            return Err(TokenError::Malformed);
        }
        let (signed, tag_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut fields = signed.split('.');
        if fields.next() != Some(TOKEN_VERSION) {
            return Err(TokenError::Malformed);
        }
        let mut number = || {
            fields
                .next()
                .and_then(parse_decimal)
                .ok_or(TokenError::Malformed)
        };
        let user = number()?;
        let user_generation = number()?;
        let device_generation = number()?;
        let expires_at_ms = number()?;
        if fields.next().is_some() {
            return Err(TokenError::Malformed);
        }
        let tag = parse_tag(tag_hex).ok_or(TokenError::Malformed)?;
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        mac.update(b"\n");
        mac.update(device.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        if now_ms >= expires_at_ms {
            return Err(TokenError::Expired);
        }
        Ok(TokenClaims {
            user: UserId(user),
            user_generation,
            device_generation,
        })
    }

    fn sign(&self, signed: &[u8], device: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(signed);
        mac.update(b"\n");
        mac.update(device.as_bytes());
        mac.finalize().into_bytes().into()
    }

    #[cfg(test)]
    fn sign_raw(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// A canonical decimal u64: digits only, no sign, no leading zero (so one number has one
/// spelling), no overflow.
fn parse_decimal(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > U64_DIGITS_MAX || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    text.parse().ok()
}

/// Exactly 64 lowercase hex digits, as `issue` writes them.
fn parse_tag(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != MAC_HEX_LEN {
        return None;
    }
    let mut tag = [0u8; 32];
    for (byte, pair) in tag.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(tag)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

fn random_failed(error: getrandom::Error) -> io::Error {
    io::Error::other(format!(
        "OS random source failed while creating the token key: {error}"
    ))
}

fn read_key_file(path: &Path) -> io::Result<TokenKey> {
    let bytes = fs::read(path)?;
    let key: [u8; TOKEN_KEY_SIZE] = bytes.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {} bytes, not {TOKEN_KEY_SIZE}; restore it or remove it (removing \
                 it logs out every device)",
                path.display(),
                bytes.len()
            ),
        )
    })?;
    Ok(TokenKey::from_bytes(key))
}

/// Writes `contents` to a file that must not exist yet, mode 0600, and syncs it.
fn write_new_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SECRET_FILE_MODE)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOW_MS: u64 = 1_700_000_000_000;

    fn key(byte: u8) -> TokenKey {
        TokenKey::from_bytes([byte; TOKEN_KEY_SIZE])
    }

    fn claims(user: u64) -> TokenClaims {
        TokenClaims {
            user: UserId(user),
            user_generation: 3,
            device_generation: 5,
        }
    }

    #[test]
    fn round_trip() {
        let key = key(7);
        let (token, expires_at_ms) = key.issue(claims(42), "phone", NOW_MS);
        assert_eq!(expires_at_ms, NOW_MS + TOKEN_LIFETIME_MS);
        assert!(token.is_ascii());
        assert!(token.len() <= TOKEN_LEN_MAX);
        assert!(
            token.starts_with(&format!("v2.42.3.5.{expires_at_ms}.")),
            "{token}"
        );
        assert_eq!(key.verify(&token, "phone", NOW_MS), Ok(claims(42)));
        assert_eq!(
            key.verify(&token, "phone", expires_at_ms - 1),
            Ok(claims(42))
        );
    }

    #[test]
    fn a_token_is_bound_to_its_device() {
        let key = key(7);
        let (token, _) = key.issue(claims(42), "phone", NOW_MS);
        assert_eq!(
            key.verify(&token, "laptop", NOW_MS),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.verify(&token, "", NOW_MS),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn longest_token_fits() {
        let max = TokenClaims {
            user: UserId(u64::MAX),
            user_generation: u64::MAX,
            device_generation: u64::MAX,
        };
        let (token, expires_at_ms) = key(1).issue(max, "d", u64::MAX);
        assert_eq!(expires_at_ms, u64::MAX);
        assert_eq!(token.len(), TOKEN_LEN_MAX);
        assert!(token.len() < TOKEN_SIZE_MAX);
        // Expires at u64::MAX: valid at any earlier time.
        assert_eq!(key(1).verify(&token, "d", NOW_MS), Ok(max));
    }

    #[test]
    fn expired_is_refused() {
        let key = key(7);
        let (token, expires_at_ms) = key.issue(claims(42), "phone", NOW_MS);
        assert_eq!(
            key.verify(&token, "phone", expires_at_ms),
            Err(TokenError::Expired)
        );
        assert_eq!(
            key.verify(&token, "phone", u64::MAX),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let key = key(7);
        let (token, expires_at_ms) = key.issue(claims(42), "phone", NOW_MS);
        let tag = token.rsplit_once('.').unwrap().1;
        // Another user id, other generations, a later expiry, a changed tag: each breaks
        // the signature.
        let other_user = format!("v2.43.3.5.{expires_at_ms}.{tag}");
        let other_user_gen = format!("v2.42.4.5.{expires_at_ms}.{tag}");
        let other_device_gen = format!("v2.42.3.6.{expires_at_ms}.{tag}");
        let later = format!("v2.42.3.5.{}.{tag}", expires_at_ms + 1);
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for forged in [other_user, other_user_gen, other_device_gen, later, flipped] {
            assert_eq!(
                key.verify(&forged, "phone", NOW_MS),
                Err(TokenError::BadSignature),
                "{forged}"
            );
        }
        // Another node's key.
        assert_eq!(
            self::key(8).verify(&token, "phone", NOW_MS),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let key = key(7);
        let (token, _) = key.issue(claims(42), "phone", NOW_MS);
        let (signed, tag) = token.rsplit_once('.').unwrap();
        let long = "9".repeat(TOKEN_SIZE_MAX * 4);
        let cases = [
            String::new(),
            ".".to_owned(),
            "...".to_owned(),
            "v2".to_owned(),
            long,
            format!("v1{}.{tag}", &signed[2..]),
            format!("v1.42.{}.{tag}", NOW_MS),
            format!("{signed}.{}", tag.to_uppercase()),
            format!("{signed}.{}", &tag[1..]),
            format!("{signed}.{tag}0"),
            format!("{signed}.{}g", &tag[1..]),
            format!("{signed}.7.{tag}"),
            format!("v2.+42.3.5.{}.{tag}", NOW_MS),
            format!("v2.042.3.5.{}.{tag}", NOW_MS),
            format!("v2..3.5.{}.{tag}", NOW_MS),
            format!("v2.42.3.5.-1.{tag}"),
            format!("v2.18446744073709551616.3.5.{}.{tag}", NOW_MS),
            format!("v2.42.3.5.{}.{tag}", "1".repeat(21)),
            "v2.42.3.5.1.\u{e9}\u{e9}".to_owned(),
        ];
        for case in &cases {
            assert_eq!(
                key.verify(case, "phone", NOW_MS),
                Err(TokenError::Malformed),
                "{case:?}"
            );
        }
    }

    #[test]
    fn padded_key_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?". HMAC
        // zero-pads short keys, so "Jefe" followed by zeros is the same key.
        let mut key = [0u8; TOKEN_KEY_SIZE];
        key[..4].copy_from_slice(b"Jefe");
        let tag = TokenKey::from_bytes(key).sign_raw(b"what do ya want for nothing?");
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(parse_tag(expected), Some(tag));
    }

    #[test]
    fn key_file_persists() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let first = TokenKey::load_or_create(&data_dir).unwrap();
        let path = data_dir.join(SECRET_FILE_NAME);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), TOKEN_KEY_SIZE as u64);
        assert_eq!(meta.permissions().mode() & 0o777, SECRET_FILE_MODE);
        let (token, _) = first.issue(claims(5), "d", NOW_MS);
        let again = TokenKey::load_or_create(&data_dir).unwrap();
        assert_eq!(again.issue(claims(5), "d", NOW_MS).0, token);
        assert_eq!(again.verify(&token, "d", NOW_MS), Ok(claims(5)));
        // Only the key file is left behind.
        let names: Vec<_> = fs::read_dir(&data_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SECRET_FILE_NAME]);
    }

    #[test]
    fn racing_creators_agree() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Barrier::new(4);
            let tokens: Vec<String> = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            let key = TokenKey::load_or_create(dir.path()).unwrap();
                            key.issue(claims(1), "d", NOW_MS).0
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert!(tokens.windows(2).all(|w| w[0] == w[1]), "{tokens:?}");
            let on_disk = TokenKey::load_or_create(dir.path()).unwrap();
            assert_eq!(on_disk.issue(claims(1), "d", NOW_MS).0, tokens[0]);
        }
    }

    #[test]
    fn wrong_length_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE_NAME);
        for len in [0, TOKEN_KEY_SIZE - 1, TOKEN_KEY_SIZE + 1] {
            fs::write(&path, vec![1u8; len]).unwrap();
            let error = TokenKey::load_or_create(dir.path()).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
            // Not replaced: the operator decides.
            assert_eq!(fs::read(&path).unwrap().len(), len);
        }
    }
}
