//! The auditors' routes: `/v1/credentials`, `/v1/exchanges`, `/v1/audit` (the event log),
//! `/v1/audit/checkpoints` and `/v1/audit/verify`. Each handler authorizes (which records the call
//! in the audit trail), parses, calls one function of [`crate::records`] or
//! [`crate::checkpoint`], and maps the result.

use axum::Json;
use axum::extract::{RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::admin::{authorize, request_id};
use super::error::ApiError;
use crate::app::AppState;
use crate::checkpoint::{self, VerifyRequest};
use crate::config::Role;
use crate::records;

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn query<T: DeserializeOwned>(raw: Option<&str>, rid: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::invalid_request(format!("malformed query: {e}"), rid))
}

/// `GET /v1/credentials` (auditor).
pub(super) async fn credentials(State(app): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let f = query(raw.as_deref(), &rid)?;
            let page = records::credentials(&app, f).await.map_err(|e| ApiError::from_records(e, &rid))?;
            Ok(Json(page).into_response())
        }
        .await,
    )
}

/// `GET /v1/exchanges` (auditor).
pub(super) async fn exchanges(State(app): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let f = query(raw.as_deref(), &rid)?;
            let page = records::exchanges(&app, f).await.map_err(|e| ApiError::from_records(e, &rid))?;
            Ok(Json(page).into_response())
        }
        .await,
    )
}

/// `GET /v1/audit` (auditor): the hash-chained event log, oldest first, filtered.
pub(super) async fn events(State(app): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            let who = authorize(&app, &parts, Role::Auditor, &rid).await?;
            tracing::debug!(admin = %who.name, role = who.role.as_str(), "audit read");
            let f = query(raw.as_deref(), &rid)?;
            let page = records::events(&app, f).await.map_err(|e| ApiError::from_records(e, &rid))?;
            Ok(Json(page).into_response())
        }
        .await,
    )
}

/// `POST /v1/audit/checkpoints` (admin): sign the chain head now. 201 with the checkpoint.
pub(super) async fn checkpoint(State(app): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            let who = authorize(&app, &parts, Role::Admin, &rid).await?;
            let c =
                checkpoint::take(&app, &who.actor, Some(&rid)).await.map_err(|e| ApiError::from_checkpoint(e, &rid))?;
            Ok((StatusCode::CREATED, Json(c)).into_response())
        }
        .await,
    )
}

/// `GET /v1/audit/checkpoints` (auditor): the stored checkpoints and the key that signs new ones.
pub(super) async fn checkpoints(State(app): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let items = app.ledger.checkpoints().await.map_err(|e| ApiError::unavailable(e.to_string(), &rid))?;
            let key = app.checkpoint_key.as_ref().map(|k| {
                let p = k.public_key();
                json!({ "key_id": p.key_id(), "public_key": p.to_base64(), "algorithm": "Ed25519" })
            });
            Ok(Json(json!({ "items": items, "next_cursor": null, "signing_key": key })).into_response())
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    from: Option<i64>,
    to: Option<i64>,
}

/// `GET /v1/audit/verify` (auditor): recompute the chain and check the checkpoints with this
/// server's checkpoint key. 200 whatever the outcome: the report's `ok` says it.
pub(super) async fn verify(State(app): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let q: VerifyQuery = query(raw.as_deref(), &rid)?;
            let keys = app.checkpoint_key.as_ref().map(|k| vec![k.public_key()]).unwrap_or_default();
            let request = VerifyRequest { from: q.from, to: q.to, keys, extra_checkpoints: Vec::new() };
            let report =
                checkpoint::verify(&*app.ledger, request).await.map_err(|e| ApiError::unavailable(e.to_string(), &rid))?;
            if !report.ok {
                tracing::error!(problems = report.problems.len(), first = ?report.problems.first(), "audit.verify_failed");
            }
            Ok(Json(report).into_response())
        }
        .await,
    )
}
