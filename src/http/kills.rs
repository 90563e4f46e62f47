//! The kill-switch routes: `/v1/kills`, `/v1/kills/{id}`, `/v1/kills/{id}/lift` and
//! `/v1/credentials/{id}/revoke`. Each handler authorizes, parses, calls one function of
//! [`crate::killswitch`] and maps its result.

use axum::Json;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::admin::{authorize, request_id};
use super::error::ApiError;
use crate::app::AppState;
use crate::config::Role;
use crate::killswitch::{self, Caller, Created, KillRequest, ListQuery, ReasonRequest};

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn parse_id(text: &str, what: &str, request_id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::invalid_request(format!("{what} id {text:?} is not a UUID"), request_id))
}

/// Reads a JSON body; an empty body is `{}` where every field is optional.
pub(super) async fn json_body<T: DeserializeOwned>(
    body: axum::body::Body,
    empty_ok: bool,
    request_id: &str,
) -> Result<T, ApiError> {
    let bytes = super::token::read_body(body, request_id).await?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) && empty_ok { b"{}" } else { &bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_request(format!("malformed request body: {e}"), request_id))
}

/// `POST /v1/kills` (security): 201 with the rule and its report, or 200 with a dry run.
pub(super) async fn create(State(app): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, body) = req.into_parts();
    respond(
        async {
            let who = authorize(&app, &parts, Role::Security, &rid).await?;
            let r: KillRequest = json_body(body, false, &rid).await?;
            let caller = Caller { key_name: &who.name, actor: &who.actor, request_id: &rid };
            match killswitch::create(&app, r, caller).await.map_err(|e| ApiError::from_kill_switch(e, &rid))? {
                Created::Rule(view) => Ok((StatusCode::CREATED, Json(view)).into_response()),
                Created::DryRun(report) => Ok(Json(report).into_response()),
            }
        }
        .await,
    )
}

/// `GET /v1/kills` (auditor).
pub(super) async fn list(State(app): State<AppState>, RawQuery(query): RawQuery, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let q: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
                .map_err(|e| ApiError::invalid_request(format!("malformed query: {e}"), &rid))?;
            let page = killswitch::list(&app, q).await.map_err(|e| ApiError::from_kill_switch(e, &rid))?;
            Ok(Json(page).into_response())
        }
        .await,
    )
}

/// `GET /v1/kills/{id}` (auditor).
pub(super) async fn show(State(app): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    respond(
        async {
            authorize(&app, &parts, Role::Auditor, &rid).await?;
            let id = parse_id(&id, "kill rule", &rid)?;
            let view = killswitch::show(&app, id).await.map_err(|e| ApiError::from_kill_switch(e, &rid))?;
            Ok(Json(view).into_response())
        }
        .await,
    )
}

/// `POST /v1/kills/{id}/lift` (security).
pub(super) async fn lift(State(app): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, body) = req.into_parts();
    respond(
        async {
            let who = authorize(&app, &parts, Role::Security, &rid).await?;
            let id = parse_id(&id, "kill rule", &rid)?;
            let r: ReasonRequest = json_body(body, false, &rid).await?;
            let caller = Caller { key_name: &who.name, actor: &who.actor, request_id: &rid };
            let view = killswitch::lift(&app, id, r, caller).await.map_err(|e| ApiError::from_kill_switch(e, &rid))?;
            Ok(Json(view).into_response())
        }
        .await,
    )
}

/// `POST /v1/credentials/{id}/revoke` (security): 202 while a revocation is under way, 200 when
/// the credential had already ended.
pub(super) async fn revoke(State(app): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, body) = req.into_parts();
    respond(
        async {
            let who = authorize(&app, &parts, Role::Security, &rid).await?;
            let id = parse_id(&id, "credential", &rid)?;
            let r: ReasonRequest = json_body(body, true, &rid).await?;
            let caller = Caller { key_name: &who.name, actor: &who.actor, request_id: &rid };
            let answer = killswitch::revoke_credential(&app, id, r, caller)
                .await
                .map_err(|e| ApiError::from_kill_switch(e, &rid))?;
            let status = if answer.accepted() { StatusCode::ACCEPTED } else { StatusCode::OK };
            Ok((status, Json(answer)).into_response())
        }
        .await,
    )
}
