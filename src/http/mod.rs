//! HTTP: routes, request parsing, admin authentication and error mapping. Handlers are thin:
//! parse, call one domain function, map the result.

mod admin;
mod audit;
mod dev;
pub mod error;
pub mod ip_limit;
mod kills;
mod release;
mod signing_keys;
mod token;

use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::app::AppState;

pub use admin::explain_body;
pub use dev::DevIssuer;
pub use token::{MAX_BODY, MAX_TOKEN, parse_exchange};

/// The id of one request: on every response (`x-request-id`), error body and log line.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The public API. `/healthz`, `/readyz` and `/metrics` are added here too unless the config
/// puts them on `admin_listen`.
pub fn router(app: AppState, dev_issuer: Option<DevIssuer>) -> Router {
    let mut router = Router::new()
        .route("/v1/token", post(token::exchange))
        .route("/v1/release", post(release::release))
        .route("/v1/introspect", post(token::introspect))
        .route("/.well-known/jwks.json", get(token::jwks))
        .route("/openapi.json", get(openapi))
        .route("/v1/audit", get(audit::events))
        .route("/v1/audit/checkpoints", post(audit::checkpoint).get(audit::checkpoints))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/credentials", get(audit::credentials))
        .route("/v1/exchanges", get(audit::exchanges))
        .route("/v1/explain", post(admin::explain))
        .route("/v1/kills", post(kills::create).get(kills::list))
        .route("/v1/kills/{id}", get(kills::show))
        .route("/v1/kills/{id}/lift", post(kills::lift))
        .route("/v1/credentials/{id}/revoke", post(kills::revoke))
        .route("/v1/signing-keys", get(signing_keys::list))
        .route("/v1/signing-keys/rotate", post(signing_keys::rotate))
        .route("/v1/signing-keys/{kid}/retire", post(signing_keys::retire))
        .with_state(app.clone());
    if app.config.server.admin_listen.is_none() {
        router = router.merge(ops_router(app.clone()));
    }
    if let Some(dev) = dev_issuer {
        router = router.merge(dev::router(app.clone(), dev));
    }
    router.layer(middleware::from_fn(request_id)).layer(axum::extract::DefaultBodyLimit::max(token::MAX_BODY))
}

/// `/healthz`, `/readyz`, `/metrics`.
pub fn ops_router(app: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app)
        .layer(middleware::from_fn(request_id))
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7().simple().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Every event logged while the request is handled carries its id.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    tracing::debug!(parent: &span, %method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    response
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    for h in app.verifier.health() {
        let l = crate::metrics::IssuerLabels { issuer: h.id.clone() };
        app.metrics.jwks_refreshes.get_or_create(&l).set(h.refreshes as i64);
        app.metrics.jwks_refresh_failures.get_or_create(&l).set(h.refresh_failures as i64);
        app.metrics.issuer_up.get_or_create(&l).set(i64::from(h.last_error.is_none() && h.keys > 0));
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.encode())
}

/// Ready when the store answers, the policies are loaded and the kill rules are fresh. Issuer
/// key health is reported, but one issuer's outage does not make every replica unready.
async fn readyz(State(app): State<AppState>) -> Response {
    // A probe gives up after a second (Kubernetes' default): a store that does not answer by
    // then is down as far as readiness goes.
    let store = match tokio::time::timeout(std::time::Duration::from_millis(800), app.ledger.ping()).await {
        Ok(answer) => answer,
        Err(_) => Err(crate::ledger::LedgerError::Unavailable("the store did not answer within 800ms".into())),
    };
    let kills = app.kills.get();
    let kill_age_ms = i64::try_from(kills.age().as_millis()).unwrap_or(i64::MAX);
    let kills_fresh = kills.age() <= crate::server::KILL_FRESHNESS;
    let policies = app.policies.get().policies.len();
    let ready = store.is_ok() && kills_fresh;
    let issuers: Vec<_> = app
        .verifier
        .health()
        .into_iter()
        .map(|h| {
            json!({
                "id": h.id, "keys": h.keys, "last_refresh_ok": h.last_refresh_ok, "last_error": h.last_error,
            })
        })
        .collect();
    let body = json!({
        "ready": ready,
        "store": store.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "policies": policies,
        "kill_rules": kills.state.rules.len(),
        "kill_rules_age_ms": kill_age_ms,
        "issuers": issuers,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}
