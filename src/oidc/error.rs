//! Why a subject token, or an issuer's keys, were refused.

/// Every variant means the subject token was refused: the HTTP layer answers RFC 6749
/// `invalid_grant` for all of them.
///
/// `Display` is a short reason that is safe to show a caller: it never echoes the token, a claim
/// value or key material, only the names of headers, claims and configured settings. Detail that
/// could help map the configuration (which issuer's discovery failed and how) only reaches the
/// issuer health report and the logs, never the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("subject token is larger than {max} bytes")]
    TokenTooLarge { max: usize },
    #[error("malformed subject token: {0}")]
    Malformed(&'static str),
    #[error("malformed subject token: the {0} is not valid base64url")]
    BadBase64(&'static str),
    #[error("malformed subject token: the {0} is not a JSON object")]
    BadJson(&'static str),
    #[error("the token's issuer is not configured")]
    UnknownIssuer,
    #[error("signing algorithm is not allowed for this issuer")]
    AlgorithmNotAllowed,
    #[error("the {0:?} header is not accepted: keys come only from the issuer's JWKS")]
    ForbiddenHeader(&'static str),
    #[error("critical header extensions are not supported")]
    CriticalHeader,
    #[error("no key of the issuer matches the token's key id")]
    UnknownKey,
    #[error("the token names no key id and several of the issuer's keys fit")]
    AmbiguousKey,
    #[error("the token's algorithm does not fit the issuer's key")]
    KeyAlgorithmMismatch,
    #[error("the issuer's signing keys are not available")]
    KeysUnavailable,
    #[error("signature verification failed")]
    BadSignature,
    #[error("missing {0} claim")]
    MissingClaim(&'static str),
    #[error("invalid {0} claim")]
    InvalidClaim(&'static str),
    #[error("the token's audience does not include this broker")]
    AudienceMismatch,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is issued in the future")]
    IssuedInFuture,
    #[error("the token is older than the issuer's maximum token age")]
    TooOld,
    #[error("claim {0} does not have a required value")]
    RequiredClaim(String),

    // Key retrieval. These are recorded in issuer health; a token refused because of them is
    // refused with `KeysUnavailable` or `UnknownKey`.
    #[error("{what} request failed: {reason}")]
    Fetch { what: &'static str, reason: String },
    #[error("{what} answered a redirect, which is not followed")]
    Redirect { what: &'static str },
    #[error("{what} response is larger than {max} bytes")]
    ResponseTooLarge { what: &'static str, max: usize },
    #[error("{what} response is not valid: {reason}")]
    BadDocument { what: &'static str, reason: String },
    #[error("discovery document names issuer {found:?}, not the configured URL")]
    IssuerMismatch { found: String },
    #[error("jwks_uri is not allowed: {0}")]
    JwksUriNotAllowed(String),
    #[error("invalid issuer configuration: {0}")]
    Config(String),
}

impl OidcError {
    /// A stable snake_case reason for the audit trail and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::TokenTooLarge { .. } => "token_too_large",
            OidcError::Malformed(_) => "malformed_token",
            OidcError::BadBase64(_) => "malformed_base64",
            OidcError::BadJson(_) => "malformed_json",
            OidcError::UnknownIssuer => "unknown_issuer",
            OidcError::AlgorithmNotAllowed => "algorithm_not_allowed",
            OidcError::ForbiddenHeader(_) => "forbidden_header",
            OidcError::CriticalHeader => "unsupported_crit",
            OidcError::UnknownKey => "unknown_key",
            OidcError::AmbiguousKey => "ambiguous_key",
            OidcError::KeyAlgorithmMismatch => "key_algorithm_mismatch",
            OidcError::KeysUnavailable => "keys_unavailable",
            OidcError::BadSignature => "bad_signature",
            OidcError::MissingClaim(_) => "missing_claim",
            OidcError::InvalidClaim(_) => "invalid_claim",
            OidcError::AudienceMismatch => "audience_mismatch",
            OidcError::Expired => "expired",
            OidcError::NotYetValid => "not_yet_valid",
            OidcError::IssuedInFuture => "issued_in_future",
            OidcError::TooOld => "token_too_old",
            OidcError::RequiredClaim(_) => "required_claim_mismatch",
            OidcError::Fetch { .. } => "fetch_failed",
            OidcError::Redirect { .. } => "redirect_refused",
            OidcError::ResponseTooLarge { .. } => "response_too_large",
            OidcError::BadDocument { .. } => "bad_document",
            OidcError::IssuerMismatch { .. } => "discovery_issuer_mismatch",
            OidcError::JwksUriNotAllowed(_) => "jwks_uri_not_allowed",
            OidcError::Config(_) => "invalid_configuration",
        }
    }
}
