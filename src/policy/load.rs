//! Loading: from TOML files to compiled [`Policy`] values, refusing anything doubtful.
//!
//! Every check that can be made before a token arrives is made here, so that `decide` has nothing
//! left to parse or compile, and so that a mistake fails `latchkey policy check` (and a reload)
//! instead of the first exchange.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::glob::Pattern;
use super::{
    AwsGrant, BackendKind, ClaimRule, Condition, GithubGrant, GithubRepositories, GrantSpec, IssuerInfo, JwtGrant,
    Level, LoadContext, LoadError, Policy, PolicySet, VaultGrant, VaultMethod, github_permissions,
};
use crate::config::IssuerKind;

/// Bounds of a capability TTL.
pub(super) const MIN_TTL: Duration = Duration::from_secs(60);
pub(super) const MAX_TTL: Duration = Duration::from_secs(12 * 3600);
/// STS refuses sessions shorter than 900 s.
pub(super) const MIN_AWS_TTL: Duration = Duration::from_secs(15 * 60);
/// A condition longer than this is more program than policy.
pub(super) const MAX_CONDITION_CHARS: usize = 4096;
/// Deepest expression tree a condition may compile to. The `cel` crate evaluates (and drops) its
/// tree recursively and offers no evaluation budget, so depth is bounded here, at load, far below
/// what a worker thread's stack holds. Flat `a || b || …` chains of a few dozen terms fit.
pub(super) const MAX_CONDITION_DEPTH: usize = 64;
/// Comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) one condition may hold. None
/// may sit inside another's body: nested loops multiply, and a token's claims can hold thousands
/// of list items, so `l.all(x, l.all(y, …))` would cost the square of the token size per nesting.
pub(super) const MAX_CONDITION_COMPREHENSIONS: usize = 8;
/// GitHub's limit on `repositories`/`repository_ids` in one installation token request.
pub(super) const MAX_REPOSITORIES: usize = 500;
/// STS limits on a session policy (packed) and on managed session policies.
const MAX_SESSION_POLICY_CHARS: usize = 2048;
const MAX_POLICY_ARNS: usize = 10;
/// JWT registered claims latchkey sets itself; a policy may not override them.
const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// Capability and grant names: lowercase, safe in file names, URLs, logs and session tags.
static NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9_.-]*$").expect("valid regex"));
/// Agent labels travel as AWS session tag values and kill selectors: keep them plain.
static AGENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$").expect("valid regex"));
static ROLE_ARN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^arn:aws(-cn|-us-gov|-iso|-iso-b)?:iam::[0-9]{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}$")
        .expect("valid regex")
});
static POLICY_ARN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^arn:aws(-cn|-us-gov|-iso|-iso-b)?:iam::([0-9]{12}|aws):policy/([\w+=,.@-]+/)*[\w+=,.@-]{1,128}$")
        .expect("valid regex")
});
/// The length (2 to 1224) is checked apart: a bounded repetition of a class is a large automaton.
static EXTERNAL_ID: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_+=,.@:/-]+$").expect("valid regex"));

/// The CEL environment every condition is compiled and run in: the standard library, shared.
pub(super) static CEL_ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// What a directory holds, by file name.
pub(super) enum FileKind {
    Policy,
    TableTest,
}

