//! Subject-token verification (DESIGN step 2): configured issuers only, keys only from their
//! discovery document and JWKS, an algorithm allow-list, audience, lifetime and required claims.

mod claims;

pub use claims::{Claims, UnverifiedClaims, VerifiedClaims};
// TEMP STUB
#[derive(Debug)]
pub struct Verifier;
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct OidcError;
impl OidcError {
    pub fn code(&self) -> &'static str {
        "x"
    }
}
pub struct IssuerHealth {
    pub id: String,
    pub keys: usize,
    pub last_refresh_ok: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    pub refreshes: u64,
    pub refresh_failures: u64,
}
#[derive(Debug)]
pub struct StaticKeySource;
impl StaticKeySource {
    pub fn from_json(_: &serde_json::Value) -> Result<Self, OidcError> {
        Ok(Self)
    }
}
impl Verifier {
    pub fn new(
        _: &[crate::config::IssuerConfig],
        _: &str,
        _: std::time::Duration,
        _: std::sync::Arc<dyn crate::app::Clock>,
    ) -> Result<Self, OidcError> {
        Ok(Self)
    }
    pub fn with_key_source(self, _: &str, _: std::sync::Arc<StaticKeySource>) -> Self {
        self
    }
    pub async fn verify(&self, _: &str) -> Result<VerifiedClaims, OidcError> {
        Err(OidcError)
    }
    pub fn issuer(&self, _: &str) -> Option<&crate::config::IssuerConfig> {
        None
    }
    pub async fn refresh_all(&self) {}
    pub fn health(&self) -> Vec<IssuerHealth> {
        vec![]
    }
}
