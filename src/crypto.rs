//! Key material: the master key, what is derived from it, and the primitives built on it.
//!
//! ```text
//!   KEYGATE_MASTER_KEY (64 hex) ──or── data/master.key (64 hex, mode 0600, created on first use)
//!                     │
//!             HKDF-SHA-256 (salt "keygate/v1")
//!        ┌────────────┼──────────────────┐
//!   "at-rest"     "key-digest"      "store-check"
//!   AES-256-GCM   HMAC-SHA-256      a fingerprint kept in the store, so that a wrong master
//!   for secrets   pepper for keys   key is a clear error at start, never silent garbage
//! ```
//!
//! Keys are `sk-` + 48 characters of `[A-Za-z0-9]` from the OS CSPRNG and are stored only as
//! their keyed digest.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The prefix of every keygate key.
pub const KEY_PREFIX: &str = "sk-";
/// Characters after the prefix.
pub const KEY_BODY_LEN: usize = 48;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The keyed digest of a key: what the store and the key cache know it by.
pub type KeyDigest = [u8; 32];

/// Why the master key could not be had. No variant carries key material.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("KEYGATE_MASTER_KEY must be exactly 64 hex characters (32 bytes)")]
    BadEnv,
    #[error("master key file {0}: must hold exactly 64 hex characters (32 bytes); is it corrupt?")]
    BadFile(PathBuf),
    #[error("master key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the operating system's random number generator failed")]
    Rng,
    /// AES-256-GCM refused to seal (a plaintext beyond its length limit).
    #[error("sealing a secret failed (AES-256-GCM refused the plaintext)")]
    Seal,
}

/// Where the master key comes from.
pub struct MasterKeySource {
    /// The value of `KEYGATE_MASTER_KEY`, when set. Read by `main`, never here, so tests never
    /// touch the process environment.
    pub env: Option<Zeroizing<String>>,
    /// The key file, created (mode 0600) when it is missing and `env` is `None`.
    pub file: PathBuf,
}

/// The master key and the keys derived from it.
pub struct MasterKey {
    at_rest: LessSafeKey,
    pepper: hmac::Key,
    audit: hmac::Key,
    check: [u8; 32],
    rng: SystemRandom,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

/// An error opening sealed data: wrong master key, or the bytes were changed.
#[derive(Debug, thiserror::Error)]
#[error("cannot decrypt a stored secret: the master key does not match or the data is corrupt")]
pub struct OpenError;

impl MasterKey {
    /// Loads the master key from the environment value or the file, creating the file with
    /// mode 0600 when neither exists.
    pub fn load_or_create(source: &MasterKeySource) -> Result<Self, MasterKeyError> {
        if let Some(hex) = &source.env {
            let bytes = decode_hex32(hex.trim()).ok_or(MasterKeyError::BadEnv)?;
            return Ok(Self::from_bytes(&bytes));
        }
        let path = &source.file;
        match fs::read_to_string(path) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                warn_if_readable_by_others(path);
                let bytes = decode_hex32(text.trim())
                    .ok_or_else(|| MasterKeyError::BadFile(path.clone()))?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = Zeroizing::new([0u8; 32]);
                SystemRandom::new()
                    .fill(bytes.as_mut())
                    .map_err(|_| MasterKeyError::Rng)?;
                write_new_key_file(path, &bytes).map_err(|source| MasterKeyError::Io {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "created a new master key file (mode 0600)");
                Ok(Self::from_bytes(&bytes))
            }
            Err(source) => Err(MasterKeyError::Io {
                path: path.clone(),
                source,
            }),
        }
    }

    /// Builds the derived keys from 32 bytes of master key.
    pub fn from_bytes(master: &[u8; 32]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"keygate/v1").extract(master);
        let at_rest = derive32(&prk, b"at-rest");
        let pepper = derive32(&prk, b"key-digest");
        let check = derive32(&prk, b"store-check");
        let audit = derive32(&prk, b"audit-trail");
        MasterKey {
            at_rest: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, at_rest.as_ref())
                    .expect("32 bytes is an AES-256 key"),
            ),
            pepper: hmac::Key::new(hmac::HMAC_SHA256, pepper.as_ref()),
            audit: hmac::Key::new(hmac::HMAC_SHA256, audit.as_ref()),
            check: *check,
            rng: SystemRandom::new(),
        }
    }

    /// The MAC of an audit event's canonical bytes (which include the previous event's MAC),
    /// under a key derived from the master key for this use only.
    pub fn audit_mac(&self, canonical: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.audit, canonical);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `mac` is the MAC of `canonical`, compared in constant time.
    pub fn audit_mac_matches(&self, canonical: &[u8], mac: &[u8]) -> bool {
        hmac::verify(&self.audit, canonical, mac).is_ok()
    }

    /// A fingerprint of the master key, safe to store: it is a one-way derivation.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.check
    }

    /// The keyed digest (HMAC-SHA-256 with the pepper) of a key.
    pub fn digest(&self, key: &str) -> KeyDigest {
        let tag = hmac::sign(&self.pepper, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Encrypts `plaintext` bound to `context` (the row it belongs to), as nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, MasterKeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| MasterKeyError::Rng)?;
        let mut buf = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.at_rest
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut body,
            )
            .map_err(|_| MasterKeyError::Seal)?;
        buf.extend_from_slice(&body);
        body.iter_mut().for_each(|b| *b = 0);
        Ok(buf)
    }

    /// Decrypts what [`MasterKey::seal`] produced for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Secret, OpenError> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut body = Zeroizing::new(rest.to_vec());
        let plain = self
            .at_rest
            .open_in_place(nonce, Aad::from(context.as_bytes()), body.as_mut_slice())
            .map_err(|_| OpenError)?;
        let text = std::str::from_utf8(plain).map_err(|_| OpenError)?;
        Ok(Secret::new(text.to_owned()))
    }

    /// A new key: `sk-` + 48 characters of `[A-Za-z0-9]`.
    pub fn generate_key(&self) -> Result<Secret, MasterKeyError> {
        let mut out = String::with_capacity(KEY_PREFIX.len() + KEY_BODY_LEN);
        out.push_str(KEY_PREFIX);
        let mut buf = [0u8; 64];
        while out.len() < KEY_PREFIX.len() + KEY_BODY_LEN {
            self.rng.fill(&mut buf).map_err(|_| MasterKeyError::Rng)?;
            for &b in &buf {
                // Rejection sampling: 248 = 4 × 62, so accepted bytes map uniformly.
                if b < 248 && out.len() < KEY_PREFIX.len() + KEY_BODY_LEN {
                    out.push(ALPHABET[(b % 62) as usize] as char);
                }
            }
        }
        buf.iter_mut().for_each(|b| *b = 0);
        Ok(Secret::new(out))
    }
}

