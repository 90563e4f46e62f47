//! `POST /v1/release`: no admin key; the caller proves itself with the exchange's release
//! token. Parses the body (JSON or form), calls [`crate::release::release`], maps the result.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::RequestId;
use super::error::ApiError;
use crate::app::AppState;
use crate::release::{self, ReleaseRequest};

pub(super) async fn release(State(app): State<AppState>, req: Request) -> Response {
    let rid = req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    let (parts, body) = req.into_parts();
    let result = async {
        let body = super::token::read_body(body, &rid).await?;
        let request: ReleaseRequest = if super::token::is_json(&parts.headers) {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::invalid_request(format!("malformed JSON body: {e}"), &rid))?
        } else {
            serde_urlencoded::from_bytes(&body)
                .map_err(|e| ApiError::invalid_request(format!("malformed form body: {e}"), &rid))?
        };
        release::release(&app, request, &rid).await.map_err(|e| ApiError::from_release(e, &rid))
    }
    .await;
    match result {
        Ok(released) => {
            let mut response = Json(released).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => e.into_response(),
    }
}
