//! Key rotation without downtime: the re-seal pass that moves every sealed blob to the current
//! sealing key, and the rotation of the `jwt` signing key.
//!
//! Sealing key: an operator makes a new key current and lists the old one in
//! `previous_key_files`; every replica runs [`reseal`] at start-up and then every minute. The
//! pass opens each blob still sealed with a previous key and seals it again with the current
//! one, each write conditional on the blob being unchanged, so replicas racing (or a revocation
//! erasing a handle meanwhile) do no harm. The gauge `latchkey_sealed_blobs_not_current` says
//! when nothing needs the previous keys any more: at 0 on every replica they can be dropped.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::app::App;
use crate::backend::jwt::{JwtKeyError, KeyView, Retirement, key_aad};
use crate::ledger::{BlobCursor, LedgerError, Reseal, ResealCount, SealedBlob, SealedKind};
use crate::seal::Sealer;

/// Re-seals per transaction (and per `sealing.resealed` event).
const RESEAL_BATCH: usize = 200;

/// Sealed blobs read from the ledger at a time: the pass holds at most one page in memory,
/// however many credentials hold a handle.
pub const SEALED_PAGE: usize = 500;

/// What one re-seal pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResealReport {
    /// What this pass re-sealed, and what it skipped because it had changed meanwhile.
    pub resealed: ResealCount,
    /// Blobs still not under the current key after the pass (unreadable ones, and any that
    /// arrived or changed meanwhile): the previous keys are still needed while this is above 0.
    pub remaining: u64,
    /// Blobs that open with none of the configured keys: they stay as they are, and whatever
    /// needed them (a revocation) fails until the key that sealed them is configured again.
    pub unreadable: u64,
}

/// The associated data a blob was sealed under, as the code that sealed it chose it.
fn aad(blob: &SealedBlob) -> Option<Vec<u8>> {
    match blob.kind {
        // Revocation handles are bound to their credential's id (see `broker`).
        SealedKind::CredentialHandle => Uuid::parse_str(&blob.id).ok().map(|id| id.as_bytes().to_vec()),
        SealedKind::SigningKey => Some(key_aad(&blob.id)),
    }
}

/// One page of sealed blobs after `after`, and the cursor of the next page (`None` after the
/// last).
async fn page_of_blobs(
    app: &App,
    after: Option<&BlobCursor>,
    page: usize,
) -> Result<(Vec<SealedBlob>, Option<BlobCursor>), LedgerError> {
    let blobs = app.ledger.sealed_blobs(after, page).await?;
    let next = if blobs.len() < page { None } else { blobs.last().map(SealedBlob::cursor) };
    Ok((blobs, next))
}

/// One re-seal pass: every blob sealed with a previous key is sealed again with the current
/// key. Idempotent; safe to run on every replica at once.
pub async fn reseal(app: &App) -> Result<ResealReport, LedgerError> {
    reseal_in_pages(app, SEALED_PAGE).await
}

