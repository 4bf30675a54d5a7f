//! Text fields merged with automerge.
//!
//! A register field ([`crate::state`]) keeps concurrent writes as a
//! conflict, which is right for a name or an email, and wrong for notes
//! that two desks type into at once. A *text field* is an automerge text
//! object instead: an [`Op::Text`](crate::event::Op::Text) carries one
//! automerge change, the fold keeps one automerge document per (stream,
//! text field), concurrent edits merge character by character (automerge's
//! sequence CRDT), and the read model shows the text and its heads
//! ([`Text`]).
//!
//! **Positions count UTF-16 code units**, everywhere: in a [`Splice`], in
//! the HTTP body, in `weftlog append --splice`. The desk runs in a browser,
//! whose strings count UTF-16 units; the documents are opened with
//! automerge's [`TextEncoding::Utf16CodeUnit`]. A position that falls
//! inside a surrogate pair, or past the end, is refused.
//!
//! **The document.** Every document starts from one fixed change, the
//! *genesis*: actor [`genesis_actor`] (blake3 of [`GENESIS_CONTEXT`],
//! first 16 bytes), seq 1, time 0, no deps, one op that makes a text
//! object at the root key `"text"`. Every replica builds the same bytes,
//! so the text object has the same id (`1@genesis`) everywhere, and two
//! desks that start a field at once edit one object instead of racing
//! for the root key. The genesis is implied, never carried by an event.
//!
//! **Validity** ([`check`], on every insert, by every replica, against the
//! event's causal past only). The change
//! - decodes as one automerge change chunk;
//! - has the actor [`actor`] derives from the event: blake3 of
//!   [`ACTOR_CONTEXT`] ‖ author (32 bytes) ‖ seq (u64 LE) ‖ hlc (u64 LE) ‖
//!   the op's index in the event (u64 LE), first 16 bytes. Two branches of
//!   a forked author hold one seq, but differ in hlc (or are the same
//!   event), so they get different actors;
//! - has seq 1, time 0, no message, no author footer, at least one op;
//! - has deps strictly ascending and not empty, each the genesis or the
//!   hash of a text change of the same stream and field carried by an
//!   event in the causal past;
//! - starts its ops right after the largest op of its dep closure (what
//!   automerge does when it commits on a document at those deps);
//! - holds only text edits of the text object: an insert of one character
//!   (`Put` of a one-scalar string, `insert`, no pred) or a `Delete` whose
//!   pred is the element it deletes; every element it names is made by an
//!   insert: an earlier op of the change, or one of a change in its dep
//!   closure (a delete makes no element).
//!
//! So every change applies: its deps are there, and so is everything it
//! names. Applying in causal order always succeeds.
//!
//! **Which changes take effect** (a function of the event set, like
//! every read model; `Field::rebuild` is its definition):
//! - a change carried by a command duplicate (`state` module docs: of the
//!   events of one stream with one command id, only the first in canonical
//!   order takes effect) takes no effect;
//! - the one case that can still collide: two fork branches with the same
//!   author, seq and hlc derive the same actor, and automerge holds one
//!   change per (actor, seq). Of the text changes of a field that share an
//!   actor, only the one carried by the first event in canonical order
//!   (`(hlc, author, seq, id)`, duplicates included) may take effect; the
//!   others take none;
//! - a change whose deps are not all in effect (the genesis always is)
//!   takes no effect either.
//!
//! A late event can make a command's first event a duplicate; its changes
//! then stop taking effect, and with them every change that builds on
//! them. An automerge document cannot drop a change, so the field keeps
//! every change it was given, with the events that carried it, and
//! rebuilds the document from the genesis and the changes in effect, in
//! canonical order (a causal order: hlcs grow along causality). That is
//! what a replay in canonical order gives, so the state stays a function
//! of the event set. Rebuilds happen only then (and when an actor is
//! shared); every other change is applied to the document in place.
//!
//! **The read model** per field ([`Text`]) is the text and the sorted
//! hashes of the document's heads (the changes in effect that no other
//! change in effect names; the genesis is left out, so a field with no
//! change in effect shows no heads). The state hash covers exactly that,
//! never automerge's save bytes (`PROTOCOL.md` §7).
//!
//! **Local edits** ([`edit`]): a [`TextEdit`] lists splices against the
//! text this replica shows in the new event's causal past, or, with
//! `base`, against the document at those heads (automerge's `fork_at`);
//! the change then names `base` as its deps, and merging it rebases the
//! edit over everything concurrent, as automerge merges any two changes.
//! Heads this replica does not hold in effect are refused
//! ([`EditError::UnknownBase`]; the HTTP layer answers 409).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    legacy, ActorId, AutoCommit, Change, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue,
    TextEncoding, Value, ROOT,
};
use serde::Serialize;

use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};

/// Context of the actor derivation ([`actor`]).
pub const ACTOR_CONTEXT: &[u8] = b"weftlog/v1/text-actor";
/// Context of the genesis actor ([`genesis_actor`]).
pub const GENESIS_CONTEXT: &[u8] = b"weftlog/v1/text-genesis";
/// Bytes of an automerge actor id derived here.
pub const ACTOR_BYTES: usize = 16;
/// The root key of the text object.
pub const TEXT_KEY: &str = "text";
/// Most splices in one [`TextEdit`].
pub const MAX_SPLICES: usize = 1024;

