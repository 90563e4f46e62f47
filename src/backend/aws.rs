//! The `aws` backend: STS sessions for one role, narrowed by a session policy, tagged with who
//! they are for, and revoked through deny statements on the role.
//!
//! STS sessions cannot be revoked. What can be done is to make IAM refuse them: the role's
//! inline policy `latchkey-revocations` collects deny statements that latchkey owns (their `Sid`
//! starts with `Latchkey`; other statements are left alone):
//!
//! - `LatchkeyRevoked<epoch>`: one credential, or several, denied by `aws:SourceIdentity`, which
//!   is derived from the credential id and which a session cannot change. Credentials whose
//!   sessions end in the same quarter of an hour share one statement, whose `Sid` carries the
//!   end of that quarter, after which every session it names has expired and it is pruned.
//! - `LatchkeyKill<rule>`: a kill rule, denied by the session tags its selector names
//!   (`aws:PrincipalTag/latchkey-agent`, …), with no time bound while the rule stands. When the
//!   rule is lifted or lapses, the statement is bounded to sessions issued before that time
//!   (`aws:TokenIssueTime`), and pruned once every such session has expired. A selector that tags
//!   cannot express (a subject, a workflow, a claim) falls back to per-credential statements.
//!
//! Writes to one role's policy are serialized in this process and verified by reading the policy
//! back, so that concurrent writers (other replicas) cannot silently drop a statement.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::SecretBox;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Backend, BackendError, MintRequest, Minted, SecretFields, Upkeep, fingerprint};
use crate::app::Clock;
use crate::config::AwsConfig;
use crate::kill::{KillRule, Selector};
use crate::ledger::CredentialRow;
use crate::policy::{BackendKind, GrantSpec};

pub const ISSUED_TOKEN_TYPE: &str = "urn:latchkey:token-type:aws-session";
/// The inline policy on each target role that holds latchkey's deny statements.
pub const REVOCATION_POLICY: &str = "latchkey-revocations";
/// IAM's limit on all inline policies of a role together, in characters without whitespace.
const MAX_POLICY_CHARS: usize = 10_240;
/// STS's shortest and longest sessions.
const MIN_SESSION: i64 = 900;
const MAX_SESSION: i64 = 12 * 3600;
/// Per-credential statements group sessions ending within the same window.
const BUCKET_SECONDS: i64 = 900;
const SID_REVOKED: &str = "LatchkeyRevoked";
const SID_KILL: &str = "LatchkeyKill";
/// Reading the policy back after a write and finding a statement missing (another writer raced
/// us) retries the merge this many times.
const MERGE_ATTEMPTS: u32 = 5;
/// How long a kill statement read back from IAM is taken to be still there (see
/// `AwsBackend::kill_statements`).
const KILL_STATEMENT_FRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("STS refused AssumeRole for {role}: {message}")]
    AssumeRefused { role: String, message: String },
    #[error("STS could not be reached: {0}")]
    StsUnavailable(String),
    #[error("IAM {operation} on role {role}: {message}")]
    Iam { operation: &'static str, role: String, message: String },
    #[error("the revocation policy of role {role} is full ({chars} characters; IAM allows {MAX_POLICY_CHARS})")]
    PolicyFull { role: String, chars: usize },
    #[error("another writer kept replacing the revocation policy of role {0}")]
    Contended(String),
    #[error("bad revocation handle: {0}")]
    Handle(String),
}

impl From<AwsError> for BackendError {
    fn from(e: AwsError) -> Self {
        let backend = BackendKind::Aws;
        match e {
            AwsError::AssumeRefused { .. } => BackendError::Refused { backend, message: e.to_string() },
            AwsError::Handle(_) => BackendError::BadHandle { backend, message: e.to_string() },
            _ => BackendError::Unavailable { backend, message: e.to_string() },
        }
    }
}

/// What revoking one session needs; sealed by the broker like every handle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SessionHandle {
    role_arn: String,
    source_identity: String,
    /// When STS ends the session.
    expires_at: DateTime<Utc>,
}

