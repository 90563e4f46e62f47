//! Tests of loading, deciding, narrowing, lint and table tests, over policy files in a
//! temporary directory.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::config::IssuerKind;

fn ctx() -> LoadContext {
    let issuer = |kind, required: &[&str]| IssuerInfo {
        kind,
        required_claims: required.iter().map(|s| (*s).to_owned()).collect(),
    };
    LoadContext {
        issuers: HashMap::from([
            ("github-actions".to_owned(), issuer(IssuerKind::Github, &[])),
            ("github-pinned".to_owned(), issuer(IssuerKind::Github, &["repository_owner_id"])),
            ("gitlab".to_owned(), issuer(IssuerKind::Gitlab, &[])),
            ("buildkite".to_owned(), issuer(IssuerKind::Generic, &[])),
        ]),
        backends: vec![BackendKind::Github, BackendKind::Aws, BackendKind::Vault, BackendKind::Jwt],
        github_apps: vec!["default".to_owned(), "other".to_owned()],
        ..Default::default()
    }
}

/// The head of a policy that loads: pinned owner, one jwt grant is added by `policy`.
const HEAD: &str = r#"
agent = "pr-reviewer"
issuer = "github-actions"
ttl = "15m"
"#;

const JWT: &str = r#"
[[grant]]
backend = "jwt"
audience = "https://svc.example"
"#;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write file");
}

fn load(files: &[(&str, &str)]) -> Result<PolicySet, Vec<LoadError>> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    PolicySet::load_dir(dir.path(), &ctx())
}

fn load_one(text: &str) -> Result<PolicySet, Vec<LoadError>> {
    load(&[("cap.toml", text)])
}

/// A policy `cap` with HEAD, the given [match]/[exclude]/extra text, and a jwt grant unless the
/// text has its own grants.
fn policy(body: &str) -> PolicySet {
    let grants = if body.contains("[[grant]]") { "" } else { JWT };
    match load_one(&format!("{HEAD}{body}\n{grants}")) {
        Ok(set) => set,
        Err(e) => panic!("policy should load: {e:?}"),
    }
}

fn load_errors(text: &str) -> String {
    match load_one(text) {
        Ok(_) => panic!("policy should not load:\n{text}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
    }
}

fn claims(value: Value) -> Claims {
    let Value::Object(map) = value else { panic!("claims must be an object") };
    Claims::from_map("github-actions", IssuerKind::Github, map)
}

fn base_claims() -> Value {
    json!({
        "sub": "repo:acme/widgets:ref:refs/heads/main",
        "repository_owner_id": "1234567",
        "repository_id": 7654321,
        "repository": "acme/widgets",
        "event_name": "pull_request",
        "ref": "refs/pull/42/merge",
        "actor": "octocat",
        "runner_environment": "github-hosted",
    })
}

fn with(overrides: Value) -> Claims {
    let mut base = base_claims();
    for (k, v) in overrides.as_object().expect("object") {
        if v.is_null() {
            base.as_object_mut().expect("object").remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    claims(base)
}

fn decide(set: &PolicySet, c: &Claims) -> Decision {
    set.decide("cap", c, None)
}

fn deny_reason(d: &Decision) -> Option<DenyReason> {
    match d.outcome {
        Outcome::Deny(r) => Some(r),
        Outcome::Allow { .. } => None,
    }
}

fn failing_step(d: &Decision) -> &TraceStep {
    d.trace.iter().find(|s| !s.passed).expect("a failing step")
}

const PIN: &str = "[match]\nrepository_owner_id = \"1234567\"\n";

// ---------------------------------------------------------------- loading

#[test]
fn loads_a_full_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "pr-review.aws.json",
        r#"{ "Version": "2012-10-17",
             "Statement": [ { "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*" } ] }"#,
    );
    let text = r#"
description = "everything"
agent = "pr-reviewer"
issuer = "github-actions"
ttl = "15m"
condition = 'claims.runner_environment == "github-hosted"'

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
repository_id = 7654321
event_name = ["pull_request", "workflow_dispatch"]
ref = ["refs/heads/main", "refs/pull/*/merge"]

[exclude]
actor = "dependabot[bot]"

[[grant]]
name = "code"
backend = "github"
owner = "acme"
installation_id = 5555555
repositories = ["widgets"]
permissions = { contents = "read", pull_requests = "write" }

[[grant]]
backend = "aws"
role_arn = "arn:aws:iam::123456789012:role/ci/pr-review"
session_policy = "pr-review.aws.json"
policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
external_id = "latchkey-ext"

[[grant]]
backend = "vault"
kind = "token"
policies = ["ci-read"]
num_uses = 3

[[grant]]
name = "db"
backend = "vault"
kind = "secret"
path = "database/creds/ci"
method = "write"
params = { ttl = "5m", n = 1, f = 1.5, list = [1, "a"] }

[[grant]]
backend = "jwt"
audience = "https://svc.example"
claims = { scope = "review", n = 2, nested = { a = true } }
"#;
    write(dir.path(), "pr-review.toml", text);
    let set = PolicySet::load_dir(dir.path(), &ctx()).expect("loads");
    let p = &set.policies["pr-review"];
    assert_eq!(p.capability, "pr-review");
    assert_eq!(p.description, "everything");
    assert_eq!(p.agent, "pr-reviewer");
    assert_eq!(p.ttl, Duration::from_secs(900));
    assert_eq!(p.sha256, hex::encode(sha2::Sha256::digest(text.as_bytes())));
    let names: Vec<_> = p.grants.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["code", "aws", "vault", "db", "jwt"]);
    match &p.grants[0].1 {
        GrantSpec::Github(g) => {
            assert_eq!(g.app, None);
            assert_eq!(g.owner.as_deref(), Some("acme"));
            assert_eq!(g.installation_id, Some(5555555));
            assert_eq!(g.repositories, GithubRepositories::Names(vec!["widgets".into()]));
            assert_eq!(g.permissions["pull_requests"], "write");
        }
        other => panic!("{other:?}"),
    }
    match &p.grants[1].1 {
        GrantSpec::Aws(a) => {
            let sp = a.session_policy.as_deref().expect("session policy");
            assert!(!sp.contains(' ') && !sp.contains('\n'), "whitespace removed: {sp}");
            assert_eq!(serde_json::from_str::<Value>(sp).expect("json")["Version"], "2012-10-17");
            assert_eq!(a.external_id.as_deref(), Some("latchkey-ext"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.grants[2].1,
        GrantSpec::Vault(VaultGrant::Token { policies: vec!["ci-read".into()], num_uses: Some(3) })
    );
    match &p.grants[3].1 {
        GrantSpec::Vault(VaultGrant::Secret { path, method, params, revocable }) => {
            assert_eq!(path, "database/creds/ci");
            assert_eq!(*method, VaultMethod::Write);
            assert!(*revocable);
            assert_eq!(Value::Object(params.clone()), json!({"ttl": "5m", "n": 1, "f": 1.5, "list": [1, "a"]}));
        }
        other => panic!("{other:?}"),
    }
    match &p.grants[4].1 {
        GrantSpec::Jwt(j) => {
            assert_eq!(j.audience, "https://svc.example");
            assert_eq!(Value::Object(j.claims.clone()), json!({"scope": "review", "n": 2, "nested": {"a": true}}));
        }
        other => panic!("{other:?}"),
    }
}

use sha2::Digest;

#[test]
fn skips_table_tests_hidden_and_other_files() {
    let set = load(&[
        ("cap.toml", &format!("{HEAD}{PIN}{JWT}")),
        ("cap.test.toml", "this is not a policy"),
        (".cap.toml", "neither is this"),
        ("notes.md", "# nor this"),
        ("cap.aws.json", "{}"),
    ])
    .expect("loads");
    assert_eq!(set.policies.keys().collect::<Vec<_>>(), ["cap"]);
}

#[test]
fn capability_name_is_restricted() {
    let errors = load(&[("Bad Name.toml", &format!("{HEAD}{PIN}{JWT}"))]).expect_err("bad name");
    assert_eq!(errors[0].file, "Bad Name.toml");
    assert!(errors[0].message.contains("capability name"), "{errors:?}");
    load(&[("a.b_c-1.toml", &format!("{HEAD}{PIN}{JWT}"))]).expect("dots, dashes and underscores are fine");
}

#[test]
fn every_error_of_every_file_is_reported_and_the_set_fails() {
    let errors = load(&[
        ("good.toml", &format!("{HEAD}{PIN}{JWT}")),
        ("one.toml", &format!("{HEAD}{PIN}{JWT}").replace("github-actions", "nope")),
        ("two.toml", &format!("{HEAD}{PIN}{JWT}").replace("15m", "1s").replace("\"jwt\"", "\"ldap\"")),
    ])
    .expect_err("the whole set fails");
    let files: Vec<_> = errors.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(files, ["one.toml", "two.toml", "two.toml"], "{errors:?}");
    assert!(errors[0].to_string().starts_with("one.toml: unknown issuer `nope`"), "{}", errors[0]);
}

#[test]
fn unknown_keys_are_load_errors() {
    assert!(load_errors(&format!("{HEAD}{PIN}{JWT}colour = \"red\"\n")).contains("unknown field `colour`"));
    assert!(
        load_errors(&format!("agent = \"a\"\nissuer = \"github-actions\"\nttl = \"15m\"\nextra = 1\n{PIN}{JWT}"))
            .contains("unknown field `extra`")
    );
    let e = load_errors(&format!("{HEAD}{PIN}[[grant]]\nbackend = \"jwt\"\naudience = \"a\"\naudiance = \"b\"\n"));
    assert!(e.contains("unknown field `audiance`") && e.contains("grant 1"), "{e}");
    let e = load_errors(&format!(
        "{HEAD}{PIN}[[grant]]\nbackend = \"github\"\nowner = \"acme\"\nrepositories = [\"w\"]\n\
         permissions = {{ contents = \"read\" }}\nrepos = []\n"
    ));
    assert!(e.contains("unknown field `repos`"), "{e}");
}

#[test]
fn required_fields() {
    assert!(load_errors(&format!("issuer = \"github-actions\"\nttl = \"15m\"\n{PIN}{JWT}")).contains("`agent`"));
    assert!(load_errors(&format!("agent = \"a\"\nttl = \"15m\"\n{PIN}{JWT}")).contains("`issuer`"));
    assert!(load_errors(&format!("agent = \"a\"\nissuer = \"github-actions\"\n{PIN}{JWT}")).contains("`ttl`"));
    assert!(load_errors(&format!("{HEAD}{PIN}")).contains("at least one [[grant]]"));
    assert!(load_errors(&format!("{HEAD}{PIN}[[grant]]\naudience = \"a\"\n")).contains("`backend` is required"));
}

#[test]
fn agent_is_restricted() {
    let e = load_errors(&format!("{HEAD}{PIN}{JWT}").replace("pr-reviewer", "pr reviewer"));
    assert!(e.contains("agent `pr reviewer`"), "{e}");
}

#[test]
fn unknown_issuer_and_backend() {
    let e = load_errors(&format!("{HEAD}{PIN}{JWT}").replace("github-actions", "circleci"));
    assert!(e.contains("unknown issuer `circleci`") && e.contains("github-actions"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}{JWT}").replace("\"jwt\"", "\"gcp\""));
    assert!(e.contains("unknown backend `gcp`"), "{e}");
    // Known to latchkey, but not configured.
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "cap.toml", &format!("{HEAD}{PIN}{JWT}"));
    let mut c = ctx();
    c.backends = vec![BackendKind::Github];
    let e = PolicySet::load_dir(dir.path(), &c).expect_err("jwt not configured");
    assert!(e[0].message.contains("jwt backend is not configured"), "{e:?}");
}