/// An automerge change hash (SHA-256 of the change), as the read model
/// shows heads. Compares as bytes; prints as 64 lowercase hex digits.
pub type Head = [u8; 32];

/// A text field's read model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Text {
    /// The merged text.
    pub text: String,
    /// The document's heads, ascending by bytes, the genesis left out.
    pub heads: Vec<Head>,
}

/// One splice: at `pos`, delete `delete` units, then insert `insert`.
/// Positions and lengths count UTF-16 code units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splice {
    /// Where, in UTF-16 code units from the start.
    pub pos: u64,
    /// How many UTF-16 code units to delete there.
    pub delete: u64,
    /// The text to insert there.
    pub insert: String,
}

/// The text edits of a local command on one field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextEdit {
    /// The text field.
    pub field: String,
    /// Applied in order, each against the text the previous ones left.
    pub splices: Vec<Splice>,
    /// The heads the client saw (`None`: the text this replica shows).
    /// Empty: the empty text every field starts from.
    pub base: Option<Vec<Head>>,
}

/// Why a text change is invalid (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadChange {
    /// The bytes are not one automerge change.
    #[error("not an automerge change: {0}")]
    Decode(String),
    /// The actor is not the one derived from the event.
    #[error("actor {got} is not the one derived from the event ({want})")]
    Actor {
        /// The actor the change has, hex.
        got: String,
        /// The actor it must have, hex.
        want: String,
    },
    /// A header rule is broken.
    #[error("{0}")]
    Header(&'static str),
    /// A dep is neither the genesis nor a text change of this field in
    /// the event's causal past.
    #[error("dep {} is not a text change of this field in the event's causal past", Hex(.0))]
    UnknownDep(Head),
    /// The ops do not start right after the dep closure's.
    #[error("start op {got}, expected {want}")]
    StartOp {
        /// The change's start op.
        got: u64,
        /// One past the largest op of its dep closure.
        want: u64,
    },
    /// An op is not a text edit, or names an element outside the change
    /// and its dep closure.
    #[error("op {index}: {why}")]
    Op {
        /// The op's index in the change.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// Why a local text edit was refused. Nothing is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// `base` names a head this replica does not hold in effect on the
    /// field (the HTTP layer answers 409: fetch the field and retry).
    #[error("text field {field:?}: base head {} is unknown here", Hex(.head))]
    UnknownBase {
        /// The field.
        field: String,
        /// The unknown head.
        head: Head,
    },
    /// A splice falls outside the text, or inside a surrogate pair.
    #[error("text field {field:?}: splice {index} ({pos}, delete {delete}) does not fit a text of {len} UTF-16 units on character boundaries")]
    Position {
        /// The field.
        field: String,
        /// The splice's index.
        index: usize,
        /// Its position.
        pos: u64,
        /// Its delete count.
        delete: u64,
        /// The text's length then, in UTF-16 units.
        len: u64,
    },
    /// The edit changes nothing.
    #[error("text field {0:?}: the splices change nothing")]
    Empty(String),
    /// More than [`MAX_SPLICES`] splices.
    #[error("text field {field:?}: {got} splices, the limit is {MAX_SPLICES}")]
    TooManySplices {
        /// The field.
        field: String,
        /// How many.
        got: usize,
    },
    /// Two edits of one field in one command.
    #[error("text field {0:?} is edited twice in one command")]
    Twice(String),
}

/// Lowercase hex of a byte string, for messages.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A head from 64 hex digits (either case), as clients send `base`.
pub fn parse_head(s: &str) -> Option<Head> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The automerge actor of the text op at `index` in the event by `author`
/// at `seq` with `hlc` (module docs).
pub fn actor(author: &NodeId, seq: u64, hlc: Hlc, index: usize) -> [u8; ACTOR_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(ACTOR_CONTEXT);
    h.update(author.as_bytes());
    h.update(&seq.to_le_bytes());
    h.update(&hlc.0.to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    first16(h.finalize().as_bytes())
}

/// The genesis change's actor.
pub fn genesis_actor() -> [u8; ACTOR_BYTES] {
    first16(blake3::hash(GENESIS_CONTEXT).as_bytes())
}

fn first16(b: &[u8; 32]) -> [u8; ACTOR_BYTES] {
    let mut a = [0; ACTOR_BYTES];
    a.copy_from_slice(&b[..ACTOR_BYTES]);
    a
}

/// The genesis change and the document it makes.
struct Genesis {
    hash: ChangeHash,
    bytes: Vec<u8>,
    doc: AutoCommit,
}

fn genesis() -> &'static Genesis {
    static G: OnceLock<Genesis> = OnceLock::new();
    G.get_or_init(|| {
        let mut doc = AutoCommit::new_with_encoding(TextEncoding::Utf16CodeUnit)
            .with_actor(ActorId::from(genesis_actor()));
        // A fresh document has no object at the key: the put cannot fail,
        // and the commit has one op.
        doc.put_object(ROOT, TEXT_KEY, ObjType::Text)
            .expect("make the text object");
        let hash = doc
            .commit_with(CommitOptions::default().with_time(0))
            .expect("genesis has an op");
        let bytes = doc
            .get_last_local_change()
            .expect("genesis committed")
            .raw_bytes()
            .to_vec();
        Genesis { hash, bytes, doc }
    })
}

/// The genesis change's hash: the dep of a field's first changes.
pub fn genesis_hash() -> Head {
    genesis().hash.0
}

/// The genesis change's bytes.
pub fn genesis_bytes() -> &'static [u8] {
    &genesis().bytes
}

