//! Evaluation: claims against one compiled policy, then the caller's narrowing.
//!
//! Deny by default: the only path to [`Outcome::Allow`] is through every check below, in order
//! (issuer, `[match]`, `[exclude]`, `condition`, narrowing). Each check leaves a [`TraceStep`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::load::{MAX_REPOSITORIES, MIN_AWS_TTL, MIN_TTL, check_repository_name};
use super::{
    Authorized, AuthorizedGrant, BackendKind, ClaimRule, Condition, Decision, DenyReason, GithubRepositories,
    GrantNarrowing, GrantSpec, Level, Narrowing, Outcome, Policy, PolicySet, TraceStep, VaultGrant, claim_text,
};
use crate::oidc::Claims;

/// How one claim fared against one rule.
pub(super) enum Eval {
    Matched,
    NotMatched,
    Absent,
    /// An array, object or `null`: no text to compare.
    NoText(&'static str),
}

impl ClaimRule {
    pub(super) fn evaluate<'c>(&self, claims: &'c Claims) -> (Eval, Option<&'c Value>) {
        let Some(value) = claims.get(&self.claim) else { return (Eval::Absent, None) };
        let eval = match value {
            Value::Array(_) => Eval::NoText("array"),
            Value::Object(_) => Eval::NoText("object"),
            Value::Null => Eval::NoText("null"),
            // Strings are borrowed; only numbers and booleans need their text built.
            Value::String(s) => matched(self, s),
            other => match claim_text(other) {
                Some(text) => matched(self, &text),
                None => Eval::NoText("non-text"),
            },
        };
        (eval, Some(value))
    }
}

fn matched(rule: &ClaimRule, text: &str) -> Eval {
    if rule.patterns.iter().any(|p| p.matches(text)) { Eval::Matched } else { Eval::NotMatched }
}

pub(super) fn decide(set: &PolicySet, capability: &str, claims: &Claims, narrow: Option<&Narrowing>) -> Decision {
    let Some(policy) = set.policies.get(capability) else {
        return Decision {
            capability: capability.to_owned(),
            outcome: Outcome::Deny(DenyReason::UnknownCapability),
            trace: vec![TraceStep {
                rule: "capability".to_owned(),
                claim: None,
                value: Some(Value::String(capability.to_owned())),
                expected: None,
                passed: false,
                note: Some("no policy for this capability".to_owned()),
            }],
            policy_sha256: None,
        };
    };
    let mut trace = Vec::with_capacity(policy.matches.len() + policy.excludes.len() + 3);
    let outcome = evaluate(policy, claims, narrow, &mut trace);
    Decision { capability: capability.to_owned(), outcome, trace, policy_sha256: Some(policy.sha256.clone()) }
}