#[test]
fn ttl_bounds() {
    let with_ttl = |ttl: &str| format!("{HEAD}{PIN}{JWT}").replace("\"15m\"", &format!("\"{ttl}\""));
    for ok in ["60s", "1m", "12h", "90m"] {
        load_one(&with_ttl(ok)).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
    }
    for bad in ["59s", "12h 1s", "0s", "1d"] {
        assert!(load_errors(&with_ttl(bad)).contains("out of bounds"), "{bad}");
    }
    assert!(load_errors(&with_ttl("soon")).contains("not a duration"));
    // An aws grant needs 15 minutes.
    let aws = "[[grant]]\nbackend = \"aws\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
    let text = format!("{HEAD}{PIN}{aws}");
    load_one(&text).expect("15m with aws");
    let e = load_errors(&text.replace("\"15m\"", "\"14m\""));
    assert!(e.contains("too short for an aws grant"), "{e}");
}

#[test]
fn unpinned_github_policy_fails_to_load() {
    let e = load_errors(&format!("{HEAD}[match]\nrepository = \"acme/widgets\"\n{JWT}"));
    assert!(e.contains("must pin `repository_owner_id` or `repository_id`"), "{e}");
    // A wildcard or a regex is not a pin.
    for pin in ["\"123*\"", "\"re:1234567\"", "[\"1234567\", \"*\"]", "\"12345?7\""] {
        let e = load_errors(&format!("{HEAD}[match]\nrepository_owner_id = {pin}\n{JWT}"));
        assert!(e.contains("must pin"), "{pin}: {e}");
    }
    // Literal pins, one or several, by owner or repository, strings or integers.
    for pin in ["repository_owner_id = \"1\"", "repository_id = 7654321", "repository_owner_id = [\"1\", \"2\"]"] {
        load_one(&format!("{HEAD}[match]\n{pin}\n{JWT}")).unwrap_or_else(|e| panic!("{pin}: {e:?}"));
    }
    // In [exclude] it is not a pin.
    let e = load_errors(&format!("{HEAD}[exclude]\nrepository_owner_id = \"1\"\n{JWT}"));
    assert!(e.contains("must pin"), "{e}");
}

