//! Sealing of what revocation needs (GitHub tokens, Vault accessors) and of latchkey's own
//! signing keys: AES-256-GCM under the sealing key.
//!
//! Blob layout: `version (1) ‖ key id (8) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The key id is the
//! first 8 bytes of SHA-256 of the key, so a blob names the key that sealed it and rotation
//! (`previous_key_files`) can still open old blobs. The associated data binds a blob to its row
//! (the credential id), so a sealed handle copied onto another row does not open.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealing key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("sealed blob is malformed")]
    Malformed,
    #[error("sealed blob was made with key {0}, which is neither the current nor a previous sealing key")]
    UnknownKey(String),
    #[error("sealed blob does not open: wrong key or it belongs to another record")]
    Open,
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

struct SealKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey({})", hex::encode(self.id))
    }
}

/// The current sealing key and the previous ones that may still open blobs.
#[derive(Debug)]
pub struct Sealer {
    current: SealKey,
    previous: Vec<SealKey>,
}

impl Sealer {
    /// Loads the current key and the previous keys. A missing current key is an error: only
    /// `latchkey init` and `latchkey dev` create one.
    pub fn load(current: &Path, previous: &[PathBuf]) -> Result<Sealer, SealError> {
        Ok(Sealer {
            current: read_key(current)?,
            previous: previous.iter().map(|p| read_key(p)).collect::<Result<_, _>>()?,
        })
    }

    /// A sealer from raw key bytes (tests and `dev`).
    pub fn from_bytes(key: &[u8; 32]) -> Sealer {
        Sealer { current: make_key(key), previous: Vec::new() }
    }

    /// The id of the current key, hex.
    pub fn key_id(&self) -> String {
        hex::encode(self.current.id)
    }

    /// The id (hex) of the key a blob was sealed with, read from its header; `None` for a blob
    /// too short to have one.
    pub fn key_id_of(blob: &[u8]) -> Option<String> {
        (blob.len() >= HEADER_LEN && blob[0] == VERSION).then(|| hex::encode(&blob[1..1 + KEY_ID_LEN]))
    }

    /// Whether a blob was sealed with the current key: once every stored blob is, the previous
    /// keys can be dropped from the configuration.
    pub fn is_current(&self, blob: &[u8]) -> bool {
        blob.len() >= HEADER_LEN && blob[0] == VERSION && blob[1..1 + KEY_ID_LEN] == self.current.id
    }

    /// Opens a blob sealed with a previous key and seals its content again with the current key,
    /// under the same associated data. `Ok(None)` when the blob is already under the current key.
    pub fn reseal(&self, aad: &[u8], blob: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        if self.is_current(blob) {
            return Ok(None);
        }
        let plain = zeroize_on_drop(self.open(aad, blob)?);
        Ok(Some(self.seal(aad, &plain.0)))
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system random source works");
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.push(VERSION);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        out.extend_from_slice(&body);
        out
    }

    pub fn open(&self, aad: &[u8], blob: &[u8]) -> Result<Vec<u8>, SealError> {
        if blob.len() < HEADER_LEN + AES_256_GCM.tag_len() || blob[0] != VERSION {
            return Err(SealError::Malformed);
        }
        let id = &blob[1..1 + KEY_ID_LEN];
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(hex::encode(id)))?;
        let nonce =
            Nonce::try_assume_unique_for_key(&blob[1 + KEY_ID_LEN..HEADER_LEN]).map_err(|_| SealError::Malformed)?;
        let mut body = blob[HEADER_LEN..].to_vec();
        let plain = key.key.open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// Plaintext held only for the moment of a re-seal, overwritten when dropped.
struct Plain(Vec<u8>);

fn zeroize_on_drop(v: Vec<u8>) -> Plain {
    Plain(v)
}

impl Drop for Plain {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // `black_box` keeps the compiler from eliding the wipe of a buffer about to be freed.
            *b = std::hint::black_box(0);
        }
    }
}

/// Writes a new random key to `path` (mode 0600), refusing to overwrite one.
pub fn generate_key_file(path: &Path) -> Result<(), SealError> {
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).expect("the system random source works");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| SealError::Write { path: path.to_owned(), source })?;
    writeln!(file, "{}", STANDARD.encode(key)).map_err(|source| SealError::Write { path: path.to_owned(), source })
}

fn read_key(path: &Path) -> Result<SealKey, SealError> {
    let err = |message: String| SealError::Key { path: path.to_owned(), message };
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(if e.kind() == std::io::ErrorKind::NotFound {
            "not found; `latchkey init` creates one".into()
        } else {
            e.to_string()
        })
    })?;
    let bytes = STANDARD.decode(text.trim()).map_err(|_| err("not base64".into()))?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| err("must hold 32 bytes, base64-encoded".into()))?;
    Ok(make_key(&key))
}

fn make_key(key: &[u8; 32]) -> SealKey {
    let digest = Sha256::digest(key);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is a valid AES-256 key");
    SealKey { id, key: LessSafeKey::new(unbound) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding_to_the_record() {
        let s = Sealer::from_bytes(&[7; 32]);
        let blob = s.seal(b"cred-1", b"ghs_secret");
        assert!(!blob.windows(10).any(|w| w == b"ghs_secret"), "plaintext visible in blob");
        assert_eq!(s.open(b"cred-1", &blob).unwrap(), b"ghs_secret");
        assert!(matches!(s.open(b"cred-2", &blob), Err(SealError::Open)));
        let mut tampered = blob.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(s.open(b"cred-1", &tampered), Err(SealError::Open)));
    }

    #[test]
    fn previous_keys_still_open_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old.key"), dir.path().join("new.key"));
        generate_key_file(&old).unwrap();
        generate_key_file(&new).unwrap();
        let blob = Sealer::load(&old, &[]).unwrap().seal(b"a", b"x");
        let rotated = Sealer::load(&new, std::slice::from_ref(&old)).unwrap();
        assert_eq!(rotated.open(b"a", &blob).unwrap(), b"x");
        assert!(matches!(Sealer::load(&new, &[]).unwrap().open(b"a", &blob), Err(SealError::UnknownKey(_))));

        // Re-sealing moves the blob to the new key, after which the old key is not needed.
        assert!(!rotated.is_current(&blob));
        let resealed = rotated.reseal(b"a", &blob).unwrap().expect("an old blob is re-sealed");
        assert!(rotated.is_current(&resealed));
        assert_eq!(Sealer::key_id_of(&resealed), Some(rotated.key_id()));
        assert_eq!(Sealer::load(&new, &[]).unwrap().open(b"a", &resealed).unwrap(), b"x");
        assert!(rotated.reseal(b"a", &resealed).unwrap().is_none(), "a current blob is left alone");
        assert!(rotated.reseal(b"b", &blob).is_err(), "the associated data still binds the blob");
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate_key_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(generate_key_file(&path).is_err());
        assert!(matches!(Sealer::load(&dir.path().join("missing"), &[]), Err(SealError::Key { .. })));
    }
}
