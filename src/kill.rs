//! Kill rules: selectors over identities that block new exchanges and revoke what they hold.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::policy::glob::Pattern;

/// What a kill rule names. Every field given must match; at least one must be given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Exact issuer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Uuid>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// The globs above, compiled on first use: selectors are matched on every exchange.
    #[serde(skip)]
    pub compiled: CompiledCache,
}

/// Compiled patterns of a selector; `None` when one does not compile (such a selector matches
/// nothing, and was refused at creation anyway).
#[derive(Clone, Default)]
pub struct CompiledCache(std::sync::OnceLock<Option<Compiled>>);

/// A cache is not part of a selector's value.
impl PartialEq for CompiledCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for CompiledCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

#[derive(Clone)]
struct Compiled {
    agent: Option<Pattern>,
    capability: Option<Pattern>,
    subject: Option<Pattern>,
    repository: Option<Pattern>,
    workflow: Option<Pattern>,
    claims: Vec<(String, Pattern)>,
}

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("a selector needs at least one field")]
    EmptySelector,
    #[error("selector field {field}: {message}")]
    BadPattern { field: String, message: String },
}

impl Selector {
    /// Refuses an empty selector and patterns that do not compile.
    pub fn validate(&self) -> Result<(), KillError> {
        let globs = [
            ("agent", &self.agent),
            ("capability", &self.capability),
            ("subject", &self.subject),
            ("repository", &self.repository),
            ("workflow", &self.workflow),
        ];
        let any = self.all
            || self.issuer.is_some()
            || self.credential.is_some()
            || !self.claims.is_empty()
            || globs.iter().any(|(_, v)| v.is_some());
        if !any {
            return Err(KillError::EmptySelector);
        }
        let claim_globs = self.claims.iter().map(|(k, v)| (k.as_str(), Some(v)));
        for (field, value) in globs.iter().map(|(f, v)| (*f, v.as_ref())).chain(claim_globs) {
            if let Some(v) = value {
                Pattern::parse(v).map_err(|message| KillError::BadPattern { field: field.to_owned(), message })?;
            }
        }
        Ok(())
    }

    fn compiled(&self) -> Option<&Compiled> {
        self.compiled
            .0
            .get_or_init(|| {
                let p = |v: &Option<String>| v.as_deref().map(Pattern::parse).transpose();
                Some(Compiled {
                    agent: p(&self.agent).ok()?,
                    capability: p(&self.capability).ok()?,
                    subject: p(&self.subject).ok()?,
                    repository: p(&self.repository).ok()?,
                    workflow: p(&self.workflow).ok()?,
                    claims: self
                        .claims
                        .iter()
                        .map(|(k, v)| Pattern::parse(v).map(|p| (k.clone(), p)))
                        .collect::<Result<_, _>>()
                        .ok()?,
                })
            })
            .as_ref()
    }

    /// Whether the selector matches an identity (and, for `credential`, one of its credentials).
    pub fn matches(&self, s: &KillSubject) -> bool {
        // An absent value never matches a pattern.
        fn glob(pattern: &Option<Pattern>, value: Option<&str>) -> bool {
            match (pattern, value) {
                (None, _) => true,
                (Some(p), Some(v)) => p.matches(v),
                (Some(_), None) => false,
            }
        }
        if self.all {
            return true;
        }
        let Some(c) = self.compiled() else { return false };
        glob(&c.agent, Some(&s.agent))
            && glob(&c.capability, Some(&s.capability))
            && glob(&c.subject, Some(&s.subject))
            && glob(&c.repository, s.repository.as_deref())
            && glob(&c.workflow, s.workflow.as_deref())
            && self.issuer.as_ref().is_none_or(|i| *i == s.issuer)
            && c.claims
                .iter()
                .all(|(name, p)| s.claims.get(name).and_then(crate::policy::claim_text).is_some_and(|v| p.matches(&v)))
            && self.credential.is_none_or(|c| s.credentials.contains(&c))
    }
}

/// The identity a selector is matched against: one exchange's claims and credentials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KillSubject {
    pub agent: String,
    pub capability: String,
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub credentials: Vec<Uuid>,
}

/// A kill rule as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KillRule {
    pub id: Uuid,
    pub selector: Selector,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub lifted_at: Option<DateTime<Utc>>,
}

impl KillRule {
    /// In force at `now`: not lifted and not lapsed.
    pub fn in_force(&self, now: DateTime<Utc>) -> bool {
        self.lifted_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> KillSubject {
        KillSubject {
            agent: "pr-reviewer".into(),
            capability: "pr-review".into(),
            issuer: "github-actions".into(),
            subject: "repo:acme/widgets:ref:refs/heads/main".into(),
            repository: Some("acme/widgets".into()),
            workflow: None,
            claims: serde_json::json!({ "actor": "octocat", "run_id": 42 }).as_object().cloned().unwrap_or_default(),
            credentials: vec![],
        }
    }

    #[test]
    fn every_given_field_must_match() {
        let s = subject();
        let sel = |v: serde_json::Value| serde_json::from_value::<Selector>(v).unwrap();
        assert!(sel(serde_json::json!({ "agent": "pr-*" })).matches(&s));
        assert!(sel(serde_json::json!({ "agent": "pr-reviewer", "repository": "acme/*" })).matches(&s));
        assert!(!sel(serde_json::json!({ "agent": "pr-reviewer", "repository": "acme/other" })).matches(&s));
        assert!(!sel(serde_json::json!({ "repository": "acme" })).matches(&s), "globs match whole values");
        assert!(!sel(serde_json::json!({ "workflow": "*" })).matches(&s), "an absent value never matches");
        assert!(sel(serde_json::json!({ "claims": { "run_id": "42" } })).matches(&s), "numbers by their text");
        assert!(!sel(serde_json::json!({ "claims": { "missing": "*" } })).matches(&s));
        assert!(!sel(serde_json::json!({ "issuer": "github" })).matches(&s), "issuer is exact");
        assert!(sel(serde_json::json!({ "all": true })).matches(&s));
    }

    #[test]
    fn an_empty_selector_and_a_bad_pattern_are_refused() {
        assert!(matches!(Selector::default().validate(), Err(KillError::EmptySelector)));
        let bad = Selector { agent: Some("re:(".into()), ..Default::default() };
        assert!(matches!(bad.validate(), Err(KillError::BadPattern { .. })));
        assert!(!bad.matches(&subject()));
    }
}
