//! Verification against an in-process issuer (axum on 127.0.0.1) that counts its requests.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair,
};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::DateTime;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::*;
use crate::app::{Clock, ManualClock};
use crate::config::{IssuerConfig, IssuerKind};

const AUD: &str = "https://latchkey.example.com";
const NOW: i64 = 1_800_000_000;
const DISCOVERY: &str = "/.well-known/openid-configuration";

// ---------------------------------------------------------------------------------------------
// Keys and tokens

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

struct TestKey {
    kid: String,
    alg: &'static str,
    pair: Pair,
}

impl TestKey {
    fn rsa(kid: &str) -> TestKey {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        TestKey { kid: kid.into(), alg: "RS256", pair: Pair::Rsa(pair) }
    }

    fn ec(kid: &str) -> TestKey {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        TestKey { kid: kid.into(), alg: "ES256", pair: Pair::Ec(pair) }
    }

    /// The key as published, under another `kid` if given.
    fn jwk_as(&self, kid: &str) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        match &self.pair {
            Pair::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Pair::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
        }
    }

    fn jwk(&self) -> Value {
        self.jwk_as(&self.kid)
    }

    fn rsa_modulus(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(pair) => pair.public_key().modulus().big_endian_without_leading_zero().to_vec(),
            Pair::Ec(_) => unreachable!(),
        }
    }

    fn sign_bytes(&self, alg: &str, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Rsa(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                let padding = if alg == "PS256" { &RSA_PSS_SHA256 } else { &RSA_PKCS1_SHA256 };
                pair.sign(padding, &rng, message, &mut sig).unwrap();
                sig
            }
            Pair::Ec(pair) => pair.sign(&rng, message).unwrap().as_ref().to_vec(),
        }
    }

    /// A token with exactly this header and these claims.
    fn sign_with(&self, header: Value, claims: &Value) -> String {
        let alg = header["alg"].as_str().unwrap_or(self.alg).to_owned();
        let input = format!("{}.{}", b64_json(&header), b64_json(claims));
        let sig = self.sign_bytes(&alg, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with(json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"}), claims)
    }
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Key generation is the slow part; every test shares these.
struct Keys {
    rsa1: TestKey,
    rsa2: TestKey,
    rsa3: TestKey,
    ec1: TestKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa1: TestKey::rsa("rsa-1"),
        rsa2: TestKey::rsa("rsa-2"),
        rsa3: TestKey::rsa("rsa-3"),
        ec1: TestKey::ec("ec-1"),
    })
}

fn claims(iss: &str) -> Value {
    static JTI: AtomicUsize = AtomicUsize::new(0);
    json!({
        "iss": iss,
        "aud": AUD,
        "sub": "repo:acme/widgets:ref:refs/heads/main",
        "exp": NOW + 300,
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "jti": format!("jti-{}", JTI.fetch_add(1, Ordering::Relaxed)),
        "repository": "acme/widgets",
        "repository_owner_id": "1234567",
        "job_workflow_ref": "acme/widgets/.github/workflows/review.yml@refs/heads/main",
    })
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

// ---------------------------------------------------------------------------------------------
// The issuer double

#[derive(Clone)]
enum Reply {
    Json(Value),
    Status(u16),
    Redirect(String),
    Body(String),
}

#[derive(Default)]
struct ServerState {
    replies: Mutex<HashMap<String, Reply>>,
    hits: Mutex<HashMap<String, usize>>,
}

async fn serve(State(state): State<Arc<ServerState>>, uri: Uri) -> Response {
    let path = uri.path().to_owned();
    *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let reply = state.replies.lock().unwrap().get(&path).cloned();
    match reply {
        Some(Reply::Json(v)) => axum::Json(v).into_response(),
        Some(Reply::Status(code)) => StatusCode::from_u16(code).unwrap().into_response(),
        Some(Reply::Redirect(to)) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
        Some(Reply::Body(body)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

struct TestIssuer {
    url: String,
    state: Arc<ServerState>,
}

impl TestIssuer {
    /// An issuer at `http://127.0.0.1:PORT` publishing `keys`, GitHub-style discovery document
    /// (no `authorization_endpoint`).
    async fn start(keys: &[&TestKey]) -> TestIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ServerState::default());
        let router = axum::Router::new().fallback(serve).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let issuer = TestIssuer { url, state };
        issuer.set_discovery(&issuer.url.clone(), &format!("{}/jwks", issuer.url));
        issuer.publish(keys);
        issuer
    }

    fn set(&self, path: &str, reply: Reply) {
        self.state.replies.lock().unwrap().insert(path.into(), reply);
    }

    fn set_discovery(&self, issuer: &str, jwks_uri: &str) {
        self.set(
            DISCOVERY,
            Reply::Json(json!({
                "issuer": issuer,
                "jwks_uri": jwks_uri,
                "subject_types_supported": ["public", "pairwise"],
                "response_types_supported": ["id_token"],
                "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid"],
            })),
        );
    }

    fn publish(&self, keys: &[&TestKey]) {
        self.publish_jwks(keys.iter().map(|k| k.jwk()).collect());
    }

    fn publish_jwks(&self, keys: Vec<Value>) {
        self.set("/jwks", Reply::Json(json!({ "keys": keys })));
    }

    fn hits(&self, path: &str) -> usize {
        self.state.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn jwks_hits(&self) -> usize {
        self.hits("/jwks")
    }

    fn config(&self, id: &str) -> IssuerConfig {
        issuer_config(id, &self.url)
    }
}

fn issuer_config(id: &str, url: &str) -> IssuerConfig {
    IssuerConfig {
        id: id.into(),
        kind: IssuerKind::Github,
        url: url.into(),
        algorithms: vec!["RS256".into(), "ES256".into()],
        max_token_age: None,
        single_use: true,
        required_claims: Default::default(),
        jwks_uri: None,
        audience: None,
        repository_claim: None,
        workflow_claim: None,
    }
}

fn clock() -> Arc<ManualClock> {
    ManualClock::new(DateTime::from_timestamp(NOW, 0).unwrap())
}

fn verifier(configs: &[IssuerConfig], clock: &Arc<ManualClock>) -> Verifier {
    let clock: Arc<dyn Clock> = clock.clone();
    Verifier::new(configs, AUD, Duration::from_secs(5), clock).unwrap()
}

/// One issuer publishing rsa1 and ec1, its verifier, and its clock.
async fn setup() -> (TestIssuer, Verifier, Arc<ManualClock>) {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1, &k.ec1]).await;
    let clock = clock();
    let v = verifier(&[issuer.config("gh")], &clock);
    (issuer, v, clock)
}

