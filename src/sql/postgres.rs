//! The PostgreSQL backend (the `postgres` crate: the blocking client of
//! `tokio-postgres`, run on the mirror's own thread). Each kind of row is
//! written with one statement per transaction: arrays bound as parameters
//! and expanded with `UNNEST`, so a batch of thousands of events costs a
//! handful of round trips. 128-bit numbers travel as text and are cast to
//! `NUMERIC`; JSON travels as text and is cast to `JSONB`.

use postgres::{Client, NoTls, Statement};

use super::{int64, Backend, Changes, Checkpoint, SqlError, TABLES};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    author TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hlc NUMERIC(20, 0) NOT NULL,
    stream TEXT NOT NULL,
    kind TEXT NOT NULL,
    user_name TEXT,
    command_id TEXT,
    payload JSONB
);
CREATE INDEX IF NOT EXISTS events_stream ON events (stream, position);
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS fields (
    stream TEXT NOT NULL,
    field TEXT NOT NULL,
    value JSONB NOT NULL,
    conflict BOOLEAN NOT NULL,
    standing JSONB NOT NULL,
    PRIMARY KEY (stream, field)
);
CREATE TABLE IF NOT EXISTS counters (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    value NUMERIC(39, 0) NOT NULL,
    PRIMARY KEY (stream, counter)
);
CREATE TABLE IF NOT EXISTS escrow (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    capacity NUMERIC(39, 0) NOT NULL,
    consumed NUMERIC(39, 0) NOT NULL,
    PRIMARY KEY (stream, counter)
);
CREATE TABLE IF NOT EXISTS escrow_rights (
    stream TEXT NOT NULL,
    counter TEXT NOT NULL,
    node TEXT NOT NULL,
    rights NUMERIC(39, 0) NOT NULL,
    PRIMARY KEY (stream, counter, node)
);
CREATE TABLE IF NOT EXISTS weftlog_checkpoint (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    node TEXT NOT NULL,
    epoch TEXT NOT NULL,
    position BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    state_hash TEXT NOT NULL,
    hash_position BIGINT NOT NULL,
    schema_version INTEGER NOT NULL
);
";

const INSERT_EVENTS: &str = "INSERT INTO events
    SELECT p, i, a, s, h::numeric, st, k, u, c, pl::jsonb
    FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
    AS t(p, i, a, s, h, st, k, u, c, pl)";
const PUT_STREAMS: &str = "INSERT INTO streams SELECT * FROM UNNEST($1::text[], $2::bigint[])
    ON CONFLICT (stream) DO UPDATE SET version = excluded.version";
const PUT_FIELDS: &str = "INSERT INTO fields
    SELECT s, f, v::jsonb, c, st::jsonb FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[]) AS t(s, f, v, c, st)
    ON CONFLICT (stream, field) DO UPDATE SET value = excluded.value, conflict = excluded.conflict, standing = excluded.standing";
const DEL_FIELDS: &str =
    "DELETE FROM fields WHERE (stream, field) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))";
const PUT_COUNTERS: &str = "INSERT INTO counters
    SELECT s, c, v::numeric FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(s, c, v)
    ON CONFLICT (stream, counter) DO UPDATE SET value = excluded.value";
const DEL_COUNTERS: &str = "DELETE FROM counters WHERE (stream, counter) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))";
const PUT_ESCROW: &str = "INSERT INTO escrow
    SELECT s, c, a::numeric, b::numeric FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t(s, c, a, b)
    ON CONFLICT (stream, counter) DO UPDATE SET capacity = excluded.capacity, consumed = excluded.consumed";
const DEL_ESCROW: &str =
    "DELETE FROM escrow WHERE (stream, counter) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))";
const PUT_RIGHTS: &str = "INSERT INTO escrow_rights
    SELECT s, c, n, r::numeric FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t(s, c, n, r)
    ON CONFLICT (stream, counter, node) DO UPDATE SET rights = excluded.rights";
const DEL_RIGHTS: &str = "DELETE FROM escrow_rights WHERE (stream, counter, node) IN (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))";
const MOVE_CHECKPOINT: &str = "UPDATE weftlog_checkpoint SET position = $1, event_id = $2, state_hash = $3, hash_position = $4 WHERE position = $5";

pub(crate) struct Postgres {
    client: Client,
    /// Prepared once the tables exist.
    statements: Option<Statements>,
}

struct Statements {
    insert_events: Statement,
    put_streams: Statement,
    put_fields: Statement,
    del_fields: Statement,
    put_counters: Statement,
    del_counters: Statement,
    put_escrow: Statement,
    del_escrow: Statement,
    put_rights: Statement,
    del_rights: Statement,
    move_checkpoint: Statement,
}

