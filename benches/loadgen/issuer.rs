//! The OIDC issuer the benchmark plays: discovery, a JWKS with one key, and GitHub
//! Actions-style subject tokens signed with that key: RS256 (RSA 2048, what GitHub Actions and
//! GitLab sign with) or ES256 (P-256, whose verification costs more).
//!
//! It is deliberately independent of latchkey's own code (its verifier is what is being
//! measured): the key is generated with aws-lc-rs, the JWK and the JWS are assembled by hand
//! following RFC 7517/7518 (RSA public key as base64url `n`/`e`; EC public key as base64url
//! `x`/`y` coordinates, ES256 signature as the fixed-width `r ‖ s`).

use std::sync::Arc;

use anyhow::{Context, anyhow};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_SHA256, RsaKeyPair, UnparsedPublicKey,
};
use axum::Json;
use axum::Router;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The `aud` every subject token carries; the broker's `server.audience`.
pub const AUDIENCE: &str = "https://latchkey.bench";
/// How long a minted token stays valid. Below the issuer's `max_token_age` (10 min), so the age
/// check never fires before `exp` does.
pub const TOKEN_LIFETIME_SECS: i64 = 9 * 60;

/// The form fields of one exchange, before the subject token. Values are percent-encoded: `:` is
/// a reserved character in `application/x-www-form-urlencoded`.
const FORM_PREFIX: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
    &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt\
    &scope=bench\
    &subject_token=";

/// A running issuer: its URL and what it needs to sign tokens.
pub struct Issuer {
    pub url: String,
    pub minter: Arc<Minter>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    /// Generates a key for `alg` and serves discovery and the JWKS on a free loopback port.
    pub async fn start(alg: Alg) -> anyhow::Result<Issuer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the issuer")?;
        let url = format!("http://{}", listener.local_addr()?);
        let minter = Arc::new(Minter::generate(&url, alg)?);
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}/jwks"),
            "id_token_signing_alg_values_supported": [alg.name()],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository",
                "repository_id", "repository_owner", "repository_owner_id", "run_id", "actor",
                "event_name", "job_workflow_ref", "workflow", "runner_environment"],
        });
        let jwks = minter.jwks()?;
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(move || async move { Json(discovery) }))
            .route("/jwks", get(move || async move { Json(jwks) }));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench issuer stopped: {e}");
            }
        });
        Ok(Issuer { url, minter, task })
    }
}

/// The signature algorithm of the subject tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Alg {
    /// RSA 2048 with SHA-256, as GitHub Actions and GitLab sign.
    Rs256,
    /// P-256 with SHA-256.
    Es256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// Signs subject tokens. Shared by the minting threads.
pub struct Minter {
    issuer: String,
    alg: Alg,
    key: Key,
    kid: String,
    /// base64url of the JOSE header, the same for every token.
    header_b64: String,
}

