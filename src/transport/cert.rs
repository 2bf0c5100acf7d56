//! `tern cert generate`: a private CA and a server certificate for a node with no public
//! name. Clients pin the CA (`--ca ca.pem`); the node serves `server.pem` and `server.key`.
//!
//! Keys are ECDSA P-256 (cheap handshakes on a Cortex-A53, unlike RSA-2048), signed with
//! ring. Both certificates are valid from the start of this year for `CERT_VALIDITY_YEARS`.
//! The CA's key is written too (0600) so more server certificates can be issued from it
//! later; keep it off the node if the node does not need it.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long the generated certificates are valid, in years from January 1st of this year.
pub const CERT_VALIDITY_YEARS: i32 = 10;

/// The files `generate` wrote.
#[derive(Debug, Clone)]
pub struct GeneratedFiles {
    /// The CA certificate clients pin.
    pub ca_cert: PathBuf,
    /// The CA's private key (0600).
    pub ca_key: PathBuf,
    /// The server certificate followed by the CA certificate (`serve --tls-cert`).
    pub server_cert: PathBuf,
    /// The server's private key, PKCS#8 (0600, `serve --tls-key`).
    pub server_key: PathBuf,
}

#[derive(Debug)]
pub enum CertError {
    /// No names, or a name that cannot go into a certificate.
    Invalid(String),
    /// Key generation or signing failed.
    Sign(rcgen::Error),
    /// Writing a file failed (it exists already, or the folder is not writable).
    Write { path: PathBuf, error: io::Error },
}

impl std::fmt::Display for CertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertError::Invalid(message) => write!(f, "{message}"),
            CertError::Sign(e) => write!(f, "certificate: {e}"),
            CertError::Write { path, error } => write!(f, "write {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for CertError {}

/// Writes `ca.pem`, `ca.key`, `server.pem` and `server.key` into `dir` (created if
/// missing) for a server reachable as each of `names` (DNS names or IP addresses). Refuses
/// to overwrite existing files, so a CA that clients pin is never replaced by accident.
pub fn generate(dir: &Path, names: &[String]) -> Result<GeneratedFiles, CertError> {
    if names.is_empty() {
        return Err(CertError::Invalid(
            "give at least one --name (a host name or IP address clients connect to)".into(),
        ));
    }
    let year = this_year();
    let validity = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(year, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + CERT_VALIDITY_YEARS, 1, 1);
    };

    let ca_key = KeyPair::generate().map_err(CertError::Sign)?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tern private CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(CertError::Sign)?;

    let server_key = KeyPair::generate().map_err(CertError::Sign)?;
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|e| CertError::Invalid(format!("--name: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(CertError::Sign)?;

    std::fs::create_dir_all(dir).map_err(|error| CertError::Write {
        path: dir.to_path_buf(),
        error,
    })?;
    let files = GeneratedFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    for path in [
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
    ] {
        if path.exists() {
            return Err(CertError::Write {
                path: path.clone(),
                error: io::Error::new(io::ErrorKind::AlreadyExists, "exists already"),
            });
        }
    }
    write_new(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&files.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    write_new(&files.server_cert, chain.as_bytes(), 0o644)?;
    write_new(
        &files.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(files)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|error| CertError::Write {
        path: path.to_path_buf(),
        error,
    })
}

/// The current year (UTC), close enough for a validity start on January 1st.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // 365.2425 days per year; off by at most a day around New Year, which the
    // January 1st start absorbs.
    1970 + (secs / 31_556_952) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_no_names_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            generate(dir.path(), &[]),
            Err(CertError::Invalid(_))
        ));
        generate(dir.path(), &["127.0.0.1".to_owned()]).unwrap();
        let again = generate(dir.path(), &["127.0.0.1".to_owned()]);
        assert!(matches!(again, Err(CertError::Write { .. })), "{again:?}");
    }

    #[test]
    fn keys_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), &["box.local".to_owned()]).unwrap();
        for key in [&files.ca_key, &files.server_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}", key.display());
        }
    }
}
