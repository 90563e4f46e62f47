//! Keeps `docs/ISSUERS.md` true.
//!
//! Every ```toml block holding an `[[issuer]]` must load as latchkey configuration. Every
//! ```json claim set tagged `<!-- claims: ISSUER_ID -->` must be one that issuer accepts
//! (`iss`, `aud`, `jti` when single use, `required_claims`) and must map to the canonical
//! `repository` and `workflow` that the line after it states. Every ```toml policy snippet
//! tagged `<!-- policy: ISSUER_ID -->` must load with the real policy loader and admit its
//! issuer's claim example.

use std::collections::BTreeMap;
use std::path::Path;

use latchkey::config::{Config, IssuerConfig};
use latchkey::oidc::Claims;
use latchkey::policy::{BackendKind, IssuerInfo, LoadContext, Outcome, PolicySet, claim_text};
use serde_json::{Map, Value};

const DOC: &str = "docs/ISSUERS.md";
const AUDIENCE: &str = "https://latchkey.example.com";
/// One block per documented platform: GitHub Actions, GitHub Enterprise Server, GitLab.com,
/// GitLab self-managed, CircleCI, Buildkite. A deleted section fails the count.
const MIN_ISSUERS: usize = 6;

/// A fenced code block and the HTML comment tag right before it, if any.
struct Block {
    lang: String,
    tag: Option<String>,
    body: String,
    /// First line of the file after the closing fence (0-based).
    after: usize,
    /// Line of the opening fence (1-based), for messages.
    line: usize,
}

fn read_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn blocks(doc: &str) -> Vec<Block> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut last_tag: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(lang) = line.strip_prefix("```") {
            let start = i;
            let mut body = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            assert!(i < lines.len(), "{DOC}:{}: unclosed code block", start + 1);
            out.push(Block { lang: lang.trim().to_owned(), tag: last_tag.take(), body, after: i + 1, line: start + 1 });
        } else if let Some(tag) = line.strip_prefix("<!--").and_then(|t| t.strip_suffix("-->")) {
            last_tag = Some(tag.trim().to_owned());
        } else if !line.is_empty() {
            last_tag = None;
        }
        i += 1;
    }
    out
}

/// The issuer id of a tag such as `claims: github-actions`.
fn tagged<'a>(block: &'a Block, kind: &str) -> Option<&'a str> {
    let tag = block.tag.as_deref()?;
    let (k, id) = tag.split_once(':')?;
    (k.trim() == kind).then(|| id.trim())
}

fn wrap(issuer_block: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:8443\"\naudience = \"{AUDIENCE}\"\n\n{issuer_block}")
}

/// Loads every `[[issuer]]` block on its own, as `latchkey serve` would.
fn issuers(doc: &str) -> BTreeMap<String, IssuerConfig> {
    let mut found = BTreeMap::new();
    for block in blocks(doc).iter().filter(|b| b.lang == "toml" && b.body.contains("[[issuer]]")) {
        let where_ = format!("{DOC}:{}", block.line);
        let config = Config::parse(&wrap(&block.body), Path::new(&where_))
            .unwrap_or_else(|e| panic!("{where_}: issuer block does not parse: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{where_}: issuer block does not validate: {e}"));
        assert!(!config.issuers.is_empty(), "{where_}: no issuer in the block");
        if let Some(tag) = tagged(block, "issuer") {
            assert!(
                config.issuers.iter().all(|i| i.id == tag),
                "{where_}: block tagged `issuer: {tag}` configures another id"
            );
        }
        for issuer in config.issuers {
            let id = issuer.id.clone();
            assert!(found.insert(id.clone(), issuer).is_none(), "{where_}: issuer id {id:?} documented twice");
        }
    }
    found
}

/// The backquoted values of the `Canonical fields:` line that follows a claim example.
fn canonical_line(lines: &[&str], from: usize, line: usize) -> (String, String) {
    let text = lines[from..]
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("{DOC}:{line}: no `Canonical fields:` line after the claim example"));
    assert!(
        text.starts_with("Canonical fields:"),
        "{DOC}:{line}: expected `Canonical fields:` after the claims, got {text:?}"
    );
    let quoted: Vec<&str> = text.split('`').skip(1).step_by(2).collect();
    match quoted.as_slice() {
        ["repository", repository, "workflow", workflow] => ((*repository).to_owned(), (*workflow).to_owned()),
        other => panic!("{DOC}:{line}: expected `repository` = `…`, `workflow` = `…`, got {other:?}"),
    }
}

fn aud_contains(aud: Option<&Value>, audience: &str) -> bool {
    match aud {
        Some(Value::String(s)) => s == audience,
        Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(audience)),
        _ => false,
    }
}

/// Claim examples, by issuer id.
fn claim_examples(doc: &str) -> BTreeMap<String, (Map<String, Value>, usize)> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = BTreeMap::new();
    for block in blocks(doc).iter().filter(|b| b.lang == "json") {
        let Some(id) = tagged(block, "claims") else { continue };
        let map: Map<String, Value> = serde_json::from_str(&block.body)
            .unwrap_or_else(|e| panic!("{DOC}:{}: claims are not a JSON object: {e}", block.line));
        assert!(
            out.insert(id.to_owned(), (map, block.line)).is_none(),
            "{DOC}:{}: two claim examples for {id}",
            block.line
        );
        let _ = canonical_line(&lines, block.after, block.line);
    }
    out
}

