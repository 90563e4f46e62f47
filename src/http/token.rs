//! `POST /v1/token` (RFC 8693), `POST /v1/introspect` (RFC 7662) and the JWKS.

use axum::Json;
use axum::body::{Body, Bytes};
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::RequestId;
use super::admin::authorize;
use super::error::ApiError;
use crate::app::AppState;
use crate::broker::{self, ExchangeRequest, Exchanged};
use crate::config::Role;
use crate::policy::Narrowing;

/// Bodies larger than this are refused before they are parsed.
pub const MAX_BODY: usize = 64 * 1024;
/// Subject tokens larger than this are refused before they are decoded.
pub const MAX_TOKEN: usize = 16 * 1024;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TOKEN_TYPES: [&str; 2] = ["urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"];

/// The token-exchange parameters, from a form or a JSON body.
#[derive(Debug, Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    scope: Option<String>,
    /// A JSON object; in the form encoding, a string holding JSON.
    narrow: Option<Value>,
    actor_token: Option<String>,
    // Accepted and ignored: latchkey answers with the capability's credentials.
    #[allow(dead_code)]
    resource: Option<Value>,
    #[allow(dead_code)]
    audience: Option<Value>,
    #[allow(dead_code)]
    requested_token_type: Option<String>,
}

/// Reads a body of at most `MAX_BODY` bytes.
pub(super) async fn read_body(body: Body, request_id: &str) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request", "request body larger than 64 KiB", request_id)
    })
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")))
}

fn parse_form(headers: &HeaderMap, body: &[u8], request_id: &str) -> Result<TokenForm, ApiError> {
    if is_json(headers) {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid_request(format!("malformed JSON body: {e}"), request_id))
    } else {
        serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::invalid_request(format!("malformed form body: {e}"), request_id))
    }
}

/// Parses an exchange request body (RFC 8693 form, or JSON when `headers` say
/// `application/json`) into the request the broker takes. Pure: no I/O, no state, so that the
/// handler stays thin and hostile bodies can be fuzzed without a server.
///
/// The body must already be bounded by [`MAX_BODY`]; subject tokens over [`MAX_TOKEN`] are
/// refused here, and JSON nesting is bounded by `serde_json`'s recursion limit (128), so a body
/// of 100,000 `[` is a quick `invalid_request`, not a stack overflow.
pub fn parse_exchange(headers: &HeaderMap, body: &[u8], request_id: &str) -> Result<ExchangeRequest, ApiError> {
    parse_request(parse_form(headers, body, request_id)?, request_id)
}

fn parse_request(form: TokenForm, request_id: &str) -> Result<ExchangeRequest, ApiError> {
    let bad = |m: &str| ApiError::invalid_request(m, request_id);
    match form.grant_type.as_deref() {
        Some(GRANT_TYPE) => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be token-exchange",
                request_id,
            ));
        }
        None => return Err(bad("grant_type is required")),
    }
    if form.actor_token.is_some() {
        return Err(bad("actor_token is not supported"));
    }
    let token = form.subject_token.ok_or_else(|| bad("subject_token is required"))?;
    if token.len() > MAX_TOKEN {
        return Err(bad("subject_token larger than 16 KiB"));
    }
    match form.subject_token_type.as_deref() {
        Some(t) if TOKEN_TYPES.contains(&t) => {}
        Some(_) => return Err(bad("subject_token_type must be urn:ietf:params:oauth:token-type:jwt or :id_token")),
        None => return Err(bad("subject_token_type is required")),
    }
    let capability = form.scope.ok_or_else(|| bad("scope (the capability name) is required"))?;
    if capability.is_empty() || capability.len() > 128 || capability.contains(char::is_whitespace) {
        return Err(bad("scope must name exactly one capability"));
    }
    let narrow = match form.narrow {
        None => None,
        Some(Value::String(s)) => Some(serde_json::from_str::<Narrowing>(&s)),
        Some(v @ Value::Object(_)) => Some(serde_json::from_value::<Narrowing>(v)),
        Some(_) => return Err(bad("narrow must be a JSON object")),
    }
    .transpose()
    .map_err(|e| ApiError::invalid_request(format!("malformed narrow: {e}"), request_id))?;
    Ok(ExchangeRequest { subject_token: token.into(), capability, narrow, request_id: request_id.to_owned() })
}

pub(super) async fn exchange(State(app): State<AppState>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    // The source address's limit comes first: a flood is refused before its body is read.
    if let (Some(limiter), Some(ConnectInfo(peer))) =
        (app.per_ip.as_ref(), req.extensions().get::<ConnectInfo<SocketAddr>>())
        && let Err(refusal) = limiter.check(peer.ip(), app.clock.now())
    {
        return per_ip_refused(&app, limiter.rate(), peer.ip(), refusal, &request_id);
    }
    let (parts, body) = req.into_parts();
    let result = async {
        let body = read_body(body, &request_id).await?;
        let request = parse_exchange(&parts.headers, &body, &request_id)?;
        broker::exchange(&app, request).await.map_err(|e| ApiError::from_exchange(e, &request_id))
    }
    .await;
    app.metrics.exchange_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(exchanged) => token_response(exchanged),
        Err(e) => {
            tracing::info!(error = e.code, status = e.status.as_u16(), "exchange refused");
            e.into_response()
        }
    }
}