/// The text object of a document built from the genesis.
fn text_obj(doc: &AutoCommit) -> ObjId {
    // Every document here starts from the genesis, and no valid change
    // touches the root map: the key holds exactly the text object.
    match doc.get(ROOT, TEXT_KEY) {
        Ok(Some((Value::Object(ObjType::Text), id))) => id,
        other => unreachable!("document without its text object: {other:?}"),
    }
}

/// A fresh document: the genesis alone.
fn fresh() -> AutoCommit {
    genesis().doc.clone()
}

/// The canonical key of the event carrying a change, and the change's
/// actor (which makes the key unique within one event).
type CarrierKey = (Hlc, NodeId, u64, EventId, [u8; ACTOR_BYTES]);

/// One event's text op on the field.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Carrier {
    hash: ChangeHash,
    /// The event is a command duplicate.
    dup: bool,
}

/// A change the field was given.
#[derive(Clone, Debug)]
struct Node {
    change: Change,
    actor: [u8; ACTOR_BYTES],
    start_op: u64,
    len: u64,
    deps: Vec<ChangeHash>,
    /// The largest op of the change and its dep closure.
    closure_max: u64,
    /// Its delete ops' counters, ascending: ops that make no element.
    deletes: Vec<u64>,
    /// The events that carry it (almost always one).
    events: Vec<EventId>,
}

/// One text field of one stream: every change it was given, the document
/// of those in effect, and the read model.
#[derive(Clone, Debug)]
pub struct Field {
    doc: AutoCommit,
    nodes: BTreeMap<ChangeHash, Node>,
    /// Every carrier, in canonical order.
    carriers: BTreeMap<CarrierKey, Carrier>,
    /// Per actor, its first carrier in canonical order.
    claims: BTreeMap<[u8; ACTOR_BYTES], CarrierKey>,
    /// The changes in effect: exactly those in `doc`, the genesis aside.
    effect: BTreeSet<ChangeHash>,
    shown: Text,
}

impl Default for Field {
    fn default() -> Field {
        Field {
            doc: fresh(),
            nodes: BTreeMap::new(),
            carriers: BTreeMap::new(),
            claims: BTreeMap::new(),
            effect: BTreeSet::new(),
            shown: Text::default(),
        }
    }
}

impl PartialEq for Field {
    /// Equal when given the same changes by the same events, which makes
    /// the document and the read model equal too.
    fn eq(&self, other: &Field) -> bool {
        self.carriers == other.carriers && self.shown == other.shown
    }
}

impl Eq for Field {}

impl Field {
    /// The read model.
    pub fn text(&self) -> &Text {
        &self.shown
    }

    /// Records a valid text change (checked by [`check`]) carried by the
    /// event `(hlc, author, seq, id)`; `dup`: that event is a command
    /// duplicate. Applies it if it takes effect.
    pub(crate) fn record(
        &mut self,
        bytes: &[u8],
        hlc: Hlc,
        author: NodeId,
        seq: u64,
        id: EventId,
        dup: bool,
    ) {
        let Ok(change) = Change::try_from(bytes) else {
            debug_assert!(false, "a checked text change decodes");
            return;
        };
        let hash = change.hash();
        let Ok(actor) = <[u8; ACTOR_BYTES]>::try_from(change.actor_id().to_bytes()) else {
            debug_assert!(false, "a checked text change has a derived actor");
            return;
        };
        let key = (hlc, author, seq, id, actor);
        if self.carriers.contains_key(&key) {
            return;
        }
        match self.nodes.get_mut(&hash) {
            Some(n) => n.events.push(id),
            None => {
                let deps = change.deps().to_vec();
                let start_op = change.start_op().get();
                let len = change.len() as u64;
                let closure_max = start_op + len - 1;
                let deletes = change
                    .decode()
                    .operations
                    .iter()
                    .enumerate()
                    .filter(|(_, op)| matches!(op.action, legacy::OpType::Delete))
                    .map(|(i, _)| start_op + i as u64)
                    .collect();
                self.nodes.insert(
                    hash,
                    Node {
                        change,
                        actor,
                        start_op,
                        len,
                        deps,
                        closure_max,
                        deletes,
                        events: vec![id],
                    },
                );
            }
        }
        self.carriers.insert(key, Carrier { hash, dup });
        match self.claims.get(&actor) {
            Some(first) if *first < key => {} // the actor is taken: no effect
            Some(_) => {
                // It takes the actor from a later carrier (two fork
                // branches with one hlc): rare, so replay.
                self.claims.insert(actor, key);
                self.rebuild();
            }
            None => {
                self.claims.insert(actor, key);
                if !dup && self.deps_in_effect(&hash) {
                    self.apply(&[hash]);
                }
            }
        }
    }

    /// The event `id`, which took effect, is now a command duplicate: its
    /// changes stop taking effect, and so do those that build on them.
    pub(crate) fn undo(&mut self, id: EventId) {
        let mut was = false;
        for (k, c) in self.carriers.iter_mut() {
            if k.3 == id && !c.dup {
                c.dup = true;
                was |= self.effect.contains(&c.hash);
            }
        }
        if was {
            self.rebuild();
        }
    }