/// The policy (or table test) files of `dir`, sorted by name so that errors come in a stable
/// order. Hidden files are skipped (editors' swap files, Kubernetes' `..data`); symlinks are
/// followed, so a ConfigMap mount works.
pub(super) fn list_files(dir: &Path, kind: FileKind) -> Result<Vec<(String, PathBuf)>, Vec<LoadError>> {
    let dir_error = |message: String| vec![LoadError { file: dir.display().to_string(), message }];
    let entries = std::fs::read_dir(dir).map_err(|e| dir_error(format!("cannot read the policy directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| dir_error(format!("cannot read the policy directory: {e}")))?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let is_test = name.ends_with(".test.toml");
        let wanted = match kind {
            FileKind::Policy => !is_test,
            FileKind::TableTest => is_test,
        };
        // `metadata` follows symlinks; a dangling link or a directory named `x.toml` is skipped.
        if wanted && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push((name, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

pub(super) fn load_dir(dir: &Path, ctx: &LoadContext) -> Result<PolicySet, Vec<LoadError>> {
    let mut set = PolicySet::default();
    let mut errors = Vec::new();
    for (file, path) in list_files(dir, FileKind::Policy)? {
        match load_file(&path, ctx) {
            Ok(policy) => {
                set.policies.insert(policy.capability.clone(), policy);
            }
            Err(messages) => {
                errors.extend(messages.into_iter().map(|message| LoadError { file: file.clone(), message }))
            }
        }
    }
    if errors.is_empty() { Ok(set) } else { Err(errors) }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    description: String,
    agent: String,
    issuer: String,
    ttl: String,
    condition: Option<String>,
    #[serde(default, rename = "match")]
    match_: toml::Table,
    #[serde(default)]
    exclude: toml::Table,
    #[serde(default)]
    grant: Vec<toml::Table>,
    #[serde(default)]
    limits: super::limits::RawLimits,
}

/// Loads one policy file; every problem found is returned, not only the first.
pub(super) fn load_file(path: &Path, ctx: &LoadContext) -> Result<Policy, Vec<String>> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let capability = file_name.strip_suffix(".toml").unwrap_or(file_name).to_owned();
    let bytes = std::fs::read(path).map_err(|e| vec![format!("cannot read: {e}")])?;
    let text = std::str::from_utf8(&bytes).map_err(|_| vec!["not UTF-8 text".to_owned()])?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse_text(&capability, text, base_dir, ctx)
}

/// Parses and compiles one policy from its text. `base_dir` is where relative file references
/// (`session_policy`) are resolved. The SHA-256 is of `text`, as it is of the file's bytes.
pub(super) fn parse_text(
    capability: &str,
    text: &str,
    base_dir: &Path,
    ctx: &LoadContext,
) -> Result<Policy, Vec<String>> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| vec![e.to_string().trim_end().to_owned()])?;
    let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
    compile(capability.to_owned(), sha256, raw, base_dir, ctx)
}

fn compile(
    capability: String,
    sha256: String,
    raw: RawPolicy,
    base_dir: &Path,
    ctx: &LoadContext,
) -> Result<Policy, Vec<String>> {
    let mut errors = Vec::new();
    if !NAME.is_match(&capability) {
        errors.push(format!(
            "the file name makes the capability name `{capability}`, which must match [a-z0-9][a-z0-9-_.]*"
        ));
    }
    if !AGENT.is_match(&raw.agent) {
        errors.push(format!(
            "agent `{}`: 1 to 64 characters among A-Z a-z 0-9 _ . -, not starting with _ . -",
            raw.agent
        ));
    }
    let issuer = ctx.issuers.get(&raw.issuer);
    if issuer.is_none() {
        let mut known: Vec<_> = ctx.issuers.keys().map(String::as_str).collect();
        known.sort_unstable();
        errors.push(format!("unknown issuer `{}` (configured: {})", raw.issuer, list_or_none(&known)));
    }

    let ttl = match humantime::parse_duration(&raw.ttl) {
        Ok(ttl) if !(MIN_TTL..=MAX_TTL).contains(&ttl) => {
            errors.push(format!("ttl `{}` is out of bounds: between 60s and 12h", raw.ttl));
            None
        }
        Ok(ttl) => Some(ttl),
        Err(e) => {
            errors.push(format!("ttl `{}` is not a duration such as \"15m\": {e}", raw.ttl));
            None
        }
    };

    let condition = raw.condition.as_deref().and_then(|source| match compile_condition(source) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(e);
            None
        }
    });
    let limits = raw.limits.compile(&mut errors);
    let matches = compile_rules("match", &raw.match_, &mut errors);
    let excludes = compile_rules("exclude", &raw.exclude, &mut errors);

    if let Some(issuer) = issuer {
        check_pinned(&raw.issuer, issuer, &matches, &mut errors);
    }

    let mut grants: Vec<(String, GrantSpec)> = Vec::new();
    if raw.grant.is_empty() {
        errors.push("a policy needs at least one [[grant]]".to_owned());
    }
    for (index, table) in raw.grant.into_iter().enumerate() {
        match compile_grant(table, base_dir, ctx) {
            Ok((name, spec)) => {
                if grants.iter().any(|(n, _)| *n == name) {
                    errors.push(format!(
                        "grant {}: the name `{name}` is already taken in this policy; give each grant a distinct `name`",
                        index + 1
                    ));
                } else {
                    grants.push((name, spec));
                }
            }
            Err(messages) => errors.extend(messages.into_iter().map(|m| format!("grant {}: {m}", index + 1))),
        }
    }
    if let Some(ttl) = ttl
        && ttl < MIN_AWS_TTL
        && grants.iter().any(|(_, g)| g.backend() == BackendKind::Aws)
    {
        errors.push(format!("ttl `{}` is too short for an aws grant: AWS sessions last at least 15m", raw.ttl));
    }

    match (issuer, ttl) {
        (Some(issuer), Some(ttl)) if errors.is_empty() => Ok(Policy {
            capability,
            description: raw.description,
            agent: raw.agent,
            issuer: raw.issuer,
            ttl,
            sha256,
            grants,
            issuer_kind: issuer.kind,
            matches,
            excludes,
            condition,
            limits,
        }),
        _ => Err(errors),
    }
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() { "none".to_owned() } else { items.join(", ") }
}

pub(super) fn compile_condition(source: &str) -> Result<Condition, String> {
    let chars = source.chars().count();
    if chars > MAX_CONDITION_CHARS {
        return Err(format!("condition is {chars} characters long; at most {MAX_CONDITION_CHARS}"));
    }
    let program = CEL_ENV.compile(source).map_err(|e| format!("condition does not compile: {e}"))?;
    let shape = ExprShape::of(program.expression());
    if shape.depth > MAX_CONDITION_DEPTH {
        return Err(format!("condition nests {} levels deep; at most {MAX_CONDITION_DEPTH}", shape.depth));
    }
    if shape.comprehensions > MAX_CONDITION_COMPREHENSIONS {
        return Err(format!(
            "condition holds {} comprehensions (all, exists, exists_one, map, filter); at most {MAX_CONDITION_COMPREHENSIONS}",
            shape.comprehensions
        ));
    }
    if shape.map {
        return Err("condition: `map()` is not allowed (its result can grow with every step of a chain); \
                    use all, exists, exists_one or filter"
            .to_owned());
    }
    if shape.claims_in_body {
        return Err("condition: the body of a comprehension (all, exists, exists_one, filter) may use its \
                    own variable and literals, not `claims` (each step would cost the size of the claims)"
            .to_owned());
    }
    if shape.nested_comprehension {
        return Err("condition: a comprehension (all, exists, exists_one, map, filter) inside another's body is \
                    not allowed (its cost would grow with the square of the claims' size)"
            .to_owned());
    }
    // CEL's `matches()` compiles its regex on every evaluation, which `decide` must not do on the
    // hot path; `re:` patterns in [match] are compiled once and say the same.
    if program.references().has_function("matches") {
        return Err("condition: `matches()` is not allowed (it compiles a regex on every exchange); \
                    use a `re:` pattern in [match] or [exclude] instead"
            .to_owned());
    }
    Ok(Condition { source: source.to_owned(), program: Arc::new(program) })
}

/// What the loader bounds in a compiled condition's expression tree.
#[derive(Debug, Default)]
struct ExprShape {
    depth: usize,
    comprehensions: usize,
    nested_comprehension: bool,
    /// A `map()`: the one macro whose result is not bounded by its range.
    map: bool,
    /// `claims` read inside a comprehension's body.
    claims_in_body: bool,
}

/// Whether a comprehension is a `map()` expansion: its step appends something other than the
/// iteration variable to the accumulator (`filter()` appends the variable itself; `all`,
/// `exists` and `exists_one` append nothing).
fn is_map(c: &cel::common::ast::ComprehensionExpr) -> bool {
    use cel::common::ast::Expr;
    let step = match &c.loop_step.expr {
        Expr::Call(call) if call.func_name == "_?_:_" && call.args.len() == 3 => &call.args[1],
        _ => &c.loop_step,
    };
    let Expr::Call(call) = &step.expr else { return false };
    let [accu, appended] = call.args.as_slice() else { return false };
    let Expr::List(appended) = &appended.expr else { return false };
    let onto_accumulator = matches!(&accu.expr, Expr::Ident(a) if *a == c.accu_var);
    let appends_var =
        matches!(appended.elements.as_slice(), [e] if matches!(&e.expr, Expr::Ident(v) if *v == c.iter_var));
    call.func_name == "_+_" && onto_accumulator && !appends_var
}

impl ExprShape {
    fn of(root: &cel::parser::Expression) -> ExprShape {
        let mut shape = ExprShape::default();
        // An explicit stack, not recursion: this runs before the depth is known to be small.
        // Entries: (node, depth, inside a comprehension's body).
        let mut stack = vec![(root, 1usize, false)];
        while let Some((node, depth, in_body)) = stack.pop() {
            shape.depth = shape.depth.max(depth);
            let next = depth + 1;
            use cel::common::ast::{EntryExpr, Expr};
            match &node.expr {
                Expr::Call(call) => {
                    stack.extend(call.target.iter().map(|t| (&**t, next, in_body)));
                    stack.extend(call.args.iter().map(|a| (a, next, in_body)));
                }
                Expr::Comprehension(c) => {
                    shape.comprehensions += 1;
                    shape.map |= is_map(c);
                    shape.nested_comprehension |= in_body;
                    stack.push((&c.iter_range, next, in_body));
                    stack.push((&c.accu_init, next, in_body));
                    stack.push((&c.loop_cond, next, true));
                    stack.push((&c.loop_step, next, true));
                    stack.push((&c.result, next, true));
                }
                Expr::List(list) => stack.extend(list.elements.iter().map(|e| (e, next, in_body))),
                Expr::Map(map) => {
                    for entry in &map.entries {
                        if let EntryExpr::MapEntry(e) = &entry.expr {
                            stack.push((&e.key, next, in_body));
                            stack.push((&e.value, next, in_body));
                        }
                    }
                }
                Expr::Struct(st) => {
                    for entry in &st.entries {
                        match &entry.expr {
                            EntryExpr::StructField(f) => stack.push((&f.value, next, in_body)),
                            EntryExpr::MapEntry(e) => {
                                stack.push((&e.key, next, in_body));
                                stack.push((&e.value, next, in_body));
                            }
                        }
                    }
                }
                Expr::Select(select) => stack.push((&select.operand, next, in_body)),
                Expr::Ident(name) => shape.claims_in_body |= in_body && name == "claims",
                Expr::Literal(_) | Expr::Unspecified => {}
            }
        }
        shape
    }
}

/// Compiles `[match]` or `[exclude]`. Values are a string or a list of strings; TOML integers
/// and booleans are accepted and compared by their text, as claims are.
fn compile_rules(section: &str, table: &toml::Table, errors: &mut Vec<String>) -> Vec<ClaimRule> {
    let mut rules = Vec::with_capacity(table.len());
    for (claim, value) in table {
        let key = format!("{section}.{claim}");
        if claim.is_empty() {
            errors.push(format!("{section}: an empty claim name"));
            continue;
        }
        let texts = match value {
            toml::Value::Array(items) => items.iter().map(scalar_text).collect::<Option<Vec<_>>>(),
            other => scalar_text(other).map(|t| vec![t]),
        };
        let Some(texts) = texts else {
            errors.push(format!("{key}: expected a string, an integer, a boolean, or a list of them"));
            continue;
        };
        if texts.is_empty() {
            errors.push(format!("{key}: an empty list would never match; remove the key or give a pattern"));
            continue;
        }
        let mut patterns = Vec::with_capacity(texts.len());
        for text in &texts {
            match Pattern::parse(text) {
                Ok(p) => patterns.push(p),
                Err(e) => errors.push(format!("{key}: {e}")),
            }
        }
        let expected = Value::Array(texts.into_iter().map(Value::String).collect());
        rules.push(ClaimRule { claim: claim.clone(), patterns, expected });
    }
    // Sorted by claim name whatever the TOML map's order, so that traces are stable.
    rules.sort_by(|a, b| a.claim.cmp(&b.claim));
    rules
}

/// The text a TOML scalar is compared by, as [`super::claim_text`] gives it for claims. Floats
/// and datetimes have no unambiguous text and are refused.
fn scalar_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The claims that pin an owner or a repository by id, for issuer kinds that have them. Names
/// can be deleted and registered again by someone else; ids cannot.
pub(super) fn pin_claims(kind: IssuerKind) -> &'static [&'static str] {
    match kind {
        IssuerKind::Github => &["repository_owner_id", "repository_id"],
        IssuerKind::Gitlab => &["namespace_id", "project_id"],
        IssuerKind::Generic => &[],
    }
}