async fn code(v: &Verifier, token: &str) -> &'static str {
    v.verify(token).await.unwrap_err().code()
}

async fn fetch(config: &IssuerConfig) -> Result<JwkSet, OidcError> {
    HttpKeySource::new(http_client(Duration::from_secs(2)).unwrap(), config).unwrap().fetch().await
}

// ---------------------------------------------------------------------------------------------
// Valid tokens

#[tokio::test]
async fn valid_rs256_and_es256_tokens_verify() {
    let (issuer, v, _) = setup().await;
    let k = keys();
    for key in [&k.rsa1, &k.ec1] {
        let c = claims(&issuer.url);
        let verified = v.verify(&key.sign(&c)).await.unwrap();
        assert_eq!(verified.claims().issuer, "gh");
        assert_eq!(verified.jti(), c["jti"].as_str());
        assert_eq!(verified.expires_at(), NOW + 300);
        assert_eq!(verified.subject, "repo:acme/widgets:ref:refs/heads/main");
    }
    // Keys were fetched once and then served from the cache.
    assert_eq!(issuer.jwks_hits(), 1);
    assert_eq!(issuer.hits(DISCOVERY), 1);
}

#[tokio::test]
async fn a_tampered_payload_fails_the_signature() {
    let (issuer, v, _) = setup().await;
    let token = keys().rsa1.sign(&claims(&issuer.url));
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = b64_json(&with(claims(&issuer.url), json!({"repository": "evil/repo"})));
    assert_eq!(code(&v, &parts.join(".")).await, "bad_signature");
}

#[tokio::test]
async fn ps256_verifies_when_allowed() {
    let k = keys();
    let issuer = TestIssuer::start(&[]).await;
    let mut jwk = k.rsa2.jwk();
    jwk["alg"] = json!("PS256");
    issuer.publish_jwks(vec![jwk]);
    let mut config = issuer.config("gh");
    config.algorithms = vec!["PS256".into()];
    let v = verifier(&[config], &clock());
    let token = k.rsa2.sign_with(json!({"alg": "PS256", "kid": "rsa-2"}), &claims(&issuer.url));
    v.verify(&token).await.unwrap();
    // The same key under RS256 is refused: the JWK says PS256 and the issuer allows only PS256.
    assert_eq!(code(&v, &k.rsa2.sign(&claims(&issuer.url))).await, "algorithm_not_allowed");
}

// ---------------------------------------------------------------------------------------------
// Header rules

#[tokio::test]
async fn alg_none_is_refused_before_any_key_lookup() {
    let (issuer, v, _) = setup().await;
    let c = claims(&issuer.url);
    for alg in ["none", "None", "NONE"] {
        let unsigned = format!("{}.{}.", b64_json(&json!({"alg": alg, "kid": "rsa-1"})), b64_json(&c));
        assert_eq!(code(&v, &unsigned).await, "algorithm_not_allowed", "{alg}");
        let signed = format!("{}.{}.c2ln", b64_json(&json!({"alg": alg})), b64_json(&c));
        assert_eq!(code(&v, &signed).await, "algorithm_not_allowed", "{alg}");
    }
    assert_eq!(issuer.jwks_hits() + issuer.hits(DISCOVERY), 0);
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let (issuer, v, _) = setup().await;
    v.refresh_all().await;
    let k = keys();
    let c = claims(&issuer.url);
    // The classic confusion: the issuer's public key (as PEM, as the raw modulus, as the JWK
    // text) used as an HMAC secret by a verifier that trusts the header's alg.
    let pem =
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(k.rsa1.rsa_modulus()));
    let secrets = [pem.into_bytes(), k.rsa1.rsa_modulus(), serde_json::to_vec(&k.rsa1.jwk()).unwrap()];
    for alg in ["HS256", "HS384", "HS512"] {
        for secret in &secrets {
            let input = format!("{}.{}", b64_json(&json!({"alg": alg, "kid": "rsa-1"})), b64_json(&c));
            let hmac_alg = match alg {
                "HS256" => aws_lc_rs::hmac::HMAC_SHA256,
                "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
                _ => aws_lc_rs::hmac::HMAC_SHA512,
            };
            let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(hmac_alg, secret), input.as_bytes());
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
            assert_eq!(code(&v, &token).await, "algorithm_not_allowed");
        }
    }
    assert_eq!(issuer.jwks_hits(), 1, "only the warm-up fetched keys");
}

#[tokio::test]
async fn an_algorithm_outside_the_issuers_allow_list_is_refused_without_fetching() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1, &k.ec1]).await;
    let mut config = issuer.config("gh");
    config.algorithms = vec!["RS256".into()];
    let v = verifier(&[config], &clock());
    assert_eq!(code(&v, &k.ec1.sign(&claims(&issuer.url))).await, "algorithm_not_allowed");
    assert_eq!(issuer.jwks_hits(), 0);
}

#[tokio::test]
async fn hmac_and_none_cannot_be_configured() {
    for alg in ["HS256", "none", "rs256"] {
        let mut config = issuer_config("gh", "https://token.actions.githubusercontent.com");
        config.algorithms = vec![alg.into()];
        let err = Verifier::new(&[config], AUD, Duration::from_secs(1), clock()).unwrap_err();
        assert_eq!(err.code(), "invalid_configuration", "{alg}");
    }
}

