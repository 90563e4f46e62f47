//! RFC 6749 §5.2 error bodies, and the one place where domain errors become HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::broker::ExchangeError;
use crate::killswitch::KillSwitchError;
use crate::release::ReleaseError;

/// An error answer: status, RFC 6749 error code, a short description and the request id.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: String,
    pub request_id: String,
    /// Seconds, for `429 slow_down`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, description: impl Into<String>, request_id: &str) -> Self {
        ApiError { status, code, description: description.into(), request_id: request_id.to_owned(), retry_after: None }
    }

    pub fn invalid_request(description: impl Into<String>, request_id: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description, request_id)
    }

    pub fn unauthorized(request_id: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", "a valid admin key is required", request_id)
    }

    pub fn forbidden(description: impl Into<String>, request_id: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "insufficient_scope", description, request_id)
    }

    pub fn unavailable(description: impl Into<String>, request_id: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", description, request_id)
    }

    pub fn not_found(request_id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource", request_id)
    }

    /// The mapping of kill-switch errors: 400 / 404 / 409 / 503.
    pub fn from_kill_switch(e: KillSwitchError, request_id: &str) -> Self {
        match e {
            KillSwitchError::Invalid(m) => Self::invalid_request(m, request_id),
            KillSwitchError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "not_found", m, request_id),
            KillSwitchError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m, request_id),
            KillSwitchError::Unavailable(m) => {
                // The detail is for the logs; the caller learns that nothing is known to have changed.
                tracing::error!(error = %m, "kill-switch call failed on the store");
                Self::unavailable("the store is unavailable; retry", request_id)
            }
        }
    }

    /// The mapping of release errors: 400 / 401 / 503. Every refusal is the same 401
    /// `invalid_token` with the same words, whether the exchange is unknown or the token wrong.
    pub fn from_release(e: ReleaseError, request_id: &str) -> Self {
        match e {
            ReleaseError::Invalid(m) => Self::invalid_request(m, request_id),
            ReleaseError::Refused => {
                Self::new(StatusCode::UNAUTHORIZED, "invalid_token", crate::release::REFUSED, request_id)
            }
            ReleaseError::Unavailable(m) => {
                tracing::error!(error = %m, "release failed on the store");
                Self::unavailable("the store is unavailable; retry", request_id)
            }
        }
    }

    /// The mapping of listing errors: 400 / 503.
    pub fn from_records(e: crate::records::RecordsError, request_id: &str) -> Self {
        match e {
            crate::records::RecordsError::Invalid(m) => Self::invalid_request(m, request_id),
            crate::records::RecordsError::Unavailable(e) => {
                tracing::error!(error = %e, "listing failed on the store");
                Self::unavailable("the store is unavailable; retry", request_id)
            }
        }
    }

    /// The mapping of checkpoint errors: 409 when no key is configured, else 503.
    pub fn from_checkpoint(e: crate::checkpoint::CheckpointError, request_id: &str) -> Self {
        match e {
            crate::checkpoint::CheckpointError::NotConfigured => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string(), request_id)
            }
            other => {
                tracing::error!(error = %other, "checkpoint failed");
                Self::unavailable("the checkpoint could not be taken; retry", request_id)
            }
        }
    }

    /// The mapping of signing-key errors: 400 / 404 / 409, else 503 with the detail only in
    /// the logs.
    pub fn from_signing_key(e: crate::backend::jwt::JwtKeyError, request_id: &str) -> Self {
        use crate::backend::jwt::JwtKeyError;
        match e {
            JwtKeyError::Invalid(m) => Self::invalid_request(m, request_id),
            JwtKeyError::UnknownKey(kid) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", format!("no signing key {kid}"), request_id)
            }
            JwtKeyError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m, request_id),
            other => {
                tracing::error!(error = %other, "a signing key change failed");
                Self::unavailable(
                    "the signing keys could not be changed; nothing changed that is in use; retry",
                    request_id,
                )
            }
        }
    }

    /// The mapping of exchange errors: 400 / 400 / 403 / 503.
    pub fn from_exchange(e: ExchangeError, request_id: &str) -> Self {
        let status = match e {
            ExchangeError::InvalidRequest(_) | ExchangeError::InvalidGrant(_) => StatusCode::BAD_REQUEST,
            ExchangeError::AccessDenied(_) => StatusCode::FORBIDDEN,
            ExchangeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ExchangeError::SlowDown { retry_after, .. } => {
                let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, e.code(), e.to_string(), request_id);
                // Whole seconds, rounded up: a client that waits that long finds a place.
                error.retry_after = Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0));
                return error;
            }
        };
        Self::new(status, e.code(), e.to_string(), request_id)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "error_description": self.description, "request_id": self.request_id });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
