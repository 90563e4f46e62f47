//! Capability policies: loading, matching, CEL conditions, narrowing, lint and decision traces.
//!
//! One TOML file in the policy directory is one capability; the file stem is its name. A
//! [`PolicySet`] is loaded whole and swapped whole: a broken new set never replaces a good one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::IssuerKind;
use crate::oidc::Claims;
use glob::Pattern;

/// What the policy loader needs to know about the rest of the configuration.
#[derive(Debug, Clone, Default)]
pub struct LoadContext {
    /// Configured issuers by id.
    pub issuers: HashMap<String, IssuerInfo>,
    /// Backends that are configured, so that a grant naming another is a load error.
    pub backends: Vec<BackendKind>,
    /// Configured GitHub app ids (`[[backends.github]] id`); the first is the default.
    pub github_apps: Vec<String>,
    /// `[backends.aws] role_path`: every `role_arn` must live under it.
    pub aws_role_path: Option<String>,
    /// What the Vault token role lets a token carry, when the broker could read the role at
    /// start-up. `None`: not known here, so the check happens at mint instead.
    pub vault_policies: Option<VaultPolicyLimits>,
}

/// The policy limits of a Vault token role (`auth/token/roles/<role>`), with Vault's meaning:
/// a token may carry a policy that the allowed lists name (exactly or by a `*` glob) and the
/// disallowed lists do not. With both allowed lists empty Vault falls back to the creating
/// token's own policies, which the broker cannot see: then only the disallowed lists count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultPolicyLimits {
    pub allowed: Vec<String>,
    pub allowed_glob: Vec<String>,
    pub disallowed: Vec<String>,
    pub disallowed_glob: Vec<String>,
}

impl VaultPolicyLimits {
    /// Whether a token minted through the role may carry `policy`. `root` never may.
    pub fn permits(&self, policy: &str) -> bool {
        // Vault lowercases policy names.
        let policy = policy.trim().to_ascii_lowercase();
        let named = |list: &[String]| list.iter().any(|p| p.eq_ignore_ascii_case(&policy));
        let globbed = |list: &[String]| list.iter().any(|g| vault_glob(&g.to_ascii_lowercase(), &policy));
        if policy == "root" || named(&self.disallowed) || globbed(&self.disallowed_glob) {
            return false;
        }
        if self.allowed.is_empty() && self.allowed_glob.is_empty() {
            return true;
        }
        // Vault adds `default` to a role's allowed list by itself.
        policy == "default" || named(&self.allowed) || globbed(&self.allowed_glob)
    }

    /// The allowed list as an operator would read it, for error messages.
    pub fn describe(&self) -> String {
        let all: Vec<&str> = self.allowed.iter().chain(&self.allowed_glob).map(String::as_str).collect();
        if all.is_empty() { "the broker token's own policies".to_owned() } else { all.join(", ") }
    }
}

/// Vault's policy globs: `*` matches any run of characters (slashes included), nothing else is
/// special.
fn vault_glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[derive(Debug, Clone)]
pub struct IssuerInfo {
    pub kind: IssuerKind,
    /// Names of the issuer's `required_claims`: a pin there counts as a pin in every policy.
    pub required_claims: Vec<String>,
}

/// The kinds of grant a policy can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Github,
    Aws,
    Vault,
    Jwt,
}

