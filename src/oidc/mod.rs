//! Subject-token verification (DESIGN step 2): configured issuers only, keys only from their
//! discovery document and JWKS, an algorithm allow-list, audience, lifetime and required claims.
//!
//! The order of checks is part of the contract:
//! 1. size and shape of the token, then the header: `crit` and key-bearing headers (`jku`,
//!    `x5u`, `jwk`, `x5c`) are refused, and so is any algorithm that is not asymmetric;
//! 2. `iss` routes to exactly one configured issuer (exact string comparison), whose
//!    `algorithms` must list the header's `alg`;
//! 3. the signature is checked with that issuer's cached keys (an unknown `kid` may refresh them,
//!    at most once per issuer per 30 s);
//! 4. only then are the claims looked at: `aud`, `exp`, `nbf`, `iat`, the maximum age, `jti` for
//!    single-use issuers, and the issuer's `required_claims`.
//!
//! Spending the `jti` is the ledger's job, once the exchange succeeds.

mod claims;
mod discovery;
mod error;
mod jwks;
mod token;
mod verify;

#[cfg(test)]
mod tests;

pub use claims::{Claims, UnverifiedClaims, VerifiedClaims};
pub use discovery::{HttpKeySource, KeySource, MAX_DISCOVERY_BYTES, MAX_JWKS_BYTES, StaticKeySource, http_client};
pub use error::OidcError;
pub use jwks::{Alg, Jwk, JwkSet};
pub use token::{check_unverified, peek_issuer};
pub use verify::{IssuerHealth, Verifier};

/// Largest subject token accepted (DESIGN step 1), checked before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: i64 = 60;
/// An unknown `kid` refreshes an issuer's keys at most this often.
pub const MIN_REFRESH_INTERVAL_SECS: i64 = 30;
/// Longest `jti` accepted: it becomes a key in the ledger.
pub const MAX_JTI_CHARS: usize = 255;
