//! Fork proofs: a record of an equivocation that anyone can check from the
//! record alone, with no replica, log or network.
//!
//! # The model
//!
//! An author forks when it signs two different events with one seq (a desk
//! restored from a backup, a cloned VM: `DESIGN.md` §2). A signature covers
//! only the event it is made over, and through the `prev` hash chain every
//! earlier event of its author (`PROTOCOL.md` §3); a node signs the last
//! event of each batch only. So the proof that the author made an event at
//! the fork seq is the chain from that event up to the first later event
//! of its branch that carries a signature, plus that signature: each event
//! names the id (blake3 of the encoding) of the one before it, and the
//! signed last event fixes them all.
//!
//! A [`ForkProof`] holds the author, the fork seq and two such
//! [`Branch`]es: the encoded events (the canonical bytes, as stored) from
//! the event at the fork seq up to and including the branch's first signed
//! event, and that event's signature. [`ForkProof::verify`] checks, from
//! the bytes alone:
//!
//! 1. the author is a usable key ([`NodeId::check_key`]);
//! 2. every event decodes strictly ([`Event::decode`]: canonical form,
//!    limits) and is by the author;
//! 3. the first event of each branch has the fork seq, each later one the
//!    seq after the one before it and `prev` = that one's id;
//! 4. the two first events differ;
//! 5. the last event of each branch carries a valid signature by the author
//!    ([`crate::event::verify`], the strict rule of `PROTOCOL.md` §3).
//!
//! Two distinct events at one seq, both signed (directly or through the
//! chain), are what nobody but the key's holder can make: the proof
//! stands on its own.
//!
//! A proof is made from a replica's store ([`ForkProof::build`], over any
//! [`Store`]: the durable events, read back with their signatures) and
//! travels in two forms with one content: the binary form
//! ([`ForkProof::encode`], postcard, `PROTOCOL.md` §9.6.1) and a JSON form
//! ([`ForkProofJson`], the event bytes and signatures in hex) that a
//! person can paste. Both are canonical: the branches are ordered by the
//! id of their first event, ascending, so one pair of branches has one
//! encoding.
//!
//! What a proof proves is an equivocation at `seq`, not that `seq` is the
//! lowest seq where the author's chains diverge ([`crate::state::Fork`]
//! names that one; proofs built from it use it).

use serde::{Deserialize, Serialize};

use crate::event::{verify, Event, EventError, Signature, SignatureError};
use crate::id::{EventId, KeyError, NodeId};
use crate::state::Fork;
use crate::sync::Store;

/// The fork proof format version this crate writes and the only one it
/// reads (the first byte of the binary form, `version` in the JSON form).
pub const FORK_PROOF_VERSION: u8 = 1;
/// Largest binary fork proof, in bytes. The JSON form is held to twice
/// this ([`MAX_FORK_PROOF_JSON_BYTES`]).
pub const MAX_FORK_PROOF_BYTES: usize = 32 * 1024 * 1024;
/// Largest JSON form a reader takes, in bytes (hex doubles every byte).
pub const MAX_FORK_PROOF_JSON_BYTES: usize = 2 * MAX_FORK_PROOF_BYTES + 64 * 1024;
/// Most events in one branch: an author's events between its signatures
/// are one batch, and a node's batches hold at most this many records.
pub const MAX_BRANCH_EVENTS: usize = 65_536;

/// Proof that an author signed two different events with one seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkProof {
    /// The author that forked.
    pub author: NodeId,
    /// The seq at which it made two events.
    pub seq: u64,
    /// The two branches, ascending by the id of their first event.
    pub branches: [Branch; 2],
}

/// One branch of a [`ForkProof`]: a run of the author's chain from the
/// fork seq up to the first event on it that carries a signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    /// The canonical encodings ([`Event::encode`]), seq ascending: the
    /// event at the fork seq first, the signed one last.
    pub events: Vec<Vec<u8>>,
    /// The author's signature over the id of the last event.
    pub signature: Signature,
}

/// What a valid [`ForkProof`] shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The author that forked.
    pub author: NodeId,
    /// The seq it used twice.
    pub seq: u64,
    /// The two events at that seq, in branch order.
    pub events: [EventId; 2],
    /// Each branch's signed last event: `(seq, id)`.
    pub heads: [(u64, EventId); 2],
}

