//! SQLite's side of [`crate::ledger::rows`]: column access for rusqlite rows, statement helpers,
//! and how SQLite errors map to [`LedgerError`].

use rusqlite::{ErrorCode, Row};

use super::super::LedgerError;
use super::super::rows::RawRow;
pub(super) use super::super::rows::{
    Cols, checkpoint_from_row, credential_columns, credential_from_row, event_from_row, exchange_columns,
    exchange_from_row, hash_from_hex, id, job_columns, job_from_row, kill_rule_columns, kill_rule_from_row,
    kill_target_columns, kill_target_from_row, signing_key_from_row, stored_kill_columns, stored_kill_from_row, ts,
};

/// Maps an SQLite error. Conditions an operator must fix (disk full, read-only file, I/O errors,
/// a lock held too long) are `Unavailable`; constraint violations are `Conflict` (a duplicate id,
/// a reference to a row that does not exist); a damaged file or a column that does not decode is
/// `Corrupt`.
pub(super) fn db_err(e: rusqlite::Error) -> LedgerError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _) => match f.code {
            ErrorCode::ConstraintViolation => LedgerError::Conflict(e.to_string()),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => LedgerError::Corrupt(e.to_string()),
            _ => LedgerError::Unavailable(e.to_string()),
        },
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..) => LedgerError::Corrupt(e.to_string()),
        _ => LedgerError::Unavailable(e.to_string()),
    }
}

impl RawRow for Row<'_> {
    fn text(&self, i: usize) -> Option<String> {
        self.get(i).ok()
    }
    fn opt_text(&self, i: usize) -> Option<Option<String>> {
        self.get(i).ok()
    }
    fn int(&self, i: usize) -> Option<i64> {
        self.get(i).ok()
    }
    fn bool(&self, i: usize) -> Option<bool> {
        self.get(i).ok()
    }
    fn opt_blob(&self, i: usize) -> Option<Option<Vec<u8>>> {
        self.get(i).ok()
    }
}

/// Runs a cached statement and decodes at most one row.
pub(super) fn query_opt<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl FnOnce(&Row<'_>) -> Result<T, LedgerError>,
) -> Result<Option<T>, LedgerError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    match rows.next().map_err(db_err)? {
        Some(row) => decode(row).map(Some),
        None => Ok(None),
    }
}

/// Runs a cached statement and decodes every row.
pub(super) fn query_all<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut decode: impl FnMut(&Row<'_>) -> Result<T, LedgerError>,
) -> Result<Vec<T>, LedgerError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db_err)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// Runs a cached statement that returns no rows; answers the number of rows changed.
pub(super) fn exec(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<usize, LedgerError> {
    conn.prepare_cached(sql).map_err(db_err)?.execute(params).map_err(db_err)
}
