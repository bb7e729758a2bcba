//! TLS: the rustls configurations of both listeners and of the upstream client, and the
//! development CA that keygate generates when no certificate is configured.
//!
//! Crypto provider: ring (see Cargo.toml for why), TLS 1.3 and 1.2 only, and only its ECDHE +
//! AEAD suites. Listeners offer ALPN `h2` and `http/1.1` and issue session tickets.
//! The upstream side trusts the system roots plus an optional extra CA file; there is no way
//! to turn verification off.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSource;

/// A TLS setup failure, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files of a generated development CA and the server certificate issued from it.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevCertPaths {
    /// The conventional names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        DevCertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        }
    }
}

/// A certificate authority that issues server certificates (the development CA, and the
/// per-run CA of the tests).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new ECDSA P-256 CA.
    pub fn generate(common_name: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues an ECDSA P-256 server certificate for `names` (DNS names or IP addresses);
    /// returns (certificate PEM, private key PEM).
    pub fn issue_server(&self, names: &[&str]) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Strict validators (sslyze, the `cryptography` package) refuse a leaf without it.
        params.use_authority_key_identifier_extension = true;
        // Browsers and Mozilla's TLS guidelines accept at most 398 days; 365 with renewal below.
        set_validity(&mut params, SERVER_CERT_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// Makes sure the development CA and server certificate exist in `dir`, generating what is
/// missing. Returns their paths and whether anything was generated.
pub fn ensure_dev_certs(dir: &Path) -> Result<(DevCertPaths, bool), TlsError> {
    let paths = DevCertPaths::in_dir(dir);
    let all = [
        &paths.ca_cert,
        &paths.ca_key,
        &paths.server_cert,
        &paths.server_key,
    ];
    if all.iter().all(|p| p.exists()) && !due_for_renewal(&paths.server_cert) {
        return Ok((paths, false));
    }
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let ca = if paths.ca_cert.exists() && paths.ca_key.exists() {
        let cert = fs::read_to_string(&paths.ca_cert).map_err(|e| file_err(&paths.ca_cert, e))?;
        let key = fs::read_to_string(&paths.ca_key).map_err(|e| file_err(&paths.ca_key, e))?;
        Ca::from_pem(&cert, &key)?
    } else {
        let ca = Ca::generate("keygate local development CA")?;
        write_file(&paths.ca_key, ca.key_pem.as_bytes(), true)?;
        write_file(&paths.ca_cert, ca.cert_pem.as_bytes(), false)?;
        ca
    };
    let (cert, key) = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
    write_file(&paths.server_key, key.as_bytes(), true)?;
    write_file(&paths.server_cert, cert.as_bytes(), false)?;
    Ok((paths, true))
}

/// Days a generated server certificate is valid.
const SERVER_CERT_DAYS: i64 = 365;

/// Whether the development server certificate was written more than 300 days ago (it is valid
/// for 365): then it is issued again from the same CA, so clients that trust the CA carry on.
fn due_for_renewal(cert: &Path) -> bool {
    let age = fs::metadata(cert)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    age.is_some_and(|a| a > std::time::Duration::from_secs(300 * 86_400))
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = options.open(path).map_err(|e| file_err(path, e))?;
    f.write_all(bytes).map_err(|e| file_err(path, e))?;
    f.sync_all().map_err(|e| file_err(path, e))
}

/// Where the listener certificate comes from, resolved: files to load, and the CA to trust
/// when it was generated.
pub struct ListenerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA file a client should trust, when keygate generated the certificate.
    pub dev_ca: Option<PathBuf>,
}

/// Resolves the configured TLS source, generating development certificates when needed.
pub fn resolve_listener_cert(source: &TlsSource) -> Result<ListenerCert, TlsError> {
    match source {
        TlsSource::Files { cert, key } => Ok(ListenerCert {
            cert: cert.clone(),
            key: key.clone(),
            dev_ca: None,
        }),
        TlsSource::Generated { dir } => {
            let (p, _generated) = ensure_dev_certs(dir)?;
            Ok(ListenerCert {
                cert: p.server_cert,
                key: p.server_key,
                dev_ca: Some(p.ca_cert),
            })
        }
    }
}

/// The listeners' rustls configuration from a PEM chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e))?;
    if chain.is_empty() {
        return Err(file_err(cert, "holds no PEM certificate"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| file_err(key, format!("does not fit the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

/// When the first certificate in the PEM file `cert` expires, in Unix seconds.
pub fn not_after(cert: &Path) -> Result<i64, TlsError> {
    let first = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .next()
        .ok_or_else(|| file_err(cert, "holds no PEM certificate"))?
        .map_err(|e| file_err(cert, e))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| file_err(cert, format!("is not a readable X.509 certificate: {e}")))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The upstream client's rustls configuration: system roots plus `extra_ca`, ALPN set by the
/// connector.
pub fn upstream_client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping an unreadable system root certificate");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
            let cert = cert.map_err(|e| file_err(path, e))?;
            roots
                .add(cert)
                .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(file_err(path, "holds no PEM certificate"));
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted root certificates for upstreams: install ca-certificates or set upstream.ca_file");
    }
    tracing::debug!(system_roots = added, "upstream trust store loaded");
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_generated_once_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let (p, generated) = ensure_dev_certs(dir.path()).unwrap();
        assert!(generated);
        let first = fs::read(&p.server_cert).unwrap();
        let (_, again) = ensure_dev_certs(dir.path()).unwrap();
        assert!(!again);
        assert_eq!(first, fs::read(&p.server_cert).unwrap());
        server_config(&p.server_cert, &p.server_key).unwrap();
        upstream_client_config(Some(&p.ca_cert)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&p.ca_key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Losing the server certificate reissues it from the same CA.
        fs::remove_file(&p.server_cert).unwrap();
        let ca_before = fs::read(&p.ca_cert).unwrap();
        let (_, generated) = ensure_dev_certs(dir.path()).unwrap();
        assert!(generated);
        assert_eq!(ca_before, fs::read(&p.ca_cert).unwrap());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        fs::write(&cert, "garbage").unwrap();
        let err = server_config(&cert, &dir.path().join("k.pem"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("c.pem"), "{err}");
        let err = upstream_client_config(Some(&cert)).err().unwrap();
        assert!(err.to_string().contains("c.pem"), "{err}");
    }
}