#[test]
fn issuer_required_claims_count_as_a_pin() {
    let text =
        format!("{HEAD}[match]\nrepository = \"acme/widgets\"\n{JWT}").replace("github-actions", "github-pinned");
    load_one(&text).expect("the issuer pins the owner");
}

#[test]
fn gitlab_needs_namespace_or_project_id_and_generic_needs_nothing() {
    let gl = HEAD.replace("github-actions", "gitlab");
    let e = load_errors(&format!("{gl}[match]\nproject_path = \"acme/widgets\"\n{JWT}"));
    assert!(e.contains("`namespace_id` or `project_id`"), "{e}");
    load_one(&format!("{gl}[match]\nnamespace_id = \"42\"\n{JWT}")).expect("namespace pin");
    load_one(&format!("{gl}[match]\nproject_id = 42\n{JWT}")).expect("project pin");
    let generic = HEAD.replace("github-actions", "buildkite");
    load_one(&format!("{generic}[match]\norganization_slug = \"acme\"\n{JWT}")).expect("generic");
}

#[test]
fn match_values_are_strings_integers_booleans_or_lists() {
    let e = load_errors(&format!("{HEAD}{PIN}x = 1.5\n{JWT}"));
    assert!(e.contains("match.x: expected a string"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}x = {{ a = 1 }}\n{JWT}"));
    assert!(e.contains("match.x"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}x = [[\"a\"]]\n{JWT}"));
    assert!(e.contains("match.x"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}x = []\n{JWT}"));
    assert!(e.contains("match.x: an empty list"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}x = \"re:(\"\n{JWT}"));
    assert!(e.contains("match.x: invalid regex"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}{JWT}[exclude]\ny = \"re:[\"\n"));
    assert!(e.contains("exclude.y: invalid regex"), "{e}");
    policy(&format!("{PIN}a = true\nb = [1, \"two\", false]"));
}

#[test]
fn condition_compiles_at_load() {
    policy(&format!("condition = 'claims.actor == \"octocat\"'\n{PIN}"));
    let e = load_errors(&format!("{HEAD}condition = 'claims.actor =='\n{PIN}{JWT}"));
    assert!(e.contains("condition does not compile"), "{e}");
    let long = format!("{}true", "true && ".repeat(600));
    let e = load_errors(&format!("{HEAD}condition = '{long}'\n{PIN}{JWT}"));
    assert!(e.contains("characters long"), "{e}");
    let e = load_errors(&format!("{HEAD}condition = 'claims.ref.matches(\"^refs/\")'\n{PIN}{JWT}"));
    assert!(e.contains("`matches()` is not allowed"), "{e}");
}

#[test]
fn grant_names_are_unique_and_valid() {
    let e = load_errors(&format!("{HEAD}{PIN}{JWT}{JWT}"));
    assert!(e.contains("the name `jwt` is already taken"), "{e}");
    let named = JWT.replace("backend", "name = \"two\"\nbackend");
    policy(&format!("{PIN}{JWT}{named}"));
    let bad = JWT.replace("backend", "name = \"Two Words\"\nbackend");
    assert!(load_errors(&format!("{HEAD}{PIN}{bad}")).contains("the name must match"));
}

const GH: &str = "[[grant]]\nbackend = \"github\"\nowner = \"acme\"\nowner_id = 1234567\n";

#[test]
fn github_grant_checks() {
    let ok = |body: &str| {
        load_one(&format!("{HEAD}{PIN}{GH}{body}")).unwrap_or_else(|e| panic!("{body}: {e:?}"));
    };
    let err = |body: &str, want: &str| {
        let e = load_errors(&format!("{HEAD}{PIN}{GH}{body}"));
        assert!(e.contains(want), "{body}: wanted {want:?} in {e}");
    };
    ok("repositories = [\"widgets\"]\npermissions = { contents = \"read\" }\n");
    ok("repositories = \"*\"\npermissions = { contents = \"write\", workflows = \"write\" }\n");
    ok("repository_ids = [1, 2]\npermissions = { organization_projects = \"admin\" }\napp = \"other\"\n");
    err(
        "repositories = [\"widgets\"]\npermissions = { pull_request = \"read\" }\n",
        "unknown GitHub permission `pull_request`",
    );
    err("repositories = [\"widgets\"]\npermissions = { contents = \"admin\" }\n", "GitHub accepts read or write");
    err("repositories = [\"widgets\"]\npermissions = { workflows = \"read\" }\n", "GitHub accepts write");
    err("repositories = [\"widgets\"]\npermissions = { contents = \"READ\" }\n", "permission `contents`");
    err("repositories = [\"widgets\"]\n", "`permissions` is required");
    err("repositories = [\"widgets\"]\npermissions = {}\n", "`permissions` is required");
    err("permissions = { contents = \"read\" }\n", "`repositories` (names, or \"*\") or `repository_ids` is required");
    err("repositories = []\npermissions = { contents = \"read\" }\n", "`repositories` is empty");
    err("repositories = \"widgets\"\npermissions = { contents = \"read\" }\n", "a list of names, or \"*\"");
    err("repositories = [\"acme/widgets\"]\npermissions = { contents = \"read\" }\n", "without its owner");
    err("repositories = [\"w\", \"w\"]\npermissions = { contents = \"read\" }\n", "a name twice");
    err("repositories = [\"w\"]\nrepository_ids = [1]\npermissions = { contents = \"read\" }\n", "not both");
    err("repositories = [\"w\"]\npermissions = { contents = \"read\" }\napp = \"nope\"\n", "unknown GitHub app `nope`");
    let many: Vec<String> = (0..501).map(|i| format!("\"r{i}\"")).collect();
    err(&format!("repositories = [{}]\npermissions = {{ contents = \"read\" }}\n", many.join(",")), "at most 500");
    let e = load_errors(&format!(
        "{HEAD}{PIN}[[grant]]\nbackend = \"github\"\nrepositories = [\"w\"]\npermissions = {{ contents = \"read\" }}\n"
    ));
    assert!(e.contains("`owner` or `installation_id` is required"), "{e}");
}

const AWS: &str = "[[grant]]\nbackend = \"aws\"\n";

#[test]
fn aws_grant_checks() {
    let err = |body: &str, want: &str| {
        let e = load_errors(&format!("{HEAD}{PIN}{AWS}{body}"));
        assert!(e.contains(want), "{body}: wanted {want:?} in {e}");
    };
    err("role_arn = \"arn:aws:iam::123:role/r\"\n", "not an IAM role ARN");
    err("role_arn = \"arn:aws:iam::123456789012:user/r\"\n", "not an IAM role ARN");
    err("role_arn = \"arn:aws:s3:::bucket\"\n", "not an IAM role ARN");
    err("\n", "missing field `role_arn`");
    let role = "role_arn = \"arn:aws-us-gov:iam::123456789012:role/a/b/c\"\n";
    load_one(&format!("{HEAD}{PIN}{AWS}{role}")).expect("gov partition, path");
    let arns: Vec<String> = (0..11).map(|i| format!("\"arn:aws:iam::aws:policy/P{i}\"")).collect();
    err(&format!("{role}policy_arns = [{}]\n", arns.join(",")), "at most 10");
    err(&format!("{role}policy_arns = [\"arn:aws:iam::aws:role/x\"]\n"), "not an IAM managed policy ARN");
    err(&format!("{role}external_id = \"x\"\n"), "`external_id`");
    err(&format!("{role}session_policy = \"missing.json\"\n"), "session_policy `missing.json`: cannot read");
}

#[test]
fn session_policy_is_read_relative_to_the_policy_and_bounded() {
    let role = "role_arn = \"arn:aws:iam::123456789012:role/r\"\nsession_policy = \"sp.json\"\n";
    let text = format!("{HEAD}{PIN}{AWS}{role}");
    let try_with = |json: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "cap.toml", &text);
        write(dir.path(), "sp.json", json);
        PolicySet::load_dir(dir.path(), &ctx())
    };
    // Whitespace does not count against the limit.
    let filler = "x".repeat(2000);
    let spaced = format!("{{\n    \"Version\"  :  \"2012-10-17\",\n    \"Sid\" : \"{filler}\"\n}}\n");
    assert!(spaced.len() > 2048 - 40);
    try_with(&spaced).expect("fits without whitespace");
    let too_long = format!("{{\"Version\":\"2012-10-17\",\"Sid\":\"{}\"}}", "x".repeat(2048));
    let e = try_with(&too_long).expect_err("too long");
    assert!(e[0].message.contains("STS allows at most 2048"), "{e:?}");
    let e = try_with("{ not json").expect_err("not json");
    assert!(e[0].message.contains("not JSON"), "{e:?}");
    let e = try_with("[1]").expect_err("not an object");
    assert!(e[0].message.contains("not a JSON object"), "{e:?}");
}