pub struct AwsBackend {
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
    region: String,
    clock: Arc<dyn Clock>,
    /// One lock per role name: read-modify-write of its policy is serialized in this process.
    role_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Roles whose revocation policy this process wrote, for the pruning pass.
    touched: Mutex<HashSet<String>>,
    /// Kill statements (role, `Sid`) this process has read back from IAM, and when. A kill
    /// revokes every session of a role with one statement: its other jobs on that role within
    /// [`KILL_STATEMENT_FRESH`] are answered from here instead of queueing on the role's lock
    /// for one IAM read each (a kill of 10,000 credentials would otherwise be paced by
    /// thousands of reads in a row). Past that, the next job reads again, and puts the
    /// statement back if another writer dropped it.
    kill_statements: Mutex<HashMap<(String, String), DateTime<Utc>>>,
}

impl std::fmt::Debug for AwsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsBackend").field("region", &self.region).finish_non_exhaustive()
    }
}

impl AwsBackend {
    /// Builds the STS and IAM clients with the broker's own credentials from the standard AWS
    /// chain (environment, profile, web identity, instance metadata).
    pub async fn new(config: &AwsConfig, timeout: Duration, clock: Arc<dyn Clock>) -> AwsBackend {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(TimeoutConfig::builder().operation_timeout(timeout).connect_timeout(timeout).build());
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        AwsBackend {
            sts: aws_sdk_sts::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            region: config.region.clone(),
            clock,
            role_locks: Mutex::new(HashMap::new()),
            touched: Mutex::new(HashSet::new()),
            kill_statements: Mutex::new(HashMap::new()),
        }
    }

    fn role_lock(&self, role: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.role_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(role.to_owned()).or_default().clone()
    }

    /// The role's revocation policy, or an empty one.
    async fn read_policy(&self, role: &str) -> Result<PolicyDocument, AwsError> {
        let answer = self.iam.get_role_policy().role_name(role).policy_name(REVOCATION_POLICY).send().await;
        match answer {
            Ok(out) => PolicyDocument::parse(out.policy_document()).map_err(|message| AwsError::Iam {
                operation: "GetRolePolicy",
                role: role.to_owned(),
                message,
            }),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_no_such_entity_exception() {
                    Ok(PolicyDocument::default())
                } else {
                    Err(AwsError::Iam { operation: "GetRolePolicy", role: role.to_owned(), message: error_text(&e) })
                }
            }
        }
    }

    async fn write_policy(&self, role: &str, doc: &PolicyDocument) -> Result<(), AwsError> {
        if doc.statements.is_empty() {
            let answer = self.iam.delete_role_policy().role_name(role).policy_name(REVOCATION_POLICY).send().await;
            return match answer {
                Ok(_) => Ok(()),
                Err(e) => {
                    let e = e.into_service_error();
                    if e.is_no_such_entity_exception() {
                        Ok(())
                    } else {
                        Err(AwsError::Iam {
                            operation: "DeleteRolePolicy",
                            role: role.to_owned(),
                            message: error_text(&e),
                        })
                    }
                }
            };
        }
        let text = doc.to_json();
        if text.chars().count() > MAX_POLICY_CHARS {
            return Err(AwsError::PolicyFull { role: role.to_owned(), chars: text.chars().count() });
        }
        self.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(REVOCATION_POLICY)
            .policy_document(text)
            .send()
            .await
            .map_err(|e| AwsError::Iam {
                operation: "PutRolePolicy",
                role: role.to_owned(),
                message: error_text(&e.into_service_error()),
            })?;
        self.touched.lock().unwrap_or_else(|p| p.into_inner()).insert(role.to_owned());
        Ok(())
    }

    /// Applies `change` to the role's policy (after pruning what has expired), writes it, and
    /// reads it back until `present` holds: a concurrent writer elsewhere may have replaced it.
    async fn merge(
        &self,
        role: &str,
        change: impl Fn(&mut PolicyDocument),
        present: impl Fn(&PolicyDocument) -> bool,
    ) -> Result<(), AwsError> {
        let lock = self.role_lock(role);
        let _guard = lock.lock().await;
        let now = self.clock.now();
        for attempt in 0..MERGE_ATTEMPTS {
            let mut doc = self.read_policy(role).await?;
            if present(&doc) {
                return Ok(());
            }
            doc.prune_expired(now);
            change(&mut doc);
            self.write_policy(role, &doc).await?;
            // Give a concurrent writer's Put time to land before checking that ours survived.
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1))).await;
            if present(&self.read_policy(role).await?) {
                return Ok(());
            }
        }
        Err(AwsError::Contended(role.to_owned()))
    }

    /// Denies one session by its source identity.
    async fn deny_session(&self, handle: &SessionHandle) -> Result<(), AwsError> {
        let role = role_name(&handle.role_arn).ok_or_else(|| AwsError::Handle("not a role ARN".into()))?;
        let si = handle.source_identity.clone();
        let bucket = bucket_end(handle.expires_at);
        self.merge(role, |doc| doc.add_source_identity(bucket, &si), |doc| doc.denies_source_identity(&si)).await
    }

    /// Denies every session on the role that the kill rule's selector names through tags.
    async fn deny_by_tags(&self, role: &str, rule: &KillRule, conditions: &Map<String, Value>) -> Result<(), AwsError> {
        let sid = kill_sid(rule);
        let key = (role.to_owned(), sid.clone());
        let seen = self.kill_statements.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        if seen.is_some_and(|at| self.clock.now() - at < KILL_STATEMENT_FRESH) {
            return Ok(());
        }
        let statement = json!({
            "Sid": sid, "Effect": "Deny", "Action": "*", "Resource": "*",
            "Condition": { "StringLike": conditions },
        });
        self.merge(role, |doc| doc.put(statement.clone()), |doc| doc.get(&sid).is_some()).await?;
        self.kill_statements.lock().unwrap_or_else(|p| p.into_inner()).insert(key, self.clock.now());
        Ok(())
    }

    /// Prunes expired statements of one role and bounds the statements of kill rules that no
    /// longer stand. `rules` are every kill rule not yet 12 h past its end.
    async fn maintain_role(&self, role: &str, rules: &[KillRule], now: DateTime<Utc>) -> Result<(), AwsError> {
        let lock = self.role_lock(role);
        let _guard = lock.lock().await;
        let mut doc = self.read_policy(role).await?;
        let before = doc.clone();
        doc.prune_expired(now);
        for rule in rules {
            let sid = kill_sid(rule);
            let Some(ended) = rule_end(rule, now) else { continue };
            if ended + chrono::Duration::seconds(MAX_SESSION) < now {
                doc.remove(&sid);
                self.kill_statements.lock().unwrap_or_else(|p| p.into_inner()).remove(&(role.to_owned(), sid));
            } else if let Some(statement) = doc.get_mut(&sid) {
                // Sessions issued before the rule ended stay denied until they expire; new ones
                // are let through.
                statement["Condition"]["DateLessThan"] =
                    json!({ "aws:TokenIssueTime": ended.to_rfc3339_opts(SecondsFormat::Secs, true) });
            }
        }
        if doc != before {
            self.write_policy(role, &doc).await?;
        }
        Ok(())
    }
}