/// A request over `[limits] per_ip`: 429 with how long to wait, a metric every time and an audit
/// event at most once a minute per address (written in the background: a flood must not wait on,
/// or fill, the store).
fn per_ip_refused(
    app: &AppState,
    rate: crate::policy::Rate,
    ip: IpAddr,
    refusal: super::ip_limit::Refusal,
    request_id: &str,
) -> Response {
    let labels = crate::metrics::LimitLabels { capability: String::new(), limit: "per_ip".into() };
    app.metrics.limits_hit.get_or_create(&labels).inc();
    if refusal.audit {
        let mut event = crate::audit::AuditEvent::new("limit.per_ip", app.clock.now());
        event.request_id = Some(request_id.to_owned());
        event.reason = Some(format!("source address over its limit of {rate}"));
        event.detail =
            Some(json!({ "address": ip.to_string(), "retry_after_ms": refusal.retry_after.as_millis() as u64 }));
        let ledger = app.ledger.clone();
        tokio::spawn(async move {
            if let Err(e) = ledger.append_event(event).await {
                tracing::warn!(error = %e, "could not audit a per-address limit");
            }
        });
    }
    let e = broker::ExchangeError::SlowDown {
        message: "too many requests from this address; retry later".into(),
        retry_after: refusal.retry_after.max(std::time::Duration::from_secs(1)),
    };
    ApiError::from_exchange(e, request_id).into_response()
}

fn token_response(x: Exchanged) -> Response {
    let credentials: Vec<Value> = x
        .credentials
        .into_iter()
        .map(|c| {
            let mut o = Map::new();
            o.insert("id".into(), json!(c.id));
            o.insert("name".into(), json!(c.name));
            o.insert("backend".into(), json!(c.backend));
            o.insert("expires_at".into(), json!(crate::audit::format_time(c.expires_at)));
            o.insert("fingerprint".into(), json!(c.fingerprint));
            o.extend(c.secret.0);
            Value::Object(o)
        })
        .collect();
    let body = json!({
        "access_token": x.access_token.expose_secret(),
        "issued_token_type": x.issued_token_type,
        "token_type": x.token_type,
        "expires_in": x.expires_in,
        "exchange_id": x.exchange_id,
        "release_token": x.release_token.expose_secret(),
        "capability": x.capability,
        "agent": x.agent,
        "expires_at": crate::audit::format_time(x.expires_at),
        "credentials": credentials,
    });
    let mut response = Json(body).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Debug, Deserialize)]
struct IntrospectForm {
    token: Option<String>,
}

/// RFC 7662 for latchkey JWTs: active only while the signature, the lifetime and the ledger all
/// agree. Revoked or expired → `{"active": false}`, and nothing else is said.
pub(super) async fn introspect(State(app): State<AppState>, req: Request) -> Response {
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    let (parts, body) = req.into_parts();
    let result = async {
        authorize(&app, &parts, Role::Service, &request_id).await?;
        let body = read_body(body, &request_id).await?;
        let form: IntrospectForm = if is_json(&parts.headers) {
            serde_json::from_slice(&body).map_err(|_| ApiError::invalid_request("malformed JSON body", &request_id))?
        } else {
            serde_urlencoded::from_bytes(&body)
                .map_err(|_| ApiError::invalid_request("malformed form body", &request_id))?
        };
        let token = form.token.ok_or_else(|| ApiError::invalid_request("token is required", &request_id))?;
        Ok::<_, ApiError>(introspect_token(&app, &token).await)
    }
    .await;
    match result {
        Ok(body) => {
            let mut r = Json(body).into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn introspect_token(app: &AppState, token: &str) -> Value {
    let inactive = json!({ "active": false });
    let Some(claims) = app.jwt.verify(token) else { return inactive };
    let now = app.clock.now().timestamp();
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let nbf = claims.get("nbf").and_then(Value::as_i64).unwrap_or(0);
    if exp <= now || nbf > now + 60 {
        return inactive;
    }
    let Some(id) = claims.get("jti").and_then(Value::as_str).and_then(|j| uuid::Uuid::parse_str(j).ok()) else {
        return inactive;
    };
    match app.ledger.credential(id).await {
        Ok(Some(c)) if c.state == crate::ledger::CredentialState::Active && c.expires_at.timestamp() > now => {}
        _ => return inactive,
    }
    let mut body = Map::new();
    body.insert("active".into(), Value::Bool(true));
    for key in ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"] {
        if let Some(v) = claims.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    if let Some(l) = claims.get("latchkey") {
        body.insert("scope".into(), l.get("capability").cloned().unwrap_or(Value::Null));
        body.insert("latchkey".into(), l.clone());
    }
    body.insert("token_type".into(), json!("Bearer"));
    Value::Object(body)
}

pub(super) async fn jwks(State(app): State<AppState>) -> Response {
    let mut r = Json(app.jwt.jwks()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    r
}