const VAULT: &str = "[[grant]]\nbackend = \"vault\"\n";

#[test]
fn vault_grant_checks() {
    let err = |body: &str, want: &str| {
        let e = load_errors(&format!("{HEAD}{PIN}{VAULT}{body}"));
        assert!(e.contains(want), "{body}: wanted {want:?} in {e}");
    };
    err("kind = \"token\"\npolicies = [\"root\"]\n", "`root` policy is never granted");
    err("kind = \"token\"\npolicies = [\"ci\", \"Root\"]\n", "`root` policy is never granted");
    err("kind = \"token\"\npolicies = []\n", "`policies` is required");
    err("kind = \"token\"\n", "`policies` is required");
    err("kind = \"token\"\npolicies = [\"ci\"]\nnum_uses = 0\n", "at least 1");
    err("kind = \"token\"\npolicies = [\"ci\"]\npath = \"x\"\n", "`path` does not apply");
    err("kind = \"secret\"\n", "`path` is required");
    err("kind = \"secret\"\npath = \"p\"\nmethod = \"delete\"\n", "method `delete`");
    err("kind = \"secret\"\npath = \"p\"\npolicies = [\"ci\"]\n", "`policies` does not apply");
    err("kind = \"lease\"\n", "kind `lease`");
    err("policies = [\"ci\"]\n", "missing field `kind`");
    let set = policy(&format!("{PIN}{VAULT}kind = \"secret\"\npath = \"kv/x\"\nrevocable = false\n"));
    assert_eq!(
        set.policies["cap"].grants[0].1,
        GrantSpec::Vault(VaultGrant::Secret {
            path: "kv/x".into(),
            method: VaultMethod::Read,
            params: Default::default(),
            revocable: false
        })
    );
}

#[test]
fn vault_secret_paths_stay_paths() {
    for (path, want) in [("kv/x?list=true", "no query"), ("kv/../sys/x", "segments"), ("kv/a b", "no query")] {
        let e = load_errors(&format!("{HEAD}{PIN}{VAULT}kind = \"secret\"\npath = \"{path}\"\n"));
        assert!(e.contains(want), "{path}: {e}");
    }
}

#[test]
fn vault_token_policies_must_be_within_the_token_role_when_it_is_known() {
    let text = format!("{HEAD}{PIN}{VAULT}kind = \"token\"\npolicies = [\"ci-read\", \"admin\"]\n");
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "cap.toml", &text);
    assert!(PolicySet::load_dir(dir.path(), &ctx()).is_ok(), "unknown role: checked at mint instead");
    let limits = VaultPolicyLimits { allowed: vec!["ci-read".into()], ..Default::default() };
    let ctx = LoadContext { vault_policies: Some(limits), ..ctx() };
    let errors = PolicySet::load_dir(dir.path(), &ctx).expect_err("admin is outside the role");
    let text = errors.iter().map(ToString::to_string).collect::<String>();
    assert!(text.contains("policy `admin` is not allowed by the Vault token role (allowed: ci-read)"), "{text}");
    assert!(!text.contains("`ci-read`"), "{text}");
}

#[test]
fn vault_policy_limits_follow_vaults_rules() {
    let limits = VaultPolicyLimits {
        allowed: vec!["ci-read".into()],
        allowed_glob: vec!["team-*-read".into()],
        disallowed: vec!["team-secret-read".into()],
        disallowed_glob: vec!["*-admin".into()],
    };
    assert!(limits.permits("ci-read"));
    assert!(limits.permits("CI-Read"), "Vault lowercases policy names");
    assert!(limits.permits("default"), "Vault allows `default` on every role");
    assert!(limits.permits("team-a/b-read"), "a glob's `*` crosses slashes");
    assert!(!limits.permits("team-secret-read"), "disallowed wins");
    assert!(!limits.permits("team-x-admin"));
    assert!(!limits.permits("ci-write"));
    assert!(!limits.permits("root"));
    let open = VaultPolicyLimits { disallowed: vec!["prod".into()], ..Default::default() };
    assert!(open.permits("anything"), "no allowed list: the broker token's policies decide");
    assert!(!open.permits("prod") && !open.permits("root"));
    assert_eq!(open.describe(), "the broker token's own policies");
}

#[test]
fn jwt_grant_checks() {
    for claim in ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"] {
        let e = load_errors(&format!("{HEAD}{PIN}{JWT}claims = {{ {claim} = \"x\" }}\n"));
        assert!(e.contains(&format!("`{claim}` is a registered claim")), "{e}");
    }
    let e = load_errors(&format!("{HEAD}{PIN}[[grant]]\nbackend = \"jwt\"\n"));
    assert!(e.contains("missing field `audience`"), "{e}");
    let e = load_errors(&format!("{HEAD}{PIN}[[grant]]\nbackend = \"jwt\"\naudience = \" \"\n"));
    assert!(e.contains("`audience` may not be empty"), "{e}");
}

#[test]
fn a_missing_directory_is_an_error() {
    let e = PolicySet::load_dir(Path::new("/nonexistent/latchkey/policies"), &ctx()).expect_err("missing");
    assert!(e[0].message.contains("cannot read the policy directory"), "{e:?}");
}

// ---------------------------------------------------------------- deciding

