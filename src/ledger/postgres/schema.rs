//! Schema migrations for PostgreSQL, embedded in the binary and tracked in `latchkey_schema`.
//!
//! Invariants: `latchkey_schema.version` is the number of migrations applied, and each migration
//! commits in one transaction with its version bump (PostgreSQL's DDL is transactional), so a
//! crash leaves a whole version. Replicas that migrate at the same moment take turns on an
//! advisory lock named after the schema, so a migration never runs twice.

use sqlx::{Connection, PgConnection};

use super::db_err;
use crate::ledger::LedgerError;

/// Every migration, in order; migration `i` (0-based) takes the schema to version `i + 1`. Never
/// edit a released migration: add a new one.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_initial", include_str!("../../../migrations/postgres/0001_initial.sql")),
    ("0002_limits", include_str!("../../../migrations/postgres/0002_limits.sql")),
    ("0003_signing_key_retirement", include_str!("../../../migrations/postgres/0003_signing_key_retirement.sql")),
    ("0004_jobs_by_backend", include_str!("../../../migrations/postgres/0004_jobs_by_backend.sql")),
];

pub(super) fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

/// The schema version in the connection's `search_path` schema; 0 when it has none.
pub(super) async fn version(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('latchkey_schema')::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    if exists.is_none() {
        return Ok(0);
    }
    let v: Option<i64> = sqlx::query_scalar("SELECT max(version)::bigint FROM latchkey_schema")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(v.unwrap_or(0))
}

/// Refuses a schema this binary cannot work with: one written by a newer latchkey, or an older
/// one unless `migrate`. `shown` names the database without its credentials.
pub(super) fn check(current: i64, migrate: bool, shown: &str) -> Result<(), LedgerError> {
    let latest = latest();
    if current > latest {
        return Err(LedgerError::Schema(format!(
            "{shown} has schema version {current}, written by a newer latchkey (this one knows up to {latest})"
        )));
    }
    if current < latest && !migrate {
        let what =
            if current == 0 { "has no latchkey schema".to_owned() } else { format!("has schema version {current}") };
        return Err(LedgerError::Schema(format!(
            "{shown} {what}; this latchkey needs version {latest}: run `latchkey migrate`"
        )));
    }
    Ok(())
}

/// Applies every pending migration in one transaction, under an advisory lock so that
/// replicas starting together do not both run one.
pub(super) async fn migrate(conn: &mut PgConnection, shown: &str) -> Result<(), LedgerError> {
    let mut tx = conn.begin().await.map_err(db_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('latchkey.migrate:' || current_schema(), 0))")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS latchkey_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    // Read under the lock: another replica may have migrated while this one waited.
    let current = version(&mut tx).await?;
    check(current, true, shown)?;
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await
            .map_err(|e| LedgerError::Schema(format!("migration {name} failed: {e}")))?;
        sqlx::query("DELETE FROM latchkey_schema").execute(&mut *tx).await.map_err(db_err)?;
        sqlx::query("INSERT INTO latchkey_schema (version) VALUES ($1)")
            .bind(i as i64 + 1)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tracing::info!(migration = name, "ledger.migrated");
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}
