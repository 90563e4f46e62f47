//! Schema migrations, embedded in the binary and tracked in `PRAGMA user_version`.
//!
//! Invariant: `user_version` is the number of migrations applied. Each migration runs in its own
//! transaction together with the `user_version` bump (the header field is transactional), so a
//! crash leaves the schema at a whole version, never half-migrated.

use rusqlite::{Connection, TransactionBehavior};

use super::codec::db_err;
use crate::ledger::LedgerError;

/// Every migration, in order; migration `i` (0-based) takes the schema to version `i + 1`.
/// Never edit a released migration: add a new one. A file's number names it and orders it among
/// its siblings; its position in this list, not its number, is its schema version.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_initial", include_str!("../../../migrations/sqlite/0001_initial.sql")),
    ("0002_kill_switch", include_str!("../../../migrations/sqlite/0002_kill_switch.sql")),
    ("0003_audit", include_str!("../../../migrations/sqlite/0003_audit.sql")),
    ("0004_limits", include_str!("../../../migrations/sqlite/0004_limits.sql")),
    ("0005_signing_key_retirement", include_str!("../../../migrations/sqlite/0005_signing_key_retirement.sql")),
    ("0006_jobs_by_backend", include_str!("../../../migrations/sqlite/0006_jobs_by_backend.sql")),
    ("0007_unread_indexes", include_str!("../../../migrations/sqlite/0007_unread_indexes.sql")),
];

pub(super) fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

pub(super) fn version(conn: &Connection) -> Result<i64, LedgerError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).map_err(db_err)
}

/// Refuses a schema this binary cannot work with: one written by a newer latchkey (whatever
/// `migrate` says: migrations only go forward), or an older one unless `migrate`.
pub(super) fn check(current: i64, migrate: bool, path: &str) -> Result<(), LedgerError> {
    let latest = latest();
    if current > latest {
        return Err(LedgerError::Schema(format!(
            "{path} has schema version {current}, written by a newer latchkey (this one knows up to {latest})"
        )));
    }
    if current < latest && !migrate {
        let what =
            if current == 0 { "has no latchkey schema".to_owned() } else { format!("has schema version {current}") };
        return Err(LedgerError::Schema(format!(
            "{path} {what}; this latchkey needs version {latest}: run `latchkey migrate`"
        )));
    }
    Ok(())
}

/// Applies the migrations after `current`, one transaction each.
pub(super) fn migrate(conn: &mut Connection, current: i64) -> Result<(), LedgerError> {
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        tx.execute_batch(sql).map_err(|e| LedgerError::Schema(format!("migration {name} failed: {e}")))?;
        tx.pragma_update(None, "user_version", i as i64 + 1).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(migration = name, "ledger.migrated");
    }
    Ok(())
}
