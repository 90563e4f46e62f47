//! Subject-token verification (DESIGN step 2): configured issuers only, keys only from their
//! discovery document and JWKS, an algorithm allow-list, audience, lifetime and required claims.

mod claims;

pub use claims::{Claims, UnverifiedClaims, VerifiedClaims};
