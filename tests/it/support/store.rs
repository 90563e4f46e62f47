//! The store under test, and a store-neutral way for tests to look into it.
//!
//! The integration suite runs once per store (`scripts/test.sh` does both runs):
//! `LATCHKEY_TEST_STORE=sqlite` (the default) gives every [`TestApp`] a SQLite file in its
//! temporary folder; `LATCHKEY_TEST_STORE=postgres` gives each one a schema of its own,
//! `lk_<uuid>`, in the run's database (`LATCHKEY_TEST_PG_URL`, made fresh by the script).
//! Both stores share one schema (same tables, columns and text encodings), so the SQL the
//! tests write runs on both as long as it keeps to what both dialects accept: literals inlined
//! (no `?1`/`$1` parameters), `TRUE`/`FALSE` for booleans, no dialect functions.
//!
//! [`TestApp`]: super::test_app::TestApp

use std::path::{Path, PathBuf};

use serde_json::Value;
use sqlx::{Connection, Row, TypeInfo, ValueRef};

/// `sqlite` (the default) or `postgres`.
pub const STORE_VAR: &str = "LATCHKEY_TEST_STORE";

/// The run's PostgreSQL database, `postgres://…/latchkey_test_<hex>`, made by `scripts/test.sh`.
pub const PG_URL_VAR: &str = "LATCHKEY_TEST_PG_URL";

/// The directory holding `initdb`, `pg_ctl` and `postgres`, for tests that run a cluster of
/// their own (they stop and restart it).
pub const PG_BIN_VAR: &str = "LATCHKEY_TEST_PG_BIN";

/// Which store the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// The store this run tests, from `LATCHKEY_TEST_STORE`. An unknown value fails the test: a
/// typo must not quietly test SQLite twice.
pub fn kind() -> Kind {
    match std::env::var(STORE_VAR).as_deref() {
        Err(_) | Ok("" | "sqlite") => Kind::Sqlite,
        Ok("postgres") => Kind::Postgres,
        Ok(other) => panic!("{STORE_VAR}={other:?}: expected `sqlite` or `postgres`"),
    }
}

/// The run's PostgreSQL database. Panics without one: with `LATCHKEY_TEST_STORE=postgres` the
/// suite must never fall back to SQLite in silence.
pub fn pg_url() -> String {
    match std::env::var(PG_URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{STORE_VAR}=postgres needs a database in {PG_URL_VAR} (postgres://USER@HOST:PORT/DB): \
             scripts/test.sh makes one, or unset {STORE_VAR} to test SQLite"
        ),
    }
}

/// For a test that only means something on SQLite (its file, its lock, its WAL): whether it
/// should run. On PostgreSQL it says so and the test returns. `scripts/test.sh` leaves these
/// tests out of the PostgreSQL run by name (they have `sqlite` in it); this is for runners
/// that cannot filter (`cargo test`).
pub fn sqlite_only() -> bool {
    if kind() == Kind::Sqlite {
        return true;
    }
    eprintln!("skipped: a SQLite-only test, and this run tests PostgreSQL");
    false
}

/// Adds `options[search_path]=SCHEMA` to a PostgreSQL URL, so that every connection made from
/// it (the broker's and the tests') works in that schema.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={schema}")
}