fn review_set() -> PolicySet {
    policy(
        r#"condition = 'claims.runner_environment == "github-hosted"'
[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
event_name = ["pull_request", "workflow_dispatch"]
ref = ["refs/heads/main", "refs/pull/*/merge"]

[exclude]
actor = "dependabot[bot]"
"#,
    )
}

#[test]
fn allows_a_matching_identity() {
    let set = review_set();
    let d = decide(&set, &with(json!({})));
    let Outcome::Allow { agent, ttl, grants, .. } = &d.outcome else { panic!("{d:?}") };
    assert_eq!(agent, "pr-reviewer");
    assert_eq!(*ttl, Duration::from_secs(900));
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].name, "jwt");
    assert_eq!(grants[0].ttl, Duration::from_secs(900));
    assert_eq!(d.policy_sha256.as_deref(), Some(set.policies["cap"].sha256.as_str()));
    assert!(d.trace.iter().all(|s| s.passed));
    let rules: Vec<_> = d.trace.iter().map(|s| s.rule.as_str()).collect();
    assert_eq!(
        rules,
        [
            "issuer",
            "match.event_name",
            "match.ref",
            "match.repository",
            "match.repository_owner_id",
            "exclude.actor",
            "condition"
        ]
    );
}

#[test]
fn unknown_capability() {
    let d = review_set().decide("nope", &with(json!({})), None);
    assert_eq!(deny_reason(&d), Some(DenyReason::UnknownCapability));
    assert_eq!(d.policy_sha256, None);
    assert_eq!(d.capability, "nope");
    assert_eq!(d.trace.len(), 1);
    assert!(!d.trace[0].passed);
}

#[test]
fn wrong_issuer() {
    let set = review_set();
    let mut c = with(json!({}));
    c.issuer = "gitlab".into();
    let d = decide(&set, &c);
    assert_eq!(deny_reason(&d), Some(DenyReason::WrongIssuer));
    assert!(d.policy_sha256.is_some());
    assert_eq!(d.trace.len(), 1);
    assert_eq!(d.trace[0].rule, "issuer");
    assert_eq!(d.trace[0].value, Some(json!("gitlab")));
    assert_eq!(d.trace[0].expected, Some(json!("github-actions")));
}

#[test]
fn match_is_on_the_whole_value() {
    let set = review_set();
    let d = decide(&set, &with(json!({"repository": "acme/widgets-evil"})));
    assert_eq!(deny_reason(&d), Some(DenyReason::NoMatch));
    let step = failing_step(&d);
    assert_eq!(step.rule, "match.repository");
    assert_eq!(step.claim.as_deref(), Some("repository"));
    assert_eq!(step.value, Some(json!("acme/widgets-evil")));
    assert_eq!(step.expected, Some(json!(["acme/widgets"])));
    assert_eq!(step.note.as_deref(), Some("no pattern matches"));
}

#[test]
fn list_means_any_of() {
    let set = review_set();
    assert_eq!(deny_reason(&decide(&set, &with(json!({"event_name": "workflow_dispatch"})))), None);
    assert_eq!(deny_reason(&decide(&set, &with(json!({"ref": "refs/heads/main"})))), None);
    let d = decide(&set, &with(json!({"ref": "refs/pull/42/head"})));
    assert_eq!(failing_step(&d).rule, "match.ref");
    let d = decide(&set, &with(json!({"event_name": "pull_request_target"})));
    assert_eq!(failing_step(&d).rule, "match.event_name");
}

#[test]
fn every_match_key_is_traced_even_after_a_failure() {
    let set = review_set();
    let d = decide(&set, &with(json!({"event_name": "push", "repository": "other/x"})));
    assert_eq!(deny_reason(&d), Some(DenyReason::NoMatch));
    let failed: Vec<_> = d.trace.iter().filter(|s| !s.passed).map(|s| s.rule.as_str()).collect();
    assert_eq!(failed, ["match.event_name", "match.repository"]);
    assert_eq!(d.trace.iter().filter(|s| s.rule.starts_with("match.")).count(), 4);
    // Nothing after [match] ran.
    assert!(d.trace.iter().all(|s| !s.rule.starts_with("exclude.") && s.rule != "condition"));
}

#[test]
fn an_absent_claim_never_matches_not_even_a_wildcard() {
    let set = policy(&format!("{PIN}environment = \"*\"\nworkflow = \"**\""));
    let d = decide(&set, &with(json!({"workflow": "a/b"})));
    let step = failing_step(&d);
    assert_eq!(step.rule, "match.environment");
    assert_eq!(step.value, None);
    assert_eq!(step.note.as_deref(), Some("claim absent"));
    assert_eq!(deny_reason(&decide(&set, &with(json!({"environment": "x", "workflow": "a/b"})))), None);
}

#[test]
fn arrays_objects_and_null_never_match() {
    let set = policy(&format!("{PIN}groups = \"**\""));
    for (value, note) in [
        (json!(["a"]), "array claims never match"),
        (json!({"a": 1}), "object claims never match"),
        (json!([]), "array claims never match"),
    ] {
        let d = decide(&set, &with(json!({ "groups": value })));
        assert_eq!(deny_reason(&d), Some(DenyReason::NoMatch));
        assert_eq!(failing_step(&d).note.as_deref(), Some(note));
    }
    let mut c = with(json!({}));
    c.claims.insert("groups".into(), Value::Null);
    let d = decide(&set, &c);
    assert_eq!(failing_step(&d).note.as_deref(), Some("null claims never match"));
}

#[test]
fn numbers_and_booleans_compare_by_json_text() {
    let set = policy("[match]\nrepository_owner_id = 1234567\nrepository_id = \"7654321\"\nfork = false");
    // Claims as numbers and strings, both ways round.
    let c = with(json!({"repository_owner_id": 1234567, "repository_id": "7654321", "fork": false}));
    assert_eq!(deny_reason(&decide(&set, &c)), None);
    let c = with(json!({"repository_owner_id": "1234567", "repository_id": 7654321, "fork": "false"}));
    assert_eq!(deny_reason(&decide(&set, &c)), None);
    let c = with(json!({"repository_owner_id": 1234567.0, "fork": false}));
    let d = decide(&set, &c);
    assert_eq!(failing_step(&d).rule, "match.repository_owner_id", "1234567.0 is not 1234567");
    let c = with(json!({"fork": true}));
    assert_eq!(failing_step(&decide(&set, &c)).rule, "match.fork");
}

#[test]
fn exclude_denies_on_match_and_fails_closed() {
    let set = review_set();
    let d = decide(&set, &with(json!({"actor": "dependabot[bot]"})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Excluded));
    let step = failing_step(&d);
    assert_eq!(step.rule, "exclude.actor");
    assert_eq!(step.note.as_deref(), Some("excluded"));
    // The brackets are literal: `dependabotb` is not excluded.
    assert_eq!(deny_reason(&decide(&set, &with(json!({"actor": "dependabotb"})))), None);
    // Absent: excluded.
    let d = decide(&set, &with(json!({"actor": null})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Excluded));
    assert!(failing_step(&d).note.as_deref().is_some_and(|n| n.contains("claim absent")));
    // Not comparable: excluded.
    let d = decide(&set, &with(json!({"actor": ["dependabot[bot]"]})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Excluded));
    assert!(failing_step(&d).note.as_deref().is_some_and(|n| n.contains("fail closed")));
    // A passing exclude is traced as passed.
    let d = decide(&set, &with(json!({})));
    assert!(d.trace.iter().any(|s| s.rule == "exclude.actor" && s.passed && s.value == Some(json!("octocat"))));
}