    fn deps_in_effect(&self, hash: &ChangeHash) -> bool {
        let g = genesis().hash;
        self.nodes[hash]
            .deps
            .iter()
            .all(|d| *d == g || self.effect.contains(d))
    }

    /// Applies changes whose deps are in the document.
    fn apply(&mut self, hashes: &[ChangeHash]) {
        let changes: Vec<Change> = hashes
            .iter()
            .map(|h| self.nodes[h].change.clone())
            .collect();
        // Validity makes every change apply: its deps are in the document,
        // every element it names is made by its dep closure, and its actor
        // is unused there (`claims`).
        if let Err(e) = self.doc.apply_changes(changes) {
            debug_assert!(false, "a valid text change failed to apply: {e}");
            return;
        }
        self.effect.extend(hashes.iter().copied());
        self.show();
    }

    /// Rebuilds the document from the genesis and the changes in effect,
    /// in canonical order: the definition of "in effect" (module docs).
    fn rebuild(&mut self) {
        let g = genesis().hash;
        let mut claimed: BTreeSet<[u8; ACTOR_BYTES]> = BTreeSet::new();
        let mut effect: BTreeSet<ChangeHash> = BTreeSet::new();
        let mut order = Vec::new();
        for (key, c) in &self.carriers {
            if !claimed.insert(key.4) || c.dup {
                continue;
            }
            let node = &self.nodes[&c.hash];
            if node.deps.iter().all(|d| *d == g || effect.contains(d)) {
                effect.insert(c.hash);
                order.push(c.hash);
            }
        }
        self.doc = fresh();
        self.effect.clear();
        self.apply(&order);
        self.show();
    }

    fn show(&mut self) {
        let g = genesis().hash;
        let obj = text_obj(&self.doc);
        // The text object exists (`text_obj`): reading it cannot fail.
        let text = self.doc.text(&obj).expect("read the text object");
        let mut heads: Vec<Head> = self
            .doc
            .get_heads()
            .into_iter()
            .filter(|h| *h != g)
            .map(|h| h.0)
            .collect();
        heads.sort_unstable();
        self.shown = Text { text, heads };
    }

    /// The changes in effect with a carrier in the causal past `in_past`,
    /// if that is not all of them: their heads.
    fn heads_in_past(&self, in_past: &impl Fn(&EventId) -> bool) -> Option<Vec<ChangeHash>> {
        let past: BTreeSet<ChangeHash> = self
            .effect
            .iter()
            .filter(|h| self.nodes[*h].events.iter().any(in_past))
            .copied()
            .collect();
        if past.len() == self.effect.len() {
            return None;
        }
        let named: BTreeSet<ChangeHash> = past
            .iter()
            .flat_map(|h| self.nodes[h].deps.iter().copied())
            .collect();
        let mut heads: Vec<ChangeHash> = past.difference(&named).copied().collect();
        if heads.is_empty() {
            heads.push(genesis().hash);
        }
        Some(heads)
    }
}