impl Postgres {
    pub fn open(url: &str) -> Result<Postgres, SqlError> {
        let mut client = Client::connect(url, NoTls)?;
        // Notices of `DROP … IF EXISTS` are not worth a line each.
        client.batch_execute("SET client_min_messages = warning")?;
        Ok(Postgres {
            client,
            statements: None,
        })
    }

    fn statements(&mut self) -> Result<&Statements, SqlError> {
        if self.statements.is_none() {
            let c = &mut self.client;
            self.statements = Some(Statements {
                insert_events: c.prepare(INSERT_EVENTS)?,
                put_streams: c.prepare(PUT_STREAMS)?,
                put_fields: c.prepare(PUT_FIELDS)?,
                del_fields: c.prepare(DEL_FIELDS)?,
                put_counters: c.prepare(PUT_COUNTERS)?,
                del_counters: c.prepare(DEL_COUNTERS)?,
                put_escrow: c.prepare(PUT_ESCROW)?,
                del_escrow: c.prepare(DEL_ESCROW)?,
                put_rights: c.prepare(PUT_RIGHTS)?,
                del_rights: c.prepare(DEL_RIGHTS)?,
                move_checkpoint: c.prepare(MOVE_CHECKPOINT)?,
            });
        }
        // Invariant: set just above.
        Ok(self.statements.as_ref().expect("statements prepared"))
    }
}

impl Backend for Postgres {
    fn checkpoint(&mut self) -> Result<Option<Checkpoint>, SqlError> {
        let exists = self
            .client
            .query_one("SELECT to_regclass('weftlog_checkpoint') IS NOT NULL", &[])?
            .get::<_, bool>(0);
        if !exists {
            return Ok(None);
        }
        let rows = self
            .client
            .query(
                "SELECT node, epoch, position, event_id, state_hash, hash_position, schema_version FROM weftlog_checkpoint",
                &[],
            )
            .map_err(|e| SqlError::Checkpoint(e.to_string()))?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let get = || -> Result<Checkpoint, postgres::Error> {
            Ok(Checkpoint {
                node: r.try_get(0)?,
                epoch: r.try_get(1)?,
                position: r.try_get::<_, i64>(2)?.max(0) as u64,
                event_id: r.try_get(3)?,
                state_hash: r.try_get(4)?,
                hash_position: r.try_get::<_, i64>(5)?.max(0) as u64,
                schema_version: r.try_get::<_, i32>(6)?.max(0) as u32,
            })
        };
        get()
            .map(Some)
            .map_err(|e| SqlError::Checkpoint(e.to_string()))
    }

