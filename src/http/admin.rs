//! Admin authentication and the admin reads.
//!
//! Admin calls carry `Authorization: Bearer <admin key>`. Roles are ordered
//! `service < auditor < security < admin`. Every admin call, reads included, is an audit event
//! naming the key; a call without a valid key is one too.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::RequestId;
use super::error::ApiError;
use crate::app::AppState;
use crate::audit::AuditEvent;
use crate::config::Role;
use crate::oidc::Claims;

/// Who made an admin call.
#[derive(Debug, Clone)]
pub struct AdminIdentity {
    /// The admin key's name, or `oidc:<sub>` for a person signed in through `[admin_oidc]`.
    pub name: String,
    pub role: Role,
    /// How the audit trail names the caller: `admin-key:<name>` or `oidc:<sub>`.
    pub actor: String,
}

/// Checks the admin key against `min`, and records the call in the audit trail.
pub(super) async fn authorize(
    app: &AppState,
    parts: &Parts,
    min: Role,
    request_id: &str,
) -> Result<AdminIdentity, ApiError> {
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let mut via = "admin_key";
    let mut refused = None;
    let mut found =
        presented.and_then(|k| app.admin_keys.get().lookup(k)).map(|(n, r)| (format!("admin-key:{n}"), n, r));
    if found.is_none()
        && let Some(token) = presented.filter(|p| crate::app::AdminOidc::looks_like_token(p))
        && let Some(idp) = app.admin_oidc.get().as_ref()
    {
        via = "admin_oidc";
        match idp.authenticate(token).await {
            Ok((user, role)) => found = Some((user.clone(), user, role)),
            Err(why) => refused = Some(why),
        }
    }
    let mut event = AuditEvent::new("admin.call", app.clock.now());
    event.request_id = Some(request_id.to_owned());
    event.reason = refused;
    let (result, outcome) = match found {
        None => (Err(ApiError::unauthorized(request_id)), "unauthenticated"),
        Some((actor, name, role)) => {
            event.actor = Some(actor.clone());
            if role >= min {
                (Ok(AdminIdentity { name, role, actor }), "allowed")
            } else {
                let msg = format!("this call needs the {} role", min.as_str());
                (Err(ApiError::forbidden(msg, request_id)), "forbidden")
            }
        }
    };
    event.decision = Some(outcome.into());
    event.detail = Some(
        json!({ "method": parts.method.as_str(), "path": parts.uri.path(), "required_role": min.as_str(), "via": via }),
    );
    if let Err(e) = app.ledger.append_event(event).await {
        // An admin call that cannot be audited does not happen.
        tracing::error!(error = %e, "could not audit an admin call");
        return Err(ApiError::unavailable("the audit trail is unavailable", request_id));
    }
    result
}

pub(super) fn request_id(req: &Request) -> String {
    req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    capability: String,
    /// Claims as a token would carry them; or give `subject_token`.
    claims: Option<serde_json::Map<String, Value>>,
    /// A subject token, verified exactly as an exchange verifies it; its `jti` is not spent.
    subject_token: Option<String>,
    /// The issuer id the claims are taken to come from; defaults to the policy's.
    issuer: Option<String>,
    narrow: Option<crate::policy::Narrowing>,
}

/// `POST /v1/explain`: the full decision trace for given claims or a subject token, and whether
/// a kill rule would block it, without minting or spending anything.
pub(super) async fn explain(State(app): State<AppState>, req: Request) -> Response {
    let request_id = request_id(&req);
    let (parts, body) = req.into_parts();
    let result = async {
        let who = authorize(&app, &parts, Role::Admin, &request_id).await?;
        let body = super::token::read_body(body, &request_id).await?;
        let r: ExplainRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid_request(format!("malformed explain request: {e}"), &request_id))?;
        tracing::info!(admin = %who.name, capability = %r.capability, "explain");
        let policies = app.policies.get();
        let (claims, token) = match (r.claims, r.subject_token) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ApiError::invalid_request("give claims or subject_token, not both", &request_id));
            }
            (None, Some(token)) => match app.verifier.verify(&token).await {
                Ok(v) => {
                    let single_use = app.verifier.issuer(&v.issuer).is_none_or(|i| i.single_use);
                    let spent = match (single_use, v.jti()) {
                        (true, Some(jti)) => app
                            .ledger
                            .jti_spent(&v.issuer, jti, &r.capability)
                            .await
                            .map_err(|e| ApiError::unavailable(e.to_string(), &request_id))?,
                        _ => false,
                    };
                    let outcome = if spent { "replayed" } else { "valid" };
                    (v.claims().clone(), json!({ "outcome": outcome, "issuer": v.issuer, "jti_spent": spent }))
                }
                Err(e) => {
                    let token = json!({ "outcome": "rejected", "error": e.code(), "detail": e.to_string() });
                    return Ok(json!({
                        "capability": r.capability, "decision": "deny", "reason": "subject_token_rejected",
                        "allowed": null, "policy_sha256": null, "trace": [], "token": token, "kill_rule": null,
                    }));
                }
            },
            (Some(map), None) => {
                let issuer = r
                    .issuer
                    .or_else(|| policies.policies.get(&r.capability).map(|p| p.issuer.clone()))
                    .unwrap_or_default();
                let claims = match app.config.issuers.iter().find(|i| i.id == issuer) {
                    Some(i) => Claims::from_map_with(
                        &i.id,
                        i.kind,
                        i.repository_claim.as_deref(),
                        i.workflow_claim.as_deref(),
                        map,
                    ),
                    None => Claims::from_map(&issuer, crate::config::IssuerKind::Generic, map),
                };
                (claims, Value::Null)
            }
        };
        let decision = policies.decide(&r.capability, &claims, r.narrow.as_ref());
        let mut body = explain_body(&decision);
        // Step 3 as the exchange would apply it: the rules in force now, against this identity.
        let mut kill_rule = Value::Null;
        if let crate::policy::Outcome::Allow { agent, .. } = &decision.outcome {
            let subject = crate::broker::claims_kill_subject(&claims, agent, &r.capability);
            let now = app.clock.now();
            if let Some(rule) =
                app.kills.get().state.rules.iter().find(|k| k.in_force(now) && k.selector.matches(&subject))
            {
                kill_rule = json!(rule.id);
                body["decision"] = json!("deny");
                body["reason"] = json!("killed");
            }
        }
        if token["outcome"] == "replayed" {
            body["decision"] = json!("deny");
            body["reason"] = json!("replayed_jti");
        }
        body["token"] = token;
        body["kill_rule"] = kill_rule;
        Ok::<_, ApiError>(body)
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A decision as JSON: what `/v1/explain` answers and `policy explain --json` prints.
pub fn explain_body(d: &crate::policy::Decision) -> Value {
    let (decision, reason, grants) = match &d.outcome {
        crate::policy::Outcome::Allow { agent, ttl, grants, .. } => (
            "allow",
            Value::Null,
            json!({
                "agent": agent,
                "ttl_seconds": ttl.as_secs(),
                "grants": grants.iter().map(|g| json!({"name": g.name, "spec": g.spec, "ttl_seconds": g.ttl.as_secs()})).collect::<Vec<_>>(),
            }),
        ),
        crate::policy::Outcome::Deny(r) => ("deny", json!(r), Value::Null),
    };
    json!({
        "capability": d.capability,
        "decision": decision,
        "reason": reason,
        "allowed": grants,
        "policy_sha256": d.policy_sha256,
        "trace": d.trace,
    })
}
