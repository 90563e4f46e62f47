//! `GET /v1/signing-keys` and `POST /v1/signing-keys/rotate`: the `jwt` backend's signing keys,
//! listed (auditor) and rotated (admin). Never a private key.

use axum::Json;
use axum::extract::{Request, State};
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