fn evaluate(policy: &Policy, claims: &Claims, narrow: Option<&Narrowing>, trace: &mut Vec<TraceStep>) -> Outcome {
    // Issuer: a policy admits tokens of one issuer only, whatever the claims say.
    let issuer_ok = claims.issuer == policy.issuer;
    trace.push(TraceStep {
        rule: "issuer".to_owned(),
        claim: None,
        value: Some(Value::String(claims.issuer.clone())),
        expected: Some(Value::String(policy.issuer.clone())),
        passed: issuer_ok,
        note: (!issuer_ok).then(|| "the token comes from another issuer".to_owned()),
    });
    if !issuer_ok {
        return Outcome::Deny(DenyReason::WrongIssuer);
    }

    // [match]: every key must match. All keys are checked so that the trace shows every miss.
    let mut all_matched = true;
    for rule in &policy.matches {
        let (eval, value) = rule.evaluate(claims);
        let note = match eval {
            Eval::Matched => None,
            Eval::NotMatched => Some("no pattern matches".to_owned()),
            Eval::Absent => Some("claim absent".to_owned()),
            Eval::NoText(kind) => Some(format!("{kind} claims never match")),
        };
        all_matched &= note.is_none();
        trace.push(claim_step("match", rule, value, note));
    }
    if !all_matched {
        return Outcome::Deny(DenyReason::NoMatch);
    }

    // [exclude]: any key matching denies. A claim that cannot be compared denies too: an
    // exclusion must not be escaped by leaving a claim out or changing its type (fail closed).
    let mut excluded = false;
    for rule in &policy.excludes {
        let (eval, value) = rule.evaluate(claims);
        let note = match eval {
            Eval::NotMatched => None,
            Eval::Matched => Some("excluded".to_owned()),
            Eval::Absent => Some("claim absent: excluded (fail closed)".to_owned()),
            Eval::NoText(kind) => Some(format!("{kind} claim cannot be compared: excluded (fail closed)")),
        };
        excluded |= note.is_some();
        trace.push(claim_step("exclude", rule, value, note));
    }
    if excluded {
        return Outcome::Deny(DenyReason::Excluded);
    }

    if let Some(condition) = &policy.condition {
        let note = run_condition(condition, claims).err();
        let passed = note.is_none();
        trace.push(TraceStep {
            rule: "condition".to_owned(),
            claim: None,
            value: None,
            expected: Some(Value::String(condition.source.clone())),
            passed,
            note,
        });
        if !passed {
            return Outcome::Deny(DenyReason::Condition);
        }
    }

    // Narrowing works on copies; an `AuthorizedGrant` is made only once everything passed.
    let mut grants: Vec<(String, GrantSpec, Duration)> =
        policy.grants.iter().map(|(name, spec)| (name.clone(), spec.clone(), policy.ttl)).collect();
    if let Some(narrow) = narrow {
        for (name, wanted) in &narrow.0 {
            let Some((_, spec, ttl)) = grants.iter_mut().find(|(n, _, _)| n == name) else {
                trace.push(TraceStep {
                    rule: format!("narrow.{name}"),
                    claim: None,
                    value: None,
                    expected: Some(Value::Array(policy.grants.iter().map(|(n, _)| Value::from(n.as_str())).collect())),
                    passed: false,
                    note: Some("the policy has no grant of this name".to_owned()),
                });
                return Outcome::Deny(DenyReason::NarrowingWider);
            };
            if !narrow_grant(name, wanted, spec, ttl, policy.ttl, trace) {
                return Outcome::Deny(DenyReason::NarrowingWider);
            }
        }
    }

    // DESIGN step 6: aws is minted last (its sessions cannot be revoked directly, so it is the
    // grant least worth minting before another fails). A stable sort keeps policy order otherwise.
    grants.sort_by_key(|(_, spec, _)| spec.backend() == BackendKind::Aws);
    // The exchange lasts as long as its longest credential.
    let ttl = grants.iter().map(|(_, _, t)| *t).max().unwrap_or(policy.ttl);
    Outcome::Allow {
        agent: policy.agent.clone(),
        ttl,
        limits: policy.limits,
        grants: grants
            .into_iter()
            .map(|(name, spec, ttl)| AuthorizedGrant { name, spec, ttl, _authorized: Authorized(()) })
            .collect(),
    }
}

fn claim_step(section: &str, rule: &ClaimRule, value: Option<&Value>, note: Option<String>) -> TraceStep {
    let passed = note.is_none();
    TraceStep {
        rule: format!("{section}.{}", rule.claim),
        claim: Some(rule.claim.clone()),
        value: value.cloned(),
        expected: Some(rule.expected.clone()),
        passed,
        note,
    }
}

/// Runs the condition with `claims` bound to the claim map. Anything but `true` denies.
pub(super) fn run_condition(condition: &Condition, claims: &Claims) -> Result<(), String> {
    let mut ctx = cel::Context::with_env(super::load::CEL_ENV.clone());
    let map = cel::to_value(&claims.claims).map_err(|e| format!("claims cannot be given to CEL: {e}"))?;
    ctx.add_variable_from_value("claims", map);
    match condition.program.execute(&ctx) {
        Ok(cel::Value::Bool(true)) => Ok(()),
        Ok(cel::Value::Bool(false)) => Err("condition is false".to_owned()),
        Ok(other) => Err(format!("condition returned {:?}, not a bool", other.type_of())),
        Err(e) => Err(format!("CEL error: {e}")),
    }
}

