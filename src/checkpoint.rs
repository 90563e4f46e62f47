//! Tamper evidence for the audit chain: signed checkpoints, and verification.
//!
//! The hash chain alone proves that the events agree with each other, not that nobody rewrote
//! them: whoever can write the database can edit an event and recompute every later hash, or cut
//! the tail off. A checkpoint is an Ed25519 signature over "event `seq` has hash `hash`", made
//! with a key kept outside the database (`[audit] checkpoint_key_file`). Checkpoints are taken
//! periodically and on demand, stored beside the chain, appended to it as `audit.checkpoint`
//! events, and so also leave the machine on the audit stream. [`verify`] recomputes the chain
//! and checks every checkpoint it can find against it:
//!
//! * an edited event breaks the chain at that event;
//! * an edited event with every later hash recomputed disagrees with the first checkpoint signed
//!   after it;
//! * a cut tail leaves a checkpoint that names an event beyond the end.
//!
//! Nothing here knows about HTTP; the key never leaves this module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::audit::{AuditEvent, ChainError, GENESIS_HASH, StoredEvent, format_time, verify_chain};
use crate::ledger::{AuditSource, Checkpoint, LedgerError};

/// The audit event that records a checkpoint on the chain (and so on the stream).
pub const CHECKPOINT_EVENT: &str = "audit.checkpoint";
/// The domain separation prefix of the signed message.
const CONTEXT: &str = "latchkey-audit-checkpoint-v1";
/// Events read per page while verifying.
const PAGE: usize = 1000;
/// Problems reported at most: after this many the log is plainly not to be trusted.
const MAX_PROBLEMS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("no checkpoint key is configured ([audit] checkpoint_key_file)")]
    NotConfigured,
    #[error("the store is unavailable: {0}")]
    Store(#[from] LedgerError),
}

/// The exact bytes a checkpoint's signature covers.
pub fn signed_message(seq: i64, hash: &str, signed_at: &str) -> Vec<u8> {
    format!("{CONTEXT}\nseq={seq}\nhash={hash}\nsigned_at={signed_at}\n").into_bytes()
}

/// The key id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// The signing key. Its `Debug` shows only the key id.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckpointKey({})", self.key_id)
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

impl CheckpointKey {
    /// Reads a PKCS#8 Ed25519 key in PEM (what [`generate_key_file`] and
    /// `openssl genpkey -algorithm ed25519` write).
    pub fn load(path: &Path) -> Result<CheckpointKey, CheckpointError> {
        let err = |message: String| CheckpointError::Key { path: path.to_owned(), message };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(if e.kind() == std::io::ErrorKind::NotFound {
                "not found; `latchkey init` creates one".into()
            } else {
                e.to_string()
            })
        })?;
        let body: String = text
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|t| t.strip_suffix(PEM_END))
            .ok_or_else(|| err("not a PEM private key".into()))?
            .split_whitespace()
            .collect();
        let der = STANDARD.decode(body).map_err(|_| err("the PEM body is not base64".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| err(format!("not a PKCS#8 Ed25519 key: {e}")))?;
        Ok(Self::from_pair(pair))
    }

    fn from_pair(pair: Ed25519KeyPair) -> CheckpointKey {
        let key_id = key_id(pair.public_key().as_ref());
        CheckpointKey { pair, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key, base64 of its 32 raw bytes: what `verify` needs.
    pub fn public_key(&self) -> PublicKey {
        PublicKey { raw: self.pair.public_key().as_ref().to_vec(), key_id: self.key_id.clone() }
    }

    /// Signs "event `seq` has hash `hash`" at `now`.
    pub fn sign(&self, seq: i64, hash: &str, now: DateTime<Utc>) -> Checkpoint {
        let signed_at = format_time(now);
        let signature = self.pair.sign(&signed_message(seq, hash, &signed_at));
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            signed_at,
            key_id: self.key_id.clone(),
            signature: STANDARD.encode(signature.as_ref()),
        }
    }
}