/// [`reseal`], reading `page` blobs at a time (tests use small pages).
pub async fn reseal_in_pages(app: &App, page: usize) -> Result<ResealReport, LedgerError> {
    let page = page.max(1);
    let sealer = &app.sealer;
    let mut report = ResealReport::default();
    let now = app.clock.now();
    let mut after = None;
    loop {
        let (blobs, next) = page_of_blobs(app, after.as_ref(), page).await?;
        let mut reseals = Vec::new();
        for blob in blobs {
            if sealer.is_current(&blob.blob) {
                continue;
            }
            let opened =
                aad(&blob).ok_or(crate::seal::SealError::Malformed).and_then(|aad| sealer.reseal(&aad, &blob.blob));
            match opened {
                Ok(Some(new)) => reseals.push(Reseal { kind: blob.kind, id: blob.id, old: blob.blob, new }),
                Ok(None) => {}
                Err(e) => {
                    report.unreadable += 1;
                    tracing::warn!(
                        sealed.kind = ?blob.kind, sealed.id = %blob.id, sealed.key_id = ?Sealer::key_id_of(&blob.blob),
                        error = %e, "a sealed blob does not open with any configured sealing key; it is left as it is"
                    );
                }
            }
        }
        for batch in reseals.chunks(RESEAL_BATCH) {
            let count = app.ledger.reseal(batch.to_vec(), &sealer.key_id(), now).await?;
            report.resealed.credentials += count.credentials;
            report.resealed.signing_keys += count.signing_keys;
            report.resealed.skipped += count.skipped;
        }
        match next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    // Counted again rather than deduced: blobs may have arrived or changed meanwhile.
    report.remaining = count_not_current(app, page).await?;
    app.metrics.sealed_not_current.set(i64::try_from(report.remaining).unwrap_or(i64::MAX));
    if report.resealed.changed() > 0 {
        tracing::info!(
            sealing.key_id = %sealer.key_id(),
            credentials = report.resealed.credentials,
            signing_keys = report.resealed.signing_keys,
            skipped = report.resealed.skipped,
            remaining = report.remaining,
            "sealing.resealed"
        );
    }
    Ok(report)
}

/// How many blobs are not under the current sealing key, read `page` at a time.
async fn count_not_current(app: &App, page: usize) -> Result<u64, LedgerError> {
    let mut remaining = 0;
    let mut after = None;
    loop {
        let (blobs, next) = page_of_blobs(app, after.as_ref(), page).await?;
        remaining += blobs.iter().filter(|b| !app.sealer.is_current(&b.blob)).count() as u64;
        match next {
            Some(cursor) => after = Some(cursor),
            None => return Ok(remaining),
        }
    }
}

/// Rotates the `jwt` signing key (`POST /v1/signing-keys/rotate`): the new key, as listed.
pub async fn rotate_signing_key(app: &App, actor: &str, request_id: &str) -> Result<KeyView, JwtKeyError> {
    let view = app.jwt.rotate(&*app.ledger, &app.sealer, app.clock.now(), actor, Some(request_id)).await?;
    tracing::info!(kid = %view.kid, signs_from = %view.signs_from, actor, "signing_key.rotated");
    Ok(view)
}

/// `POST /v1/signing-keys/{kid}/retire`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Why, for the audit trail (and each credential the retirement revokes).
    pub reason: String,
}

/// Reasons longer than this are refused: a reason is a sentence for the audit trail.
const MAX_REASON: usize = 1000;

/// Retires a leaked `jwt` signing key at once (`POST /v1/signing-keys/{kid}/retire`): see
/// [`crate::backend::jwt::JwtBackend::retire`].
pub async fn retire_signing_key(
    app: &App,
    kid: &str,
    request: RetireRequest,
    actor: &str,
    request_id: &str,
) -> Result<Retirement, JwtKeyError> {
    let reason = request.reason.trim();
    if reason.is_empty() {
        return Err(JwtKeyError::Invalid("reason is required and must not be empty".into()));
    }
    if reason.chars().count() > MAX_REASON {
        return Err(JwtKeyError::Invalid(format!("reason is longer than {MAX_REASON} characters")));
    }
    let now = app.clock.now();
    let done = app.jwt.retire(&*app.ledger, &app.sealer, now, kid, reason, actor, Some(request_id)).await?;
    tracing::warn!(
        kid = %done.kid,
        replacement = ?done.replacement.as_ref().map(|k| &k.kid),
        credentials_revoked = done.credentials_revoked,
        credentials_marked = done.credentials_marked,
        actor,
        "signing_key.retired"
    );
    Ok(done)
}

/// Re-reads the signing keys from the ledger, so that a key another replica created is
/// published here and signs here in time.
pub async fn refresh_signing_keys(app: &App) -> Result<(), JwtKeyError> {
    app.jwt.refresh(&*app.ledger, &app.sealer, app.clock.now()).await
}