/// Applies one grant's narrowing in place; `false` (with a failing trace step) when any part is
/// wider than the policy or does not apply to the grant's backend.
fn narrow_grant(
    name: &str,
    wanted: &GrantNarrowing,
    spec: &mut GrantSpec,
    ttl: &mut Duration,
    policy_ttl: Duration,
    trace: &mut Vec<TraceStep>,
) -> bool {
    let mut step = |field: &str, value: Value, expected: Option<Value>, result: Result<(), String>| {
        let passed = result.is_ok();
        trace.push(TraceStep {
            rule: format!("narrow.{name}.{field}"),
            claim: None,
            value: Some(value),
            expected,
            passed,
            note: result.err(),
        });
        passed
    };
    let not_for = |backend: BackendKind| Err(format!("does not apply to a {backend} grant"));
    let backend = spec.backend();

    if let Some(repos) = &wanted.repositories {
        let value = Value::from(repos.clone());
        let (expected, result) = match spec {
            GrantSpec::Github(g) => {
                let expected = match &g.repositories {
                    GithubRepositories::All => Value::from("*"),
                    GithubRepositories::Names(n) => Value::from(n.clone()),
                    GithubRepositories::Ids(ids) => Value::from(ids.clone()),
                };
                let result = narrow_repositories(repos, &g.repositories).map(|r| g.repositories = r);
                (Some(expected), result)
            }
            _ => (None, not_for(backend)),
        };
        if !step("repositories", value, expected, result) {
            return false;
        }
    }

    if let Some(perms) = &wanted.permissions {
        let value = serde_json::to_value(perms).unwrap_or(Value::Null);
        let (expected, result) = match spec {
            GrantSpec::Github(g) => {
                let expected = serde_json::to_value(&g.permissions).ok();
                let result = narrow_permissions(perms, &g.permissions).map(|()| g.permissions = perms.clone());
                (expected, result)
            }
            _ => (None, not_for(backend)),
        };
        if !step("permissions", value, expected, result) {
            return false;
        }
    }

    if let Some(policies) = &wanted.policies {
        let value = Value::from(policies.clone());
        let (expected, result) = match spec {
            GrantSpec::Vault(VaultGrant::Token { policies: allowed, .. }) => {
                let expected = Some(Value::from(allowed.clone()));
                let result = narrow_subset(policies, allowed).map(|p| *allowed = p);
                (expected, result)
            }
            GrantSpec::Vault(VaultGrant::Secret { .. }) => (None, Err("does not apply to a vault secret grant".into())),
            _ => (None, not_for(backend)),
        };
        if !step("policies", value, expected, result) {
            return false;
        }
    }

    if let Some(text) = &wanted.ttl {
        let expected = Some(Value::String(humantime::format_duration(policy_ttl).to_string()));
        let min = if backend == BackendKind::Aws { MIN_AWS_TTL } else { MIN_TTL };
        let result = match humantime::parse_duration(text) {
            Err(e) => Err(format!("not a duration such as \"5m\": {e}")),
            Ok(t) if t > policy_ttl => Err("longer than the policy's ttl".to_owned()),
            Ok(t) if t < min => Err(format!("shorter than the minimum of {}", humantime::format_duration(min))),
            Ok(t) => {
                *ttl = t;
                Ok(())
            }
        };
        if !step("ttl", Value::String(text.clone()), expected, result) {
            return false;
        }
    }
    true
}

fn narrow_repositories(wanted: &[String], allowed: &GithubRepositories) -> Result<GithubRepositories, String> {
    if wanted.is_empty() {
        // An empty list would not narrow anything: GitHub reads "no repositories" as "all".
        return Err("an empty list does not narrow".to_owned());
    }
    if wanted.len() > MAX_REPOSITORIES {
        return Err(format!("at most {MAX_REPOSITORIES} repositories"));
    }
    match allowed {
        GithubRepositories::All => {
            for name in wanted {
                check_repository_name(name).map_err(|e| format!("repository `{name}`: {e}"))?;
            }
            Ok(GithubRepositories::Names(dedup(wanted)))
        }
        GithubRepositories::Names(names) => narrow_subset(wanted, names).map(GithubRepositories::Names),
        // A policy that lists ids is narrowed by ids, given as text.
        GithubRepositories::Ids(ids) => {
            let mut out = Vec::with_capacity(wanted.len());
            for text in wanted {
                match text.parse::<u64>() {
                    Ok(id) if ids.contains(&id) => {
                        if !out.contains(&id) {
                            out.push(id);
                        }
                    }
                    Ok(_) => return Err(format!("repository id `{text}` is not in the policy")),
                    Err(_) => return Err("the policy lists repository ids: narrow by id".to_owned()),
                }
            }
            Ok(GithubRepositories::Ids(out))
        }
    }
}

fn narrow_permissions(wanted: &BTreeMap<String, String>, allowed: &BTreeMap<String, String>) -> Result<(), String> {
    if wanted.is_empty() {
        return Err("an empty set does not narrow".to_owned());
    }
    for (perm, level) in wanted {
        let Some(max) = allowed.get(perm) else {
            return Err(format!("`{perm}` is not granted by the policy"));
        };
        let level =
            Level::parse(level).ok_or_else(|| format!("`{perm}`: level `{level}` is not read, write or admin"))?;
        // The policy's levels were checked at load; an unparseable one cannot happen, and would
        // refuse rather than allow.
        if Level::parse(max).is_none_or(|max| level > max) {
            return Err(format!("`{perm}` = `{}` is above the policy's `{max}`", level.as_str()));
        }
    }
    Ok(())
}

fn narrow_subset(wanted: &[String], allowed: &[String]) -> Result<Vec<String>, String> {
    if wanted.is_empty() {
        return Err("an empty list does not narrow".to_owned());
    }
    if let Some(extra) = wanted.iter().find(|w| !allowed.contains(w)) {
        return Err(format!("`{extra}` is not in the policy"));
    }
    Ok(dedup(wanted))
}

/// `items` without repeats, first occurrence kept.
fn dedup(items: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    items.iter().filter(|i| seen.insert(i.as_str())).cloned().collect()
}