#[tokio::test]
async fn key_bearing_headers_are_refused_and_never_fetched() {
    let (issuer, v, _) = setup().await;
    let k = keys();
    // The attacker's own key, published on a server they control.
    let attacker = TestIssuer::start(&[&k.rsa3]).await;
    let c = claims(&issuer.url);
    let jwks_url = format!("{}/jwks", attacker.url);
    let headers = [
        ("jku", json!({"alg": "RS256", "kid": "rsa-3", "jku": jwks_url})),
        ("x5u", json!({"alg": "RS256", "kid": "rsa-3", "x5u": format!("{}/cert.pem", attacker.url)})),
        ("jwk", json!({"alg": "RS256", "kid": "rsa-3", "jwk": k.rsa3.jwk()})),
        ("x5c", json!({"alg": "RS256", "kid": "rsa-3", "x5c": ["MIIB"]})),
        // Even naming a key the issuer does publish: the header itself is refused.
        ("jku", json!({"alg": "RS256", "kid": "rsa-1", "jku": format!("{}/jwks", issuer.url)})),
    ];
    for (name, header) in headers {
        let key = if header["kid"] == "rsa-1" { &k.rsa1 } else { &k.rsa3 };
        let err = v.verify(&key.sign_with(header, &c)).await.unwrap_err();
        assert_eq!(err, OidcError::ForbiddenHeader(name));
    }
    assert_eq!(attacker.jwks_hits() + attacker.hits("/cert.pem"), 0);
    assert_eq!(issuer.jwks_hits(), 0);
}

#[tokio::test]
async fn any_crit_header_is_refused() {
    let (issuer, v, _) = setup().await;
    let c = claims(&issuer.url);
    for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
        let token = keys().rsa1.sign_with(json!({"alg": "RS256", "kid": "rsa-1", "crit": crit, "b64": true}), &c);
        assert_eq!(code(&v, &token).await, "unsupported_crit");
    }
}

#[tokio::test]
async fn missing_kid_is_accepted_only_when_exactly_one_key_fits() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1, &k.ec1]).await;
    let v = verifier(&[issuer.config("gh")], &clock());
    let c = claims(&issuer.url);
    // One RSA key and one EC key: each algorithm has exactly one candidate.
    v.verify(&k.rsa1.sign_with(json!({"alg": "RS256"}), &c)).await.unwrap();
    v.verify(&k.ec1.sign_with(json!({"alg": "ES256"}), &claims(&issuer.url))).await.unwrap();
    // Two RSA keys: ambiguous, refused even though one of them would verify.
    issuer.publish(&[&k.rsa1, &k.rsa2]);
    let v = verifier(&[issuer.config("gh")], &clock());
    let err = v.verify(&k.rsa1.sign_with(json!({"alg": "RS256"}), &claims(&issuer.url))).await.unwrap_err();
    assert_eq!(err, OidcError::AmbiguousKey);
}

#[tokio::test]
async fn a_kid_of_another_key_type_is_refused() {
    let (issuer, v, _) = setup().await;
    let k = keys();
    // ES256 signature naming the RSA key's kid.
    let token = k.ec1.sign_with(json!({"alg": "ES256", "kid": "rsa-1"}), &claims(&issuer.url));
    assert_eq!(code(&v, &token).await, "key_algorithm_mismatch");
}

// ---------------------------------------------------------------------------------------------
// Issuers

#[tokio::test]
async fn only_configured_issuers_and_only_their_own_keys() {
    let k = keys();
    let a = TestIssuer::start(&[&k.rsa1]).await;
    // Issuer B publishes a different key under the same kid as A's.
    let b = TestIssuer::start(&[]).await;
    b.publish_jwks(vec![k.rsa2.jwk_as("rsa-1")]);
    let v = verifier(&[a.config("a"), b.config("b")], &clock());

    // A valid signature by A's key, claiming an issuer nobody configured.
    let unconfigured = k.rsa1.sign(&claims("https://evil.example.com"));
    assert_eq!(code(&v, &unconfigured).await, "unknown_issuer");
    // iss is compared exactly: a trailing slash or another case is another issuer.
    assert_eq!(code(&v, &k.rsa1.sign(&claims(&format!("{}/", a.url)))).await, "unknown_issuer");
    assert_eq!(code(&v, &k.rsa1.sign(&claims(&a.url.replace("http", "HTTP")))).await, "unknown_issuer");
    // Signed by A's key, claiming to be B: B's key with that kid does not verify it.
    assert_eq!(code(&v, &k.rsa1.sign(&claims(&b.url))).await, "bad_signature");
    // And A's own token is fine.
    v.verify(&k.rsa1.sign(&claims(&a.url))).await.unwrap();
}

#[tokio::test]
async fn a_trailing_slash_in_the_issuer_url_discovers_once_and_compares_exactly() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let url = format!("{}/", issuer.url);
    issuer.set_discovery(&url, &format!("{}/jwks", issuer.url));
    let v = verifier(&[issuer_config("gh", &url)], &clock());
    v.verify(&k.rsa1.sign(&claims(&url))).await.unwrap();
    assert_eq!(issuer.hits(DISCOVERY), 1);
    assert_eq!(issuer.hits("//.well-known/openid-configuration"), 0);
}

#[tokio::test]
async fn discovery_naming_another_issuer_is_refused() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    issuer.set_discovery("https://token.actions.githubusercontent.com", &format!("{}/jwks", issuer.url));
    let err = fetch(&issuer.config("gh")).await.unwrap_err();
    assert_eq!(err.code(), "discovery_issuer_mismatch");

    let v = verifier(&[issuer.config("gh")], &clock());
    assert_eq!(code(&v, &k.rsa1.sign(&claims(&issuer.url))).await, "keys_unavailable");
    assert_eq!(issuer.jwks_hits(), 0, "the JWKS of a mismatched document is never read");
    let health = v.health();
    assert!(health[0].last_error.as_deref().unwrap().contains("discovery document names issuer"));
}