impl BackendKind {
    pub const ALL: [BackendKind; 4] = [BackendKind::Github, BackendKind::Aws, BackendKind::Vault, BackendKind::Jwt];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Github => "github",
            BackendKind::Aws => "aws",
            BackendKind::Vault => "vault",
            BackendKind::Jwt => "jwt",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grant as written in a policy, after validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum GrantSpec {
    Github(GithubGrant),
    Aws(AwsGrant),
    Vault(VaultGrant),
    Jwt(JwtGrant),
}

impl GrantSpec {
    pub fn backend(&self) -> BackendKind {
        match self {
            GrantSpec::Github(_) => BackendKind::Github,
            GrantSpec::Aws(_) => BackendKind::Aws,
            GrantSpec::Vault(_) => BackendKind::Vault,
            GrantSpec::Jwt(_) => BackendKind::Jwt,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GithubGrant {
    /// `[[backends.github]] id`; `None` is the first configured app.
    pub app: Option<String>,
    pub owner: Option<String>,
    /// The owner's numeric account id: the installation found for `owner` must belong to it, so
    /// that a renamed or re-registered login cannot receive the grant.
    pub owner_id: Option<u64>,
    pub installation_id: Option<u64>,
    pub repositories: GithubRepositories,
    /// Permission name → `read` | `write` | `admin`.
    pub permissions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GithubRepositories {
    /// `repositories = "*"`: every repository of the installation (flagged by `policy check`).
    All,
    Names(Vec<String>),
    Ids(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AwsGrant {
    pub role_arn: String,
    /// Contents of the session policy file, validated at load.
    pub session_policy: Option<String>,
    pub policy_arns: Vec<String>,
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VaultGrant {
    Token { policies: Vec<String>, num_uses: Option<u32> },
    Secret { path: String, method: VaultMethod, params: serde_json::Map<String, Value>, revocable: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VaultMethod {
    Read,
    Write,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JwtGrant {
    pub audience: String,
    /// Static claims added to the token; they cannot override the registered claims.
    pub claims: serde_json::Map<String, Value>,
}

/// The caller's optional narrowing, keyed by grant name. It may only narrow.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Narrowing(pub BTreeMap<String, GrantNarrowing>);

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantNarrowing {
    pub repositories: Option<Vec<String>>,
    pub permissions: Option<BTreeMap<String, String>>,
    pub policies: Option<Vec<String>>,
    /// A duration such as `"5m"`, at most the policy TTL.
    pub ttl: Option<String>,
}

/// Proof that a grant came out of a policy decision. Only this module can make one, so only an
/// authorized grant can reach a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorized(());

/// One grant the decision allows, after narrowing.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizedGrant {
    /// Unique within the policy; defaults to the backend's name.
    pub name: String,
    pub spec: GrantSpec,
    /// The capability TTL, or the narrowed one.
    pub ttl: Duration,
    pub(crate) _authorized: Authorized,
}

/// One step of a decision: which rule was checked, on which claim, with which value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceStep {
    /// `issuer`, `match.repository`, `exclude.actor`, `condition`, `narrow.code.permissions`, …
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The claim's value as the token carried it; `null` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// What the rule asked for (the patterns, the expression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<Value>,
    pub passed: bool,
    /// Why it failed, in words: "claim absent", "array claims never match", a CEL error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a decision denied. The caller sees only [`DenyReason::public_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    UnknownCapability,
    WrongIssuer,
    NoMatch,
    Excluded,
    Condition,
    NarrowingWider,
}

impl DenyReason {
    /// A short reason that does not reveal the policy to the token holder.
    pub fn public_message(self) -> &'static str {
        match self {
            DenyReason::NarrowingWider => "the requested narrowing is wider than the policy allows",
            _ => "no policy allows this identity the requested capability",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Allow { agent: String, ttl: Duration, grants: Vec<AuthorizedGrant>, limits: Limits },
    Deny(DenyReason),
}

/// The result of evaluating one capability for one set of claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub capability: String,
    pub outcome: Outcome,
    pub trace: Vec<TraceStep>,
    /// SHA-256 (hex) of the policy file that decided; `None` for an unknown capability.
    pub policy_sha256: Option<String>,
}

/// One loaded policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub capability: String,
    pub description: String,
    pub agent: String,
    pub issuer: String,
    pub ttl: Duration,
    pub sha256: String,
    /// `(name, grant)` in file order; names are unique within the policy.
    pub grants: Vec<(String, GrantSpec)>,
    /// The kind of `issuer`, kept for lint (`pull_request_target` is a GitHub notion).
    issuer_kind: IssuerKind,
    /// `[match]`, compiled: every rule must match.
    matches: Vec<ClaimRule>,
    /// `[exclude]`, compiled: any rule matching denies.
    excludes: Vec<ClaimRule>,
    condition: Option<Condition>,
    /// `[limits]`: rates and live exchanges per identity.
    pub limits: Limits,
}

/// One key of `[match]` or `[exclude]`: a claim name and the patterns it may match (any of).
#[derive(Debug, Clone)]
struct ClaimRule {
    claim: String,
    /// Never empty: an empty list is a load error.
    patterns: Vec<Pattern>,
    /// The patterns as a JSON array, built once for traces.
    expected: Value,
}

/// A compiled CEL `condition`.
#[derive(Debug, Clone)]
struct Condition {
    source: String,
    program: Arc<cel::Program>,
}

/// A GitHub permission level, ordered: read < write < admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    fn parse(text: &str) -> Option<Level> {
        match text {
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }
}

// A policy set is shared by every request handler: it must stay `Send + Sync` (the compiled CEL
// programs included).
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<PolicySet>();
};

/// A problem found while loading policies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct LoadError {
    pub file: String,
    pub message: String,
}

/// A `policy check` warning: legal, but worth a second look.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    pub capability: String,
    pub message: String,
}

impl Policy {
    /// Parses and compiles one policy from its TOML text, with every check [`PolicySet::load_dir`]
    /// makes on a file. `capability` is what the file stem would be; `base_dir` is where relative
    /// files (`session_policy`) are read from. Used by `load_dir` and by the fuzz targets.
    pub fn parse(capability: &str, text: &str, base_dir: &Path, ctx: &LoadContext) -> Result<Policy, Vec<String>> {
        load::parse_text(capability, text, base_dir, ctx)
    }
}

/// Compiles `source` as a policy `condition`, under the loader's caps (length, depth,
/// comprehensions), and runs it against `claims` as an exchange would: `Ok(true)` only when it
/// evaluates to `true`. A compile error or a refused shape is `Err`; a runtime error is
/// `Ok(false)` (it denies). For `policy explain`-style tooling and the fuzz targets.
pub fn evaluate_condition(source: &str, claims: &Claims) -> Result<bool, String> {
    let condition = load::compile_condition(source)?;
    Ok(decide::run_condition(&condition, claims).is_ok())
}

/// Every policy of the policy directory, loaded as one unit.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub policies: BTreeMap<String, Policy>,
}

impl PolicySet {
    /// Loads every `*.toml` file of `dir` (not `*.test.toml`, which are table tests). Any error in
    /// any file fails the whole set.
    ///
    /// Errors name the file and say what is wrong; every error found is returned, sorted by file.
    pub fn load_dir(dir: &Path, ctx: &LoadContext) -> Result<PolicySet, Vec<LoadError>> {
        load::load_dir(dir, ctx)
    }

    /// Evaluates `capability` for `claims`, then applies `narrow`. Deny by default.
    ///
    /// Runs on every exchange: everything it needs was compiled at load, so it does no I/O and
    /// compiles nothing.
    pub fn decide(&self, capability: &str, claims: &Claims, narrow: Option<&Narrowing>) -> Decision {
        decide::decide(self, capability, claims, narrow)
    }

    /// `policy check` warnings for the whole set.
    pub fn lint(&self) -> Vec<Warning> {
        self.policies.values().flat_map(lint::lint).collect()
    }
}

mod decide;
mod github_permissions;

/// Every GitHub permission a `github` grant may name, with the levels it accepts: the table the
/// loader checks against (a test keeps it equal to GitHub's OpenAPI description).
pub fn github_permission_table() -> Vec<(&'static str, Vec<&'static str>)> {
    github_permissions::PERMISSIONS
        .iter()
        .map(|(name, levels)| (*name, levels.iter().map(|l| l.as_str()).collect()))
        .collect()
}
pub mod glob;
pub mod limits;
mod lint;
mod load;
mod table;

pub use limits::{Limits, Rate};
pub use table::{CaseResult, TableReport, run_table_tests};

/// A claim's value as match patterns see it: strings as they are, numbers and booleans as their
/// JSON text; arrays, objects and `null` have no text and never match.
pub fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