    fn reset(&mut self, start: &Checkpoint, drop: bool) -> Result<(), SqlError> {
        self.statements = None;
        let mut tx = self.client.transaction()?;
        if drop {
            for t in TABLES {
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {t}"))?;
            }
        }
        tx.batch_execute(SCHEMA)?;
        tx.batch_execute(&format!("TRUNCATE {}", TABLES.join(", ")))?;
        tx.execute(
            "INSERT INTO weftlog_checkpoint VALUES (1, $1, $2, $3, $4, $5, $6, $7)",
            &[
                &start.node,
                &start.epoch,
                &int64("position", start.position)?,
                &start.event_id,
                &start.state_hash,
                &int64("hash_position", start.hash_position)?,
                &(start.schema_version as i32),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn commit(&mut self, from: u64, c: &Changes, to: &Checkpoint) -> Result<(), SqlError> {
        self.statements()?;
        // Invariant: prepared just above.
        let st = self.statements.as_ref().expect("statements prepared");
        let mut tx = self.client.transaction()?;
        if !c.events.is_empty() {
            let mut pos = Vec::with_capacity(c.events.len());
            let mut seq = Vec::with_capacity(c.events.len());
            for e in &c.events {
                pos.push(int64("position", e.position)?);
                seq.push(int64("seq", e.seq)?);
            }
            let col = |f: fn(&super::EventRow) -> Option<String>| -> Vec<Option<String>> {
                c.events.iter().map(f).collect()
            };
            tx.execute(
                &st.insert_events,
                &[
                    &pos,
                    &col(|e| Some(e.id.clone())),
                    &col(|e| Some(e.author.clone())),
                    &seq,
                    &col(|e| Some(e.hlc.to_string())),
                    &col(|e| Some(e.stream.clone())),
                    &col(|e| Some(e.kind.clone())),
                    &col(|e| e.user.clone()),
                    &col(|e| e.command_id.clone()),
                    &col(|e| e.payload.clone()),
                ],
            )?;
        }
        if !c.streams.is_empty() {
            let names: Vec<&str> = c.streams.iter().map(|(s, _)| s.as_str()).collect();
            let versions = c
                .streams
                .iter()
                .map(|(_, v)| int64("version", *v))
                .collect::<Result<Vec<_>, _>>()?;
            tx.execute(&st.put_streams, &[&names, &versions])?;
        }
        // Fields.
        let (put, del): (Vec<_>, Vec<_>) = c.fields.iter().partition(|(_, _, r)| r.is_some());
        if !put.is_empty() {
            let s: Vec<&str> = put.iter().map(|(s, _, _)| s.as_str()).collect();
            let f: Vec<&str> = put.iter().map(|(_, f, _)| f.as_str()).collect();
            let rows: Vec<_> = put.iter().filter_map(|(_, _, r)| r.as_ref()).collect();
            let v: Vec<&str> = rows.iter().map(|r| r.value.as_str()).collect();
            let k: Vec<bool> = rows.iter().map(|r| r.conflict).collect();
            let w: Vec<&str> = rows.iter().map(|r| r.standing.as_str()).collect();
            tx.execute(&st.put_fields, &[&s, &f, &v, &k, &w])?;
        }
        if !del.is_empty() {
            let s: Vec<&str> = del.iter().map(|(s, _, _)| s.as_str()).collect();
            let f: Vec<&str> = del.iter().map(|(_, f, _)| f.as_str()).collect();
            tx.execute(&st.del_fields, &[&s, &f])?;
        }
        // Counters.
        let (put, del): (Vec<_>, Vec<_>) = c.counters.iter().partition(|(_, _, v)| v.is_some());
        if !put.is_empty() {
            let s: Vec<&str> = put.iter().map(|(s, _, _)| s.as_str()).collect();
            let k: Vec<&str> = put.iter().map(|(_, k, _)| k.as_str()).collect();
            let v: Vec<String> = put
                .iter()
                .filter_map(|(_, _, v)| v.map(|v| v.to_string()))
                .collect();
            tx.execute(&st.put_counters, &[&s, &k, &v])?;
        }
        if !del.is_empty() {
            let s: Vec<&str> = del.iter().map(|(s, _, _)| s.as_str()).collect();
            let k: Vec<&str> = del.iter().map(|(_, k, _)| k.as_str()).collect();
            tx.execute(&st.del_counters, &[&s, &k])?;
        }
        // Escrow.
        let (put, del): (Vec<_>, Vec<_>) = c.escrow.iter().partition(|(_, _, v)| v.is_some());
        if !put.is_empty() {
            let s: Vec<&str> = put.iter().map(|(s, _, _)| s.as_str()).collect();
            let k: Vec<&str> = put.iter().map(|(_, k, _)| k.as_str()).collect();
            let vals: Vec<(u128, u128)> = put.iter().filter_map(|(_, _, v)| *v).collect();
            let cap: Vec<String> = vals.iter().map(|(a, _)| a.to_string()).collect();
            let used: Vec<String> = vals.iter().map(|(_, b)| b.to_string()).collect();
            tx.execute(&st.put_escrow, &[&s, &k, &cap, &used])?;
        }
        if !del.is_empty() {
            let s: Vec<&str> = del.iter().map(|(s, _, _)| s.as_str()).collect();
            let k: Vec<&str> = del.iter().map(|(_, k, _)| k.as_str()).collect();
            tx.execute(&st.del_escrow, &[&s, &k])?;
        }
        // Rights.
        let (put, del): (Vec<_>, Vec<_>) = c.rights.iter().partition(|(_, _, _, v)| v.is_some());
        if !put.is_empty() {
            let s: Vec<&str> = put.iter().map(|(s, _, _, _)| s.as_str()).collect();
            let k: Vec<&str> = put.iter().map(|(_, k, _, _)| k.as_str()).collect();
            let n: Vec<&str> = put.iter().map(|(_, _, n, _)| n.as_str()).collect();
            let r: Vec<String> = put
                .iter()
                .filter_map(|(_, _, _, v)| v.map(|v| v.to_string()))
                .collect();
            tx.execute(&st.put_rights, &[&s, &k, &n, &r])?;
        }
        if !del.is_empty() {
            let s: Vec<&str> = del.iter().map(|(s, _, _, _)| s.as_str()).collect();
            let k: Vec<&str> = del.iter().map(|(_, k, _, _)| k.as_str()).collect();
            let n: Vec<&str> = del.iter().map(|(_, _, n, _)| n.as_str()).collect();
            tx.execute(&st.del_rights, &[&s, &k, &n])?;
        }
        let moved = tx.execute(
            &st.move_checkpoint,
            &[
                &int64("position", to.position)?,
                &to.event_id,
                &to.state_hash,
                &int64("hash_position", to.hash_position)?,
                &int64("position", from)?,
            ],
        )?;
        if moved != 1 {
            return Err(SqlError::Concurrent { expected: from });
        }
        tx.commit()?;
        Ok(())
    }

    fn query_text(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SqlError> {
        let rows = self.client.query(sql, &[])?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect())
    }
}