/// Why a fork proof is refused. Branches and events are numbered from 1
/// in messages and fields: branch 1 or 2, event 1 is the one at the fork
/// seq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForkProofError {
    /// The encoding exceeds [`MAX_FORK_PROOF_BYTES`] (or the JSON text
    /// [`MAX_FORK_PROOF_JSON_BYTES`]).
    #[error("the fork proof is {got} bytes, the limit is {limit}")]
    TooLarge {
        /// Its size.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// A version this build does not read.
    #[error("unsupported fork proof version {0} (this build reads version {FORK_PROOF_VERSION})")]
    UnknownVersion(u8),
    /// The bytes are not a postcard-encoded fork proof.
    #[error("malformed fork proof: {0}")]
    Malformed(String),
    /// Bytes left over after the proof.
    #[error("{0} trailing bytes after the fork proof")]
    Trailing(usize),
    /// The bytes decode, but are not the encoding of what they decode to.
    #[error("non-canonical fork proof encoding")]
    NonCanonical,
    /// A JSON form field is not what the format says (`PROTOCOL.md` §9.6.1).
    #[error("fork proof JSON: {0}")]
    Json(String),
    /// The author is not a usable ed25519 key.
    #[error("the proof's author is refused: {0}")]
    BadAuthor(KeyError),
    /// A branch holds no event.
    #[error("branch {branch} holds no event")]
    EmptyBranch {
        /// The branch, 1 or 2.
        branch: usize,
    },
    /// A branch holds more than [`MAX_BRANCH_EVENTS`] events.
    #[error("branch {branch} holds {got} events, the limit is {MAX_BRANCH_EVENTS}")]
    TooManyEvents {
        /// The branch, 1 or 2.
        branch: usize,
        /// Its events.
        got: usize,
    },
    /// An event does not decode strictly ([`Event::decode`]).
    #[error("branch {branch}, event {index}: {error}")]
    Event {
        /// The branch, 1 or 2.
        branch: usize,
        /// The event, from 1.
        index: usize,
        /// Why it was refused.
        error: EventError,
    },
    /// An event is by another author than the proof's.
    #[error(
        "branch {branch}, event {index}: its author is {found}, not the proof's author {expected}"
    )]
    WrongAuthor {
        /// The branch, 1 or 2.
        branch: usize,
        /// The event, from 1.
        index: usize,
        /// The proof's author.
        expected: NodeId,
        /// The event's author.
        found: NodeId,
    },
    /// An event's seq is not the fork seq (event 1) or the seq after the
    /// event before it.
    #[error("branch {branch}, event {index}: seq {found}, where seq {expected} belongs")]
    WrongSeq {
        /// The branch, 1 or 2.
        branch: usize,
        /// The event, from 1.
        index: usize,
        /// The seq it must have.
        expected: u64,
        /// Its seq.
        found: u64,
    },
    /// An event's `prev` is not the id of the event before it in the
    /// branch: the chain does not reach the signed event.
    #[error("branch {branch}, event {index}: prev is not the id of event {} of the branch (a broken chain)", .index - 1)]
    BrokenLink {
        /// The branch, 1 or 2.
        branch: usize,
        /// The event, from 2.
        index: usize,
    },
    /// The signature on a branch's last event is refused.
    #[error("branch {branch}: the signature on its last event {id} is refused: {error}")]
    BadSignature {
        /// The branch, 1 or 2.
        branch: usize,
        /// The last event's id.
        id: EventId,
        /// Why.
        error: SignatureError,
    },
    /// Both branches start with the same event: no fork.
    #[error("both branches start with event {0}: one event is no fork")]
    SameEvent(EventId),
    /// The branches are not ascending by the id of their first event (the
    /// encoding would not be canonical).
    #[error("the branches are out of order: branch 1 starts with {first}, which sorts after branch 2's {second}")]
    Unordered {
        /// Branch 1's first event.
        first: EventId,
        /// Branch 2's first event.
        second: EventId,
    },
}