/// When a rule stopped standing (lifted, or lapsed), if it has.
fn rule_end(rule: &KillRule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rule.lifted_at.or(rule.expires_at.filter(|e| *e <= now))
}

fn kill_sid(rule: &KillRule) -> String {
    format!("{SID_KILL}{}", rule.id.simple())
}

/// The end of the window in which a session ends: its statement can go after that.
fn bucket_end(expires_at: DateTime<Utc>) -> i64 {
    let t = expires_at.timestamp();
    (t + BUCKET_SECONDS - 1).div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS
}

/// `arn:aws:iam::123456789012:role/path/name` → `name`.
fn role_name(arn: &str) -> Option<&str> {
    arn.split_once(":role/").map(|(_, path)| path.rsplit('/').next().unwrap_or(path))
}

/// The session name and source identity of a credential: `lk-` and its id in hex. Both allow
/// `[\w+=,.@-]` and up to 64 characters; this is 35.
pub fn source_identity(credential: uuid::Uuid) -> String {
    format!("lk-{}", credential.simple())
}

/// A session tag value in AWS's character set (letters, digits, spaces, `_.:/=+-@`) and length.
pub fn tag_value(value: &str) -> String {
    value.chars().map(|c| if c.is_alphanumeric() || " _.:/=+-@".contains(c) { c } else { '_' }).take(256).collect()
}

