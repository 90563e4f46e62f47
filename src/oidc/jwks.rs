//! JSON Web Keys: the set an issuer publishes, and the decoded keys we verify with.

use std::collections::HashMap;

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents, VerificationAlgorithm};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::OidcError;

/// The signing algorithms latchkey can verify. Only asymmetric ones exist here, so `none` and
/// HMAC cannot even be represented: a token naming them fails to parse its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    pub const ALL: [Alg; 9] =
        [Alg::Rs256, Alg::Rs384, Alg::Rs512, Alg::Ps256, Alg::Ps384, Alg::Ps512, Alg::Es256, Alg::Es384, Alg::EdDsa];

    /// The JOSE name (`RS256`), compared exactly (RFC 7515 names are case-sensitive).
    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|alg| alg.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn rsa(self) -> Option<&'static RsaParameters> {
        // The 2048-bit floor is aws-lc-rs's, and we also check it when a key is loaded.
        Some(match self {
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }

    /// For EC and OKP keys: the curve and the verification algorithm (JWS uses the fixed-width
    /// `r || s` signature encoding, not DER).
    fn curve(self) -> Option<(&'static str, usize, &'static dyn VerificationAlgorithm)> {
        match self {
            Alg::Es256 => Some(("P-256", 32, &signature::ECDSA_P256_SHA256_FIXED)),
            Alg::Es384 => Some(("P-384", 48, &signature::ECDSA_P384_SHA384_FIXED)),
            Alg::EdDsa => Some(("Ed25519", 32, &signature::ED25519)),
            _ => None,
        }
    }
}

/// One JSON Web Key as published, with only the members we use. Unknown members are ignored.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ops: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

impl std::fmt::Debug for Jwk {
    // Identifies the key without printing its material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwk").field("kty", &self.kty).field("kid", &self.kid).field("alg", &self.alg).finish()
    }
}

/// A JWK set (RFC 7517 §5), as an issuer publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

impl JwkSet {
    /// Parses a JWKS document. Members of `keys` that are not JWKs we understand (encryption
    /// keys with odd members, future key types) are skipped rather than failing the whole set,
    /// so that one exotic key cannot take an issuer's other keys away.
    pub fn from_json(bytes: &[u8]) -> Result<JwkSet, OidcError> {
        #[derive(Deserialize)]
        struct Raw {
            keys: Vec<Value>,
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|_| OidcError::BadDocument {
            what: "JWKS",
            reason: "not a JSON object with a keys array".into(),
        })?;
        Ok(JwkSet { keys: raw.keys.into_iter().filter_map(|k| serde_json::from_value(k).ok()).collect() })
    }
}

/// One decoded key, ready for one algorithm.
struct KeyEntry {
    alg: Alg,
    key: ParsedPublicKey,
}

/// The decoded keys of one issuer: every published signing key that fits an algorithm of the
/// issuer's allow-list, parsed once so that verification does no key parsing.
#[derive(Default)]
pub(crate) struct KeySet {
    entries: Vec<KeyEntry>,
    /// `kid` → indexes into `entries` (one per algorithm the key fits).
    by_kid: HashMap<String, Vec<usize>>,
    /// Entries of keys published without a `kid`.
    no_kid: Vec<usize>,
    /// Number of published keys that are usable.
    usable: usize,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet").field("keys", &self.usable).field("kids", &self.by_kid.keys()).finish()
    }
}

/// Why no key verified a signature.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyMiss {
    /// No key with this `kid` (or, without a `kid`, no key for the algorithm): worth a refresh.
    Missing,
    /// The `kid` exists but its key does not fit the token's algorithm.
    WrongAlg,
    /// No `kid` and several keys fit the algorithm.
    Ambiguous,
    BadSignature,
}