/// Why [`ForkProof::build`] made no proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The store does not serve this event (not held, or not yet durable).
    #[error("event {0} is not held (or not yet durable) here")]
    NotHeld(EventId),
    /// No signed head the store advertises lies on the event's chain: its
    /// branch's signature is not held yet.
    #[error("no signed event on the branch of event {0} is held here yet")]
    Unsigned(EventId),
    /// The events are not two events of one author at one seq.
    #[error("not a fork: {0}")]
    NotAFork(String),
    /// A stored event does not decode.
    #[error("stored event {id} does not decode: {error}")]
    Undecodable {
        /// The event.
        id: EventId,
        /// Why.
        error: EventError,
    },
    /// A branch would pass [`MAX_BRANCH_EVENTS`] or the proof
    /// [`MAX_FORK_PROOF_BYTES`].
    #[error("the proof would pass its limits: {0}")]
    TooLarge(String),
    /// The proof made from the store does not verify: the stored bytes or
    /// signatures are damaged.
    #[error("the proof made from this store does not verify: {0}")]
    Invalid(ForkProofError),
}

/// The binary form, as postcard writes it (`PROTOCOL.md` §9.6.1).
#[derive(Serialize, Deserialize)]
struct Wire {
    version: u8,
    author: NodeId,
    seq: u64,
    branches: [WireBranch; 2],
}

#[derive(Serialize, Deserialize)]
struct WireBranch {
    events: Vec<serde_bytes::ByteBuf>,
    /// R and S: 64 bytes with no length prefix.
    signature: ([u8; 32], [u8; 32]),
}

/// The JSON form of a [`ForkProof`]: the same content, the bytes in
/// lowercase hex (`PROTOCOL.md` §9.6.1). Serialize it with any JSON
/// library; [`ForkProof::from_json`] checks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkProofJson {
    /// [`FORK_PROOF_VERSION`].
    pub version: u8,
    /// The author's node id, 64 hex digits.
    pub author: String,
    /// The fork seq.
    pub seq: u64,
    /// Exactly two branches.
    pub branches: Vec<BranchJson>,
}

/// One branch of a [`ForkProofJson`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchJson {
    /// Each event's canonical encoding in hex, the fork seq's first.
    pub events: Vec<String>,
    /// The signature on the last event, 128 hex digits.
    pub signature: String,
}

impl ForkProof {
    /// The proof of `fork` ([`crate::state::State::forks`]): its first two
    /// events at the fork seq, each with its branch up to a signed event,
    /// read from `store`.
    pub fn of_fork<S: Store + ?Sized>(store: &S, fork: &Fork) -> Result<ForkProof, BuildError> {
        match fork.events.as_slice() {
            [a, b, ..] => ForkProof::build(store, fork.author, [*a, *b]),
            _ => Err(BuildError::NotAFork(format!(
                "{} event(s) at seq {}",
                fork.events.len(),
                fork.seq
            ))),
        }
    }

    /// The proof that `author` made both `events` (two events at one seq):
    /// each with the chain, read from `store` ([`Store::fetch_id`],
    /// [`Store::chain_id`]), from it to the first event on a signed head's
    /// chain ([`Store::frontier`]) that carries a signature. The proof is
    /// verified before it is returned.
    pub fn build<S: Store + ?Sized>(
        store: &S,
        author: NodeId,
        events: [EventId; 2],
    ) -> Result<ForkProof, BuildError> {
        let mut events = events;
        events.sort_unstable();
        if events[0] == events[1] {
            return Err(BuildError::NotAFork(format!(
                "event {} given twice",
                events[0]
            )));
        }
        let mut total = 0usize;
        let (first, seq) = branch_from(store, author, &events[0], &mut total)?;
        let (second, other) = branch_from(store, author, &events[1], &mut total)?;
        if seq != other {
            return Err(BuildError::NotAFork(format!(
                "event {} has seq {seq} and event {} seq {other}",
                events[0], events[1]
            )));
        }
        let proof = ForkProof {
            author,
            seq,
            branches: [first, second],
        };
        proof.verify().map_err(BuildError::Invalid)?;
        Ok(proof)
    }