#[tokio::test]
async fn a_redirect_is_refused_not_followed() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let elsewhere = TestIssuer::start(&[&k.rsa3]).await;
    elsewhere.set_discovery(&issuer.url, &format!("{}/jwks", issuer.url));
    issuer.set(DISCOVERY, Reply::Redirect(format!("{}{DISCOVERY}", elsewhere.url)));
    assert_eq!(fetch(&issuer.config("gh")).await.unwrap_err().code(), "redirect_refused");
    assert_eq!(elsewhere.hits(DISCOVERY), 0);

    // Same for the JWKS itself.
    issuer.set_discovery(&issuer.url, &format!("{}/jwks", issuer.url));
    issuer.set("/jwks", Reply::Redirect(format!("{}/jwks", elsewhere.url)));
    assert_eq!(fetch(&issuer.config("gh")).await.unwrap_err(), OidcError::Redirect { what: "JWKS" });
    assert_eq!(elsewhere.jwks_hits(), 0);
}

#[tokio::test]
async fn jwks_uri_on_another_host_is_refused_unless_configured() {
    let k = keys();
    let issuer = TestIssuer::start(&[]).await;
    let other = TestIssuer::start(&[&k.rsa1]).await;
    let other_jwks = format!("{}/jwks", other.url);
    issuer.set_discovery(&issuer.url, &other_jwks);
    assert_eq!(fetch(&issuer.config("gh")).await.unwrap_err().code(), "jwks_uri_not_allowed");
    // Same port, another host name.
    issuer.set_discovery(&issuer.url, &format!("{}/jwks", issuer.url.replace("127.0.0.1", "localhost")));
    assert_eq!(fetch(&issuer.config("gh")).await.unwrap_err().code(), "jwks_uri_not_allowed");
    // A non-loopback http jwks_uri fails the scheme check.
    issuer.set_discovery(&issuer.url, "http://keys.example.com/jwks");
    assert_eq!(fetch(&issuer.config("gh")).await.unwrap_err().code(), "jwks_uri_not_allowed");
    assert_eq!(other.jwks_hits(), 0);

    // An operator who configures the JWKS location explicitly gets it.
    let mut config = issuer.config("gh");
    config.jwks_uri = Some(other_jwks);
    let v = verifier(&[config], &clock());
    v.verify(&k.rsa1.sign(&claims(&issuer.url))).await.unwrap();
    assert_eq!(other.jwks_hits(), 1);
}

#[tokio::test]
async fn oversized_discovery_and_jwks_are_refused() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let padding = "x".repeat(MAX_DISCOVERY_BYTES);
    issuer.set(
        DISCOVERY,
        Reply::Body(
            json!({"issuer": issuer.url, "jwks_uri": format!("{}/jwks", issuer.url), "p": padding}).to_string(),
        ),
    );
    assert_eq!(
        fetch(&issuer.config("gh")).await.unwrap_err(),
        OidcError::ResponseTooLarge { what: "discovery", max: MAX_DISCOVERY_BYTES }
    );

    issuer.set_discovery(&issuer.url, &format!("{}/jwks", issuer.url));
    let many: Vec<Value> = std::iter::repeat_n(k.rsa1.jwk(), MAX_JWKS_BYTES / 300).collect();
    issuer.publish_jwks(many);
    assert_eq!(
        fetch(&issuer.config("gh")).await.unwrap_err(),
        OidcError::ResponseTooLarge { what: "JWKS", max: MAX_JWKS_BYTES }
    );
}

/// A server that answers every request with an endless chunked body and counts the bytes it
/// managed to send.
async fn endless_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, " ".repeat(16 * 1024));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {
                    counter.fetch_add(16 * 1024, Ordering::Relaxed);
                }
            });
        }
    });
    (url, sent)
}

#[tokio::test]
async fn an_endless_body_is_abandoned_at_the_cap() {
    let (url, _) = endless_server().await;
    // No Content-Length: only the incremental read can stop this, long before the timeout.
    let started = std::time::Instant::now();
    let err = fetch(&issuer_config("gh", &url)).await.unwrap_err();
    assert_eq!(err, OidcError::ResponseTooLarge { what: "discovery", max: MAX_DISCOVERY_BYTES });
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_silent_issuer_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let source = HttpKeySource::new(http_client(Duration::from_millis(300)).unwrap(), &issuer_config("gh", &url));
    let err = source.unwrap().fetch().await.unwrap_err();
    assert_eq!(err, OidcError::Fetch { what: "discovery", reason: "timed out".into() });
}

#[tokio::test]
async fn plain_http_is_refused_for_remote_issuers() {
    let config = issuer_config("gh", "http://token.example.com");
    let err = Verifier::new(&[config], AUD, Duration::from_secs(1), clock()).unwrap_err();
    assert_eq!(err.code(), "invalid_configuration");
}

// ---------------------------------------------------------------------------------------------
// Key cache

#[tokio::test]
async fn an_unknown_kid_refreshes_once_per_window_then_is_refused() {
    let (issuer, v, clock) = setup().await;
    v.refresh_all().await;
    assert_eq!(issuer.jwks_hits(), 1);
    let k = keys();
    let token = k.rsa3.sign(&claims(&issuer.url));
    assert_eq!(code(&v, &token).await, "unknown_key");
    assert_eq!(issuer.jwks_hits(), 2, "exactly one refresh");
    assert_eq!(code(&v, &token).await, "unknown_key");
    assert_eq!(issuer.jwks_hits(), 2, "no second refresh within 30 s");
    clock.advance(chrono::Duration::seconds(29));
    assert_eq!(code(&v, &token).await, "unknown_key");
    assert_eq!(issuer.jwks_hits(), 2);
    clock.advance(chrono::Duration::seconds(2));
    assert_eq!(code(&v, &token).await, "unknown_key");
    assert_eq!(issuer.jwks_hits(), 3, "one refresh once the window has passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_at_most_once() {
    let (issuer, v, _) = setup().await;
    v.refresh_all().await;
    let k = keys();
    let c = claims(&issuer.url);
    // Concurrent: one refresh in flight, the others wait for it rather than start their own.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1_000 {
        let token = k.rsa1.sign_with(json!({"alg": "RS256", "kid": format!("unknown-{i}")}), &c);
        let v = v.clone();
        tasks.spawn(async move { v.verify(&token).await.unwrap_err().code() });
    }
    while let Some(code) = tasks.join_next().await {
        assert_eq!(code.unwrap(), "unknown_key");
    }
    assert!(issuer.jwks_hits() <= 2, "{} fetches", issuer.jwks_hits());
    // Sequential, within the same window.
    let signed = k.rsa1.sign_with(json!({"alg": "RS256", "kid": "x"}), &c);
    let (_, rest) = signed.split_once('.').unwrap();
    for i in 0..10_000 {
        let token = format!("{}.{rest}", b64_json(&json!({"alg": "RS256", "kid": format!("seq-{i}")})));
        assert_eq!(code(&v, &token).await, "unknown_key");
    }
    assert!(issuer.jwks_hits() <= 2, "{} fetches", issuer.jwks_hits());
}