#[test]
fn every_issuer_block_loads_as_configuration() {
    let issuers = issuers(&read_doc());
    assert!(
        issuers.len() >= MIN_ISSUERS,
        "{DOC} documents {} issuers ({:?}), expected at least {MIN_ISSUERS}",
        issuers.len(),
        issuers.keys().collect::<Vec<_>>()
    );
}

#[test]
fn every_claim_example_passes_its_issuer_and_maps_canonical_fields() {
    let doc = read_doc();
    let lines: Vec<&str> = doc.lines().collect();
    let issuers = issuers(&doc);
    let mut seen = 0;
    for block in blocks(&doc).iter().filter(|b| b.lang == "json") {
        let Some(id) = tagged(block, "claims") else { continue };
        seen += 1;
        let at = format!("{DOC}:{}", block.line);
        let issuer = issuers.get(id).unwrap_or_else(|| panic!("{at}: claims tagged for unknown issuer {id:?}"));
        let map: Map<String, Value> =
            serde_json::from_str(&block.body).unwrap_or_else(|e| panic!("{at}: claims are not a JSON object: {e}"));

        // What verification checks before any policy (DESIGN step 2).
        assert_eq!(
            map.get("iss").and_then(Value::as_str),
            Some(issuer.url.as_str()),
            "{at}: iss must equal the issuer url"
        );
        let audience = issuer.audience.as_deref().unwrap_or(AUDIENCE);
        assert!(aud_contains(map.get("aud"), audience), "{at}: aud must contain {audience}");
        assert!(map.get("exp").and_then(Value::as_i64).is_some(), "{at}: exp is required");
        if issuer.single_use {
            let jti = map.get("jti").and_then(Value::as_str).unwrap_or_default();
            assert!(!jti.is_empty(), "{at}: issuer {id} is single_use, so its tokens need a jti");
        } else {
            assert!(map.get("jti").is_none(), "{at}: issuer {id} has a jti in its example but is not single_use");
        }
        for (name, allowed) in &issuer.required_claims {
            let text = map.get(name).and_then(claim_text);
            assert!(
                text.as_ref().is_some_and(|t| allowed.contains(t)),
                "{at}: required claim {name} = {text:?} is not one of {allowed:?}"
            );
        }

        // The canonical fields the doc states.
        let (repository, workflow) = canonical_line(&lines, block.after, block.line);
        assert!(!repository.is_empty() && !workflow.is_empty(), "{at}: canonical fields must not be empty");
        let claims = Claims::from_map_with(
            id,
            issuer.kind,
            issuer.repository_claim.as_deref(),
            issuer.workflow_claim.as_deref(),
            map,
        );
        assert_eq!(claims.issuer, id);
        assert_eq!(claims.repository.as_deref(), Some(repository.as_str()), "{at}: canonical repository");
        assert_eq!(claims.workflow.as_deref(), Some(workflow.as_str()), "{at}: canonical workflow");
    }
    assert!(seen >= MIN_ISSUERS, "{DOC} has {seen} tagged claim examples, expected at least {MIN_ISSUERS}");
    let examples = claim_examples(&doc);
    for id in issuers.keys() {
        assert!(examples.contains_key(id), "{DOC}: issuer {id} has no `<!-- claims: {id} -->` example");
    }
}

/// Each policy snippet, with a `jwt` grant added, is loaded by the real policy loader (so the
/// pinning rules apply) and must admit its issuer's claim example.
#[test]
fn every_policy_snippet_loads_and_admits_the_example() {
    let doc = read_doc();
    let issuers = issuers(&doc);
    let examples = claim_examples(&doc);
    let mut seen = BTreeMap::new();
    for block in blocks(&doc).iter().filter(|b| b.lang == "toml") {
        let Some(id) = tagged(block, "policy") else { continue };
        let at = format!("{DOC}:{}", block.line);
        let issuer = issuers.get(id).unwrap_or_else(|| panic!("{at}: policy tagged for unknown issuer {id:?}"));
        let (claims, _) = examples.get(id).unwrap_or_else(|| panic!("{at}: no claim example for {id}"));
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}\n[[grant]]\nbackend = \"jwt\"\naudience = \"https://internal.example\"\n", block.body);
        std::fs::write(dir.path().join("snippet.toml"), text).unwrap();
        let ctx = LoadContext {
            issuers: [(
                id.to_owned(),
                IssuerInfo { kind: issuer.kind, required_claims: issuer.required_claims.keys().cloned().collect() },
            )]
            .into(),
            backends: vec![BackendKind::Jwt],
            github_apps: Vec::new(),
            vault_policies: None,
        };
        let set = PolicySet::load_dir(dir.path(), &ctx).unwrap_or_else(|e| panic!("{at}: policy does not load: {e:?}"));
        assert_eq!(set.policies["snippet"].issuer, id, "{at}: policy must name issuer {id}");
        let claims = Claims::from_map_with(
            id,
            issuer.kind,
            issuer.repository_claim.as_deref(),
            issuer.workflow_claim.as_deref(),
            claims.clone(),
        );
        let decision = set.decide("snippet", &claims, None);
        assert!(
            matches!(decision.outcome, Outcome::Allow { .. }),
            "{at}: the policy does not admit the example: {:#?}",
            decision.trace
        );
        *seen.entry(id.to_owned()).or_insert(0) += 1;
    }
    for id in issuers.keys() {
        assert!(seen.contains_key(id), "{DOC}: issuer {id} has no `<!-- policy: {id} -->` snippet");
    }
}