impl Minter {
    pub fn generate(issuer: &str, alg: Alg) -> anyhow::Result<Minter> {
        let key = match alg {
            Alg::Rs256 => {
                Key::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| anyhow!("cannot generate an RSA key"))?)
            }
            Alg::Es256 => {
                let signing = &ECDSA_P256_SHA256_FIXED_SIGNING;
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &SystemRandom::new())
                    .map_err(|_| anyhow!("cannot generate a P-256 key"))?;
                Key::Ec(
                    EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref())
                        .map_err(|e| anyhow!("P-256 key rejected: {e}"))?,
                )
            }
        };
        let mut minter = Minter { issuer: issuer.to_owned(), alg, key, kid: String::new(), header_b64: String::new() };
        // A stable, key-derived id, as RFC 7638 thumbprints are: a new key gets a new kid.
        minter.kid = format!("bench-{}", &hex::encode(Sha256::digest(minter.public_key()))[..16]);
        let header = json!({"alg": alg.name(), "typ": "JWT", "kid": minter.kid});
        minter.header_b64 = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
        Ok(minter)
    }

    /// The public key: for RSA the PKCS#1 `RSAPublicKey` DER, for P-256 the uncompressed SEC1
    /// point `0x04 ‖ x (32) ‖ y (32)`.
    pub fn public_key(&self) -> &[u8] {
        match &self.key {
            Key::Rsa(k) => k.public_key().as_ref(),
            Key::Ec(k) => k.public_key().as_ref(),
        }
    }

    /// `{"keys": [<the public JWK>]}`.
    pub fn jwks(&self) -> anyhow::Result<Value> {
        let public = self.public_key();
        let jwk = match self.alg {
            Alg::Rs256 => {
                let (n, e) = rsa_public_numbers(public)?;
                json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)})
            }
            Alg::Es256 => json!({
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
            }),
        };
        let mut jwk = jwk;
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(self.alg.name());
        Ok(json!({ "keys": [jwk] }))
    }

    /// The claims of token number `n`, GitHub Actions-shaped, issued at `now` (Unix seconds).
    /// Every token has its own `jti` (single use is on) and its own `run_id`, as one token per
    /// job would.
    pub fn claims(&self, n: u64, now: i64) -> anyhow::Result<Value> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| anyhow!("the system random source failed"))?;
        let jti = uuid::Builder::from_random_bytes(jti).into_uuid();
        let sha = "2f0b5c3e6a1d4e8f9b7c0a1d2e3f4a5b6c7d8e9f";
        let workflow_ref = "acme/widgets/.github/workflows/bench.yml@refs/heads/main";
        Ok(json!({
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "repo:acme/widgets:ref:refs/heads/main",
            "jti": jti.to_string(),
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_SECS,
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "ref_protected": "true",
            "sha": sha,
            "repository": "acme/widgets",
            "repository_id": "7654321",
            "repository_owner": "acme",
            "repository_owner_id": "1234567",
            "repository_visibility": "private",
            "run_id": (9_000_000_000 + n).to_string(),
            "run_number": "42",
            "run_attempt": "1",
            "actor": "octocat",
            "actor_id": "583231",
            "event_name": "push",
            "workflow": "bench",
            "workflow_ref": workflow_ref,
            "workflow_sha": sha,
            "job_workflow_ref": workflow_ref,
            "job_workflow_sha": sha,
            "runner_environment": "github-hosted",
            "head_ref": "",
            "base_ref": "",
        }))
    }

    /// A compact JWS over `claims`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
        let signing_input = format!("{}.{payload}", self.header_b64);
        let rng = SystemRandom::new();
        let sig = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
                    .map_err(|_| anyhow!("RS256 signing failed"))?;
                sig
            }
            Key::Ec(k) => {
                k.sign(&rng, signing_input.as_bytes()).map_err(|_| anyhow!("ES256 signing failed"))?.as_ref().to_vec()
            }
        };
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// The form body of one exchange of a fresh token `n`. A compact JWS is base64url and `.`,
    /// all unreserved in a form, so the token goes in unescaped.
    pub fn exchange_body(&self, n: u64, now: i64) -> anyhow::Result<Vec<u8>> {
        let token = self.sign(&self.claims(n, now)?)?;
        let mut body = Vec::with_capacity(FORM_PREFIX.len() + token.len());
        body.extend_from_slice(FORM_PREFIX.as_bytes());
        body.extend_from_slice(token.as_bytes());
        Ok(body)
    }

    /// Mints `count` exchange bodies on every core. Not timed: this is done before the load.
    pub fn mint(&self, count: usize, now: i64) -> anyhow::Result<Vec<Vec<u8>>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(count.max(1));
        let per_thread = count.div_ceil(threads);
        let chunks: Vec<anyhow::Result<Vec<Vec<u8>>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let from = t * per_thread;
                    let to = (from + per_thread).min(count);
                    scope.spawn(move || (from..to).map(|n| self.exchange_body(n as u64, now)).collect())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a minting thread panicked"))))
                .collect()
        });
        let mut bodies = Vec::with_capacity(count);
        for chunk in chunks {
            bodies.extend(chunk?);
        }
        Ok(bodies)
    }
}

/// The subject token inside an exchange body.
pub fn token_of(body: &[u8]) -> &[u8] {
    body.strip_prefix(FORM_PREFIX.as_bytes()).unwrap_or(body)
}