/// Writes a new key file, readable by its owner only; never overwrites.
pub fn generate_key_file(path: &Path) -> Result<CheckpointKey, CheckpointError> {
    use std::io::Write;
    let err = |message: String| CheckpointError::Key { path: path.to_owned(), message };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| err("cannot generate a key".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| err(e.to_string()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| err(e.to_string()))?;
    let b64 = STANDARD.encode(pkcs8.as_ref());
    let mut pem = format!("{PEM_BEGIN}\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(PEM_END);
    pem.push('\n');
    file.write_all(pem.as_bytes()).map_err(|e| err(e.to_string()))?;
    Ok(CheckpointKey::from_pair(pair))
}

/// A public key that checkpoints are checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    raw: Vec<u8>,
    key_id: String,
}

impl PublicKey {
    /// Base64 (standard or URL-safe) of the 32 raw bytes, as `latchkey audit public-key` prints.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let text = text.trim();
        let raw = STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
            .map_err(|_| "a public key is 32 bytes in base64".to_owned())?;
        if raw.len() != 32 {
            return Err("a public key is 32 bytes in base64".into());
        }
        Ok(PublicKey { key_id: key_id(&raw), raw })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.raw)
    }

    fn verifies(&self, c: &Checkpoint) -> bool {
        let Ok(sig) = STANDARD.decode(&c.signature) else { return false };
        UnparsedPublicKey::new(&ED25519, &self.raw).verify(&signed_message(c.seq, &c.hash, &c.signed_at), &sig).is_ok()
    }
}

/// Takes a checkpoint of the chain head now: signs it, stores it, and appends its
/// `audit.checkpoint` event (which the audit stream then carries off the machine).
pub async fn take(app: &App, actor: &str, request_id: Option<&str>) -> Result<Checkpoint, CheckpointError> {
    let key = app.checkpoint_key.as_ref().ok_or(CheckpointError::NotConfigured)?;
    let now = app.clock.now();
    let (seq, hash) = app.ledger.audit_head().await?;
    let checkpoint = key.sign(seq, &hash, now);
    let mut event = AuditEvent::new(CHECKPOINT_EVENT, now);
    event.actor = Some(actor.to_owned());
    event.request_id = request_id.map(str::to_owned);
    event.detail = Some(serde_json::to_value(&checkpoint).unwrap_or(Value::Null));
    app.ledger.record_checkpoint(&checkpoint, event).await?;
    tracing::info!(seq, key_id = %checkpoint.key_id, "audit.checkpoint");
    Ok(checkpoint)
}

/// The periodic checkpoint: skipped when nothing but the previous checkpoint's own event was
/// appended since, so an idle broker does not grow its log by itself.
pub async fn take_if_due(app: &App) -> Result<Option<Checkpoint>, CheckpointError> {
    if app.checkpoint_key.is_none() {
        return Ok(None);
    }
    let (head, _) = app.ledger.audit_head().await?;
    if head == 0 {
        return Ok(None);
    }
    if let Some(last) = app.ledger.latest_checkpoint().await?
        && head <= last.seq + 1
    {
        return Ok(None);
    }
    take(app, "system", None).await.map(Some)
}

/// Runs [`take_if_due`] every `[audit] checkpoint_interval`.
pub fn spawn_periodic(app: &crate::app::AppState) {
    if app.checkpoint_key.is_none() {
        return;
    }
    let app = app.clone();
    let every = app.config.audit.checkpoint_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = take_if_due(&app).await {
                tracing::warn!(error = %e, "audit.checkpoint_failed");
            }
        }
    });
}

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyRequest {
    /// First event to check (default 1). Its link to the event before is taken as stored.
    pub from: Option<i64>,
    /// Last event to check (default: the end of the log).
    pub to: Option<i64>,
    /// Keys whose signatures are accepted. Empty: signatures are not checked, only said so.
    pub keys: Vec<PublicKey>,
    /// Checkpoints kept elsewhere (the audit stream, a SIEM export): checked like stored ones.
    pub extra_checkpoints: Vec<Checkpoint>,
}

