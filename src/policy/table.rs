//! Table tests (`latchkey policy test`): given claims, the expected decision.
//!
//! Every `*.test.toml` of the policy directory holds cases:
//!
//! ```toml
//! [claims]                        # optional: the claims every case starts from
//! repository_owner_id = "1234567"
//! repository = "acme/widgets"
//!
//! [[case]]
//! name = "a pull request from a fork is refused"
//! capability = "pr-review"
//! issuer = "github-actions"       # optional; defaults to the capability's issuer
//! claims = { repository = "evil/widgets" }   # laid over [claims]
//! remove = ["actor"]              # optional: claims of [claims] to leave out
//! narrow = { review = { ttl = "5m" } }       # optional, as in an exchange
//! expect = "deny"                 # "allow" | "deny"
//! denied_by = "match.repository"  # optional, deny only: the first rule that failed
//! reason = "no_match"             # optional, deny only
//! grants = ["review"]             # optional, allow only: grant names, in minting order
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::load::{FileKind, list_files, table_to_json};
use super::{LoadContext, LoadError, Narrowing, Outcome, PolicySet, TraceStep};
use crate::oidc::Claims;

/// The results of every case of every table test file, in file then case order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TableReport {
    pub cases: Vec<CaseResult>,
}

impl TableReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    pub fn all_passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }
}

/// For people: one line per case; a failing case shows its trace.
impl std::fmt::Display for TableReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for case in &self.cases {
            let status = if case.passed { "ok  " } else { "FAIL" };
            writeln!(f, "{status} {}: {} [{}]", case.file, case.name, case.capability)?;
            if let Some(failure) = &case.failure {
                writeln!(f, "     {failure}")?;
                for step in &case.trace {
                    let mark = if step.passed { "pass" } else { "FAIL" };
                    write!(f, "       {mark} {}", step.rule)?;
                    if let Some(value) = &step.value {
                        write!(f, " value={value}")?;
                    }
                    if let Some(expected) = &step.expected {
                        write!(f, " expected={expected}")?;
                    }
                    if let Some(note) = &step.note {
                        write!(f, " ({note})")?;
                    }
                    writeln!(f)?;
                }
            }
        }
        write!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

/// One case's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseResult {
    /// The `*.test.toml` file name.
    pub file: String,
    pub name: String,
    pub capability: String,
    pub passed: bool,
    /// What differed from the expectation; `None` when the case passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The decision's trace, to show why a failing case decided as it did.
    pub trace: Vec<TraceStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    claims: toml::Table,
    #[serde(default)]
    case: Vec<RawCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    capability: String,
    issuer: Option<String>,
    #[serde(default)]
    claims: toml::Table,
    #[serde(default)]
    remove: Vec<String>,
    narrow: Option<Narrowing>,
    expect: Expect,
    denied_by: Option<String>,
    reason: Option<String>,
    grants: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

/// Runs every `*.test.toml` of `dir` against `set`. A malformed test file is an error (with the
/// file name), as a malformed policy is; a case whose decision differs is a failed case.
pub fn run_table_tests(dir: &Path, set: &PolicySet, ctx: &LoadContext) -> Result<TableReport, Vec<LoadError>> {
    let mut report = TableReport::default();
    let mut errors = Vec::new();
    for (file, path) in list_files(dir, FileKind::TableTest)? {
        let mut error = |message: String| errors.push(LoadError { file: file.clone(), message });
        let raw: RawFile = match std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| toml::from_str(&text).map_err(|e| e.to_string().trim_end().to_owned()))
        {
            Ok(raw) => raw,
            Err(e) => {
                error(e);
                continue;
            }
        };
        if raw.case.is_empty() {
            error("no [[case]] in this file".to_owned());
            continue;
        }
        let base = match table_to_json(raw.claims) {
            Ok(base) => base,
            Err(e) => {
                error(format!("[claims]: {e}"));
                continue;
            }
        };
        for (index, case) in raw.case.into_iter().enumerate() {
            let at = format!("case {} ({})", index + 1, case.name);
            match run_case(&file, case, &base, set, ctx) {
                Ok(result) => report.cases.push(result),
                Err(message) => error(format!("{at}: {message}")),
            }
        }
    }
    if errors.is_empty() { Ok(report) } else { Err(errors) }
}

fn run_case(
    file: &str,
    case: RawCase,
    base: &serde_json::Map<String, serde_json::Value>,
    set: &PolicySet,
    ctx: &LoadContext,
) -> Result<CaseResult, String> {
    if case.name.trim().is_empty() {
        return Err("`name` may not be empty".to_owned());
    }
    match case.expect {
        Expect::Allow if case.denied_by.is_some() || case.reason.is_some() => {
            return Err("`denied_by` and `reason` go with expect = \"deny\"".to_owned());
        }
        Expect::Deny if case.grants.is_some() => return Err("`grants` goes with expect = \"allow\"".to_owned()),
        _ => {}
    }
    let issuer = match (&case.issuer, set.policies.get(&case.capability)) {
        (Some(issuer), _) => issuer.clone(),
        (None, Some(policy)) => policy.issuer.clone(),
        (None, None) => return Err(format!("no policy `{}`: give the case an `issuer`", case.capability)),
    };
    let kind = ctx.issuers.get(&issuer).ok_or_else(|| format!("unknown issuer `{issuer}`"))?.kind;
    let mut claims = base.clone();
    for name in &case.remove {
        if claims.remove(name).is_none() {
            return Err(format!("remove: `{name}` is not in [claims]"));
        }
    }
    claims.extend(table_to_json(case.claims).map_err(|e| format!("claims: {e}"))?);
    let claims = Claims::from_map(&issuer, kind, claims);

    let decision = set.decide(&case.capability, &claims, case.narrow.as_ref());
    let failure = match (&decision.outcome, case.expect) {
        (Outcome::Allow { grants, .. }, Expect::Allow) => case.grants.as_ref().and_then(|want| {
            let got: Vec<&str> = grants.iter().map(|g| g.name.as_str()).collect();
            (got != *want).then(|| format!("expected grants {want:?}, got {got:?}"))
        }),
        (Outcome::Allow { .. }, Expect::Deny) => Some("expected deny, got allow".to_owned()),
        (Outcome::Deny(reason), Expect::Allow) => {
            let rule = decision.trace.iter().find(|s| !s.passed).map_or("?", |s| s.rule.as_str());
            Some(format!("expected allow, got deny ({}) by `{rule}`", reason_text(*reason)))
        }
        (Outcome::Deny(reason), Expect::Deny) => {
            let rule = decision.trace.iter().find(|s| !s.passed).map(|s| s.rule.as_str());
            let by = case
                .denied_by
                .as_deref()
                .filter(|want| Some(*want) != rule)
                .map(|want| format!("expected deny by `{want}`, got deny by `{}`", rule.unwrap_or("?")));
            let why = case
                .reason
                .as_deref()
                .filter(|want| *want != reason_text(*reason))
                .map(|want| format!("expected reason `{want}`, got `{}`", reason_text(*reason)));
            match (by, why) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or(b),
            }
        }
    };
    Ok(CaseResult {
        file: file.to_owned(),
        name: case.name,
        capability: case.capability,
        passed: failure.is_none(),
        failure,
        trace: decision.trace,
    })
}

fn reason_text(reason: super::DenyReason) -> String {
    match serde_json::to_value(reason) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{reason:?}"),
    }
}