/// A new, empty schema `lk_<uuid>` in the run's database; returns its name.
pub async fn create_schema(base_url: &str) -> String {
    let schema = format!("lk_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database {base_url}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
    conn.close().await.ok();
    schema
}

/// One broker's store, for looking at what it holds.
#[derive(Debug, Clone)]
pub enum Store {
    /// The SQLite file (its `-wal` file beside it).
    Sqlite { path: PathBuf },
    /// A PostgreSQL URL whose `search_path` is the broker's schema, and a small pool on it
    /// (connecting anew for every look costs more than the looks themselves).
    Postgres { url: String, pool: sqlx::PgPool },
}

impl Store {
    /// The store this run tests, for a broker whose folder is `dir`: a SQLite file there, or a
    /// fresh schema in the run's PostgreSQL database.
    pub async fn fresh(dir: &Path) -> Store {
        match kind() {
            Kind::Sqlite => Store::Sqlite { path: dir.join("latchkey.db") },
            Kind::Postgres => Store::postgres_schema(&pg_url()).await,
        }
    }

    /// A fresh schema in the PostgreSQL database at `base_url`.
    pub async fn postgres_schema(base_url: &str) -> Store {
        let schema = create_schema(base_url).await;
        let url = with_search_path(base_url, &schema);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&url)
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        Store::Postgres { url, pool }
    }

    /// What `[store] url` says for this store (a SQLite path relative to the config's folder).
    pub fn config_url(&self) -> String {
        match self {
            Store::Sqlite { path } => match path.file_name() {
                Some(name) => format!("sqlite://{}", name.to_string_lossy()),
                None => format!("sqlite://{}", path.display()),
            },
            Store::Postgres { url, .. } => url.clone(),
        }
    }

    /// Every row `sql` returns, each a vector of JSON values: SQL NULL → `null`, integers and
    /// floats → numbers, booleans → `true`/`false` on PostgreSQL but `1`/`0` on SQLite (read
    /// them with [`truthy`]), bytes → lowercase hex strings, anything else → its text.
    pub async fn query(&self, sql: &str) -> Vec<Vec<Value>> {
        match self {
            Store::Sqlite { path } => {
                let (path, sql) = (path.clone(), sql.to_owned());
                tokio::task::spawn_blocking(move || sqlite_query(&path, &sql)).await.unwrap()
            }
            Store::Postgres { pool, .. } => {
                let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.iter().map(pg_row).collect()
            }
        }
    }

    /// Runs one statement that returns no rows (an `UPDATE`, a `DELETE`); the rows it changed.
    /// It takes the store's write lock like any writer, so it waits for the broker's writes.
    pub async fn execute(&self, sql: &str) -> u64 {
        match self {
            Store::Sqlite { path } => {
                let (path, sql) = (path.clone(), sql.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(&path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                    conn.execute(&sql, []).unwrap_or_else(|e| panic!("{sql}: {e}")) as u64
                })
                .await
                .unwrap()
            }
            Store::Postgres { pool, .. } => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .rows_affected(),
        }
    }

    /// The first column of the first row (`null` if there is none).
    pub async fn scalar(&self, sql: &str) -> Value {
        self.query(sql).await.into_iter().next().and_then(|r| r.into_iter().next()).unwrap_or(Value::Null)
    }

    /// A `SELECT count(*) …`, or any query whose first cell is an integer.
    pub async fn count(&self, sql: &str) -> i64 {
        let v = self.scalar(sql).await;
        v.as_i64().unwrap_or_else(|| panic!("{sql}: {v} is not an integer"))
    }

    /// Everything the store keeps at rest, as bytes to search for a secret that must not be
    /// there. SQLite: the database file and its WAL, as on disk. PostgreSQL: every row of every
    /// table of the schema, each value as its text, and `bytea` values both as that text (hex)
    /// and as their raw bytes.
    pub async fn dump(&self) -> Vec<u8> {
        match self {
            Store::Sqlite { path } => {
                let mut out = std::fs::read(path).unwrap();
                let mut wal = path.clone().into_os_string();
                wal.push("-wal");
                out.extend(std::fs::read(PathBuf::from(wal)).unwrap_or_default());
                out
            }
            Store::Postgres { pool, .. } => {
                let mut conn = pool.acquire().await.unwrap();
                let tables: Vec<String> = sqlx::raw_sql(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1",
                )
                .fetch_all(&mut *conn)
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get_unchecked::<String, _>(0).unwrap())
                .collect();
                assert!(!tables.is_empty(), "the schema has no tables: is it migrated?");
                let mut out = Vec::new();
                for table in tables {
                    out.extend_from_slice(format!("-- {table}\n").as_bytes());
                    let sql = format!("SELECT * FROM \"{table}\"");
                    for row in sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *conn).await.unwrap() {
                        for i in 0..row.columns().len() {
                            let raw = row.try_get_raw(i).unwrap();
                            if raw.is_null() {
                                out.extend_from_slice(b"NULL");
                            } else {
                                let is_bytea = raw.type_info().name() == "BYTEA";
                                let text = raw.as_str().unwrap().to_owned();
                                out.extend_from_slice(text.as_bytes());
                                if is_bytea {
                                    out.push(b' ');
                                    out.extend(hex::decode(text.trim_start_matches("\\x")).unwrap());
                                }
                            }
                            out.push(b'\t');
                        }
                        out.push(b'\n');
                    }
                }
                out
            }
        }
    }
}

/// A boolean cell: `true`/`false` from PostgreSQL, `1`/`0` from SQLite.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64() != Some(0),
        other => panic!("{other} is not a boolean"),
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A row of a simple-protocol query, where PostgreSQL sends every value as text.
fn pg_row(row: &sqlx::postgres::PgRow) -> Vec<Value> {
    (0..row.columns().len())
        .map(|i| {
            let raw = row.try_get_raw(i).unwrap();
            if raw.is_null() {
                return Value::Null;
            }
            let ty = raw.type_info().name().to_owned();
            let text = raw.as_str().unwrap();
            match ty.as_str() {
                "BOOL" => Value::Bool(text == "t"),
                "INT2" | "INT4" | "INT8" | "OID" => Value::from(text.parse::<i64>().unwrap()),
                "FLOAT4" | "FLOAT8" | "NUMERIC" => match text.parse::<i64>() {
                    Ok(i) => Value::from(i),
                    Err(_) => Value::from(text.parse::<f64>().unwrap()),
                },
                "BYTEA" => Value::from(text.trim_start_matches("\\x").to_owned()),
                _ => Value::from(text.to_owned()),
            }
        })
        .collect()
}

fn sqlite_query(path: &Path, sql: &str) -> Vec<Vec<Value>> {
    use rusqlite::types::ValueRef as V;
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let n = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let values = (0..n)
            .map(|i| match row.get_ref(i).unwrap() {
                V::Null => Value::Null,
                V::Integer(i) => Value::from(i),
                V::Real(f) => Value::from(f),
                V::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                V::Blob(b) => Value::from(hex::encode(b)),
            })
            .collect();
        out.push(values);
    }
    out
}