/// One thing wrong with the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The event where it shows.
    pub seq: i64,
    /// `gap`, `broken_link`, `bad_hash`, `bad_body`, `rewritten`, `truncated`, `bad_signature`,
    /// `unknown_key`.
    pub kind: &'static str,
    pub message: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub from: i64,
    /// The last event checked (`from - 1` when there was none).
    pub to: i64,
    pub events_checked: u64,
    /// The recomputed hash of event `to`.
    pub head_hash: String,
    pub checkpoints_checked: u64,
    /// Whether checkpoint signatures were checked (a public key was given).
    pub signatures_checked: bool,
    /// The latest checkpoint that agreed with the chain.
    pub last_good_checkpoint: Option<Checkpoint>,
    /// Everything found, in order of sequence number; the first is the first broken link.
    pub problems: Vec<Problem>,
}

fn chain_problem(e: &ChainError) -> Problem {
    let (seq, kind) = match e {
        ChainError::Gap { seq, .. } => (*seq, "gap"),
        ChainError::BrokenLink { seq } => (*seq, "broken_link"),
        ChainError::BadHash { seq } => (*seq, "bad_hash"),
        ChainError::BadBody { seq } => (*seq, "bad_body"),
    };
    Problem { seq, kind, message: e.to_string() }
}

/// A checkpoint carried by an `audit.checkpoint` event, or by a line of the audit stream (the
/// same item shape as `GET /v1/audit`), or given bare.
pub fn checkpoint_from_json(v: &Value) -> Option<Checkpoint> {
    let event = if v.get("event").is_some_and(Value::is_object) { &v["event"] } else { v };
    if event.get("event").and_then(Value::as_str) == Some(CHECKPOINT_EVENT) {
        return serde_json::from_value(event.get("detail")?.clone()).ok();
    }
    serde_json::from_value(v.clone()).ok()
}