#[tokio::test]
async fn cached_keys_survive_an_issuer_outage() {
    let (issuer, v, clock) = setup().await;
    v.refresh_all().await;
    let ok = v.health();
    assert_eq!((ok[0].keys, ok[0].refreshes, ok[0].refresh_failures), (2, 1, 0));
    assert!(ok[0].last_refresh_ok.is_some() && ok[0].last_error.is_none());

    issuer.set(DISCOVERY, Reply::Status(503));
    clock.advance(chrono::Duration::seconds(31));
    let k = keys();
    // An unknown kid makes a refresh that fails...
    assert_eq!(code(&v, &k.rsa3.sign(&claims(&issuer.url))).await, "unknown_key");
    // ...and the keys we had still verify.
    v.verify(&k.rsa1.sign(&claims(&issuer.url))).await.unwrap();
    v.refresh_all().await;
    v.verify(&k.ec1.sign(&claims(&issuer.url))).await.unwrap();

    let health = v.health();
    assert_eq!(health[0].id, "gh");
    assert_eq!(health[0].keys, 2);
    assert_eq!((health[0].refreshes, health[0].refresh_failures), (3, 2));
    assert_eq!(health[0].last_error.as_deref(), Some("discovery request failed: HTTP 503"));
    assert_eq!(health[0].last_refresh_ok, ok[0].last_refresh_ok);

    // Back up: the error clears.
    issuer.set_discovery(&issuer.url, &format!("{}/jwks", issuer.url));
    v.refresh_all().await;
    assert!(v.health()[0].last_error.is_none());
}

#[tokio::test]
async fn keys_follow_rotation_exactly() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let clock = clock();
    let v = verifier(&[issuer.config("gh")], &clock);
    v.verify(&k.rsa1.sign(&claims(&issuer.url))).await.unwrap();
    assert_eq!(issuer.jwks_hits(), 1);

    // The issuer adds a key: the first token under it costs one refresh.
    issuer.publish(&[&k.rsa1, &k.rsa2]);
    clock.advance(chrono::Duration::seconds(31));
    v.verify(&k.rsa2.sign(&claims(&issuer.url))).await.unwrap();
    assert_eq!(issuer.jwks_hits(), 2);
    // The old key still verifies while it is published.
    v.verify(&k.rsa1.sign(&claims(&issuer.url))).await.unwrap();
    assert_eq!(issuer.jwks_hits(), 2);

    // The issuer withdraws the old key. Once a refresh has seen that, tokens under it fail.
    issuer.publish(&[&k.rsa2]);
    v.refresh_all().await;
    assert_eq!(v.health()[0].keys, 1);
    assert_eq!(code(&v, &k.rsa1.sign(&claims(&issuer.url))).await, "unknown_key");
    v.verify(&k.rsa2.sign(&claims(&issuer.url))).await.unwrap();
}

#[tokio::test]
async fn a_static_key_source_replaces_discovery() {
    let k = keys();
    let url = "http://127.0.0.1:1";
    let jwks = JwkSet::from_json(json!({"keys": [k.ec1.jwk()]}).to_string().as_bytes()).unwrap();
    let v = verifier(&[issuer_config("dev", url)], &clock())
        .with_key_source("dev", Arc::new(StaticKeySource::new(jwks)))
        .with_key_source("nobody", Arc::new(StaticKeySource::new(JwkSet::default())));
    v.refresh_all().await;
    assert_eq!(v.health()[0].keys, 1);
    v.verify(&k.ec1.sign(&claims(url))).await.unwrap();
    assert_eq!(v.issuer("dev").unwrap().url, url);
    assert!(v.issuer("nobody").is_none());
    // Neither the verifier nor its key sources print key material.
    let debug = format!("{v:?}");
    assert!(!debug.contains(k.ec1.jwk()["x"].as_str().unwrap()), "{debug}");
}

#[test]
fn unusable_published_keys_are_skipped_not_fatal() {
    let k = keys();
    let mut small = k.rsa1.jwk_as("small");
    small["n"] = json!(URL_SAFE_NO_PAD.encode([0xff; 128])); // 1024 bits
    let document = json!({"keys": [
        k.rsa1.jwk(),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": k.rsa2.jwk()["n"], "e": "AQAB"},
        {"kty": "EC", "kid": "bad-point", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode([1; 32]), "y": URL_SAFE_NO_PAD.encode([2; 32])},
        {"kty": 7},
        small,
    ]});
    let jwks = JwkSet::from_json(document.to_string().as_bytes()).unwrap();
    assert_eq!(jwks.keys.len(), 5, "the member with a non-string kty is skipped");
    let set = jwks::KeySet::build(&jwks, &Alg::ALL);
    assert_eq!(set.len(), 1);
    // Debug output names keys but carries no key material.
    let debug = format!("{set:?} {jwks:?}");
    assert!(!debug.contains(k.rsa1.jwk()["n"].as_str().unwrap()), "{debug}");
    assert!(JwkSet::from_json(b"{\"keys\": 5}").is_err());
}

// ---------------------------------------------------------------------------------------------
// Claims

