//! Where an issuer's keys come from: OIDC discovery and its JWKS over HTTP, or a fixed set.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::error::OidcError;
use super::jwks::JwkSet;
use crate::config::{IssuerConfig, check_issuer_url};

/// Largest discovery document we read. Real ones are a few KiB.
pub const MAX_DISCOVERY_BYTES: usize = 256 * 1024;
/// Largest JWKS we read. Real ones hold a handful of keys.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Supplies the current JWK set of one issuer. One trait, so that the development issuer of
/// `latchkey dev` and tests can stand in for HTTP.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync + fmt::Debug {
    /// The issuer's currently published keys. Called on warm-up, on an unknown `kid` (at most
    /// once per issuer per 30 s) and on periodic refresh; never per token.
    async fn fetch(&self) -> Result<JwkSet, OidcError>;
}

/// A fixed JWK set: the built-in development issuer's keys.
#[derive(Debug, Clone)]
pub struct StaticKeySource(JwkSet);

impl StaticKeySource {
    pub fn new(keys: JwkSet) -> Self {
        Self(keys)
    }

    /// From a JWKS document (`{"keys": [...]}`).
    pub fn from_json(document: &[u8]) -> Result<Self, OidcError> {
        JwkSet::from_json(document).map(Self)
    }
}

#[async_trait::async_trait]
impl KeySource for StaticKeySource {
    async fn fetch(&self) -> Result<JwkSet, OidcError> {
        Ok(self.0.clone())
    }
}

/// The HTTP client for discovery and JWKS: no redirects (a redirect could lead key retrieval
/// away from the issuer's host), connect and total timeouts so a slow issuer cannot hold a
/// refresh forever. https-except-loopback is enforced on every URL before it is requested.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, OidcError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| OidcError::Config(format!("cannot build the HTTP client: {e}")))
}

/// The fields of an OpenID Provider Metadata document (OpenID Connect Discovery 1.0 §3) that
/// key retrieval needs.
///
/// A struct of our own rather than `openidconnect`'s `CoreProviderMetadata`: that type requires
/// `authorization_endpoint` (and other members a relying party that only verifies ID tokens has
/// no use for), and GitHub Actions' discovery document has no `authorization_endpoint`, so it
/// would be refused. Unknown members are ignored.
#[derive(Debug, Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    jwks_uri: String,
}

/// Discovery plus JWKS over HTTP: the key source of every configured issuer.
///
/// Invariants: the discovery URL is derived from the configured issuer URL; the discovered
/// `issuer` must equal that URL exactly; the JWKS must come from the issuer's own origin
/// (scheme, host and port) unless the configuration names a `jwks_uri`; every URL is https, or
/// http on loopback only; no redirect is followed; responses are read incrementally and
/// abandoned past a size cap.
#[derive(Clone)]
pub struct HttpKeySource {
    client: reqwest::Client,
    issuer: String,
    discovery_url: Url,
    configured_jwks: Option<Url>,
}

impl fmt::Debug for HttpKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpKeySource")
            .field("issuer", &self.issuer)
            .field("configured_jwks", &self.configured_jwks.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
}

impl HttpKeySource {
    pub fn new(client: reqwest::Client, issuer: &IssuerConfig) -> Result<Self, OidcError> {
        let checked =
            |raw: &str| check_issuer_url(raw).map_err(|m| OidcError::Config(format!("issuer {}: {m}", issuer.id)));
        checked(&issuer.url)?;
        // `https://host/path/` and `https://host/path` both discover at
        // `https://host/path/.well-known/openid-configuration`; the `iss` comparison itself stays
        // exact against the configured string.
        let discovery_url = checked(&format!("{}/.well-known/openid-configuration", issuer.url.trim_end_matches('/')))?;
        let configured_jwks = issuer.jwks_uri.as_deref().map(checked).transpose()?;
        Ok(Self { client, issuer: issuer.url.clone(), discovery_url, configured_jwks })
    }

    async fn discover_jwks_uri(&self) -> Result<Url, OidcError> {
        let body = get_bounded(&self.client, &self.discovery_url, MAX_DISCOVERY_BYTES, "discovery").await?;
        let doc: DiscoveryDocument = serde_json::from_slice(&body).map_err(|_| OidcError::BadDocument {
            what: "discovery",
            reason: "not a JSON object with string issuer and jwks_uri".into(),
        })?;
        if doc.issuer != self.issuer {
            return Err(OidcError::IssuerMismatch { found: doc.issuer.chars().take(200).collect() });
        }
        let jwks = check_issuer_url(&doc.jwks_uri).map_err(OidcError::JwksUriNotAllowed)?;
        if jwks.origin() != self.discovery_url.origin() {
            return Err(OidcError::JwksUriNotAllowed(format!(
                "{} is not on the issuer's host (set jwks_uri in the issuer's configuration to allow it)",
                jwks.origin().ascii_serialization()
            )));
        }
        Ok(jwks)
    }
}

#[async_trait::async_trait]
impl KeySource for HttpKeySource {
    async fn fetch(&self) -> Result<JwkSet, OidcError> {
        // A configured jwks_uri is trusted as configured: no discovery is needed to find it.
        let jwks_uri = match &self.configured_jwks {
            Some(uri) => uri.clone(),
            None => self.discover_jwks_uri().await?,
        };
        let body = get_bounded(&self.client, &jwks_uri, MAX_JWKS_BYTES, "JWKS").await?;
        JwkSet::from_json(&body)
    }
}

/// GETs `url` and reads at most `max` bytes of the body, chunk by chunk, so that an oversized or
/// endless answer costs at most `max` bytes of memory.
async fn get_bounded(
    client: &reqwest::Client,
    url: &Url,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, OidcError> {
    let fetch = |e: reqwest::Error| OidcError::Fetch {
        what,
        reason: if e.is_timeout() { "timed out".into() } else { e.without_url().to_string() },
    };
    let mut response =
        client.get(url.clone()).header(reqwest::header::ACCEPT, "application/json").send().await.map_err(fetch)?;
    let status = response.status();
    if status.is_redirection() {
        return Err(OidcError::Redirect { what });
    }
    if !status.is_success() {
        return Err(OidcError::Fetch { what, reason: format!("HTTP {}", status.as_u16()) });
    }
    let too_large = OidcError::ResponseTooLarge { what, max };
    if response.content_length().is_some_and(|len| len > max as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fetch)? {
        if body.len() + chunk.len() > max {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
