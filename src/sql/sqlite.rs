//! The SQLite backend: one file, WAL journal. `synchronous=NORMAL` is
//! enough for exactly once: a process killed at any point leaves the last
//! committed transaction (rows and checkpoint together), and power loss may
//! only lose whole transactions, after which the mirror resumes from an
//! earlier checkpoint. The 128-bit columns have no declared type, so an
//! integer past 64 bits stays the decimal text it was given.

use std::path::Path;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension};

use super::{int64, Backend, Changes, Checkpoint, Num, SqlError, TABLES};

/// How long a statement waits for a lock held by a reader (ms).
const BUSY_TIMEOUT_MS: u64 = 5000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hlc NOT NULL,
    stream TEXT NOT NULL,
    kind TEXT NOT NULL,
    user_name TEXT,
    command_id TEXT,
    payload TEXT
);
CREATE INDEX IF NOT EXISTS events_stream ON events (stream, position);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fields (
    stream TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    conflict INTEGER NOT NULL,
    standing TEXT NOT NULL,
    PRIMARY KEY (stream, field)
);
CREATE TABLE IF NOT EXISTS counters (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    value NOT NULL,
    PRIMARY KEY (stream, counter)
);
CREATE TABLE IF NOT EXISTS escrow (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    capacity NOT NULL,
    consumed NOT NULL,
    PRIMARY KEY (stream, counter)
);
CREATE TABLE IF NOT EXISTS escrow_rights (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    node TEXT NOT NULL,
    rights NOT NULL,
    PRIMARY KEY (stream, counter, node)
);
CREATE TABLE IF NOT EXISTS weftlog_checkpoint (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    node TEXT NOT NULL,
    epoch TEXT NOT NULL,
    position INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    state_hash TEXT NOT NULL,
    hash_position INTEGER NOT NULL,
    schema_version INTEGER NOT NULL
);
";

pub(crate) struct Sqlite {
    conn: Connection,
}

fn num(n: i128) -> SqlValue {
    match Num::of(n) {
        Num::Int(i) => SqlValue::Integer(i),
        Num::Text(t) => SqlValue::Text(t),
    }
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, SqlError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Sqlite { conn })
    }
}

impl Backend for Sqlite {
    fn checkpoint(&mut self) -> Result<Option<Checkpoint>, SqlError> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'weftlog_checkpoint'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Ok(None);
        }
        let row = self
            .conn
            .query_row(
                "SELECT node, epoch, position, event_id, state_hash, hash_position, schema_version FROM weftlog_checkpoint",
                [],
                |r| {
                    Ok(Checkpoint {
                        node: r.get(0)?,
                        epoch: r.get(1)?,
                        position: r.get::<_, i64>(2)?.max(0) as u64,
                        event_id: r.get(3)?,
                        state_hash: r.get(4)?,
                        hash_position: r.get::<_, i64>(5)?.max(0) as u64,
                        schema_version: r.get::<_, i64>(6)?.clamp(0, u32::MAX as i64) as u32,
                    })
                },
            )
            .optional()
            .map_err(|e| SqlError::Checkpoint(e.to_string()))?;
        Ok(row)
    }

    fn reset(&mut self, start: &Checkpoint, drop: bool) -> Result<(), SqlError> {
        let tx = self.conn.transaction()?;
        if drop {
            for t in TABLES {
                tx.execute_batch(&format!("DROP TABLE IF EXISTS {t}"))?;
            }
        }
        tx.execute_batch(SCHEMA)?;
        for t in TABLES {
            tx.execute_batch(&format!("DELETE FROM {t}"))?;
        }
        tx.execute(
            "INSERT INTO weftlog_checkpoint VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                start.node,
                start.epoch,
                int64("position", start.position)?,
                start.event_id,
                start.state_hash,
                int64("hash_position", start.hash_position)?,
                start.schema_version,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn commit(&mut self, from: u64, c: &Changes, to: &Checkpoint) -> Result<(), SqlError> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for e in &c.events {
                ins.execute(params![
                    int64("position", e.position)?,
                    e.id,
                    e.author,
                    int64("seq", e.seq)?,
                    num(e.hlc as i128),
                    e.stream,
                    e.kind,
                    e.user,
                    e.command_id,
                    e.payload,
                ])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO streams VALUES (?1, ?2) ON CONFLICT (stream) DO UPDATE SET version = excluded.version",
            )?;
            for (s, v) in &c.streams {
                put.execute(params![s, int64("version", *v)?])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO fields VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (stream, field) DO UPDATE SET value = excluded.value, conflict = excluded.conflict, standing = excluded.standing",
            )?;
            let mut del =
                tx.prepare_cached("DELETE FROM fields WHERE stream = ?1 AND field = ?2")?;
            for (s, f, row) in &c.fields {
                match row {
                    Some(r) => put.execute(params![s, f, r.value, r.conflict, r.standing])?,
                    None => del.execute(params![s, f])?,
                };
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO counters VALUES (?1, ?2, ?3) ON CONFLICT (stream, counter) DO UPDATE SET value = excluded.value",
            )?;
            let mut del =
                tx.prepare_cached("DELETE FROM counters WHERE stream = ?1 AND counter = ?2")?;
            for (s, k, v) in &c.counters {
                match v {
                    Some(v) => put.execute(params![s, k, num(*v)])?,
                    None => del.execute(params![s, k])?,
                };
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO escrow VALUES (?1, ?2, ?3, ?4) ON CONFLICT (stream, counter) DO UPDATE SET capacity = excluded.capacity, consumed = excluded.consumed",
            )?;
            let mut del =
                tx.prepare_cached("DELETE FROM escrow WHERE stream = ?1 AND counter = ?2")?;
            for (s, k, v) in &c.escrow {
                match v {
                    Some((cap, used)) => {
                        put.execute(params![s, k, num(*cap as i128), num(*used as i128)])?
                    }
                    None => del.execute(params![s, k])?,
                };
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO escrow_rights VALUES (?1, ?2, ?3, ?4) ON CONFLICT (stream, counter, node) DO UPDATE SET rights = excluded.rights",
            )?;
            let mut del = tx.prepare_cached(
                "DELETE FROM escrow_rights WHERE stream = ?1 AND counter = ?2 AND node = ?3",
            )?;
            for (s, k, n, v) in &c.rights {
                match v {
                    Some(v) => put.execute(params![s, k, n, num(*v as i128)])?,
                    None => del.execute(params![s, k, n])?,
                };
            }
            let moved = tx.execute(
                "UPDATE weftlog_checkpoint SET position = ?1, event_id = ?2, state_hash = ?3, hash_position = ?4 WHERE position = ?5",
                params![
                    int64("position", to.position)?,
                    to.event_id,
                    to.state_hash,
                    int64("hash_position", to.hash_position)?,
                    int64("position", from)?,
                ],
            )?;
            if moved != 1 {
                return Err(SqlError::Concurrent { expected: from });
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn query_text(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SqlError> {
        let mut st = self.conn.prepare(sql)?;
        let n = st.column_count();
        let rows = st.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, Option<String>>(i))
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
