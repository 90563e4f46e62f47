//! The compact JWS form of a subject token, taken apart without trusting any of it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::error::OidcError;
use super::jwks::Alg;
use super::{MAX_TOKEN_BYTES, UnverifiedClaims};

/// Header parameters that carry or point at a key. Honouring any of them would let the token
/// choose the key it is checked with, so a token carrying one is refused outright: keys come
/// only from the issuer's JWKS.
const KEY_BEARING_HEADERS: [&str; 4] = ["jku", "x5u", "jwk", "x5c"];

/// A subject token split into its parts. Nothing in it is trusted until the signature over
/// `signing_input` has been checked with one of the issuer's keys.
pub(crate) struct Jws<'a> {
    /// `BASE64URL(header) . BASE64URL(payload)`, the bytes the signature covers.
    pub signing_input: &'a [u8],
    pub alg: Alg,
    pub kid: Option<String>,
    pub payload: Map<String, Value>,
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for Jws<'_> {
    // Claims and the signature stay out of Debug output: a token must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jws").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// Splits `token` into its three segments after checking its size.
fn segments(token: &str) -> Result<[&str; 3], OidcError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(OidcError::TokenTooLarge { max: MAX_TOKEN_BYTES });
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => Ok([h, p, s]),
        _ => Err(OidcError::Malformed("expected three dot-separated segments")),
    }
}

fn decode(segment: &str, name: &'static str) -> Result<Vec<u8>, OidcError> {
    // Unpadded base64url only (RFC 7515 §2): padding or the standard alphabet is refused.
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| OidcError::BadBase64(name))
}

fn decode_object(segment: &str, name: &'static str) -> Result<Map<String, Value>, OidcError> {
    let bytes = decode(segment, name)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(OidcError::BadJson(name)),
    }
}

/// Parses a compact JWS and applies every check that needs no key: size, shape, encoding, and
/// the header rules (no `crit`, no key-bearing headers, an asymmetric algorithm).
pub(crate) fn parse(token: &str) -> Result<Jws<'_>, OidcError> {
    let [header_b64, payload_b64, signature_b64] = segments(token)?;
    let header = decode_object(header_b64, "header")?;

    // We implement no JWS extension, so any `crit` means the token requires processing we do
    // not do (RFC 7515 §4.1.11): refuse it, whatever it lists.
    if header.contains_key("crit") {
        return Err(OidcError::CriticalHeader);
    }
    if let Some(name) = KEY_BEARING_HEADERS.into_iter().find(|name| header.contains_key(*name)) {
        return Err(OidcError::ForbiddenHeader(name));
    }
    // `Alg::from_name` knows only asymmetric algorithms, so `none` and every HMAC algorithm are
    // refused here, before the issuer is even looked up and long before any key is.
    let alg = match header.get("alg") {
        Some(Value::String(name)) => Alg::from_name(name).ok_or(OidcError::AlgorithmNotAllowed)?,
        Some(_) => return Err(OidcError::Malformed("alg header is not a string")),
        None => return Err(OidcError::Malformed("missing alg header")),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(OidcError::Malformed("kid header is not a string")),
    };

    let payload = decode_object(payload_b64, "payload")?;
    let signature = decode(signature_b64, "signature")?;
    if signature.is_empty() {
        return Err(OidcError::Malformed("empty signature"));
    }
    let signing_input = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    Ok(Jws { signing_input, alg, kid, payload, signature })
}

/// Decodes the payload without verifying anything, only to route the token by its `iss`.
///
/// The result must not influence any decision other than choosing which issuer's keys to try:
/// [`super::Verifier::verify`] does the real checks (and routes by `iss` itself).
pub fn peek_issuer(token: &str) -> Result<UnverifiedClaims, OidcError> {
    let [_, payload_b64, _] = segments(token)?;
    let payload = decode_object(payload_b64, "payload")?;
    let iss = match payload.get("iss") {
        None => None,
        Some(Value::String(iss)) => Some(iss.clone()),
        Some(_) => return Err(OidcError::InvalidClaim("iss")),
    };
    Ok(UnverifiedClaims { iss })
}

/// Applies every check [`parse`] makes without a key (size, shape, encoding, header rules) and
/// keeps nothing: the parts of an unverified token never leave this module.
pub fn check_unverified(token: &str) -> Result<(), OidcError> {
    parse(token).map(|_| ())
}