#[tokio::test]
async fn audience_must_contain_the_configured_audience() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let mut own = issuer.config("own");
    own.url = format!("{}/own", issuer.url);
    own.audience = Some("sts.example.com".into());
    issuer.set(
        "/own/.well-known/openid-configuration",
        Reply::Json(json!({"issuer": own.url, "jwks_uri": format!("{}/jwks", issuer.url)})),
    );
    let v = verifier(&[issuer.config("gh"), own.clone()], &clock());
    let c = |aud: Value| with(claims(&issuer.url), json!({ "aud": aud }));

    v.verify(&k.rsa1.sign(&c(json!(AUD)))).await.unwrap();
    v.verify(&k.rsa1.sign(&c(json!(["other", AUD])))).await.unwrap();
    let cases = [
        (c(json!("https://other.example.com")), "audience_mismatch"),
        (c(json!(["other", "another"])), "audience_mismatch"),
        (c(json!([])), "audience_mismatch"),
        (c(json!(format!("{AUD}/"))), "audience_mismatch"),
        (c(json!([AUD, 5])), "invalid_claim"),
        (c(json!({"aud": AUD})), "invalid_claim"),
        (with(claims(&issuer.url), json!({"aud": null})), "missing_claim"),
    ];
    for (claims, expected) in cases {
        assert_eq!(code(&v, &k.rsa1.sign(&claims)).await, expected, "{}", claims["aud"]);
    }
    // An issuer with its own audience wants that one, not the default.
    let own_claims = |aud: &str| with(claims(&own.url), json!({ "aud": aud }));
    v.verify(&k.rsa1.sign(&own_claims("sts.example.com"))).await.unwrap();
    assert_eq!(code(&v, &k.rsa1.sign(&own_claims(AUD))).await, "audience_mismatch");
}

#[tokio::test]
async fn lifetime_is_honoured_with_sixty_seconds_of_leeway() {
    let (issuer, v, _) = setup().await;
    let k = keys();
    let c = |changes: Value| k.rsa1.sign(&with(claims(&issuer.url), changes));
    let accepted = [
        json!({"exp": NOW - 59}),
        json!({"exp": NOW as f64 - 30.5}),
        json!({"nbf": NOW + 60}),
        json!({"iat": NOW + 60}),
        json!({"nbf": null, "iat": null}),
    ];
    for changes in accepted {
        v.verify(&c(changes.clone())).await.unwrap_or_else(|e| panic!("{changes}: {e}"));
    }
    let refused = [
        (json!({"exp": NOW - 60}), "expired"),
        (json!({"exp": NOW - 3600}), "expired"),
        (json!({"exp": null}), "missing_claim"),
        (json!({"exp": "2099-01-01"}), "invalid_claim"),
        (json!({"nbf": NOW + 61}), "not_yet_valid"),
        (json!({"iat": NOW + 61}), "issued_in_future"),
        (json!({"iat": NOW + 86_400}), "issued_in_future"),
        (json!({"iat": true}), "invalid_claim"),
    ];
    for (changes, expected) in refused {
        assert_eq!(code(&v, &c(changes.clone())).await, expected, "{changes}");
    }
}

#[tokio::test]
async fn max_token_age_requires_and_bounds_iat() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let mut config = issuer.config("gh");
    config.max_token_age = Some(Duration::from_secs(600));
    let v = verifier(&[config], &clock());
    let c = |changes: Value| k.rsa1.sign(&with(claims(&issuer.url), changes));
    v.verify(&c(json!({"iat": NOW - 600}))).await.unwrap();
    assert_eq!(code(&v, &c(json!({"iat": NOW - 601}))).await, "token_too_old");
    assert_eq!(v.verify(&c(json!({"iat": null}))).await.unwrap_err(), OidcError::MissingClaim("iat"));
}

#[tokio::test]
async fn single_use_requires_a_usable_jti() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let mut reusable = issuer.config("reusable");
    reusable.url = format!("{}/reusable", issuer.url);
    reusable.single_use = false;
    issuer.set(
        "/reusable/.well-known/openid-configuration",
        Reply::Json(json!({"issuer": reusable.url, "jwks_uri": format!("{}/jwks", issuer.url)})),
    );
    let v = verifier(&[issuer.config("gh"), reusable.clone()], &clock());
    let c = |changes: Value| k.rsa1.sign(&with(claims(&issuer.url), changes));

    assert_eq!(v.verify(&c(json!({"jti": null}))).await.unwrap_err(), OidcError::MissingClaim("jti"));
    assert_eq!(code(&v, &c(json!({"jti": ""}))).await, "invalid_claim");
    assert_eq!(code(&v, &c(json!({"jti": 42}))).await, "invalid_claim");
    assert_eq!(code(&v, &c(json!({"jti": "j".repeat(256)}))).await, "invalid_claim");
    let longest = "é".repeat(255);
    assert_eq!(v.verify(&c(json!({ "jti": longest }))).await.unwrap().jti(), Some(longest.as_str()));

    // An issuer that is not single-use needs no jti.
    let token = k.rsa1.sign(&with(claims(&reusable.url), json!({"jti": null})));
    assert_eq!(v.verify(&token).await.unwrap().jti(), None);
}

#[tokio::test]
async fn required_claims_compare_by_claim_text() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let mut config = issuer.config("gh");
    config.required_claims.insert("repository_owner_id".into(), vec!["1234567".into(), "7654321".into()]);
    config.required_claims.insert("runner_hosted".into(), vec!["true".into()]);
    let v = verifier(&[config], &clock());
    let c = |changes: Value| k.rsa1.sign(&with(with(claims(&issuer.url), json!({"runner_hosted": true})), changes));

    v.verify(&c(json!({}))).await.unwrap();
    v.verify(&c(json!({"repository_owner_id": 7654321}))).await.unwrap();
    v.verify(&c(json!({"runner_hosted": "true"}))).await.unwrap();
    let refused = [
        json!({"repository_owner_id": "999"}),
        json!({"repository_owner_id": null}),
        json!({"repository_owner_id": ["1234567"]}),
        json!({"repository_owner_id": {"id": "1234567"}}),
        json!({"repository_owner_id": " 1234567"}),
        json!({"runner_hosted": false}),
    ];
    for changes in refused {
        let err = v.verify(&c(changes.clone())).await.unwrap_err();
        assert_eq!(err.code(), "required_claim_mismatch", "{changes}");
        // The reason names the claim, never the value it had.
        assert!(!err.to_string().contains("999"));
    }
}