    /// Checks the proof from its content alone (module docs): the author's
    /// key, each event's strict decoding, author, seq and `prev` link, the
    /// two first events distinct and in order, and each branch's last
    /// signature.
    pub fn verify(&self) -> Result<Verified, ForkProofError> {
        self.author.check_key().map_err(ForkProofError::BadAuthor)?;
        let mut firsts = [EventId([0; 32]); 2];
        let mut heads = [(0u64, EventId([0; 32])); 2];
        for (k, b) in self.branches.iter().enumerate() {
            let branch = k + 1;
            if b.events.is_empty() {
                return Err(ForkProofError::EmptyBranch { branch });
            }
            if b.events.len() > MAX_BRANCH_EVENTS {
                return Err(ForkProofError::TooManyEvents {
                    branch,
                    got: b.events.len(),
                });
            }
            let mut last: Option<(u64, EventId)> = None;
            for (i, bytes) in b.events.iter().enumerate() {
                let index = i + 1;
                let (event, id) = Event::decode(bytes).map_err(|error| ForkProofError::Event {
                    branch,
                    index,
                    error,
                })?;
                if event.author != self.author {
                    return Err(ForkProofError::WrongAuthor {
                        branch,
                        index,
                        expected: self.author,
                        found: event.author,
                    });
                }
                let expected = match last {
                    None => self.seq,
                    Some((seq, _)) => seq.saturating_add(1),
                };
                if event.seq != expected {
                    return Err(ForkProofError::WrongSeq {
                        branch,
                        index,
                        expected,
                        found: event.seq,
                    });
                }
                if let Some((_, before)) = last {
                    if event.prev != Some(before) {
                        return Err(ForkProofError::BrokenLink { branch, index });
                    }
                } else {
                    firsts[k] = id;
                }
                last = Some((event.seq, id));
            }
            // The loop ran at least once: the branch is not empty.
            let (seq, id) = last.expect("a non-empty branch has a last event");
            verify(&self.author, &id, &b.signature)
                .map_err(|error| ForkProofError::BadSignature { branch, id, error })?;
            heads[k] = (seq, id);
        }
        if firsts[0] == firsts[1] {
            return Err(ForkProofError::SameEvent(firsts[0]));
        }
        if firsts[0] > firsts[1] {
            return Err(ForkProofError::Unordered {
                first: firsts[0],
                second: firsts[1],
            });
        }
        Ok(Verified {
            author: self.author,
            seq: self.seq,
            events: firsts,
            heads,
        })
    }

    /// The binary form (`PROTOCOL.md` §9.6.1).
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            version: FORK_PROOF_VERSION,
            author: self.author,
            seq: self.seq,
            branches: self.branches.clone().map(|b| {
                let (r, s) = b.signature.0.split_at(32);
                WireBranch {
                    events: b
                        .events
                        .into_iter()
                        .map(serde_bytes::ByteBuf::from)
                        .collect(),
                    // Both halves are 32 bytes: a 64-byte array split at 32.
                    signature: (
                        r.try_into().expect("32 bytes"),
                        s.try_into().expect("32 bytes"),
                    ),
                }
            }),
        };
        // Writing to a Vec cannot fail and every field type is encodable.
        postcard::to_stdvec(&wire).expect("encode to Vec")
    }

    /// Reads the binary form: size, version, framing and canonical form are
    /// checked; the content is not ([`ForkProof::verify`] does that).
    pub fn decode(bytes: &[u8]) -> Result<ForkProof, ForkProofError> {
        if bytes.len() > MAX_FORK_PROOF_BYTES {
            return Err(ForkProofError::TooLarge {
                got: bytes.len(),
                limit: MAX_FORK_PROOF_BYTES,
            });
        }
        match bytes.first() {
            Some(&v) if v != FORK_PROOF_VERSION => return Err(ForkProofError::UnknownVersion(v)),
            _ => {}
        }
        let (wire, rest): (Wire, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| ForkProofError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ForkProofError::Trailing(rest.len()));
        }
        let proof = ForkProof {
            author: wire.author,
            seq: wire.seq,
            branches: wire.branches.map(|b| {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&b.signature.0);
                sig[32..].copy_from_slice(&b.signature.1);
                Branch {
                    events: b.events.into_iter().map(|e| e.into_vec()).collect(),
                    signature: Signature(sig),
                }
            }),
        };
        // Varints have more than one encoding; only the shortest is taken.
        if proof.encode() != bytes {
            return Err(ForkProofError::NonCanonical);
        }
        Ok(proof)
    }

    /// The JSON form (`PROTOCOL.md` §9.6.1).
    pub fn to_json(&self) -> ForkProofJson {
        ForkProofJson {
            version: FORK_PROOF_VERSION,
            author: self.author.to_string(),
            seq: self.seq,
            branches: self
                .branches
                .iter()
                .map(|b| BranchJson {
                    events: b.events.iter().map(|e| hex(e)).collect(),
                    signature: hex(&b.signature.0),
                })
                .collect(),
        }
    }

    /// Reads the JSON form: version, hex and the number of branches are
    /// checked; the content is not ([`ForkProof::verify`] does that).
    pub fn from_json(json: &ForkProofJson) -> Result<ForkProof, ForkProofError> {
        if json.version != FORK_PROOF_VERSION {
            return Err(ForkProofError::UnknownVersion(json.version));
        }
        let bad = |what: String| ForkProofError::Json(what);
        // The key itself is checked by `verify`, like the binary form's.
        let author: [u8; 32] = unhex(&json.author)
            .and_then(|a| a.try_into().ok())
            .ok_or_else(|| bad("author is not 64 lowercase hex digits".into()))?;
        let [a, b] = json.branches.as_slice() else {
            return Err(bad(format!(
                "{} branches, a proof has 2",
                json.branches.len()
            )));
        };
        let mut total = 0usize;
        let mut branch = |k: usize, b: &BranchJson| -> Result<Branch, ForkProofError> {
            if b.events.len() > MAX_BRANCH_EVENTS {
                return Err(ForkProofError::TooManyEvents {
                    branch: k,
                    got: b.events.len(),
                });
            }
            let mut events = Vec::with_capacity(b.events.len());
            for (i, e) in b.events.iter().enumerate() {
                total += e.len() / 2;
                if total > MAX_FORK_PROOF_BYTES {
                    return Err(ForkProofError::TooLarge {
                        got: total,
                        limit: MAX_FORK_PROOF_BYTES,
                    });
                }
                events.push(unhex(e).ok_or_else(|| {
                    bad(format!("branch {k}, event {}: not lowercase hex", i + 1))
                })?);
            }
            let sig: [u8; 64] = unhex(&b.signature)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "branch {k}: signature is not 128 lowercase hex digits"
                    ))
                })?;
            Ok(Branch {
                events,
                signature: Signature(sig),
            })
        };
        Ok(ForkProof {
            author: NodeId(author),
            seq: json.seq,
            branches: [branch(1, a)?, branch(2, b)?],
        })
    }
}