/// Checks a text change carried by an event's op (module docs): `field` is
/// what the replica holds of the field, `actor` the one derived from the
/// event ([`actor`]), `in_past` whether an event is in its causal past.
pub fn check(
    field: Option<&Field>,
    bytes: &[u8],
    actor: [u8; ACTOR_BYTES],
    in_past: impl Fn(&EventId) -> bool,
) -> Result<(), BadChange> {
    let change = Change::try_from(bytes).map_err(|e| BadChange::Decode(e.to_string()))?;
    if change.actor_id().to_bytes() != actor {
        return Err(BadChange::Actor {
            got: Hex(change.actor_id().to_bytes()).to_string(),
            want: Hex(&actor).to_string(),
        });
    }
    if change.seq() != 1 {
        return Err(BadChange::Header("seq is not 1"));
    }
    if change.timestamp() != 0 {
        return Err(BadChange::Header("time is not 0"));
    }
    if change.message().is_some() {
        return Err(BadChange::Header("a message is set"));
    }
    if !change.extra_bytes().is_empty() {
        return Err(BadChange::Header("extra bytes (an author footer) are set"));
    }
    if change.is_empty() {
        return Err(BadChange::Header("no ops"));
    }
    let deps = change.deps();
    if deps.is_empty() {
        return Err(BadChange::Header("no deps (the genesis at least)"));
    }
    if !deps.windows(2).all(|w| w[0] < w[1]) {
        return Err(BadChange::Header("deps are not strictly ascending"));
    }
    let g = genesis().hash;
    let nodes = field.map(|f| &f.nodes);
    let mut closure_max = 0;
    for d in deps {
        let m = if *d == g {
            1
        } else {
            match nodes.and_then(|n| n.get(d)) {
                Some(n) if n.events.iter().any(&in_past) => n.closure_max,
                _ => return Err(BadChange::UnknownDep(d.0)),
            }
        };
        closure_max = closure_max.max(m);
    }
    let start = change.start_op().get();
    if start != closure_max + 1 {
        return Err(BadChange::StartOp {
            got: start,
            want: closure_max + 1,
        });
    }
    let text_id = legacy::ObjectId::Id(legacy::OpId(1, ActorId::from(genesis_actor())));
    // Elements made by other changes that the ops name: (counter, actor).
    let mut needed: BTreeSet<(u64, [u8; ACTOR_BYTES])> = BTreeSet::new();
    let expanded = change.decode();
    // Counters of this change's deletes: they make no element.
    let mut deletes: Vec<u64> = Vec::new();
    for (index, op) in expanded.operations.iter().enumerate() {
        let bad = |why| BadChange::Op { index, why };
        if op.obj != text_id {
            return Err(bad("not on the text object"));
        }
        let elem = match (&op.action, op.insert, &op.key) {
            (legacy::OpType::Put(ScalarValue::Str(s)), true, legacy::Key::Seq(e)) => {
                if s.chars().count() != 1 {
                    return Err(bad("an insert is not one character"));
                }
                if !op.pred.is_empty() {
                    return Err(bad("an insert has a pred"));
                }
                e
            }
            (legacy::OpType::Delete, false, legacy::Key::Seq(e @ legacy::ElementId::Id(id))) => {
                let pred: Vec<&legacy::OpId> = op.pred.iter().collect();
                if pred != [id] {
                    return Err(bad("a delete's pred is not the element it deletes"));
                }
                e
            }
            _ => return Err(bad("not a one-character insert or a delete")),
        };
        if matches!(op.action, legacy::OpType::Delete) {
            deletes.push(start + index as u64);
        }
        let legacy::ElementId::Id(legacy::OpId(counter, by)) = elem else {
            continue; // the head of the text
        };
        let Ok(by) = <[u8; ACTOR_BYTES]>::try_from(by.to_bytes()) else {
            return Err(bad("names an element of an unknown actor"));
        };
        if by == actor {
            if *counter < start || *counter >= start + index as u64 {
                return Err(bad("names an element the change has not made yet"));
            }
            if deletes.contains(counter) {
                return Err(bad("names a delete as an element"));
            }
        } else {
            needed.insert((*counter, by));
        }
    }
    // Find each named element in the dep closure, walking back from the
    // deps; a change whose closure ends below every element still needed
    // holds none of them.
    let mut stack: Vec<ChangeHash> = deps.iter().filter(|d| **d != g).copied().collect();
    let mut seen: BTreeSet<ChangeHash> = stack.iter().copied().collect();
    while let Some(least) = needed.first().map(|n| n.0) {
        let Some(h) = stack.pop() else {
            return Err(BadChange::Op {
                index: 0,
                why: "names an element outside its dep closure",
            });
        };
        // Deps were found above, and a recorded change's deps were recorded
        // before it.
        let Some(n) = nodes.and_then(|n| n.get(&h)) else {
            continue;
        };
        if n.closure_max < least {
            continue;
        }
        let made = |c: u64| {
            c >= n.start_op && c < n.start_op + n.len && n.deletes.binary_search(&c).is_err()
        };
        if needed
            .iter()
            .any(|&(c, a)| a == n.actor && !made(c) && c >= n.start_op && c < n.start_op + n.len)
        {
            return Err(BadChange::Op {
                index: 0,
                why: "names a delete as an element",
            });
        }
        needed.retain(|&(c, a)| !(a == n.actor && made(c)));
        for d in &n.deps {
            if *d != g && seen.insert(*d) {
                stack.push(*d);
            }
        }
    }
    Ok(())
}

/// Builds the change of a local edit (module docs) for the text op with
/// `actor`: against `base`, or the text in the causal past `in_past`.
pub fn edit(
    field: Option<&Field>,
    e: &TextEdit,
    actor: [u8; ACTOR_BYTES],
    in_past: impl Fn(&EventId) -> bool,
) -> Result<Vec<u8>, EditError> {
    if e.splices.len() > MAX_SPLICES {
        return Err(EditError::TooManySplices {
            field: e.field.clone(),
            got: e.splices.len(),
        });
    }
    let empty = Field::default();
    let f = field.unwrap_or(&empty);
    let mut doc = f.doc.clone();
    let at: Option<Vec<ChangeHash>> = match &e.base {
        Some(base) => {
            for h in base {
                if !f.effect.contains(&ChangeHash(*h)) {
                    return Err(EditError::UnknownBase {
                        field: e.field.clone(),
                        head: *h,
                    });
                }
            }
            let mut heads: Vec<ChangeHash> = base.iter().map(|h| ChangeHash(*h)).collect();
            if heads.is_empty() {
                heads.push(genesis().hash);
            }
            Some(heads)
        }
        None => f.heads_in_past(&in_past),
    };
    if let Some(heads) = at {
        // Every head is in the document (checked, or in effect).
        doc = doc.fork_at(&heads).expect("fork at heads held");
    }
    doc.set_actor(ActorId::from(actor));
    let obj = text_obj(&doc);
    for (index, s) in e.splices.iter().enumerate() {
        // The text object exists: reading it cannot fail.
        let text = doc.text(&obj).expect("read the text object");
        let (pos, end) = match utf16_range(&text, s.pos, s.delete) {
            Some(r) => r,
            None => {
                return Err(EditError::Position {
                    field: e.field.clone(),
                    index,
                    pos: s.pos,
                    delete: s.delete,
                    len: text.encode_utf16().count() as u64,
                })
            }
        };
        // In range and on character boundaries (checked just above).
        doc.splice_text(&obj, pos, (end - pos) as isize, &s.insert)
            .expect("splice in range");
    }
    if doc
        .commit_with(CommitOptions::default().with_time(0))
        .is_none()
    {
        return Err(EditError::Empty(e.field.clone()));
    }
    // Just committed.
    let change = doc.get_last_local_change().expect("a local change");
    Ok(change.raw_bytes().to_vec())
}