/// A kill selector as IAM `StringLike` conditions on session tags, when tags can express it
/// exactly. Agent and capability names hold no `/`, so their globs mean what IAM's `*` and `?`
/// mean; a repository is expressible only as an exact name (IAM's `*` would cross `/`). Anything
/// else (subject, workflow, issuer, claims, one credential, regexes) is not expressible.
pub fn tag_conditions(selector: &Selector) -> Option<Map<String, Value>> {
    if selector.subject.is_some()
        || selector.workflow.is_some()
        || selector.issuer.is_some()
        || !selector.claims.is_empty()
        || selector.credential.is_some()
    {
        return None;
    }
    let mut conditions = Map::new();
    if selector.all {
        conditions.insert("aws:PrincipalTag/latchkey-credential".into(), json!("*"));
        return Some(conditions);
    }
    for (tag, pattern, globs) in [
        ("latchkey-agent", &selector.agent, true),
        ("latchkey-capability", &selector.capability, true),
        ("latchkey-repository", &selector.repository, false),
    ] {
        let Some(pattern) = pattern else { continue };
        conditions.insert(format!("aws:PrincipalTag/{tag}"), Value::String(iam_like(pattern, globs)?));
    }
    (!conditions.is_empty()).then_some(conditions)
}

/// A latchkey glob as an IAM `StringLike` value, or `None` when IAM would mean something else.
fn iam_like(pattern: &str, globs: bool) -> Option<String> {
    if pattern.starts_with("re:") {
        return None;
    }
    let mut out = String::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if globs => {
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                out.push('*');
            }
            '?' if globs => out.push('?'),
            '*' | '?' => return None,
            // IAM reads `${…}` as a policy variable; `${$}` is a literal `$`.
            '$' => out.push_str("${$}"),
            c => out.push_str(&tag_value(&c.to_string())),
        }
    }
    Some(out)
}

fn error_text(e: &impl std::error::Error) -> String {
    // Service errors print their code and message; neither carries credentials.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text.chars().take(300).collect()
}

/// The revocation policy: latchkey's statements and whatever else is there, kept as is.
#[derive(Debug, Clone, Default, PartialEq)]
struct PolicyDocument {
    statements: Vec<Value>,
}