#[test]
fn regex_patterns_in_match() {
    let set = policy(&format!("{PIN}ref = \"re:refs/(heads/main|tags/v[0-9]+)\""));
    assert_eq!(deny_reason(&decide(&set, &with(json!({"ref": "refs/tags/v12"})))), None);
    assert_eq!(deny_reason(&decide(&set, &with(json!({"ref": "refs/heads/main"})))), None);
    for bad in ["refs/tags/v1x", "xrefs/heads/main", "refs/heads/main2"] {
        assert_eq!(deny_reason(&decide(&set, &with(json!({ "ref": bad })))), Some(DenyReason::NoMatch), "{bad}");
    }
}

#[test]
fn condition_false_error_and_non_bool_deny() {
    let set = review_set();
    let d = decide(&set, &with(json!({"runner_environment": "self-hosted"})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Condition));
    let step = failing_step(&d);
    assert_eq!(step.rule, "condition");
    assert_eq!(step.expected, Some(json!("claims.runner_environment == \"github-hosted\"")));
    assert_eq!(step.note.as_deref(), Some("condition is false"));

    let d = decide(&set, &with(json!({"runner_environment": null})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Condition));
    assert!(failing_step(&d).note.as_deref().is_some_and(|n| n.starts_with("CEL error")), "{d:?}");

    let set = policy(&format!("condition = 'claims.actor'\n{PIN}"));
    let d = decide(&set, &with(json!({})));
    assert_eq!(deny_reason(&d), Some(DenyReason::Condition));
    assert!(failing_step(&d).note.as_deref().is_some_and(|n| n.contains("not a bool")), "{d:?}");

    let set = policy(&format!("condition = '\"admins\" in claims.groups && claims.run_attempt < 3'\n{PIN}"));
    assert_eq!(deny_reason(&decide(&set, &with(json!({"groups": ["admins"], "run_attempt": 1})))), None);
    assert_eq!(
        deny_reason(&decide(&set, &with(json!({"groups": ["devs"], "run_attempt": 1})))),
        Some(DenyReason::Condition)
    );
}

// ---------------------------------------------------------------- narrowing and ordering

fn narrow(value: Value) -> Narrowing {
    serde_json::from_value(value).expect("narrowing")
}

fn multi_set() -> PolicySet {
    policy(&format!(
        r#"{PIN}
[[grant]]
backend = "aws"
role_arn = "arn:aws:iam::123456789012:role/r"

[[grant]]
name = "code"
backend = "github"
owner = "acme"
repositories = ["widgets", "gadgets"]
permissions = {{ contents = "write", pull_requests = "read" }}

[[grant]]
name = "all"
backend = "github"
owner = "acme"
repositories = "*"
permissions = {{ contents = "read" }}

[[grant]]
name = "ids"
backend = "github"
owner = "acme"
repository_ids = [1, 2]
permissions = {{ contents = "read" }}

[[grant]]
backend = "vault"
kind = "token"
policies = ["a", "b"]

[[grant]]
backend = "jwt"
audience = "x"
"#
    ))
}

fn allowed(d: &Decision) -> (&Duration, &[AuthorizedGrant]) {
    match &d.outcome {
        Outcome::Allow { ttl, grants, .. } => (ttl, grants),
        Outcome::Deny(r) => panic!("denied: {r:?} {:#?}", d.trace),
    }
}

fn grant<'a>(grants: &'a [AuthorizedGrant], name: &str) -> &'a AuthorizedGrant {
    grants.iter().find(|g| g.name == name).expect("grant present")
}

#[test]
fn aws_grants_are_last_and_order_is_otherwise_kept() {
    let set = multi_set();
    assert_eq!(set.policies["cap"].grants[0].0, "aws", "file order is kept in the policy");
    let d = decide(&set, &with(json!({})));
    let (_, grants) = allowed(&d);
    let names: Vec<_> = grants.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["code", "all", "ids", "vault", "jwt", "aws"]);
}

#[test]
fn narrowing_within_the_policy_is_applied() {
    let set = multi_set();
    let n = narrow(json!({
        "code": {"repositories": ["gadgets", "gadgets"], "permissions": {"contents": "read"}, "ttl": "5m"},
        "all": {"repositories": ["anything"]},
        "ids": {"repositories": ["2"]},
        "vault": {"policies": ["b"]},
        "aws": {"ttl": "15m"},
    }));
    let d = set.decide("cap", &with(json!({})), Some(&n));
    let (ttl, grants) = allowed(&d);
    assert_eq!(*ttl, Duration::from_secs(900), "the longest grant");
    let code = grant(grants, "code");
    assert_eq!(code.ttl, Duration::from_secs(300));
    let GrantSpec::Github(g) = &code.spec else { panic!() };
    assert_eq!(g.repositories, GithubRepositories::Names(vec!["gadgets".into()]));
    assert_eq!(g.permissions, BTreeMap::from([("contents".into(), "read".into())]));
    let GrantSpec::Github(g) = &grant(grants, "all").spec else { panic!() };
    assert_eq!(g.repositories, GithubRepositories::Names(vec!["anything".into()]));
    let GrantSpec::Github(g) = &grant(grants, "ids").spec else { panic!() };
    assert_eq!(g.repositories, GithubRepositories::Ids(vec![2]));
    assert_eq!(
        grant(grants, "vault").spec,
        GrantSpec::Vault(VaultGrant::Token { policies: vec!["b".into()], num_uses: None })
    );
    assert_eq!(grant(grants, "jwt").ttl, Duration::from_secs(900), "not narrowed: the policy ttl");
    let steps: Vec<_> = d.trace.iter().filter(|s| s.rule.starts_with("narrow.")).map(|s| s.rule.as_str()).collect();
    assert!(steps.contains(&"narrow.code.permissions") && steps.contains(&"narrow.vault.policies"), "{steps:?}");
    assert!(d.trace.iter().all(|s| s.passed));

    // Every grant narrowed below the policy TTL: the exchange is as short as its longest grant.
    let n = narrow(json!({"jwt": {"ttl": "2m"}}));
    let single = policy(PIN);
    let d = single.decide("cap", &with(json!({})), Some(&n));
    assert_eq!(*allowed(&d).0, Duration::from_secs(120));
}