/// Recomputes the chain over `[from, to]` and checks every checkpoint found in the store, on
/// the chain itself and in `extra_checkpoints`.
pub async fn verify<S: AuditSource + ?Sized>(source: &S, req: VerifyRequest) -> Result<VerifyReport, LedgerError> {
    let from = req.from.unwrap_or(1).max(1);
    let mut problems = Vec::new();
    // The link into the range is taken as stored: a range check proves the range, the
    // checkpoints inside it, and nothing before it.
    let mut prev = GENESIS_HASH;
    if from > 1 {
        match source.chain(from - 2, 1).await?.first() {
            Some(e) if e.seq == from - 1 => prev = parse_hash(&e.hash).unwrap_or(GENESIS_HASH),
            _ => {
                problems.push(Problem { seq: from - 1, kind: "gap", message: format!("event {} is missing", from - 1) })
            }
        }
    }
    let mut checkpoints: Vec<Checkpoint> = source.stored_checkpoints().await?;
    checkpoints.extend(req.extra_checkpoints);
    // The recomputed hash of every event, kept only where a checkpoint might need it is not
    // known until the whole chain is read, so keep them all (32 bytes each).
    let mut computed: HashMap<i64, [u8; 32]> = HashMap::new();
    let mut expected = from;
    let mut events_checked = 0u64;
    let mut last = from - 1;
    let mut after = from - 1;
    'pages: loop {
        let page: Vec<StoredEvent> = source.chain(after, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            if req.to.is_some_and(|to| e.seq > to) {
                break 'pages;
            }
            after = e.seq;
            if let Err(err) = verify_chain(prev, expected, std::slice::from_ref(e)) {
                if problems.len() < MAX_PROBLEMS {
                    problems.push(chain_problem(&err));
                }
                // Carry on from what is stored, so that each later break is reported on its own.
                prev = parse_hash(&e.hash).unwrap_or(GENESIS_HASH);
            } else {
                prev = crate::audit::chain_hash(&prev, e.body.as_bytes());
            }
            computed.insert(e.seq, prev);
            if let Ok(ev) = e.event()
                && ev.event == CHECKPOINT_EVENT
                && let Some(c) = ev.detail.and_then(|d| serde_json::from_value::<Checkpoint>(d).ok())
            {
                checkpoints.push(c);
            }
            expected = e.seq + 1;
            last = e.seq;
            events_checked += 1;
        }
    }
    // One checkpoint per (seq, signature): the same one is found in the table and on the chain.
    let mut unique: BTreeMap<(i64, String), Checkpoint> = BTreeMap::new();
    for c in checkpoints {
        unique.entry((c.seq, c.signature.clone())).or_insert(c);
    }
    let keys: HashMap<&str, &PublicKey> = req.keys.iter().map(|k| (k.key_id(), k)).collect();
    let signatures_checked = !keys.is_empty();
    let mut checked = 0u64;
    let mut last_good: Option<Checkpoint> = None;
    let mut previous_good_seq = from - 1;
    for c in unique.into_values() {
        if c.seq < from || req.to.is_some_and(|to| c.seq > to) {
            continue;
        }
        checked += 1;
        let mut push = |p: Problem| {
            if problems.len() < MAX_PROBLEMS {
                problems.push(p)
            }
        };
        if signatures_checked {
            match keys.get(c.key_id.as_str()) {
                None => {
                    push(Problem {
                        seq: c.seq,
                        kind: "unknown_key",
                        message: format!("checkpoint of event {} is signed by unknown key {}", c.seq, c.key_id),
                    });
                    continue;
                }
                Some(k) if !k.verifies(&c) => {
                    push(Problem {
                        seq: c.seq,
                        kind: "bad_signature",
                        message: format!("checkpoint of event {} does not carry a valid signature", c.seq),
                    });
                    continue;
                }
                Some(_) => {}
            }
        }
        match computed.get(&c.seq) {
            None if c.seq > last => push(Problem {
                seq: c.seq,
                kind: "truncated",
                message: format!(
                    "the log ends at event {last}, but a checkpoint signed at {} vouches for event {}: \
                     events were removed from the end",
                    c.signed_at, c.seq
                ),
            }),
            None => push(Problem {
                seq: c.seq,
                kind: "gap",
                message: format!("event {} named by a checkpoint is missing", c.seq),
            }),
            Some(h) if hex::encode(h) != c.hash => push(Problem {
                seq: c.seq,
                kind: "rewritten",
                message: format!(
                    "event {} does not have the hash its checkpoint (signed at {}) vouches for: events after {} \
                     up to {} were rewritten and their hashes recomputed",
                    c.seq, c.signed_at, previous_good_seq, c.seq
                ),
            }),
            Some(_) => {
                previous_good_seq = c.seq;
                last_good = Some(c);
            }
        }
    }
    problems.sort_by_key(|p| p.seq);
    Ok(VerifyReport {
        ok: problems.is_empty(),
        from,
        to: last,
        events_checked,
        head_hash: hex::encode(prev),
        checkpoints_checked: checked,
        signatures_checked,
        last_good_checkpoint: last_good,
        problems,
    })
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// The report as JSON, for the API and `--json`.
pub fn report_json(r: &VerifyReport) -> Value {
    json!(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{chain_hash, test_chain};

    struct Mem(Vec<StoredEvent>, Vec<Checkpoint>);

    #[async_trait::async_trait]
    impl AuditSource for Mem {
        async fn chain(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, LedgerError> {
            Ok(self.0.iter().filter(|e| e.seq > after).take(limit).cloned().collect())
        }
        async fn stored_checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
            Ok(self.1.clone())
        }
    }

    /// Rewrites event `at` and recomputes every later hash, as a careful attacker would.
    fn rewrite(events: &mut [StoredEvent], at: usize) {
        events[at].body = events[at].body.replace("\"n", "\"X");
        let mut prev = parse_hash(&events[at].prev_hash).unwrap();
        for e in events.iter_mut().skip(at) {
            e.prev_hash = hex::encode(prev);
            prev = chain_hash(&prev, e.body.as_bytes());
            e.hash = hex::encode(prev);
        }
    }

    fn key() -> CheckpointKey {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        CheckpointKey::from_pair(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    fn req(k: &CheckpointKey) -> VerifyRequest {
        VerifyRequest { keys: vec![k.public_key()], ..Default::default() }
    }

    #[tokio::test]
    async fn an_intact_log_with_a_checkpoint_verifies() {
        let k = key();
        let events = test_chain(10);
        let cp = k.sign(7, &events[6].hash, Utc::now());
        let r = verify(&Mem(events, vec![cp]), req(&k)).await.unwrap();
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!((r.events_checked, r.checkpoints_checked, r.to), (10, 1, 10));
        assert!(r.signatures_checked);
    }

    #[tokio::test]
    async fn a_recomputed_rewrite_is_caught_by_the_next_checkpoint() {
        let k = key();
        let mut events = test_chain(10);
        let early = k.sign(2, &events[1].hash, Utc::now());
        let cp = k.sign(7, &events[6].hash, Utc::now());
        rewrite(&mut events, 4);
        let r = verify(&Mem(events, vec![early, cp]), req(&k)).await.unwrap();
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!((r.problems[0].seq, r.problems[0].kind), (7, "rewritten"));
        assert!(r.problems[0].message.contains("after 2"), "{}", r.problems[0].message);
    }

    #[tokio::test]
    async fn a_cut_tail_is_caught() {
        let k = key();
        let mut events = test_chain(10);
        let cp = k.sign(9, &events[8].hash, Utc::now());
        events.truncate(6);
        let r = verify(&Mem(events, vec![cp]), req(&k)).await.unwrap();
        assert_eq!(r.problems[0].kind, "truncated");
        assert!(r.problems[0].message.contains("ends at event 6"));
    }

    #[tokio::test]
    async fn a_forged_or_foreign_signature_is_caught() {
        let k = key();
        let events = test_chain(5);
        let mut forged = k.sign(3, &events[2].hash, Utc::now());
        forged.signed_at = "2000-01-01T00:00:00.000Z".into();
        let foreign = key().sign(4, &events[3].hash, Utc::now());
        let r = verify(&Mem(events, vec![forged, foreign]), req(&k)).await.unwrap();
        let kinds: Vec<_> = r.problems.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, ["bad_signature", "unknown_key"]);
    }

    #[tokio::test]
    async fn an_edit_without_recompute_names_its_event_and_a_range_checks_only_itself() {
        let mut events = test_chain(8);
        events[4].body = events[4].body.replace("n4", "nX");
        let r = verify(&Mem(events.clone(), vec![]), VerifyRequest::default()).await.unwrap();
        assert_eq!(r.problems.len(), 1);
        assert_eq!((r.problems[0].seq, r.problems[0].kind), (5, "bad_hash"));
        let r = verify(&Mem(events, vec![]), VerifyRequest { from: Some(6), to: Some(8), ..Default::default() })
            .await
            .unwrap();
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!((r.from, r.to, r.events_checked), (6, 8, 3));
    }

    #[test]
    fn key_files_round_trip_and_public_keys_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.key");
        let k = generate_key_file(&path).unwrap();
        assert!(generate_key_file(&path).is_err(), "never overwrites");
        let again = CheckpointKey::load(&path).unwrap();
        assert_eq!(k.key_id(), again.key_id());
        let p = PublicKey::parse(&k.public_key().to_base64()).unwrap();
        assert_eq!(p.key_id(), k.key_id());
        assert!(PublicKey::parse("not a key").is_err());
        assert!(format!("{k:?}").contains(k.key_id()));
    }
}