fn check_pinned(issuer_id: &str, issuer: &IssuerInfo, matches: &[ClaimRule], errors: &mut Vec<String>) {
    let pins = pin_claims(issuer.kind);
    if pins.is_empty() || issuer.required_claims.iter().any(|c| pins.contains(&c.as_str())) {
        return;
    }
    let pinned = matches.iter().any(|r| {
        pins.contains(&r.claim.as_str()) && !r.patterns.is_empty() && r.patterns.iter().all(Pattern::is_literal)
    });
    if !pinned {
        errors.push(format!(
            "issuer `{issuer_id}` is a {kind} issuer: [match] must pin `{a}` or `{b}` with literal values (no \
             wildcards, no `re:`), because names can be registered again by someone else; or the issuer's \
             required_claims must pin one of them",
            kind = match issuer.kind {
                IssuerKind::Github => "github",
                IssuerKind::Gitlab => "gitlab",
                IssuerKind::Generic => "generic",
            },
            a = pins[0],
            b = pins[1],
        ));
    }
}

fn compile_grant(
    mut table: toml::Table,
    base_dir: &Path,
    ctx: &LoadContext,
) -> Result<(String, GrantSpec), Vec<String>> {
    let backend = match table.remove("backend") {
        Some(toml::Value::String(b)) => b,
        Some(_) => return Err(vec!["`backend` must be a string".to_owned()]),
        None => return Err(vec!["`backend` is required (github, aws, vault or jwt)".to_owned()]),
    };
    let kind = match backend.as_str() {
        "github" => BackendKind::Github,
        "aws" => BackendKind::Aws,
        "vault" => BackendKind::Vault,
        "jwt" => BackendKind::Jwt,
        other => return Err(vec![format!("unknown backend `{other}` (github, aws, vault or jwt)")]),
    };
    let name = match table.remove("name") {
        Some(toml::Value::String(n)) => n,
        Some(_) => return Err(vec!["`name` must be a string".to_owned()]),
        None => backend.clone(),
    };
    let at = |m: String| format!("({name}, {backend}) {m}");
    let mut errors = Vec::new();
    if !NAME.is_match(&name) {
        errors.push(at("the name must match [a-z0-9][a-z0-9-_.]*".to_owned()));
    }
    if !ctx.backends.contains(&kind) {
        errors.push(at(format!("the {backend} backend is not configured")));
    }
    let spec = match kind {
        BackendKind::Github => github_grant(table, ctx),
        BackendKind::Aws => aws_grant(table, base_dir, ctx),
        BackendKind::Vault => vault_grant(table, ctx),
        BackendKind::Jwt => jwt_grant(table),
    };
    match spec {
        Ok(spec) if errors.is_empty() => Ok((name, spec)),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more.into_iter().map(at));
            Err(errors)
        }
    }
}