#[test]
fn narrowing_wider_or_misapplied_is_refused() {
    let set = multi_set();
    let cases = [
        (json!({"nope": {"ttl": "5m"}}), "narrow.nope", "no grant of this name"),
        (json!({"code": {"repositories": ["other"]}}), "narrow.code.repositories", "`other` is not in the policy"),
        (json!({"code": {"repositories": []}}), "narrow.code.repositories", "empty"),
        (json!({"all": {"repositories": ["acme/x"]}}), "narrow.all.repositories", "without its owner"),
        (json!({"ids": {"repositories": ["3"]}}), "narrow.ids.repositories", "not in the policy"),
        (json!({"ids": {"repositories": ["widgets"]}}), "narrow.ids.repositories", "narrow by id"),
        (json!({"code": {"permissions": {"contents": "admin"}}}), "narrow.code.permissions", "above"),
        (json!({"code": {"permissions": {"pull_requests": "write"}}}), "narrow.code.permissions", "above"),
        (json!({"code": {"permissions": {"issues": "read"}}}), "narrow.code.permissions", "not granted"),
        (json!({"code": {"permissions": {"contents": "all"}}}), "narrow.code.permissions", "level"),
        (json!({"code": {"permissions": {}}}), "narrow.code.permissions", "empty"),
        (json!({"vault": {"policies": ["c"]}}), "narrow.vault.policies", "not in the policy"),
        (json!({"code": {"ttl": "16m"}}), "narrow.code.ttl", "longer"),
        (json!({"code": {"ttl": "59s"}}), "narrow.code.ttl", "shorter"),
        (json!({"aws": {"ttl": "14m"}}), "narrow.aws.ttl", "shorter"),
        (json!({"code": {"ttl": "soon"}}), "narrow.code.ttl", "not a duration"),
        (json!({"jwt": {"repositories": ["widgets"]}}), "narrow.jwt.repositories", "does not apply to a jwt grant"),
        (json!({"aws": {"permissions": {"contents": "read"}}}), "narrow.aws.permissions", "does not apply"),
        (json!({"code": {"policies": ["a"]}}), "narrow.code.policies", "does not apply"),
    ];
    for (n, rule, note) in cases {
        let d = set.decide("cap", &with(json!({})), Some(&narrow(n.clone())));
        assert_eq!(deny_reason(&d), Some(DenyReason::NarrowingWider), "{n}");
        let step = failing_step(&d);
        assert_eq!(step.rule, rule, "{n}");
        assert!(step.note.as_deref().is_some_and(|s| s.contains(note)), "{n}: {:?}", step.note);
    }
    // Narrowing is checked only after the identity is admitted.
    let d = set.decide("cap", &with(json!({"repository_owner_id": "1"})), Some(&narrow(json!({"nope": {}}))));
    assert_eq!(deny_reason(&d), Some(DenyReason::NoMatch));
}

#[test]
fn narrowing_rejects_unknown_fields() {
    assert!(serde_json::from_value::<Narrowing>(json!({"code": {"scopes": []}})).is_err());
}

#[test]
fn vault_secret_cannot_be_narrowed_by_policies() {
    let set = policy(&format!("{PIN}{VAULT}kind = \"secret\"\npath = \"kv/x\"\n"));
    let d = set.decide("cap", &with(json!({})), Some(&narrow(json!({"vault": {"policies": ["a"]}}))));
    assert_eq!(deny_reason(&d), Some(DenyReason::NarrowingWider));
    assert!(failing_step(&d).note.as_deref().is_some_and(|n| n.contains("vault secret")));
}

#[test]
fn traces_serialize_without_empty_fields() {
    let d = review_set().decide("cap", &with(json!({"repository": "x/y"})), None);
    let json = serde_json::to_value(&d.trace).expect("serializes");
    assert_eq!(
        json[0],
        json!({"rule": "issuer", "value": "github-actions", "expected": "github-actions", "passed": true})
    );
    let step = d.trace.iter().position(|s| s.rule == "match.repository").expect("step");
    assert_eq!(
        json[step],
        json!({"rule": "match.repository", "claim": "repository", "value": "x/y", "expected": ["acme/widgets"],
               "passed": false, "note": "no pattern matches"})
    );
}

// ---------------------------------------------------------------- lint

fn warnings(body: &str) -> Vec<String> {
    policy(body).lint().into_iter().map(|w| w.message).collect()
}

#[test]
fn lint_is_quiet_for_a_careful_policy() {
    let w = warnings(&format!(
        "{PIN}ref = \"refs/heads/main\"\nevent_name = \"push\"\n{GH}repositories = [\"w\"]\npermissions = {{ contents = \"write\" }}"
    ));
    assert!(w.is_empty(), "{w:?}");
    assert!(warnings(&format!("{PIN}ref = \"refs/heads/main\"")).is_empty());
}