impl PolicyDocument {
    /// IAM returns policy documents URL-encoded (RFC 3986); a plain one is taken as is.
    fn parse(text: &str) -> Result<PolicyDocument, String> {
        let decoded = if text.trim_start().starts_with('{') {
            text.to_owned()
        } else {
            url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let doc: Value = serde_json::from_str(&decoded).map_err(|e| format!("policy document is not JSON: {e}"))?;
        let statements = match &doc["Statement"] {
            Value::Array(items) => items.clone(),
            Value::Object(_) => vec![doc["Statement"].clone()],
            _ => Vec::new(),
        };
        Ok(PolicyDocument { statements })
    }

    fn to_json(&self) -> String {
        json!({ "Version": "2012-10-17", "Statement": self.statements }).to_string()
    }

    fn sid(statement: &Value) -> &str {
        statement["Sid"].as_str().unwrap_or_default()
    }

    fn get(&self, sid: &str) -> Option<&Value> {
        self.statements.iter().find(|s| Self::sid(s) == sid)
    }

    fn get_mut(&mut self, sid: &str) -> Option<&mut Value> {
        self.statements.iter_mut().find(|s| Self::sid(s) == sid)
    }

    fn put(&mut self, statement: Value) {
        let sid = Self::sid(&statement).to_owned();
        match self.get_mut(&sid) {
            Some(existing) => *existing = statement,
            None => self.statements.push(statement),
        }
    }

    fn remove(&mut self, sid: &str) {
        self.statements.retain(|s| Self::sid(s) != sid);
    }

    fn source_identities(statement: &Value) -> Vec<String> {
        match &statement["Condition"]["StringEquals"]["aws:SourceIdentity"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        }
    }

    fn denies_source_identity(&self, si: &str) -> bool {
        self.statements
            .iter()
            .filter(|s| Self::sid(s).starts_with(SID_REVOKED))
            .any(|s| Self::source_identities(s).iter().any(|v| v == si))
    }

    fn add_source_identity(&mut self, bucket: i64, si: &str) {
        let sid = format!("{SID_REVOKED}{bucket}");
        let mut identities: BTreeSet<String> =
            self.get(&sid).map(Self::source_identities).unwrap_or_default().into_iter().collect();
        identities.insert(si.to_owned());
        self.put(json!({
            "Sid": sid, "Effect": "Deny", "Action": "*", "Resource": "*",
            "Condition": { "StringEquals": { "aws:SourceIdentity": identities } },
        }));
    }

    /// Drops per-credential statements whose every session has ended.
    fn prune_expired(&mut self, now: DateTime<Utc>) {
        self.statements.retain(|s| match Self::sid(s).strip_prefix(SID_REVOKED).and_then(|e| e.parse::<i64>().ok()) {
            Some(end) => end > now.timestamp(),
            None => true,
        });
    }
}

#[async_trait]
impl Backend for AwsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Aws
    }

    async fn mint(&self, request: MintRequest<'_>) -> Result<Minted, BackendError> {
        let GrantSpec::Aws(grant) = &request.grant.spec else {
            return Err(BackendError::Refused { backend: BackendKind::Aws, message: "not an aws grant".into() });
        };
        let si = source_identity(request.credential_id);
        let duration = (request.expires_at - request.now).num_seconds().clamp(MIN_SESSION, MAX_SESSION);
        let tag = |key: &str, value: &str| {
            aws_sdk_sts::types::Tag::builder().key(key).value(tag_value(value)).build().map_err(|e| {
                BackendError::Refused { backend: BackendKind::Aws, message: format!("session tag {key}: {e}") }
            })
        };
        let mut call = self
            .sts
            .assume_role()
            .role_arn(&grant.role_arn)
            .role_session_name(&si)
            .source_identity(&si)
            .duration_seconds(duration as i32)
            .tags(tag("latchkey-agent", request.agent)?)
            .tags(tag("latchkey-capability", request.capability)?)
            .tags(tag("latchkey-credential", &request.credential_id.to_string())?);
        if let Some(repository) = request.claims.repository.as_deref() {
            call = call.tags(tag("latchkey-repository", repository)?);
        }
        if let Some(policy) = &grant.session_policy {
            call = call.policy(policy);
        }
        for arn in &grant.policy_arns {
            call = call.policy_arns(aws_sdk_sts::types::PolicyDescriptorType::builder().arn(arn).build());
        }
        if let Some(external_id) = &grant.external_id {
            call = call.external_id(external_id);
        }
        let answer = call.send().await.map_err(|e| match e {
            aws_sdk_sts::error::SdkError::ServiceError(e) => {
                AwsError::AssumeRefused { role: grant.role_arn.clone(), message: error_text(e.err()) }
            }
            other => AwsError::StsUnavailable(error_text(&other)),
        })?;
        let credentials = answer.credentials().ok_or_else(|| AwsError::StsUnavailable("no credentials".into()))?;
        let expires_at = DateTime::from_timestamp(credentials.expiration().secs(), 0).unwrap_or(request.expires_at);
        let handle = SessionHandle { role_arn: grant.role_arn.clone(), source_identity: si, expires_at };
        let handle = serde_json::to_vec(&handle).map_err(|e| AwsError::Handle(e.to_string()))?;
        let mut secret = Map::new();
        secret.insert("access_key_id".into(), json!(credentials.access_key_id()));
        secret.insert("secret_access_key".into(), json!(credentials.secret_access_key()));
        secret.insert("session_token".into(), json!(credentials.session_token()));
        secret.insert("expiration".into(), json!(expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)));
        secret.insert("role_arn".into(), json!(grant.role_arn));
        secret.insert("region".into(), json!(self.region));
        Ok(Minted {
            secret: SecretFields(secret),
            access_token: credentials.session_token().to_owned().into(),
            issued_token_type: ISSUED_TOKEN_TYPE,
            token_type: "N_A",
            handle: Some(SecretBox::new(Box::new(handle))),
            fingerprint: fingerprint(credentials.session_token().as_bytes()),
            expires_at,
        })
    }

    async fn revoke(&self, credential: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError> {
        let Some(handle) = handle else {
            // No handle: AssumeRole never answered, or its answer was never recorded. The session,
            // if there is one, lasts its duration: the policy TTL, and never less than STS's 15 min.
            let ttl = (credential.expires_at - credential.created_at).num_seconds().max(MIN_SESSION);
            let lives_for = Duration::from_secs(ttl.unsigned_abs());
            return Err(BackendError::Unrecorded { backend: BackendKind::Aws, lives_for });
        };
        let handle: SessionHandle = serde_json::from_slice(handle).map_err(|e| AwsError::Handle(e.to_string()))?;
        if handle.expires_at <= self.clock.now() {
            return Ok(()); // STS has ended it.
        }
        Ok(self.deny_session(&handle).await?)
    }

    async fn revoke_for_kill(
        &self,
        credential: &CredentialRow,
        handle: Option<&[u8]>,
        rule: &KillRule,
    ) -> Result<(), BackendError> {
        let (Some(raw), Some(conditions)) = (handle, tag_conditions(&rule.selector)) else {
            return self.revoke(credential, handle).await;
        };
        let session: SessionHandle = serde_json::from_slice(raw).map_err(|e| AwsError::Handle(e.to_string()))?;
        if session.expires_at <= self.clock.now() {
            return Ok(());
        }
        let role = role_name(&session.role_arn).ok_or_else(|| AwsError::Handle("not a role ARN".into()))?;
        Ok(self.deny_by_tags(role, rule, &conditions).await?)
    }

    async fn maintain(&self, upkeep: &Upkeep<'_>) -> Result<(), BackendError> {
        let now = self.clock.now();
        let rules = upkeep.rules;
        let arns = upkeep.policies.policies.values().flat_map(|p| p.grants.iter()).filter_map(|(_, g)| match g {
            GrantSpec::Aws(a) => Some(a.role_arn.as_str()),
            _ => None,
        });
        let mut all: BTreeSet<String> = arns.filter_map(role_name).map(str::to_owned).collect();
        all.extend(self.touched.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        let mut first_error = None;
        for role in all {
            if let Err(e) = self.maintain_role(&role, rules, now).await {
                tracing::warn!(role = %role, error = %e, "could not prune the revocation policy");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(v: Value) -> Selector {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn selectors_become_tag_conditions_only_when_iam_means_the_same() {
        let c = tag_conditions(&selector(json!({ "agent": "pr-*", "capability": "deploy" }))).unwrap();
        assert_eq!(c["aws:PrincipalTag/latchkey-agent"], "pr-*");
        assert_eq!(c["aws:PrincipalTag/latchkey-capability"], "deploy");
        let c = tag_conditions(&selector(json!({ "repository": "acme/widgets" }))).unwrap();
        assert_eq!(c["aws:PrincipalTag/latchkey-repository"], "acme/widgets");
        assert!(tag_conditions(&selector(json!({ "repository": "acme/*" }))).is_none(), "IAM's * crosses /");
        assert!(tag_conditions(&selector(json!({ "agent": "re:pr-.*" }))).is_none());
        assert!(tag_conditions(&selector(json!({ "agent": "pr", "workflow": "x" }))).is_none());
        assert!(tag_conditions(&selector(json!({ "claims": { "actor": "x" } }))).is_none());
        let all = tag_conditions(&selector(json!({ "all": true }))).unwrap();
        assert_eq!(all["aws:PrincipalTag/latchkey-credential"], "*");
        assert_eq!(iam_like("a$b**c", true).unwrap(), "a${$}b*c");
    }

    #[test]
    fn tag_values_and_source_identities_fit_aws() {
        assert_eq!(tag_value("acme/widgets"), "acme/widgets");
        assert_eq!(tag_value("a#b!c"), "a_b_c");
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
        let si = source_identity(uuid::Uuid::nil());
        assert!(si.len() <= 64 && si.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c)), "{si}");
    }

    #[test]
    fn per_credential_denies_group_by_expiry_and_prune() {
        let mut doc = PolicyDocument::default();
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        doc.add_source_identity(bucket_end(t(1000)), "lk-a");
        doc.add_source_identity(bucket_end(t(1700)), "lk-b");
        doc.add_source_identity(bucket_end(t(2000)), "lk-c");
        assert_eq!(doc.statements.len(), 2, "{doc:?}");
        assert!(doc.denies_source_identity("lk-b") && doc.denies_source_identity("lk-c"));
        doc.prune_expired(t(1800));
        assert!(!doc.denies_source_identity("lk-a"), "its sessions have all ended");
        assert!(doc.denies_source_identity("lk-c"));
        // Another party's statement is kept.
        doc.put(json!({ "Sid": "Theirs", "Effect": "Deny", "Action": "s3:*", "Resource": "*" }));
        doc.prune_expired(t(100_000));
        assert_eq!(doc.statements.len(), 1);
    }

    #[test]
    fn url_encoded_documents_parse() {
        let doc = PolicyDocument::parse("%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%5D%7D").unwrap();
        assert!(doc.statements.is_empty());
        assert!(PolicyDocument::parse(r#"{"Statement": {"Sid": "x"}}"#).unwrap().get("x").is_some());
    }
}
