//! Claims of a subject token, by how far they are trusted.

use serde_json::{Map, Value};

/// Claims of a subject token whose signature has not been checked.
///
/// Must only be used to find the `iss` claim, so that the right issuer's keys can be chosen;
/// nothing else in it may influence a decision.
#[derive(Debug)]
pub struct UnverifiedClaims {
    pub(crate) iss: Option<String>,
}

impl UnverifiedClaims {
    pub fn issuer(&self) -> Option<&str> {
        self.iss.as_deref()
    }
}

/// A set of claims with the canonical fields of its issuer kind mapped out.
///
/// Policies are evaluated over `Claims`. In an exchange they always come from
/// [`VerifiedClaims`]; `policy explain` and `/v1/explain` build them from claims an admin typed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Claims {
    /// The configured issuer id (`github-actions`), not the `iss` URL.
    pub issuer: String,
    /// `sub`, or empty when absent.
    pub subject: String,
    /// Canonical repository: GitHub `repository`, GitLab `project_path`.
    pub repository: Option<String>,
    /// Canonical workflow: GitHub `job_workflow_ref`, GitLab `ci_config_ref_uri`.
    pub workflow: Option<String>,
    /// Every claim of the token, as sent.
    pub claims: Map<String, Value>,
}

impl Claims {
    /// Builds claims from a JSON object, mapping the canonical fields for `kind`.
    pub fn from_map(issuer: &str, kind: crate::config::IssuerKind, claims: Map<String, Value>) -> Claims {
        Self::from_map_with(issuer, kind, None, None, claims)
    }

    /// As [`Claims::from_map`], with a `generic` issuer's configured claim names.
    pub fn from_map_with(
        issuer: &str,
        kind: crate::config::IssuerKind,
        repository_claim: Option<&str>,
        workflow_claim: Option<&str>,
        claims: Map<String, Value>,
    ) -> Claims {
        use crate::config::IssuerKind;
        let (repo_key, wf_key) = match kind {
            IssuerKind::Github => (Some("repository"), Some("job_workflow_ref")),
            IssuerKind::Gitlab => (Some("project_path"), Some("ci_config_ref_uri")),
            IssuerKind::Generic => (repository_claim, workflow_claim),
        };
        let string = |key: Option<&str>| key.and_then(|k| claims.get(k)).and_then(Value::as_str).map(str::to_owned);
        Claims {
            issuer: issuer.to_owned(),
            subject: claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned(),
            repository: string(repo_key),
            workflow: string(wf_key),
            claims,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }
}

/// Claims of a subject token whose signature, issuer, audience, lifetime, single-use and
/// required claims have all been checked. Only [`crate::oidc`] can make one.
#[derive(Debug, Clone)]
pub struct VerifiedClaims {
    pub(crate) claims: Claims,
    /// `jti`, present whenever the issuer is single-use.
    pub(crate) jti: Option<String>,
    /// `exp`, seconds since the epoch.
    pub(crate) expires_at: i64,
}

impl VerifiedClaims {
    pub fn claims(&self) -> &Claims {
        &self.claims
    }
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }
}

impl std::ops::Deref for VerifiedClaims {
    type Target = Claims;
    fn deref(&self) -> &Claims {
        &self.claims
    }
}