#[test]
fn lint_flags_an_owner_found_by_login_without_its_id() {
    let grant = "[[grant]]\nbackend = \"github\"\nowner = \"acme\"\nrepositories = [\"w\"]\npermissions = { contents = \"read\" }";
    let w = warnings(&format!("{PIN}ref = \"refs/heads/main\"\n{grant}"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("without `owner_id`"), "{w:?}");
    let pinned = grant.replace("owner = \"acme\"", "installation_id = 5");
    assert!(
        warnings(&format!("{PIN}ref = \"refs/heads/main\"\n{pinned}")).is_empty(),
        "a pinned installation is an id"
    );
}

#[test]
fn lint_write_without_ref_or_environment() {
    let gh_write = format!("{GH}repositories = [\"w\"]\npermissions = {{ contents = \"write\" }}");
    let w = warnings(&format!("{PIN}event_name = \"push\"\n{gh_write}"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("constrains neither `ref` nor `environment`") && w[0].contains("`github`"), "{w:?}");
    // A wildcard ref does not count as a constraint.
    let w = warnings(&format!("{PIN}event_name = \"push\"\nref = \"**\"\n{gh_write}"));
    assert!(w.iter().any(|m| m.contains("neither `ref`")), "{w:?}");
    // An environment does.
    assert!(warnings(&format!("{PIN}event_name = \"push\"\nenvironment = \"prod\"\n{gh_write}")).is_empty());
    // aws is a writer; read-only github is not; vault write is.
    let aws = format!("{AWS}role_arn = \"arn:aws:iam::123456789012:role/r\"");
    assert!(warnings(&format!("{PIN}event_name = \"push\"\n{aws}")).iter().any(|m| m.contains("`aws`")));
    let gh_read = format!("{GH}repositories = [\"w\"]\npermissions = {{ contents = \"read\" }}");
    assert!(warnings(&format!("{PIN}event_name = \"push\"\n{gh_read}")).is_empty());
    let vw = format!("{VAULT}kind = \"secret\"\npath = \"p\"\nmethod = \"write\"");
    assert!(warnings(&format!("{PIN}event_name = \"push\"\n{vw}")).iter().any(|m| m.contains("`vault`")));
}

#[test]
fn lint_pull_request_target_with_a_write_grant() {
    let gh_write = format!("{GH}repositories = [\"w\"]\npermissions = {{ contents = \"write\" }}");
    let prt = |m: &Vec<String>| m.iter().any(|w| w.contains("pull_request_target"));
    for event in ["\"pull_request_target\"", "\"pull_request*\"", "[\"push\", \"*\"]", "\"re:pull_request.*\""] {
        let w = warnings(&format!("{PIN}ref = \"refs/heads/main\"\nevent_name = {event}\n{gh_write}"));
        assert!(prt(&w), "{event}: {w:?}");
    }
    // Not constrained at all on a GitHub issuer: admitted.
    assert!(prt(&warnings(&format!("{PIN}ref = \"refs/heads/main\"\n{gh_write}"))));
    // Excluded, or not matched, or no write grant: quiet.
    let excluded =
        format!("{PIN}ref = \"refs/heads/main\"\n{gh_write}\n[exclude]\nevent_name = \"pull_request_target\"");
    assert!(!prt(&warnings(&excluded)));
    assert!(!prt(&warnings(&format!("{PIN}ref = \"refs/heads/main\"\nevent_name = \"pull_request\"\n{gh_write}"))));
    assert!(!prt(&warnings(&format!("{PIN}ref = \"refs/heads/main\"\nevent_name = \"*\""))));
}

#[test]
fn lint_all_repositories_only_wildcards_and_unrevocable() {
    let w = warnings(&format!(
        "{PIN}ref = \"refs/heads/main\"\n{GH}repositories = \"*\"\npermissions = {{ contents = \"read\" }}"
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("repositories = \"*\""), "{w:?}");

    let pinned = HEAD.replace("github-actions", "github-pinned");
    let set = load_one(&format!("{pinned}[match]\nrepository = \"**\"\nref = \"*\"\n{JWT}")).expect("loads");
    let w: Vec<_> = set.lint().into_iter().map(|w| w.message).collect();
    assert!(w.iter().any(|m| m.contains("only wildcards")), "{w:?}");
    let set = load_one(&format!("{pinned}{JWT}")).expect("loads without [match]");
    assert!(set.lint().iter().any(|w| w.message.contains("only wildcards") && w.capability == "cap"));

    let w = warnings(&format!("{PIN}{VAULT}kind = \"secret\"\npath = \"kv/x\"\nrevocable = false"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("revocable = false"), "{w:?}");
}

// ---------------------------------------------------------------- table tests

#[test]
fn example_policies_load_lint_clean_and_pass_their_table_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut c = ctx();
    c.backends = vec![BackendKind::Jwt];
    let set = PolicySet::load_dir(&dir, &c).expect("example policies load with only the jwt backend");
    assert!(set.policies.contains_key("pr-review") && set.policies.contains_key("deploy-staging"));
    assert_eq!(set.lint(), vec![], "no warnings");
    let report = run_table_tests(&dir, &set, &c).expect("table tests are well formed");
    assert!(report.cases.len() >= 10);
    assert!(report.all_passed(), "{report}");
}

#[test]
fn table_tests_report_failures_with_their_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "cap.toml",
        &format!("{HEAD}[match]\nrepository_owner_id = \"1\"\nref = \"refs/heads/main\"\n{JWT}"),
    );
    write(
        dir.path(),
        "cap.test.toml",
        r#"
[claims]
repository_owner_id = "1"
ref = "refs/heads/main"

[[case]]
name = "passes"
capability = "cap"
expect = "allow"
grants = ["jwt"]

[[case]]
name = "wrong expectation"
capability = "cap"
claims = { ref = "refs/heads/dev" }
expect = "allow"

[[case]]
name = "wrong rule"
capability = "cap"
remove = ["repository_owner_id"]
expect = "deny"
denied_by = "match.ref"
reason = "no_match"

[[case]]
name = "wrong grants"
capability = "cap"
expect = "allow"
grants = ["other"]

[[case]]
name = "denied as expected"
capability = "cap"
claims = { ref = "refs/heads/dev" }
narrow = { jwt = { ttl = "1m" } }
expect = "deny"
denied_by = "match.ref"
reason = "no_match"
"#,
    );
    let set = PolicySet::load_dir(dir.path(), &ctx()).expect("loads");
    let report = run_table_tests(dir.path(), &set, &ctx()).expect("well formed");
    let results: Vec<_> = report.cases.iter().map(|c| (c.name.as_str(), c.passed)).collect();
    assert_eq!(
        results,
        [
            ("passes", true),
            ("wrong expectation", false),
            ("wrong rule", false),
            ("wrong grants", false),
            ("denied as expected", true)
        ]
    );
    assert_eq!((report.passed(), report.failed()), (2, 3));
    assert!(!report.all_passed());
    assert_eq!(report.cases[1].failure.as_deref(), Some("expected allow, got deny (no_match) by `match.ref`"));
    assert_eq!(
        report.cases[2].failure.as_deref(),
        Some("expected deny by `match.ref`, got deny by `match.repository_owner_id`")
    );
    assert!(report.cases[1].trace.iter().any(|s| s.rule == "match.ref" && !s.passed));
    let text = report.to_string();
    assert!(text.contains("FAIL cap.test.toml: wrong expectation [cap]"), "{text}");
    assert!(text.contains("FAIL match.ref value=\"refs/heads/dev\""), "{text}");
    assert!(text.ends_with("2 passed, 3 failed"), "{text}");
}

#[test]
fn malformed_table_tests_are_errors() {
    let set = policy(PIN);
    let run = |text: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "x.test.toml", text);
        run_table_tests(dir.path(), &set, &ctx())
    };
    let msg = |text: &str| run(text).expect_err("malformed")[0].to_string();
    assert!(msg("").contains("no [[case]]"));
    assert!(msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nexpect = \"maybe\"\n").contains("maybe"));
    assert!(msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nexpect = \"allow\"\nclaim = {}\n").contains("claim"));
    let e = msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nissuer = \"nope\"\nexpect = \"deny\"\n");
    assert!(e.starts_with("x.test.toml: case 1 (a): unknown issuer `nope`"), "{e}");
    let e = msg("[[case]]\nname = \"a\"\ncapability = \"other\"\nexpect = \"deny\"\n");
    assert!(e.contains("give the case an `issuer`"), "{e}");
    let e = msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nexpect = \"allow\"\ndenied_by = \"x\"\n");
    assert!(e.contains("go with expect = \"deny\""), "{e}");
    let e = msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nexpect = \"deny\"\nremove = [\"x\"]\n");
    assert!(e.contains("`x` is not in [claims]"), "{e}");
    let e = msg("[[case]]\nname = \"a\"\ncapability = \"cap\"\nexpect = \"deny\"\nnarrow = { jwt = { scope = 1 } }\n");
    assert!(e.contains("scope"), "{e}");
    // No test files at all: an empty report.
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(run_table_tests(dir.path(), &set, &ctx()).expect("empty").cases.len(), 0);
}

// ---------------------------------------------------------------- hot path

#[test]
fn decide_is_cheap() {
    let set = review_set();
    let c = with(json!({}));
    let start = std::time::Instant::now();
    for _ in 0..2_000 {
        assert!(matches!(set.decide("cap", &c, None).outcome, Outcome::Allow { .. }));
    }
    // Generous for an unoptimized build on a busy machine; catches compiling at decide time.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}