/// The branch of `id` in `store`, and its seq. `total` counts the bytes of
/// the proof so far.
fn branch_from<S: Store + ?Sized>(
    store: &S,
    author: NodeId,
    id: &EventId,
    total: &mut usize,
) -> Result<(Branch, u64), BuildError> {
    let first = store.fetch_id(id).ok_or(BuildError::NotHeld(*id))?;
    let event = Event::decode_trusted(&first.bytes)
        .map_err(|error| BuildError::Undecodable { id: *id, error })?;
    if event.author != author {
        return Err(BuildError::NotAFork(format!(
            "event {id} is by {}, not {author}",
            event.author
        )));
    }
    let seq = event.seq;
    let mut add = |bytes: &[u8], events: usize| {
        *total += bytes.len();
        if *total > MAX_FORK_PROOF_BYTES || events > MAX_BRANCH_EVENTS {
            return Err(BuildError::TooLarge(format!(
                "{events} events, {total} bytes from event {id}"
            )));
        }
        Ok(())
    };
    add(&first.bytes, 1)?;
    let mut events = vec![first.bytes];
    if let Some(signature) = first.sig {
        return Ok((Branch { events, signature }, seq));
    }
    // The lowest signed head whose chain holds the event: the frontier is
    // ascending by (author, seq, id).
    let head = store
        .frontier()
        .into_iter()
        .filter(|h| h.author == author && h.seq > seq)
        .find(|h| store.chain_id(&h.id, seq) == Some(*id))
        .ok_or(BuildError::Unsigned(*id))?;
    for s in seq + 1..=head.seq {
        let at = store
            .chain_id(&head.id, s)
            .ok_or(BuildError::Unsigned(*id))?;
        let stored = store.fetch_id(&at).ok_or(BuildError::NotHeld(at))?;
        add(&stored.bytes, events.len() + 1)?;
        events.push(stored.bytes);
        if let Some(signature) = stored.sig {
            return Ok((Branch { events, signature }, seq));
        }
    }
    Err(BuildError::Unsigned(*id))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        // Writing to a String cannot fail.
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Lowercase hex only: one text per byte string.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.chunks_exact(2)
        .map(|p| Some(digit(p[0])? * 16 + digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::{Keypair, Meta, Op, MIN_FORMAT_VERSION};
    use crate::hlc::Hlc;
    use crate::id::PointFault;
    use crate::sync::MemStore;

    fn key() -> Keypair {
        Keypair::from_secret([1; 32])
    }

    fn event(author: NodeId, seq: u64, prev: Option<EventId>, ms: u64, phone: &str) -> Event {
        Event {
            version: MIN_FORMAT_VERSION,
            author,
            seq,
            prev,
            deps: vec![],
            hlc: Hlc::from_ms(1_700_000_000_000 + ms),
            stream: "attendee/1".into(),
            kind: "Edited".into(),
            ops: vec![Op::Set {
                field: "phone".into(),
                value: format!("{phone:?}").into_bytes(),
                supersedes: vec![],
            }],
            payload: vec![],
            meta: Meta::default(),
        }
    }

    /// Seq 1, then two branches at seq 2: one signed event on one, an
    /// unsigned event and a signed one on the other. Each as
    /// `(event, bytes, id, signature)`.
    fn history() -> Vec<(Event, Vec<u8>, EventId, Option<Signature>)> {
        let k = key();
        let mut out = Vec::new();
        let mut push = |e: Event, signed: bool| {
            let (bytes, id) = e.seal();
            out.push((e, bytes, id, signed.then(|| k.sign(&id))));
            id
        };
        let one = push(event(k.node_id(), 1, None, 0, "1"), true);
        push(event(k.node_id(), 2, Some(one), 1, "a"), true);
        let b2 = push(event(k.node_id(), 2, Some(one), 2, "b"), false);
        push(event(k.node_id(), 3, Some(b2), 3, "c"), true);
        out
    }

    fn store() -> MemStore {
        let mut s = MemStore::new();
        for (e, bytes, id, sig) in history() {
            s.insert(&e, id, &bytes, sig).unwrap();
        }
        s
    }

    fn proof() -> ForkProof {
        let s = store();
        let forks = s.state().forks();
        assert_eq!(forks.len(), 1);
        ForkProof::of_fork(&s, &forks[0]).unwrap()
    }

    /// Re-signs branch `k`'s last event with `key`, after an edit.
    fn resign(p: &mut ForkProof, k: usize, key: &Keypair) {
        let last = p.branches[k].events.last().unwrap();
        let id = EventId(*blake3::hash(last).as_bytes());
        p.branches[k].signature = key.sign(&id);
    }

    #[test]
    fn a_proof_built_from_a_store_verifies_and_round_trips() {
        let h = history();
        let p = proof();
        // Branches ascending by first id; the unsigned branch runs to its
        // signed event.
        let (a, b) = (&h[1], &h[2]);
        let (lo, hi) = if a.2 < b.2 { (a, b) } else { (b, a) };
        assert_eq!(p.branches[0].events[0], lo.1);
        assert_eq!(p.branches[1].events[0], hi.1);
        let long = if p.branches[0].events.len() == 2 {
            0
        } else {
            1
        };
        assert_eq!(
            p.branches[long].events,
            vec![h[2].1.clone(), h[3].1.clone()]
        );
        assert_eq!(p.branches[1 - long].events, vec![h[1].1.clone()]);
        let v = p.verify().unwrap();
        assert_eq!(v.author, key().node_id());
        assert_eq!(v.seq, 2);
        assert_eq!(v.events, [lo.2, hi.2]);
        assert_eq!(v.heads[long], (3, h[3].2));
        assert_eq!(v.heads[1 - long], (2, h[1].2));
        assert_eq!(ForkProof::decode(&p.encode()).unwrap(), p);
        assert_eq!(ForkProof::from_json(&p.to_json()).unwrap(), p);
        let text = serde_json::to_string(&p.to_json()).unwrap();
        let back: ForkProofJson = serde_json::from_str(&text).unwrap();
        assert_eq!(ForkProof::from_json(&back).unwrap(), p);
        // Built from the events in either order: the same proof.
        let again = ForkProof::build(&store(), key().node_id(), [hi.2, lo.2]).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn building_without_a_fork_or_a_signature_is_refused() {
        let h = history();
        let s = store();
        let me = key().node_id();
        assert!(matches!(
            ForkProof::build(&s, me, [h[1].2, h[1].2]),
            Err(BuildError::NotAFork(_))
        ));
        assert!(matches!(
            ForkProof::build(&s, me, [h[1].2, h[3].2]),
            Err(BuildError::NotAFork(_))
        ));
        let missing = EventId([7; 32]);
        assert_eq!(
            ForkProof::build(&s, me, [h[1].2, missing]),
            Err(BuildError::NotHeld(missing))
        );
        // The unsigned branch without its signed end.
        let mut s = MemStore::new();
        for (e, bytes, id, sig) in history().into_iter().take(3) {
            s.insert(&e, id, &bytes, sig).unwrap();
        }
        assert_eq!(
            ForkProof::build(&s, me, [h[1].2, h[2].2]),
            Err(BuildError::Unsigned(h[2].2))
        );
    }

    #[test]
    fn tampered_bytes_are_refused() {
        let p = proof();
        let long = if p.branches[0].events.len() == 2 {
            0
        } else {
            1
        };
        // A byte of the payload of the unsigned event: it still decodes,
        // but its id changes and the next event's prev no longer names it.
        let mut q = p.clone();
        let e = &mut q.branches[long].events[0];
        let at = e.len() - 6;
        e[at] ^= 1;
        assert_eq!(
            q.verify(),
            Err(ForkProofError::BrokenLink {
                branch: long + 1,
                index: 2
            })
        );
        // A byte of the signed event: its signature no longer verifies.
        let mut q = p.clone();
        let e = &mut q.branches[1 - long].events[0];
        let at = e.len() - 6;
        e[at] ^= 1;
        let err = q.verify().unwrap_err();
        assert!(
            matches!(
                err,
                ForkProofError::BadSignature {
                    error: SignatureError::Invalid,
                    ..
                }
            ),
            "{err}"
        );
        // A byte that breaks the encoding: named as the event's error.
        let mut q = p.clone();
        q.branches[0].events[0].push(0);
        assert_eq!(
            q.verify(),
            Err(ForkProofError::Event {
                branch: 1,
                index: 1,
                error: EventError::Trailing(1)
            })
        );
        // A byte of the binary form.
        let mut bytes = p.encode();
        bytes.push(0);
        assert_eq!(ForkProof::decode(&bytes), Err(ForkProofError::Trailing(1)));
        let mut bytes = p.encode();
        bytes[0] = 2;
        assert_eq!(
            ForkProof::decode(&bytes),
            Err(ForkProofError::UnknownVersion(2))
        );
    }

    #[test]
    fn a_wrong_signature_is_refused() {
        let mut q = proof();
        resign(&mut q, 0, &Keypair::from_secret([2; 32]));
        let err = q.verify().unwrap_err();
        assert!(
            matches!(
                err,
                ForkProofError::BadSignature {
                    branch: 1,
                    error: SignatureError::Invalid,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("branch 1: the signature on its last event"));
        // Branch 2's signature on branch 1: signed by the author, but over
        // another event.
        let mut q = proof();
        q.branches[0].signature = q.branches[1].signature;
        assert!(matches!(
            q.verify(),
            Err(ForkProofError::BadSignature { branch: 1, .. })
        ));
    }

    #[test]
    fn a_weak_key_is_refused() {
        let mut q = proof();
        let mut identity = [0u8; 32];
        identity[0] = 1;
        q.author = NodeId(identity);
        let err = q.verify().unwrap_err();
        assert!(
            matches!(
                err,
                ForkProofError::BadAuthor(KeyError {
                    fault: PointFault::SmallOrder,
                    ..
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("weak (small-order)"), "{err}");
    }

    #[test]
    fn an_event_by_another_author_is_refused() {
        let other = Keypair::from_secret([2; 32]);
        let mut q = proof();
        let mut e = event(other.node_id(), 2, None, 9, "x");
        e.prev = Some(EventId([3; 32]));
        q.branches[1].events = vec![e.encode()];
        resign(&mut q, 1, &other);
        assert_eq!(
            q.verify(),
            Err(ForkProofError::WrongAuthor {
                branch: 2,
                index: 1,
                expected: key().node_id(),
                found: other.node_id()
            })
        );
    }

    #[test]
    fn mismatched_seqs_are_refused() {
        let k = key();
        let h = history();
        // Branch 2 starts at seq 3: two events at different seqs.
        let mut q = proof();
        let long = if q.branches[0].events.len() == 2 {
            0
        } else {
            1
        };
        q.branches[long].events.remove(0);
        let err = q.verify().unwrap_err();
        assert_eq!(
            err,
            ForkProofError::WrongSeq {
                branch: long + 1,
                index: 1,
                expected: 2,
                found: 3
            }
        );
        assert_eq!(
            err.to_string(),
            format!("branch {}, event 1: seq 3, where seq 2 belongs", long + 1)
        );
        // A gap inside a branch: seq 4 after seq 2, its prev right.
        let mut q = proof();
        let e = event(k.node_id(), 4, Some(h[2].2), 3, "c");
        q.branches[long].events[1] = e.encode();
        resign(&mut q, long, &k);
        assert_eq!(
            q.verify(),
            Err(ForkProofError::WrongSeq {
                branch: long + 1,
                index: 2,
                expected: 3,
                found: 4
            })
        );
    }

    #[test]
    fn identical_events_are_refused() {
        let mut q = proof();
        q.branches[1] = q.branches[0].clone();
        let first = EventId(*blake3::hash(&q.branches[0].events[0]).as_bytes());
        assert_eq!(q.verify(), Err(ForkProofError::SameEvent(first)));
        // Swapped branches: a fork, but not the canonical encoding.
        let mut q = proof();
        q.branches.swap(0, 1);
        assert!(matches!(q.verify(), Err(ForkProofError::Unordered { .. })));
        // No event at all.
        let mut q = proof();
        q.branches[1].events.clear();
        assert_eq!(q.verify(), Err(ForkProofError::EmptyBranch { branch: 2 }));
    }

    #[test]
    fn a_broken_prev_link_is_refused() {
        let k = key();
        let mut q = proof();
        let long = if q.branches[0].events.len() == 2 {
            0
        } else {
            1
        };
        // Seq 3 re-made with prev naming another event, and signed: the
        // signature is the author's, but it does not cover event 1.
        let e = event(k.node_id(), 3, Some(EventId([5; 32])), 3, "c");
        q.branches[long].events[1] = e.encode();
        resign(&mut q, long, &k);
        let err = q.verify().unwrap_err();
        assert_eq!(
            err,
            ForkProofError::BrokenLink {
                branch: long + 1,
                index: 2
            }
        );
        assert!(
            err.to_string().contains("prev is not the id of event 1"),
            "{err}"
        );
    }

    #[test]
    fn the_json_form_is_checked() {
        let p = proof();
        let mut j = p.to_json();
        j.version = 9;
        assert_eq!(
            ForkProof::from_json(&j),
            Err(ForkProofError::UnknownVersion(9))
        );
        let mut j = p.to_json();
        j.branches.pop();
        assert!(matches!(
            ForkProof::from_json(&j),
            Err(ForkProofError::Json(_))
        ));
        let mut j = p.to_json();
        j.branches[0].events[0] = j.branches[0].events[0].to_uppercase();
        assert!(matches!(
            ForkProof::from_json(&j),
            Err(ForkProofError::Json(_))
        ));
        let mut j = p.to_json();
        j.branches[1].signature.pop();
        assert!(matches!(
            ForkProof::from_json(&j),
            Err(ForkProofError::Json(_))
        ));
        let text = serde_json::to_string(&p.to_json())
            .unwrap()
            .replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<ForkProofJson>(&text).is_err());
    }

    proptest! {
        /// Random bytes, and a valid proof with random bytes changed, never
        /// panic the decoder or the verifier.
        #[test]
        fn malformed_proofs_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..600),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            if let Ok(p) = ForkProof::decode(&junk) {
                let _ = p.verify();
            }
            let whole = PROOF.with(|p| p.encode());
            // Every strict prefix of a valid proof is refused. (Of an edited
            // one it need not be: an edited length can make a prefix whole.)
            let short = &whole[..cut.index(whole.len())];
            prop_assert!(ForkProof::decode(short).is_err());
            let mut good = whole.clone();
            for (i, b) in edits {
                let at = i.index(good.len());
                good[at] = b;
            }
            if let Ok(p) = ForkProof::decode(&good) {
                let _ = p.verify();
            }
            // Any prefix of the edited bytes still never panics.
            let _ = ForkProof::decode(&good[..cut.index(good.len())]);
        }
    }

    thread_local! {
        static PROOF: ForkProof = proof();
    }
}
