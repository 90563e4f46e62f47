//! The cost floor of an exchange: what no implementation of it can skip, measured alone, per
//! core. Verifying the subject token's ES256 signature (with its claims checks), judging the
//! policy, and signing the ES256 credential JWT. `scripts/bench.sh` measures the whole service;
//! the README compares the two. Run with `cargo bench --bench cost_floor`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use latchkey::app::SystemClock;
use latchkey::config::Config;
use latchkey::http::DevIssuer;
use latchkey::oidc::{JwkSet, StaticKeySource, Verifier};
use latchkey::policy::PolicySet;

const AUDIENCE: &str = "https://latchkey.bench";
const ISSUER: &str = "http://127.0.0.1:1/dev/oidc";

fn config(dir: &Path) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\naudience = \"{AUDIENCE}\"\n\n[policies]\ndir = \"{policies}\"\n\n\
         [[issuer]]\nid = \"github-actions\"\nkind = \"github\"\nurl = \"{ISSUER}\"\nalgorithms = [\"ES256\"]\n\
         max_token_age = \"10m\"\n",
        policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies").display(),
    );
    let path = dir.join("latchkey.toml");
    std::fs::write(&path, text).expect("config written");
    Config::load(&path).expect("config loads")
}

fn cost_floor(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config(dir.path());
    let issuer = DevIssuer::new(ISSUER, AUDIENCE);
    let keys = JwkSet::from_json(issuer.jwks().to_string().as_bytes()).expect("jwks");
    let verifier = Verifier::new(&config.issuers, AUDIENCE, Duration::from_secs(5), Arc::new(SystemClock))
        .expect("verifier")
        .with_key_source("github-actions", Arc::new(StaticKeySource::new(keys)));
    let policies =
        PolicySet::load_dir(&config.resolve(&config.policies.dir), &latchkey::server::policy_context(&config))
            .expect("the example policies load");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let overrides = serde_json::Map::from_iter([
        ("event_name".to_owned(), serde_json::json!("pull_request")),
        ("ref".to_owned(), serde_json::json!("refs/pull/42/merge")),
    ]);
    let token = issuer.mint(&overrides, chrono::Utc::now());
    runtime.block_on(verifier.refresh_all());
    let claims = runtime.block_on(verifier.verify(&token)).expect("the token verifies");
    assert!(
        matches!(policies.decide("pr-review", claims.claims(), None).outcome, latchkey::policy::Outcome::Allow { .. }),
        "the benchmark's token must be allowed, or it measures a denial"
    );

    let mut group = c.benchmark_group("exchange floor");
    group.bench_function("verify the ES256 subject token", |b| {
        b.to_async(&runtime).iter(|| async { verifier.verify(&token).await.expect("verifies") })
    });
    group.bench_function("decide the policy", |b| b.iter(|| policies.decide("pr-review", claims.claims(), None)));
    group.bench_function("sign an ES256 JWT", |b| b.iter(|| issuer.mint(&overrides, chrono::Utc::now())));
    group.finish();
}

criterion_group!(benches, cost_floor);
criterion_main!(benches);