impl Minter {
    /// Verifies the token of an exchange body with the published key: a cheap guard, run on a
    /// minted token before the load, against sending a batch the broker must refuse.
    pub fn check(&self, body: &[u8]) -> anyhow::Result<()> {
        let token = token_of(body);
        let dot = token.iter().rposition(|b| *b == b'.').ok_or_else(|| anyhow!("not a compact JWS"))?;
        let sig = URL_SAFE_NO_PAD.decode(&token[dot + 1..])?;
        let verified = match self.alg {
            Alg::Rs256 => {
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, self.public_key()).verify(&token[..dot], &sig)
            }
            Alg::Es256 => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.public_key()).verify(&token[..dot], &sig)
            }
        };
        verified.map_err(|_| anyhow!("a minted token does not verify with the published key"))
    }
}

/// The modulus and public exponent of a PKCS#1 `RSAPublicKey` (RFC 8017 A.1.1:
/// `SEQUENCE { INTEGER n, INTEGER e }`, DER), unsigned big-endian with no leading zero, as a JWK
/// carries them (RFC 7518 6.3.1).
fn rsa_public_numbers(der: &[u8]) -> anyhow::Result<(&[u8], &[u8])> {
    fn element(input: &[u8], tag: u8) -> anyhow::Result<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first().ok_or_else(|| anyhow!("DER: truncated"))?;
        if t != tag {
            return Err(anyhow!("DER: tag {t:#x}, expected {tag:#x}"));
        }
        let (&first, rest) = rest.split_first().ok_or_else(|| anyhow!("DER: truncated"))?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 2 || rest.len() < n {
                return Err(anyhow!("DER: unsupported length"));
            }
            (rest[..n].iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b)), &rest[n..])
        };
        if rest.len() < len {
            return Err(anyhow!("DER: truncated"));
        }
        Ok(rest.split_at(len))
    }
    fn unsigned(i: &[u8]) -> &[u8] {
        let zeros = i.iter().take_while(|b| **b == 0).count();
        &i[zeros.min(i.len().saturating_sub(1))..]
    }
    let (body, _) = element(der, 0x30)?;
    let (n, rest) = element(body, 0x02)?;
    let (e, _) = element(rest, 0x02)?;
    Ok((unsigned(n), unsigned(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).expect("base64url")
    }

    /// The three parts of the compact JWS in an exchange body.
    fn jws_parts(body: &[u8]) -> Vec<&str> {
        let parts: Vec<&str> = std::str::from_utf8(token_of(body)).expect("ascii").split('.').collect();
        assert_eq!(parts.len(), 3);
        parts
    }

    /// The minter's own check accepts its token and refuses one with a changed signature.
    fn assert_self_check(minter: &Minter, body: &[u8]) {
        minter.check(body).expect("self-check accepts it");
        let mut forged = body.to_vec();
        let at = forged.len() - 60;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        assert!(minter.check(&forged).is_err(), "self-check refuses a changed signature");
    }

    #[test]
    fn rs256_tokens_verify_against_the_published_jwk() {
        let minter = Minter::generate("http://127.0.0.1:1", Alg::Rs256).expect("key");
        let body = minter.exchange_body(7, 1_700_000_000).expect("token");
        let parts = jws_parts(&body);

        // Rebuild the public key from the JWK's `n` and `e` alone, as a relying party would.
        let jwks = minter.jwks().expect("jwks");
        let jwk = &jwks["keys"][0];
        assert_eq!((jwk["kty"].as_str(), jwk["alg"].as_str()), (Some("RSA"), Some("RS256")));
        let (n, e) = (b64(jwk["n"].as_str().expect("n")), b64(jwk["e"].as_str().expect("e")));
        assert_eq!((n.len(), n[0] & 0x80), (256, 0x80), "a 2048-bit modulus, no leading zero");
        assert_eq!(e, [1, 0, 1], "the public exponent 65537");
        let sig = b64(parts[2]);
        aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(&RSA_PKCS1_2048_8192_SHA256, format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("signature verifies");
        let header: Value = serde_json::from_slice(&b64(parts[0])).expect("header");
        assert_eq!((&header["alg"], &header["kid"]), (&json!("RS256"), &jwk["kid"]));
        assert_self_check(&minter, &body);
    }

    #[test]
    fn es256_tokens_verify_against_the_published_jwk() {
        let minter = Minter::generate("http://127.0.0.1:1", Alg::Es256).expect("key");
        let body = minter.exchange_body(7, 1_700_000_000).expect("token");
        let parts = jws_parts(&body);

        // Rebuild the public key from the JWK alone, as a relying party would.
        let jwks = minter.jwks().expect("jwks");
        let jwk = &jwks["keys"][0];
        assert_eq!(
            (jwk["kty"].as_str(), jwk["crv"].as_str(), jwk["alg"].as_str()),
            (Some("EC"), Some("P-256"), Some("ES256"))
        );
        let mut point = vec![4u8];
        point.extend(b64(jwk["x"].as_str().expect("x")));
        point.extend(b64(jwk["y"].as_str().expect("y")));
        assert_eq!(point.len(), 65);
        let sig = b64(parts[2]);
        assert_eq!(sig.len(), 64, "ES256 signatures are r ‖ s, 32 bytes each");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("signature verifies");

        let header: Value = serde_json::from_slice(&b64(parts[0])).expect("header");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], jwk["kid"]);
        let claims: Value = serde_json::from_slice(&b64(parts[1])).expect("claims");
        assert_eq!(claims["iss"], "http://127.0.0.1:1");
        assert_eq!(claims["aud"], AUDIENCE);
        assert_eq!(claims["exp"].as_i64(), Some(1_700_000_000 + TOKEN_LIFETIME_SECS));
        assert_eq!(claims["repository_owner_id"], "1234567");
        assert_eq!(claims["run_id"], "9000000007");
        assert_self_check(&minter, &body);
    }

    #[test]
    fn the_form_body_is_a_valid_token_exchange() {
        let minter = Minter::generate("http://127.0.0.1:1", Alg::Es256).expect("key");
        let body = minter.exchange_body(0, 1_700_000_000).expect("token");
        let text = std::str::from_utf8(&body).expect("ascii");
        let fields: std::collections::HashMap<String, String> = url_decode_form(text);
        assert_eq!(fields["grant_type"], "urn:ietf:params:oauth:grant-type:token-exchange");
        assert_eq!(fields["subject_token_type"], "urn:ietf:params:oauth:token-type:jwt");
        assert_eq!(fields["scope"], "bench");
        assert_eq!(fields["subject_token"].as_bytes(), token_of(&body));
    }

    #[test]
    fn minting_gives_unique_jtis_on_every_thread() {
        let minter = Minter::generate("http://127.0.0.1:1", Alg::Es256).expect("key");
        let bodies = minter.mint(101, 1_700_000_000).expect("mint");
        assert_eq!(bodies.len(), 101);
        let jtis: std::collections::HashSet<String> = bodies
            .iter()
            .map(|b| {
                let token = std::str::from_utf8(token_of(b)).expect("ascii");
                let claims: Value =
                    serde_json::from_slice(&b64(token.split('.').nth(1).expect("payload"))).expect("json");
                claims["jti"].as_str().expect("jti").to_owned()
            })
            .collect();
        assert_eq!(jtis.len(), 101);
    }

    #[tokio::test]
    async fn discovery_and_jwks_are_served() {
        let issuer = Issuer::start(Alg::Es256).await.expect("issuer");
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        let discovery: Value = client
            .get(format!("{}/.well-known/openid-configuration", issuer.url))
            .send()
            .await
            .expect("discovery")
            .json()
            .await
            .expect("json");
        assert_eq!(discovery["issuer"], issuer.url.as_str());
        let jwks_uri = discovery["jwks_uri"].as_str().expect("jwks_uri");
        assert_eq!(jwks_uri, format!("{}/jwks", issuer.url));
        let jwks: Value = client.get(jwks_uri).send().await.expect("jwks").json().await.expect("json");
        assert_eq!(jwks, issuer.minter.jwks().expect("jwks"));
    }

    /// A minimal `application/x-www-form-urlencoded` decoder, independent of the encoder above.
    fn url_decode_form(text: &str) -> std::collections::HashMap<String, String> {
        text.split('&')
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("key=value");
                (decode(k), decode(v))
            })
            .collect()
    }

    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex"));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).expect("utf-8")
    }
}