/// Deserializes what is left of a grant table into its backend's fields, refusing unknown ones.
fn fields<T: for<'de> Deserialize<'de>>(table: toml::Table) -> Result<T, Vec<String>> {
    toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| vec![e.message().trim_end().to_owned()])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
    app: Option<String>,
    owner: Option<String>,
    owner_id: Option<u64>,
    installation_id: Option<u64>,
    repositories: Option<toml::Value>,
    repository_ids: Option<Vec<u64>>,
    permissions: Option<BTreeMap<String, String>>,
}

fn github_grant(table: toml::Table, ctx: &LoadContext) -> Result<GrantSpec, Vec<String>> {
    let raw: RawGithub = fields(table)?;
    let mut errors = Vec::new();
    if let Some(app) = &raw.app
        && !ctx.github_apps.contains(app)
    {
        let known: Vec<_> = ctx.github_apps.iter().map(String::as_str).collect();
        errors.push(format!("unknown GitHub app `{app}` (configured: {})", list_or_none(&known)));
    }
    match &raw.owner {
        Some(owner) if owner.is_empty() || owner.contains('/') => {
            errors.push(format!("owner `{owner}` is not a login"))
        }
        None if raw.installation_id.is_none() => errors.push("`owner` or `installation_id` is required".to_owned()),
        _ => {}
    }
    let repositories = match (raw.repositories, raw.repository_ids) {
        (Some(_), Some(_)) => {
            errors.push("give `repositories` or `repository_ids`, not both".to_owned());
            None
        }
        (None, None) => {
            errors.push("`repositories` (names, or \"*\") or `repository_ids` is required".to_owned());
            None
        }
        (None, Some(ids)) => {
            if ids.is_empty() || ids.len() > MAX_REPOSITORIES {
                errors.push(format!("`repository_ids` needs 1 to {MAX_REPOSITORIES} ids"));
            }
            if ids.iter().collect::<BTreeSet<_>>().len() != ids.len() {
                errors.push("`repository_ids` lists an id twice".to_owned());
            }
            Some(GithubRepositories::Ids(ids))
        }
        (Some(toml::Value::String(s)), None) if s == "*" => Some(GithubRepositories::All),
        (Some(toml::Value::Array(items)), None) => {
            let names: Option<Vec<String>> = items.into_iter().map(|v| v.as_str().map(str::to_owned)).collect();
            match names {
                Some(names) => {
                    if names.is_empty() {
                        errors
                            .push("`repositories` is empty; list names, or use \"*\" for every repository".to_owned());
                    }
                    if names.len() > MAX_REPOSITORIES {
                        errors.push(format!("`repositories` lists {} names; at most {MAX_REPOSITORIES}", names.len()));
                    }
                    for n in &names {
                        if let Err(e) = check_repository_name(n) {
                            errors.push(format!("repository `{n}`: {e}"));
                        }
                    }
                    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
                        errors.push("`repositories` lists a name twice".to_owned());
                    }
                    Some(GithubRepositories::Names(names))
                }
                None => {
                    errors.push("`repositories` must be a list of names, or \"*\"".to_owned());
                    None
                }
            }
        }
        (Some(_), None) => {
            errors.push("`repositories` must be a list of names, or \"*\"".to_owned());
            None
        }
    };
    let permissions = raw.permissions.unwrap_or_default();
    if permissions.is_empty() {
        errors.push("`permissions` is required, e.g. { contents = \"read\" }".to_owned());
    }
    for (name, level) in &permissions {
        match github_permissions::levels(name) {
            None => errors.push(format!("unknown GitHub permission `{name}`")),
            Some(allowed) => {
                if !Level::parse(level).is_some_and(|l| allowed.contains(&l)) {
                    let allowed: Vec<_> = allowed.iter().map(|l| l.as_str()).collect();
                    errors.push(format!("permission `{name}` = `{level}`: GitHub accepts {}", allowed.join(" or ")));
                }
            }
        }
    }
    match repositories {
        Some(repositories) if errors.is_empty() => Ok(GrantSpec::Github(GithubGrant {
            app: raw.app,
            owner: raw.owner,
            owner_id: raw.owner_id,
            installation_id: raw.installation_id,
            repositories,
            permissions,
        })),
        _ => Err(errors),
    }
}