#[tokio::test]
async fn github_and_gitlab_canonical_fields_are_mapped() {
    let k = keys();
    let issuer = TestIssuer::start(&[&k.rsa1]).await;
    let mut gitlab = issuer.config("gitlab");
    gitlab.kind = IssuerKind::Gitlab;
    gitlab.url = format!("{}/gitlab", issuer.url);
    issuer.set(
        "/gitlab/.well-known/openid-configuration",
        Reply::Json(json!({"issuer": gitlab.url, "jwks_uri": format!("{}/jwks", issuer.url)})),
    );
    let mut generic = issuer.config("buildkite");
    generic.kind = IssuerKind::Generic;
    generic.url = format!("{}/buildkite", issuer.url);
    generic.repository_claim = Some("pipeline_slug".into());
    issuer.set(
        "/buildkite/.well-known/openid-configuration",
        Reply::Json(json!({"issuer": generic.url, "jwks_uri": format!("{}/jwks", issuer.url)})),
    );
    let v = verifier(&[issuer.config("github-actions"), gitlab.clone(), generic.clone()], &clock());

    let gh = v.verify(&k.rsa1.sign(&claims(&issuer.url))).await.unwrap();
    assert_eq!(gh.issuer, "github-actions");
    assert_eq!(gh.repository.as_deref(), Some("acme/widgets"));
    assert_eq!(gh.workflow.as_deref(), Some("acme/widgets/.github/workflows/review.yml@refs/heads/main"));

    let gl_claims = with(
        claims(&gitlab.url),
        json!({
            "repository": null, "job_workflow_ref": null,
            "sub": "project_path:acme/widgets:ref_type:branch:ref:main",
            "project_path": "acme/widgets", "namespace_id": "42",
            "ci_config_ref_uri": "gitlab.com/acme/widgets//.gitlab-ci.yml@refs/heads/main",
        }),
    );
    let gl = v.verify(&k.rsa1.sign(&gl_claims)).await.unwrap();
    assert_eq!(gl.issuer, "gitlab");
    assert_eq!(gl.repository.as_deref(), Some("acme/widgets"));
    assert_eq!(gl.workflow.as_deref(), Some("gitlab.com/acme/widgets//.gitlab-ci.yml@refs/heads/main"));
    assert_eq!(gl.get("namespace_id"), Some(&json!("42")));

    let bk =
        v.verify(&k.rsa1.sign(&with(claims(&generic.url), json!({"pipeline_slug": "acme/deploy"})))).await.unwrap();
    assert_eq!(bk.repository.as_deref(), Some("acme/deploy"));
    assert_eq!(bk.workflow, None);
}

// ---------------------------------------------------------------------------------------------
// Malformed tokens

#[tokio::test]
async fn malformed_tokens_get_clear_reasons() {
    let (issuer, v, _) = setup().await;
    let good = keys().rsa1.sign(&claims(&issuer.url));
    let [h, p, s]: [&str; 3] = good.split('.').collect::<Vec<_>>().try_into().unwrap();
    let not_json = URL_SAFE_NO_PAD.encode("not json");
    let array = URL_SAFE_NO_PAD.encode("[1,2]");
    let cases = [
        (format!("{h}.{p}"), OidcError::Malformed("expected three dot-separated segments")),
        (format!("{h}.{p}.{s}.{s}"), OidcError::Malformed("expected three dot-separated segments")),
        (String::new(), OidcError::Malformed("expected three dot-separated segments")),
        (format!("{h}!.{p}.{s}"), OidcError::BadBase64("header")),
        (format!("{h}.{p}=.{s}"), OidcError::BadBase64("payload")),
        (format!("{h}.{p}.{s}+/"), OidcError::BadBase64("signature")),
        (format!("{not_json}.{p}.{s}"), OidcError::BadJson("header")),
        (format!("{h}.{not_json}.{s}"), OidcError::BadJson("payload")),
        (format!("{h}.{array}.{s}"), OidcError::BadJson("payload")),
        (format!("{h}.{p}."), OidcError::Malformed("empty signature")),
        (format!("{}.{p}.{s}", b64_json(&json!({"kid": "rsa-1"}))), OidcError::Malformed("missing alg header")),
        (
            format!("{}.{p}.{s}", b64_json(&json!({"alg": ["RS256"]}))),
            OidcError::Malformed("alg header is not a string"),
        ),
        (
            format!("{}.{p}.{s}", b64_json(&json!({"alg": "RS256", "kid": 1}))),
            OidcError::Malformed("kid header is not a string"),
        ),
    ];
    for (token, expected) in cases {
        let err = v.verify(&token).await.unwrap_err();
        assert_eq!(err, expected, "{token}");
        // Reasons never echo the token.
        assert!(!err.to_string().contains(p));
    }
    let no_iss = keys().rsa1.sign(&with(claims(&issuer.url), json!({"iss": null})));
    assert_eq!(v.verify(&no_iss).await.unwrap_err(), OidcError::MissingClaim("iss"));
    assert_eq!(issuer.jwks_hits(), 0);
}

#[tokio::test]
async fn oversized_tokens_are_refused_before_decoding() {
    let (issuer, v, _) = setup().await;
    let k = keys();
    let big = with(claims(&issuer.url), json!({"pad": "x".repeat(MAX_TOKEN_BYTES)}));
    let token = k.rsa1.sign(&big);
    assert_eq!(v.verify(&token).await.unwrap_err(), OidcError::TokenTooLarge { max: MAX_TOKEN_BYTES });
    assert_eq!(peek_issuer(&token).unwrap_err().code(), "token_too_large");
    let junk = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(code(&v, &junk).await, "token_too_large");
    // Just under the limit is fine.
    let mut fits = claims(&issuer.url);
    let room = MAX_TOKEN_BYTES - k.rsa1.sign(&fits).len() - 20;
    fits["pad"] = json!("x".repeat(room * 3 / 4));
    v.verify(&k.rsa1.sign(&fits)).await.unwrap();
}

