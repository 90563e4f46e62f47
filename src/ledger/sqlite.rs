//! The SQLite ledger: one node, WAL, durable commits, group commit.

use std::path::Path;

use super::LedgerError;

use std::sync::Arc;

use super::Ledger;

/// Opens (creating if needed) the database at `path`.
pub async fn open(path: &Path, migrate: bool) -> Result<Arc<dyn Ledger>, LedgerError> {
    let _ = (path, migrate);
    todo!("sqlite ledger")
}
