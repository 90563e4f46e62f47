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

    /// Whether the selector matches an identity (and, for `credential`, one of its credentials).
    pub fn matches(&self, s: &KillSubject) -> bool {
        fn glob(pattern: &Option<String>, value: Option<&str>) -> bool {
            match pattern {
                None => true,
                Some(p) => match (Pattern::parse(p), value) {
                    (Ok(p), Some(v)) => p.matches(v),
                    // A pattern that does not compile was refused at creation; an absent value
                    // never matches.
                    _ => false,
                },
            }
        }
        if self.all {
            return true;
        }
        glob(&self.agent, Some(&s.agent))
            && glob(&self.capability, Some(&s.capability))
            && glob(&self.subject, Some(&s.subject))
            && glob(&self.repository, s.repository.as_deref())
            && glob(&self.workflow, s.workflow.as_deref())
            && self.issuer.as_ref().is_none_or(|i| *i == s.issuer)
            && self.claims.iter().all(|(name, p)| {
                let value = s.claims.get(name).and_then(crate::policy::claim_text);
                glob(&Some(p.clone()), value.as_deref())
            })
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
