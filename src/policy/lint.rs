//! `latchkey policy check` warnings: policies that load, but that a reviewer should look at twice.

use super::{ClaimRule, GithubRepositories, GrantSpec, Policy, VaultGrant, VaultMethod, Warning};
use crate::config::IssuerKind;

/// The GitHub event that runs with the base repository's secrets and ref on code from a fork.
const PULL_REQUEST_TARGET: &str = "pull_request_target";

pub(super) fn lint(policy: &Policy) -> Vec<Warning> {
    let mut messages = Vec::new();
    let find = |claim: &str| policy.matches.iter().find(|r| r.claim == claim);
    let constrains = |claim: &str| find(claim).is_some_and(|r| !r.patterns.iter().all(|p| p.is_wildcard_only()));

    let writers: Vec<&str> = policy.grants.iter().filter(|(_, g)| can_write(g)).map(|(n, _)| n.as_str()).collect();
    if !writers.is_empty() {
        if !constrains("ref") && !constrains("environment") {
            messages.push(format!(
                "grant(s) {} can write, but [match] constrains neither `ref` nor `environment`: any branch can use them",
                quoted(&writers)
            ));
        }
        if admits_pull_request_target(policy, find("event_name")) {
            messages.push(format!(
                "grant(s) {} can write, and `event_name` admits `{PULL_REQUEST_TARGET}`, which runs on the base \
                 branch's ref for pull requests from forks",
                quoted(&writers)
            ));
        }
    }
    for (name, grant) in &policy.grants {
        match grant {
            GrantSpec::Github(g) if g.repositories == GithubRepositories::All => messages.push(format!(
                "grant `{name}`: `repositories = \"*\"` gives every repository of the installation, present and future"
            )),
            GrantSpec::Github(g) if g.installation_id.is_none() && g.owner_id.is_none() => messages.push(format!(
                "grant `{name}`: owner `{}` is found by login without `owner_id`; only when the token's own \
                 `repository_owner` is that login is its `repository_owner_id` checked against the installation, so \
                 pin `owner_id` to refuse a renamed or re-registered owner",
                g.owner.as_deref().unwrap_or_default()
            )),
            GrantSpec::Vault(VaultGrant::Secret { revocable: false, .. }) => messages.push(format!(
                "grant `{name}`: `revocable = false`: the secret has no lease, so neither its TTL nor a kill can take \
                 it back"
            )),
            _ => {}
        }
    }
    if policy.matches.iter().all(|r| r.patterns.iter().all(|p| p.is_wildcard_only())) {
        messages.push(
            "[match] holds only wildcards (or nothing): every identity of the issuer that passes its required claims \
             is admitted"
                .to_owned(),
        );
    }
    messages.into_iter().map(|message| Warning { capability: policy.capability.clone(), message }).collect()
}

/// A grant that can change something: GitHub write or admin, any AWS role (its permissions are
/// not visible from here), a Vault write.
fn can_write(grant: &GrantSpec) -> bool {
    match grant {
        GrantSpec::Github(g) => g.permissions.values().any(|level| level != "read"),
        GrantSpec::Aws(_) => true,
        GrantSpec::Vault(VaultGrant::Secret { method: VaultMethod::Write, .. }) => true,
        GrantSpec::Vault(_) | GrantSpec::Jwt(_) => false,
    }
}

/// Whether `pull_request_target` gets through `[match]` and `[exclude]`: matched by a pattern, or
/// not constrained at all on a GitHub issuer.
fn admits_pull_request_target(policy: &Policy, event_name: Option<&ClaimRule>) -> bool {
    let admitted = match event_name {
        Some(rule) => rule.patterns.iter().any(|p| p.matches(PULL_REQUEST_TARGET)),
        None => policy.issuer_kind == IssuerKind::Github,
    };
    let excluded = policy
        .excludes
        .iter()
        .any(|r| r.claim == "event_name" && r.patterns.iter().any(|p| p.matches(PULL_REQUEST_TARGET)));
    admitted && !excluded
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}