/// `pos..pos + delete` in UTF-16 units, if both ends fall on character
/// boundaries of `text`.
fn utf16_range(text: &str, pos: u64, delete: u64) -> Option<(usize, usize)> {
    let end = pos.checked_add(delete)?;
    let (mut ok_pos, mut ok_end) = (pos == 0, end == 0);
    let mut at = 0u64;
    for c in text.chars() {
        at += c.len_utf16() as u64;
        ok_pos |= at == pos;
        ok_end |= at == end;
    }
    if !(ok_pos && ok_end) {
        return None;
    }
    Some((usize::try_from(pos).ok()?, usize::try_from(end).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Meta, Op};
    use crate::state::{Draft, Inserted, Invalid, PrepareError, State};
    use crate::testkit::Desk;
    use proptest::prelude::*;

    /// A wall time: 2023-11-14.
    const T: u64 = 1_700_000_000_000;

    /// The notes' view of a desk: the `notes` field of `attendee/1`.
    trait Typist {
        fn splice(&mut self, wall: u64, splices: &[(u64, u64, &str)]) -> EventId;
        fn notes(&self) -> Text;
    }

    impl Typist for Desk {
        fn splice(&mut self, wall: u64, splices: &[(u64, u64, &str)]) -> EventId {
            self.append(wall, notes(splices, None, None))
                .expect("a valid splice")
        }

        fn notes(&self) -> Text {
            self.state
                .stream("attendee/1")
                .and_then(|s| s.text("notes"))
                .cloned()
                .unwrap_or_default()
        }
    }

    fn notes(splices: &[(u64, u64, &str)], base: Option<Vec<Head>>, cmd: Option<&str>) -> Draft {
        Draft {
            stream: "attendee/1".into(),
            kind: "NotesEdited".into(),
            texts: vec![TextEdit {
                field: "notes".into(),
                splices: splices
                    .iter()
                    .map(|&(pos, delete, insert)| Splice {
                        pos,
                        delete,
                        insert: insert.into(),
                    })
                    .collect(),
                base,
            }],
            meta: Meta {
                command_id: cmd.map(str::to_string),
                user: None,
            },
            ..Draft::default()
        }
    }

    /// Two desks that type into one note at once both keep their words,
    /// merged character by character, and show the same text and hash.
    #[test]
    fn concurrent_edits_merge_character_by_character() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        a.splice(T, &[(0, 0, "vegan")]);
        b.learn(&a.log.clone(), T + 1);
        a.splice(T + 10, &[(0, 0, "strict ")]);
        b.splice(T + 11, &[(5, 0, ", no nuts")]);
        let (ha, hb) = (a.log.clone(), b.log.clone());
        a.learn(&hb, T + 20);
        b.learn(&ha, T + 20);
        assert_eq!(a.notes().text, "strict vegan, no nuts");
        assert_eq!(a.notes(), b.notes());
        assert_eq!(a.notes().heads.len(), 2, "two concurrent heads");
        assert_eq!(a.state.state_hash(), b.state.state_hash());
        // Both insert at one position: both survive, in one order.
        a.splice(T + 30, &[(0, 0, "A")]);
        b.splice(T + 31, &[(0, 0, "B")]);
        let (ha, hb) = (a.log.clone(), b.log.clone());
        a.learn(&hb, T + 40);
        b.learn(&ha, T + 40);
        let t = a.notes().text;
        assert!(
            t == "ABstrict vegan, no nuts" || t == "BAstrict vegan, no nuts",
            "{t}"
        );
        assert_eq!(a.state.state_hash(), b.state.state_hash());
    }

    /// Positions count UTF-16 code units: an emoji is two, and a position
    /// inside it is refused.
    #[test]
    fn positions_count_utf16_units() {
        let mut a = Desk::new(1);
        a.splice(T, &[(0, 0, "a😀é")]);
        a.splice(T + 1, &[(3, 0, "b")]);
        assert_eq!(a.notes().text, "a😀bé");
        let err = a
            .append(T + 2, notes(&[(2, 0, "x")], None, None))
            .unwrap_err();
        assert!(
            matches!(err, PrepareError::Text(EditError::Position { len: 5, .. })),
            "{err}"
        );
        let err = a
            .append(T + 2, notes(&[(0, 9, "")], None, None))
            .unwrap_err();
        assert!(matches!(
            err,
            PrepareError::Text(EditError::Position { .. })
        ));
        // Splices apply in order; deleting an emoji deletes two units.
        a.splice(T + 3, &[(1, 2, ""), (0, 0, ">")]);
        assert_eq!(a.notes().text, ">abé");
    }

    /// `base` edits the document at the heads a client saw; the change
    /// merges with what came since. Unknown heads are refused.
    #[test]
    fn an_edit_at_stale_heads_is_rebased_and_unknown_heads_refused() {
        let mut a = Desk::new(1);
        a.splice(T, &[(0, 0, "hello")]);
        let seen = a.notes().heads;
        a.splice(T + 1, &[(0, 0, "oh, ")]);
        a.append(T + 2, notes(&[(5, 0, " world")], Some(seen), None))
            .unwrap();
        assert_eq!(a.notes().text, "oh, hello world");
        let err = a
            .append(T + 3, notes(&[(0, 0, "x")], Some(vec![[7; 32]]), None))
            .unwrap_err();
        assert!(
            matches!(err, PrepareError::Text(EditError::UnknownBase { .. })),
            "{err}"
        );
        // An empty base is the empty text: "!" is concurrent with every
        // insert at the start, and automerge orders them.
        a.append(T + 4, notes(&[(0, 0, "!")], Some(vec![]), None))
            .unwrap();
        let t = a.notes().text;
        assert_eq!(t.replace('!', ""), "oh, hello world", "{t}");
    }

    /// A change is refused unless it is what the event's author could have
    /// made in its causal past: the derived actor, deps in the past, text
    /// edits only.
    #[test]
    fn forged_changes_are_refused() {
        let mut a = Desk::new(1);
        let b = Desk::new(2);
        a.splice(T, &[(0, 0, "abc")]);
        let Op::Text { change, .. } = a.log[0].0.ops[0].clone() else {
            unreachable!()
        };
        let raw = |change: Vec<u8>| Draft {
            stream: "attendee/1".into(),
            kind: "K".into(),
            ops: vec![Op::Text {
                field: "notes".into(),
                change,
            }],
            ..Draft::default()
        };
        let refused = |r: Result<EventId, PrepareError>| match r {
            Err(PrepareError::Invalid(Invalid::BadText { why, .. })) => why,
            other => panic!("not refused: {other:?}"),
        };
        // Another event carrying a's change: not its actor.
        let why = refused(a.append(T + 1, raw(change.clone())));
        assert!(matches!(why, BadChange::Actor { .. }), "{why}");
        assert!(matches!(
            refused(a.append(T + 1, raw(vec![1, 2, 3]))),
            BadChange::Decode(_)
        ));
        // b builds on a's change without having a's event in its past.
        let field = &a.state.stream("attendee/1").unwrap().texts["notes"];
        let hlc = Hlc(1 << 40);
        let e = TextEdit {
            field: "notes".into(),
            splices: vec![Splice {
                pos: 3,
                delete: 0,
                insert: "d".into(),
            }],
            base: None,
        };
        let forged = edit(Some(field), &e, actor(&b.id, 1, hlc, 0), |_| true).unwrap();
        let ev = Event {
            version: 2,
            author: b.id,
            seq: 1,
            prev: None,
            deps: vec![],
            hlc,
            stream: "attendee/1".into(),
            kind: "K".into(),
            ops: vec![Op::Text {
                field: "notes".into(),
                change: forged,
            }],
            payload: vec![],
            meta: Meta::default(),
        };
        let mut c = Desk::new(3);
        c.learn(&a.log.clone(), T);
        let (_, id) = ev.seal();
        let err = c.state.insert(&ev, id).unwrap_err();
        assert!(
            matches!(
                err,
                Invalid::BadText {
                    why: BadChange::UnknownDep(_),
                    ..
                }
            ),
            "{err}"
        );
    }

    /// An op that names a delete as if it made an element is refused.
    #[test]
    fn an_insert_after_a_delete_op_is_refused() {
        let mut a = Desk::new(1);
        a.splice(T, &[(0, 0, "ab")]);
        let field = &a.state.stream("attendee/1").unwrap().texts["notes"];
        let who = actor(&a.id, 2, Hlc(1 << 50), 0);
        let e = TextEdit {
            field: "notes".into(),
            splices: vec![
                Splice {
                    pos: 0,
                    delete: 1,
                    insert: String::new(),
                },
                Splice {
                    pos: 0,
                    delete: 0,
                    insert: "x".into(),
                },
            ],
            base: None,
        };
        let good = edit(Some(field), &e, who, |_| true).unwrap();
        assert_eq!(check(Some(field), &good, who, |_| true), Ok(()));
        let mut x = Change::try_from(&good[..]).unwrap().decode();
        let (legacy::OpType::Delete, legacy::OpType::Put(_)) =
            (&x.operations[0].action, &x.operations[1].action)
        else {
            panic!("{:?}", x.operations);
        };
        let del = legacy::OpId(x.start_op.get(), ActorId::from(who));
        x.operations[1].key = legacy::Key::Seq(legacy::ElementId::Id(del));
        x.hash = None;
        let mut forged = Change::from(x);
        let bytes = forged.bytes().to_vec();
        assert_eq!(
            check(Some(field), &bytes, who, |_| true),
            Err(BadChange::Op {
                index: 1,
                why: "names a delete as an element"
            })
        );
    }

    /// A command carried out at two desks: the first in canonical order
    /// takes effect, the other's text change is undone once that one
    /// arrives, and so is the change built on it; every delivery order
    /// shows the same text and hash.
    #[test]
    fn a_duplicates_text_change_is_undone_with_what_builds_on_it() {
        let (mut a, mut b) = (Desk::new(1), Desk::new(2));
        b.append(T, notes(&[(0, 0, "VIP")], None, Some("c-1")))
            .unwrap();
        a.append(T + 10, notes(&[(0, 0, "guest")], None, Some("c-1")))
            .unwrap();
        a.splice(T + 11, &[(5, 0, " of honour")]);
        assert_eq!(a.notes().text, "guest of honour");
        let (ha, hb) = (a.log.clone(), b.log.clone());
        a.learn(&hb, T + 20);
        b.learn(&ha, T + 20);
        assert_eq!(
            a.notes().text,
            "VIP",
            "the duplicate and its follower undone"
        );
        assert_eq!(b.notes(), a.notes());
        assert_eq!(a.state.state_hash(), b.state.state_hash());
        // A later edit builds on what is shown.
        a.splice(T + 30, &[(3, 0, "!")]);
        b.learn(&a.log.clone(), T + 31);
        assert_eq!(b.notes().text, "VIP!");
        assert_eq!(a.state.state_hash(), b.state.state_hash());
    }

    /// Two fork branches with one author, seq and hlc derive one actor:
    /// only the change of the first in canonical order takes effect, in
    /// either delivery order.
    #[test]
    fn fork_branches_sharing_an_actor_keep_the_first() {
        let mut a = Desk::new(1);
        a.splice(T, &[(0, 0, "base")]);
        let mut copy = Desk::new(1);
        copy.learn(&a.log.clone(), T);
        copy.clock = a.clock.clone();
        let x = a.splice(T + 5, &[(4, 0, " X")]);
        let y = copy.splice(T + 5, &[(4, 0, " Y")]);
        let (ex, ey) = (a.log[1].0.clone(), copy.log[1].0.clone());
        assert_eq!((ex.seq, ex.hlc), (ey.seq, ey.hlc), "one actor");
        let mut shown = Vec::new();
        for order in [[(ex.clone(), x), (ey.clone(), y)], [(ey, y), (ex, x)]] {
            let mut r = Desk::new(9);
            r.learn(&a.log[..1], T);
            r.learn(&order, T + 6);
            shown.push((r.notes(), r.state.state_hash()));
        }
        assert_eq!(shown[0], shown[1]);
        let first = if x < y { "base X" } else { "base Y" };
        assert_eq!(shown[0].0.text, first);
    }

    /// Every replica builds the same genesis.
    #[test]
    fn the_genesis_is_fixed() {
        assert_eq!(genesis_actor(), genesis_actor());
        let c = Change::try_from(genesis_bytes()).unwrap();
        assert_eq!(c.hash().0, genesis_hash());
        assert_eq!((c.seq(), c.timestamp(), c.len()), (1, 0, 1));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Edit {
            desk: usize,
            at: u16,
            delete: u8,
            insert: String,
        },
        Sync {
            from: usize,
            to: usize,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..3usize, any::<u16>(), 0..4u8, "[a-c😀é]{0,3}").prop_map(
                |(desk, at, delete, insert)| Step::Edit { desk, at, delete, insert }
            ),
            1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
        ]
    }

    /// A splice that fits `text` (UTF-16 positions on character
    /// boundaries), chosen by `at` and `delete`.
    fn fitting(text: &str, at: u16, delete: u8) -> (u64, u64) {
        let mut bounds = vec![0u64];
        let mut n = 0;
        for c in text.chars() {
            n += c.len_utf16() as u64;
            bounds.push(n);
        }
        let i = at as usize % bounds.len();
        let j = (i + delete as usize).min(bounds.len() - 1);
        (bounds[i], bounds[j] - bounds[i])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random concurrent splices on three desks, exchanged at random,
        /// then delivered to a fresh replica in a random causal order: every
        /// replica shows the same text, heads and state hash.
        #[test]
        fn random_concurrent_splices_converge(
            steps in proptest::collection::vec(step(), 1..40),
            seed in any::<u64>(),
        ) {
            let mut desks = [Desk::new(1), Desk::new(2), Desk::new(3)];
            for (i, s) in steps.iter().enumerate() {
                let wall = T + i as u64 * 10;
                match s {
                    Step::Edit { desk, at, delete, insert } => {
                        let d = &mut desks[*desk];
                        let (pos, del) = fitting(&d.notes().text, *at, *delete);
                        match d.append(wall, notes(&[(pos, del, insert)], None, None)) {
                            Ok(_) | Err(PrepareError::Text(EditError::Empty(_))) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Step::Sync { from, to } => {
                        let held = desks[*from].log.clone();
                        desks[*to].learn(&held, wall);
                    }
                }
            }
            for to in 0..3 {
                for from in 0..3 {
                    let held = desks[from].log.clone();
                    desks[to].learn(&held, T + 1_000_000);
                }
            }
            // A fresh replica: every event, in a random causal order.
            let mut pending = desks[0].log.clone();
            let mut fresh = State::new();
            let mut rng = seed | 1;
            while !pending.is_empty() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let ready: Vec<usize> = (0..pending.len())
                    .filter(|&i| {
                        let e = &pending[i].0;
                        e.prev.iter().chain(&e.deps).all(|d| fresh.contains(d))
                    })
                    .collect();
                let (e, id) = pending.remove(ready[(rng % ready.len() as u64) as usize]);
                prop_assert_eq!(fresh.insert(&e, id), Ok(Inserted::New));
            }
            let text = desks[0].notes();
            for d in &desks {
                prop_assert_eq!(&d.notes(), &text);
                prop_assert_eq!(d.state.state_hash(), desks[0].state.state_hash());
            }
            prop_assert_eq!(fresh.state_hash(), desks[0].state.state_hash());
        }
    }
}