/// Whether `key` has the shape of a keygate key. Anything else is refused before any lookup.
pub fn is_well_formed_key(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + KEY_BODY_LEN
        && key.starts_with(KEY_PREFIX)
        && key.as_bytes()[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// The preview of a key kept in the store: `sk-****` + its last four characters.
pub fn key_preview(key: &Secret) -> String {
    key.preview(KEY_PREFIX)
}

/// Compares two digests in constant time.
pub fn digests_equal(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn derive32(prk: &hkdf::Prk, info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&[info], Len32)
        .and_then(|okm| okm.fill(out.as_mut()))
        .expect("32 bytes is within HKDF-SHA-256's output limit");
    out
}

fn decode_hex32(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let bytes = decode_hex(text).filter(|b| b.len() == 32)?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    Some(out)
}

/// Hex (either case) to bytes; `None` for an odd length or a non-hex digit. Zeroized on drop:
/// it also reads master keys.
pub(crate) fn decode_hex(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() / 2));
    for pair in bytes.chunks(2) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out.push((hi * 16 + lo) as u8);
    }
    Some(out)
}

/// Bytes to lowercase hex (zeroized on drop: it also writes master keys).
pub(crate) fn encode_hex(bytes: &[u8]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn write_new_key_file(path: &Path, bytes: &[u8; 32]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut options = fs::OpenOptions::new();
    // create_new: never overwrite a key file that appeared meanwhile (that would orphan the
    // secrets sealed under it).
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let hex = encode_hex(bytes);
    file.write_all(hex.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "master key file is readable by group or others; chmod 600 it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn seal_open_round_trip_and_context_binding() {
        let k = key();
        let sealed = k.seal("ai_secret:1", b"hunter2").unwrap();
        assert_eq!(k.open("ai_secret:1", &sealed).unwrap().expose(), "hunter2");
        assert!(k.open("ai_secret:2", &sealed).is_err(), "context is bound");
        let other = MasterKey::from_bytes(&[8u8; 32]);
        assert!(
            other.open("ai_secret:1", &sealed).is_err(),
            "wrong key fails"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(k.open("ai_secret:1", &tampered).is_err());
        assert!(k.open("ai_secret:1", &[1, 2, 3]).is_err());
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_differ() {
        let k = key();
        let a = k.generate_key().unwrap();
        let b = k.generate_key().unwrap();
        assert!(is_well_formed_key(a.expose()));
        assert_ne!(a, b);
        assert_eq!(key_preview(&a).len(), "sk-****".len() + 4);
    }

    #[test]
    fn malformed_keys_are_recognised() {
        assert!(!is_well_formed_key(""));
        assert!(!is_well_formed_key("sk-short"));
        let long = format!("sk-{}", "a".repeat(47)) + "-";
        assert!(!is_well_formed_key(&long));
        assert!(!is_well_formed_key(&format!("pk-{}", "a".repeat(48))));
        assert!(is_well_formed_key(&format!("sk-{}", "a".repeat(48))));
    }

    #[test]
    fn digest_depends_on_the_master_key() {
        let a = MasterKey::from_bytes(&[1u8; 32]).digest("sk-x");
        let b = MasterKey::from_bytes(&[2u8; 32]).digest("sk-x");
        assert!(!digests_equal(&a, &b));
        assert!(digests_equal(&a, &a));
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/master.key");
        let src = MasterKeySource {
            env: None,
            file: file.clone(),
        };
        let a = MasterKey::load_or_create(&src).unwrap();
        let b = MasterKey::load_or_create(&src).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(&file, "not hex").unwrap();
        let err = MasterKey::load_or_create(&src).unwrap_err();
        assert!(matches!(err, MasterKeyError::BadFile(_)), "{err}");
    }

    #[test]
    fn env_overrides_file_and_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let src = MasterKeySource {
            env: Some(Zeroizing::new("ab".repeat(32))),
            file: dir.path().join("master.key"),
        };
        MasterKey::load_or_create(&src).unwrap();
        assert!(
            !src.file.exists(),
            "no file is created when the env var is set"
        );
        let bad = MasterKeySource {
            env: Some(Zeroizing::new("zz".repeat(32))),
            file: dir.path().join("master.key"),
        };
        assert!(matches!(
            MasterKey::load_or_create(&bad),
            Err(MasterKeyError::BadEnv)
        ));
    }
}
