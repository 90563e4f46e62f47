//! `GET /v1/signing-keys`, `POST /v1/signing-keys/rotate` and
//! `POST /v1/signing-keys/{kid}/retire`: the `jwt` backend's signing keys, listed (auditor),
//! rotated and retired (admin). Never a private key.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::admin::{authorize, request_id};
use super::error::ApiError;
use crate::app::AppState;
use crate::config::Role;

/// `GET /v1/signing-keys` (auditor): every published key and its phase.
pub(super) async fn list(State(app): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    match authorize(&app, &parts, Role::Auditor, &rid).await {
        Ok(_) => Json(json!({ "items": app.jwt.views(app.clock.now()) })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/signing-keys/rotate` (admin): 201 with the new key and every published key.
pub(super) async fn rotate(State(app): State<AppState>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, _) = req.into_parts();
    let result = async {
        let who = authorize(&app, &parts, Role::Admin, &rid).await?;
        let key = crate::keys::rotate_signing_key(&app, &who.actor, &rid)
            .await
            .map_err(|e| ApiError::from_signing_key(e, &rid))?;
        let keys = app.jwt.views(app.clock.now());
        Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({ "key": key, "items": keys }))).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/signing-keys/{kid}/retire` (admin), `{"reason"}`: 200 with what the retirement did
/// (the replacement key, if one was made, and the credentials it ended) and every published key.
pub(super) async fn retire(State(app): State<AppState>, Path(kid): Path<String>, req: Request) -> Response {
    let rid = request_id(&req);
    let (parts, body) = req.into_parts();
    let result = async {
        let who = authorize(&app, &parts, Role::Admin, &rid).await?;
        let r: crate::keys::RetireRequest = super::kills::json_body(body, false, &rid).await?;
        let retired = crate::keys::retire_signing_key(&app, &kid, r, &who.actor, &rid)
            .await
            .map_err(|e| ApiError::from_signing_key(e, &rid))?;
        let keys = app.jwt.views(app.clock.now());
        Ok::<_, ApiError>(Json(json!({ "retired": retired, "items": keys })).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