impl KeySet {
    /// Decodes `jwks` for the algorithms in `allowed`. A key is used only if it is a signing key
    /// (`use` absent or `sig`, `key_ops` absent or containing `verify`), its own `alg` (when
    /// present) is the algorithm, and its type and curve fit the algorithm.
    pub fn build(jwks: &JwkSet, allowed: &[Alg]) -> KeySet {
        let mut set = KeySet::default();
        for jwk in &jwks.keys {
            if jwk.use_.as_deref().is_some_and(|u| u != "sig")
                || jwk.key_ops.as_ref().is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
            {
                continue;
            }
            let mut any = false;
            for &alg in allowed {
                if jwk.alg.as_deref().is_some_and(|a| a != alg.name()) {
                    continue;
                }
                let Some(key) = decode_key(jwk, alg) else { continue };
                let index = set.entries.len();
                set.entries.push(KeyEntry { alg, key });
                match &jwk.kid {
                    Some(kid) => set.by_kid.entry(kid.clone()).or_default().push(index),
                    None => set.no_kid.push(index),
                }
                any = true;
            }
            if any {
                set.usable += 1;
            } else {
                tracing::debug!(oidc.kid = ?jwk.kid, oidc.kty = %jwk.kty, "published key fits no allowed algorithm; ignored");
            }
        }
        set
    }

    /// Number of published keys in use.
    pub fn len(&self) -> usize {
        self.usable
    }

    /// Verifies `signature` over `message` with the key the token names.
    ///
    /// With a `kid`, only keys with that `kid` are tried. Without one, the token is accepted only
    /// if exactly one key of the set fits the algorithm, so that a token cannot make us try every
    /// key until one happens to fit.
    pub fn verify(&self, kid: Option<&str>, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), KeyMiss> {
        match kid {
            Some(kid) => {
                let indexes = self.by_kid.get(kid).ok_or(KeyMiss::Missing)?;
                let mut fitting = indexes.iter().map(|&i| &self.entries[i]).filter(|e| e.alg == alg).peekable();
                if fitting.peek().is_none() {
                    return Err(KeyMiss::WrongAlg);
                }
                // Normally one key; an issuer that publishes one kid twice gets each tried.
                if fitting.any(|e| e.key.verify_sig(message, signature).is_ok()) {
                    Ok(())
                } else {
                    Err(KeyMiss::BadSignature)
                }
            }
            None => {
                let mut fitting = self.entries.iter().filter(|e| e.alg == alg);
                match (fitting.next(), fitting.next()) {
                    (None, _) => Err(KeyMiss::Missing),
                    (Some(_), Some(_)) => Err(KeyMiss::Ambiguous),
                    (Some(entry), None) => entry.key.verify_sig(message, signature).map_err(|_| KeyMiss::BadSignature),
                }
            }
        }
    }
}

fn b64(field: &Option<String>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(field.as_deref()?).ok()
}

/// Decodes `jwk` for `alg`, or `None` when the key does not fit it or is malformed.
fn decode_key(jwk: &Jwk, alg: Alg) -> Option<ParsedPublicKey> {
    if let Some(params) = alg.rsa() {
        if jwk.kty != "RSA" {
            return None;
        }
        let n = b64(&jwk.n)?;
        let e = b64(&jwk.e)?;
        // Refuse weak (< 2048 bits) and absurd (> 8192 bits) moduli when loading, not only when
        // verifying, so that they never count as usable keys.
        let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
        if !(2048..=8192).contains(&bits) {
            return None;
        }
        return RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }.to_parsed_public_key(params).ok();
    }
    let (crv, len, algorithm) = alg.curve()?;
    if jwk.crv.as_deref() != Some(crv) {
        return None;
    }
    let x = b64(&jwk.x)?;
    if x.len() != len {
        return None;
    }
    match alg {
        Alg::EdDsa if jwk.kty == "OKP" => ParsedPublicKey::new(algorithm, x).ok(),
        Alg::Es256 | Alg::Es384 if jwk.kty == "EC" => {
            let y = b64(&jwk.y)?;
            if y.len() != len {
                return None;
            }
            // Uncompressed SEC1 point; aws-lc-rs checks that it is on the curve.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            ParsedPublicKey::new(algorithm, point).ok()
        }
        _ => None,
    }
}