#[test]
fn peek_issuer_reads_only_the_iss() {
    let k = keys();
    let token = k.rsa1.sign(&claims("https://token.actions.githubusercontent.com"));
    assert_eq!(peek_issuer(&token).unwrap().issuer(), Some("https://token.actions.githubusercontent.com"));
    let none = k.rsa1.sign(&with(claims("x"), json!({"iss": null})));
    assert_eq!(peek_issuer(&none).unwrap().issuer(), None);
    assert_eq!(peek_issuer("a.b").unwrap_err().code(), "malformed_token");
    assert_eq!(peek_issuer("a.!!.c").unwrap_err().code(), "malformed_base64");
    let numeric = k.rsa1.sign(&with(claims("x"), json!({"iss": 5})));
    assert_eq!(peek_issuer(&numeric).unwrap_err().code(), "invalid_claim");
}

#[test]
fn every_error_has_a_distinct_code() {
    let errors = [
        OidcError::TokenTooLarge { max: 1 },
        OidcError::Malformed("x"),
        OidcError::BadBase64("x"),
        OidcError::BadJson("x"),
        OidcError::UnknownIssuer,
        OidcError::AlgorithmNotAllowed,
        OidcError::ForbiddenHeader("jku"),
        OidcError::CriticalHeader,
        OidcError::UnknownKey,
        OidcError::AmbiguousKey,
        OidcError::KeyAlgorithmMismatch,
        OidcError::KeysUnavailable,
        OidcError::BadSignature,
        OidcError::MissingClaim("x"),
        OidcError::InvalidClaim("x"),
        OidcError::AudienceMismatch,
        OidcError::Expired,
        OidcError::NotYetValid,
        OidcError::IssuedInFuture,
        OidcError::TooOld,
        OidcError::RequiredClaim("x".into()),
        OidcError::Fetch { what: "x", reason: "y".into() },
        OidcError::Redirect { what: "x" },
        OidcError::ResponseTooLarge { what: "x", max: 1 },
        OidcError::BadDocument { what: "x", reason: "y".into() },
        OidcError::IssuerMismatch { found: "x".into() },
        OidcError::JwksUriNotAllowed("x".into()),
        OidcError::Config("x".into()),
    ];
    let codes: std::collections::HashSet<_> = errors.iter().map(OidcError::code).collect();
    assert_eq!(codes.len(), errors.len());
    assert!(codes.iter().all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')));
}

/// A key source whose keys the test swaps, that counts fetches and answers slowly.
#[derive(Debug, Default)]
struct CountingSource {
    keys: Mutex<JwkSet>,
    fetches: AtomicUsize,
    delay: Duration,
    /// While set, fetches fail as an unreachable issuer's do.
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl KeySource for CountingSource {
    async fn fetch(&self) -> Result<JwkSet, OidcError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(OidcError::Fetch { what: "JWKS", reason: "connection refused".into() });
        }
        Ok(self.keys.lock().unwrap().clone())
    }
}

fn jwk_set(keys: &[&TestKey]) -> JwkSet {
    JwkSet::from_json(json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string().as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tokens_under_a_new_key_share_one_refresh() {
    let k = keys();
    let url = "http://127.0.0.1:1";
    let source = Arc::new(CountingSource { delay: Duration::from_millis(200), ..Default::default() });
    *source.keys.lock().unwrap() = jwk_set(&[&k.rsa1]);
    let v = verifier(&[issuer_config("dev", url)], &clock()).with_key_source("dev", source.clone());
    v.refresh_all().await;
    *source.keys.lock().unwrap() = jwk_set(&[&k.rsa1, &k.ec1]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (v, token) = (v.clone(), k.ec1.sign(&claims(url)));
        tasks.spawn(async move { v.verify(&token).await.map(|_| ()) });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    // Warm-up plus a single refresh that every waiting token used.
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn periodic_refresh_keeps_fetching() {
    let source = Arc::new(CountingSource::default());
    let v = verifier(&[issuer_config("dev", "http://127.0.0.1:1")], &clock()).with_key_source("dev", source.clone());
    let task = v.spawn_periodic_refresh(Duration::from_millis(20), Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(150)).await;
    task.abort();
    assert!(source.fetches.load(Ordering::SeqCst) >= 3);
}

/// An issuer that fails its refresh is tried again at the shorter retry period, so its health
/// recovers long before the next full refresh; a healthy issuer is not fetched in between.
#[tokio::test]
async fn a_failing_issuer_is_retried_sooner_than_the_full_refresh() {
    let k = keys();
    let source = Arc::new(CountingSource::default());
    *source.keys.lock().unwrap() = jwk_set(&[&k.rsa1]);
    let v = verifier(&[issuer_config("dev", "http://127.0.0.1:1")], &clock()).with_key_source("dev", source.clone());
    v.refresh_all().await;
    let health = || v.health().into_iter().next().unwrap();
    assert!(health().last_error.is_none());

    let task = v.spawn_periodic_refresh(Duration::from_millis(400), Duration::from_millis(20));
    // Healthy: nothing is fetched before the full refresh.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);

    // Down at the full refresh: the failure shows, and is retried every 20 ms.
    source.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(health().last_error.is_some(), "the failed refresh shows in the issuer's health");
    let failing_fetches = source.fetches.load(Ordering::SeqCst);
    assert!(failing_fetches >= 5, "retried while failing: {failing_fetches} fetches");
    assert_eq!(health().keys, 1, "cached keys kept");

    // Back: healthy again within a retry period or two, long before the next full refresh.
    source.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(60)).await;
    task.abort();
    assert!(health().last_error.is_none(), "recovered: {:?}", health().last_error);
}