/// A repository name within its owner, as GitHub's token API takes it.
pub(super) fn check_repository_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.contains('/') {
        Err("give the name without its owner (the owner is the grant's `owner`)")
    } else if name == "*" {
        Err("\"*\" stands alone: `repositories = \"*\"`")
    } else {
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    role_arn: String,
    session_policy: Option<String>,
    #[serde(default)]
    policy_arns: Vec<String>,
    external_id: Option<String>,
}

fn aws_grant(table: toml::Table, base_dir: &Path, ctx: &LoadContext) -> Result<GrantSpec, Vec<String>> {
    let raw: RawAws = fields(table)?;
    let mut errors = Vec::new();
    if !ROLE_ARN.is_match(&raw.role_arn) {
        errors
            .push(format!("role_arn `{}` is not an IAM role ARN (arn:aws:iam::123456789012:role/name)", raw.role_arn));
    }
    if let Some(path) = &ctx.aws_role_path {
        // arn:aws:iam::123456789012:role/latchkey/ci/deploy → /latchkey/ci/
        let role_path = raw.role_arn.split_once(":role").map(|(_, r)| &r[..=r.rfind('/').unwrap_or(0)]);
        if role_path.is_some_and(|p| !p.starts_with(path.as_str())) {
            errors.push(format!(
                "role_arn `{}` is outside the IAM path {path} that [backends.aws] role_path allows",
                raw.role_arn
            ));
        }
    }
    if raw.policy_arns.len() > MAX_POLICY_ARNS {
        errors.push(format!("`policy_arns` lists {}; STS takes at most {MAX_POLICY_ARNS}", raw.policy_arns.len()));
    }
    for arn in &raw.policy_arns {
        if !POLICY_ARN.is_match(arn) {
            errors.push(format!("policy ARN `{arn}` is not an IAM managed policy ARN"));
        }
    }
    if let Some(id) = &raw.external_id
        && (!(2..=1224).contains(&id.len()) || !EXTERNAL_ID.is_match(id))
    {
        errors.push("`external_id` must be 2 to 1224 characters among letters, digits and +=,.@:/-".to_owned());
    }
    let session_policy = match &raw.session_policy {
        None => None,
        Some(file) => match read_session_policy(&base_dir.join(file)) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(format!("session_policy `{file}`: {e}"));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(GrantSpec::Aws(AwsGrant {
        role_arn: raw.role_arn,
        session_policy,
        policy_arns: raw.policy_arns,
        external_id: raw.external_id,
    }))
}

/// Reads a session policy and returns it without whitespace, the form sent to STS and the one
/// its size limit applies to.
fn read_session_policy(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    if !json.is_object() {
        return Err("not a JSON object (an IAM policy document)".to_owned());
    }
    let compact = serde_json::to_string(&json).map_err(|e| format!("cannot serialize: {e}"))?;
    let chars = compact.chars().count();
    if chars > MAX_SESSION_POLICY_CHARS {
        return Err(format!("{chars} characters without whitespace; STS allows at most {MAX_SESSION_POLICY_CHARS}"));
    }
    Ok(compact)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    kind: String,
    policies: Option<Vec<String>>,
    num_uses: Option<u32>,
    path: Option<String>,
    method: Option<String>,
    params: Option<toml::Table>,
    revocable: Option<bool>,
}

fn vault_grant(table: toml::Table, ctx: &LoadContext) -> Result<GrantSpec, Vec<String>> {
    let raw: RawVault = fields(table)?;
    let mut errors = Vec::new();
    let not_for = |errors: &mut Vec<String>, field: &str, present: bool, kind: &str| {
        if present {
            errors.push(format!("`{field}` does not apply to kind = \"{kind}\""));
        }
    };
    let spec = match raw.kind.as_str() {
        "token" => {
            not_for(&mut errors, "path", raw.path.is_some(), "token");
            not_for(&mut errors, "method", raw.method.is_some(), "token");
            not_for(&mut errors, "params", raw.params.is_some(), "token");
            not_for(&mut errors, "revocable", raw.revocable.is_some(), "token");
            let policies = raw.policies.unwrap_or_default();
            if policies.is_empty() {
                errors.push("`policies` is required and may not be empty for kind = \"token\"".to_owned());
            }
            for p in &policies {
                // Vault lowercases policy names: `Root` is `root`.
                if p.trim().eq_ignore_ascii_case("root") {
                    errors.push("the `root` policy is never granted".to_owned());
                } else if p.trim().is_empty() {
                    errors.push("an empty policy name".to_owned());
                } else if let Some(limits) = &ctx.vault_policies
                    && !limits.permits(p)
                {
                    errors.push(format!(
                        "policy `{p}` is not allowed by the Vault token role (allowed: {})",
                        limits.describe()
                    ));
                }
            }
            if raw.num_uses == Some(0) {
                errors.push("`num_uses` must be at least 1 (omit it for unlimited uses)".to_owned());
            }
            VaultGrant::Token { policies, num_uses: raw.num_uses }
        }
        "secret" => {
            not_for(&mut errors, "policies", raw.policies.is_some(), "secret");
            not_for(&mut errors, "num_uses", raw.num_uses.is_some(), "secret");
            let path = raw.path.unwrap_or_default();
            if path.trim_matches('/').is_empty() {
                errors.push("`path` is required for kind = \"secret\"".to_owned());
            } else if path.contains(['?', '#', '%']) || path.chars().any(char::is_whitespace) {
                errors.push(format!("path `{path}`: a Vault path has no query, fragment, escapes or spaces"));
            } else if path.split('/').any(|s| s == "." || s == "..") {
                errors.push(format!("path `{path}`: `.` and `..` segments are not allowed"));
            }
            let method = match raw.method.as_deref() {
                None | Some("read") => VaultMethod::Read,
                Some("write") => VaultMethod::Write,
                Some(other) => {
                    errors.push(format!("method `{other}`: \"read\" or \"write\""));
                    VaultMethod::Read
                }
            };
            let params = match raw.params.map(table_to_json).transpose() {
                Ok(p) => p.unwrap_or_default(),
                Err(e) => {
                    errors.push(format!("params: {e}"));
                    serde_json::Map::new()
                }
            };
            VaultGrant::Secret { path, method, params, revocable: raw.revocable.unwrap_or(true) }
        }
        other => {
            errors.push(format!("kind `{other}`: \"token\" or \"secret\""));
            return Err(errors);
        }
    };
    if errors.is_empty() { Ok(GrantSpec::Vault(spec)) } else { Err(errors) }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    audience: String,
    claims: Option<toml::Table>,
}

fn jwt_grant(table: toml::Table) -> Result<GrantSpec, Vec<String>> {
    let raw: RawJwt = fields(table)?;
    let mut errors = Vec::new();
    if raw.audience.trim().is_empty() {
        errors.push("`audience` may not be empty".to_owned());
    }
    let claims = match raw.claims.map(table_to_json).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            errors.push(format!("claims: {e}"));
            serde_json::Map::new()
        }
    };
    for registered in REGISTERED_CLAIMS {
        if claims.contains_key(registered) {
            errors.push(format!("claims: `{registered}` is a registered claim that latchkey sets itself"));
        }
    }
    if errors.is_empty() { Ok(GrantSpec::Jwt(JwtGrant { audience: raw.audience, claims })) } else { Err(errors) }
}

pub(super) fn table_to_json(table: toml::Table) -> Result<serde_json::Map<String, Value>, String> {
    table.into_iter().map(|(k, v)| Ok((k, toml_to_json(v)?))).collect()
}

/// TOML to JSON: datetimes become their RFC 3339 text; a float JSON cannot carry is refused.
fn toml_to_json(value: toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{f} is not a JSON number"))?
        }
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect::<Result<_, _>>()?),
        toml::Value::Table(t) => Value::Object(table_to_json(t)?),
    })
}
