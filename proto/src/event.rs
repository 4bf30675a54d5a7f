//! Events, their canonical encoding, ids, limits and signatures.
//!
//! An [`Event`] is immutable once made. Its canonical encoding is postcard
//! over the struct as declared here (field order is the encoding order), and
//! its [`EventId`] is blake3 of those bytes. `PROTOCOL.md` specifies the
//! bytes; `tests/vectors.rs` checks the vectors printed there.
//!
//! Signatures are not part of the event: an author signs the id of the last
//! event of each batch it commits, and that signature covers every earlier
//! event of the author through the `prev` hash chain.
//!
//! Verification is strict (`PROTOCOL.md` §3): the author must be a usable
//! key ([`NodeId::check_key`]: canonical, not of small order), S must be
//! below the group order, R must pass the same point rule as a key, and the
//! cofactorless equation must hold, which is ed25519-dalek 2's
//! `verify_strict` plus the key check. A lenient verifier accepts, for a
//! small-order key, signatures that anyone can make without a secret key;
//! replicas that verified differently would disagree on which events exist.

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::id::{check_encoding, Dot, EventId, KeyError, NodeId, PointFault};

/// The newest event format version this crate reads and writes. An event
/// carries the lowest version that has every op it holds
/// ([`Event::version_for`]): version 1 for the ops of the first format
/// (registers, counters, escrow init, transfer and consume), version 2 once
/// it holds a seat policy, an overdraft sale or a text change. So events
/// that use no new op keep their bytes and ids.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest event format version this crate reads.
pub const MIN_FORMAT_VERSION: u8 = 1;
/// Longest automerge change one text op carries, in bytes.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Longest stream name, in bytes.
pub const MAX_STREAM_BYTES: usize = 256;
/// Longest kind, in bytes.
pub const MAX_KIND_BYTES: usize = 128;
/// Longest payload, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most ops in one event.
pub const MAX_OPS: usize = 1024;
/// Longest field or counter name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest register value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most dots one `Set` may supersede, and most deps of one event.
pub const MAX_DOTS: usize = 1024;
/// Longest command id or acting user, in bytes.
pub const MAX_META_BYTES: usize = 256;
/// Largest canonical encoding of one event, in bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Domain separation for signatures: an author signs `SIG_CONTEXT ‖ id`.
const SIG_CONTEXT: &[u8] = b"weftlog/v1/event-id";

/// One event. See `DESIGN.md` §2 for the meaning of each field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Format version: [`Event::version_for`] its ops.
    pub version: u8,
    /// The node that made the event; its encoding must pass
    /// [`NodeId::check_encoding`].
    pub author: NodeId,
    /// 1, 2, 3 … in the author's chain, no gaps.
    pub seq: u64,
    /// Id of the author's previous event; `None` exactly when `seq == 1`.
    pub prev: Option<EventId>,
    /// Other events the author had seen and that `prev` does not imply;
    /// sorted ascending, no duplicates.
    pub deps: Vec<EventId>,
    /// Strictly greater than the hlc of `prev` and of every dep.
    pub hlc: Hlc,
    /// The aggregate the event belongs to, e.g. `customer/123`.
    pub stream: String,
    /// What the user meant, e.g. `SeatsPurchased`.
    pub kind: String,
    /// The event's effects on CRDT state, applied in order.
    pub ops: Vec<Op>,
    /// Application bytes, usually JSON.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Idempotency key and acting user.
    pub meta: Meta,
}

/// Who did it and under which command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Idempotency key: a command id is applied at most once per log.
    pub command_id: Option<String>,
    /// The acting user, as the application names them.
    pub user: Option<String>,
}

/// A CRDT effect. `PROTOCOL.md` gives the variant tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Multi-value register write. Removes exactly the writes named in
    /// `supersedes` (which must lie in the event's causal past).
    Set {
        /// Field name.
        field: String,
        /// The value, canonical JSON text by convention.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The writes to this field that the author saw, sorted ascending.
        supersedes: Vec<Dot>,
    },
    /// PN-counter increment (negative to decrement).
    Add {
        /// Counter name.
        counter: String,
        /// Signed change.
        delta: i64,
    },
    /// Bounded counter: add `capacity` to the counter, with the rights to it
    /// held by the author.
    EscrowInit {
        /// Counter name.
        counter: String,
        /// Capacity added; at least 1.
        capacity: u64,
    },
    /// Bounded counter: move `amount` of the author's rights to `to`.
    EscrowTransfer {
        /// Counter name.
        counter: String,
        /// The node receiving the rights; not the author, and a usable key
        /// ([`NodeId::check_key`]).
        to: NodeId,
        /// Rights moved; at least 1.
        amount: u64,
    },
    /// Bounded counter: use up `amount` of the author's rights.
    EscrowConsume {
        /// Counter name.
        counter: String,
        /// Rights consumed; at least 1.
        amount: u64,
    },
    /// Bounded counter: the seat policy of `counter`. The policies of a
    /// counter form a multi-value register: a policy op removes exactly the
    /// policy ops named in `supersedes` (which must lie in the event's
    /// causal past). Format version 2.
    EscrowPolicy {
        /// Counter name.
        counter: String,
        /// The policy.
        policy: Policy,
        /// The policy writes of this counter the author saw, sorted ascending.
        supersedes: Vec<Dot>,
    },
    /// Bounded counter: a sale under a `risk-window` policy that may use
    /// rights beyond those the author holds, up to the policy's
    /// `max_overdraft`; the figures the selling node judged its admission
    /// by are recorded for audit and judged by no other replica. Format
    /// version 2.
    EscrowOverdraw {
        /// Counter name.
        counter: String,
        /// Rights consumed; at least 1.
        amount: u64,
        /// Milliseconds since the selling node's last successful sync
        /// round, by its own clock, when it sold.
        synced_ms_ago: u64,
        /// Capacity left unsold on the counter, as the selling node knew
        /// it at that round.
        remaining_at_sync: u64,
    },
    /// A text field merged with automerge: `change` is one automerge
    /// change (its compressed-or-not binary chunk) to the field's document.
    /// Format version 2.
    Text {
        /// Field name.
        field: String,
        /// The automerge change bytes.
        #[serde(with = "serde_bytes")]
        change: Vec<u8>,
    },
}

/// How a bounded counter may be sold (`DESIGN.md` §1, the venue's seat
/// policies). Set per counter by [`Op::EscrowPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    /// The rule.
    pub mode: PolicyMode,
    /// `risk-window`: the longest time since the last successful sync in
    /// which a node may still overdraw; `strict`: the longest time since a
    /// peer was last reached in which a node may still sell. Seconds.
    pub window_s: u32,
    /// `risk-window`: the least share of the capacity, in percent, that
    /// must have been unsold at the last successful sync for a node to
    /// overdraw. At most 100.
    pub min_remaining_pct: u8,
    /// `risk-window`: how far below zero an author's rights may go.
    pub max_overdraft: u64,
    /// What the node that detects an oversold sale writes at once.
    pub on_oversell: Compensation,
    /// How long after the automatic compensation staff may override it, in
    /// seconds of hlc.
    pub override_s: u32,
}

impl Policy {
    /// `mode` with the defaults of its other settings: a one-hour risk
    /// window (`window_s` 3600; 30 under `strict`), 10 % of the capacity
    /// unsold at the last sync, an overdraft of at most 5 seats, oversold
    /// sales put on the waitlist, and one hour for staff to override that.
    pub fn new(mode: PolicyMode) -> Policy {
        Policy {
            mode,
            window_s: match mode {
                PolicyMode::Strict => 30,
                PolicyMode::Escrow | PolicyMode::RiskWindow => 3600,
            },
            min_remaining_pct: 10,
            max_overdraft: match mode {
                PolicyMode::RiskWindow => 5,
                PolicyMode::Escrow | PolicyMode::Strict => 0,
            },
            on_oversell: Compensation::Waitlist,
            override_s: 3600,
        }
    }

    /// Sets one setting by the name the CLI and the HTTP body use
    /// (`window_s`, `min_remaining_pct`, `max_overdraft`, `on_oversell`,
    /// `override_s`), from its text form.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{key}: {v:?} is not a whole number in range"))
        }
        match key {
            "window_s" => self.window_s = num(key, value)?,
            "min_remaining_pct" => {
                let pct: u8 = num(key, value)?;
                if pct > 100 {
                    return Err(format!("{key}: {pct} is above 100"));
                }
                self.min_remaining_pct = pct;
            }
            "max_overdraft" => self.max_overdraft = num(key, value)?,
            "on_oversell" => self.on_oversell = value.parse()?,
            "override_s" => self.override_s = num(key, value)?,
            "mode" => return Err("mode is given first, as MODE".into()),
            _ => {
                return Err(format!(
                    "unknown policy setting {key:?} (known: window_s, min_remaining_pct, \
                     max_overdraft, on_oversell, override_s)"
                ))
            }
        }
        Ok(())
    }

    /// Parses `MODE[,key=value...]`, the CLI's form (`risk-window,max_overdraft=3`).
    pub fn parse_spec(spec: &str) -> Result<Policy, String> {
        let mut parts = spec.split(',');
        let mode: PolicyMode = parts.next().unwrap_or_default().trim().parse()?;
        let mut policy = Policy::new(mode);
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            policy.set(k.trim(), v.trim())?;
        }
        Ok(policy)
    }
}

impl PolicyMode {
    /// Every mode, in the order of their tags.
    pub const ALL: [PolicyMode; 3] = [
        PolicyMode::Escrow,
        PolicyMode::RiskWindow,
        PolicyMode::Strict,
    ];

    /// The name the CLI, the HTTP API and the JSON forms use.
    pub fn name(self) -> &'static str {
        match self {
            PolicyMode::Escrow => "escrow",
            PolicyMode::RiskWindow => "risk-window",
            PolicyMode::Strict => "strict",
        }
    }
}

impl std::str::FromStr for PolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<PolicyMode, String> {
        PolicyMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown seat policy {s:?} (known: escrow, risk-window, strict)")
            })
    }
}

impl Compensation {
    /// Every compensation, in the order of their tags.
    pub const ALL: [Compensation; 4] = [
        Compensation::Notify,
        Compensation::Cancel,
        Compensation::Waitlist,
        Compensation::Honour,
    ];

    /// The name the CLI, the HTTP API and the JSON forms use.
    pub fn name(self) -> &'static str {
        match self {
            Compensation::Notify => "notify",
            Compensation::Cancel => "cancel",
            Compensation::Waitlist => "waitlist",
            Compensation::Honour => "honour",
        }
    }
}

impl std::str::FromStr for Compensation {
    type Err = String;
    fn from_str(s: &str) -> Result<Compensation, String> {
        Compensation::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!("unknown compensation {s:?} (known: notify, cancel, waitlist, honour)")
            })
    }
}

/// A seat policy's rule ([`Policy::mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyMode {
    /// Sell only rights held in the causal past.
    Escrow,
    /// Escrow, and beyond it sell offline up to `max_overdraft` seats.
    RiskWindow,
    /// Escrow, and refuse to sell while no peer has been reached within
    /// `window_s`.
    Strict,
}

/// What is done about an oversold sale: the value of its compensation
/// register `oversold/<sale id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Compensation {
    /// The staff on site are told; the seat stays taken until they decide.
    Notify,
    /// The sale is cancelled and its seat released.
    Cancel,
    /// The registrant joins the session's waitlist and the seat is released.
    Waitlist,
    /// The ticket is honoured: the seat is kept and the capacity raised.
    Honour,
}

/// Why an event is malformed on its own, before any state is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The bytes are not a postcard-encoded event.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// The version is not the lowest that has the event's ops
    /// ([`Event::version_for`]).
    #[error("event format version {got}, but its ops need version {want} exactly")]
    WrongVersion {
        /// The event's version.
        got: u8,
        /// The version its ops call for.
        want: u8,
    },
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("non-canonical encoding")]
    NonCanonical,
    /// Bytes left over after the event.
    #[error("{0} trailing bytes after the event")]
    Trailing(usize),
    /// A format version this build does not know.
    #[error("unsupported event format version {0} (this build reads versions {MIN_FORMAT_VERSION} to {MIN_FORMAT_VERSION})")]
    UnknownVersion(u8),
    /// The encoding exceeds [`MAX_EVENT_BYTES`].
    #[error("event is {0} bytes, the limit is {MAX_EVENT_BYTES}")]
    TooLarge(usize),
    /// A named limit is exceeded.
    #[error("{what} is {got}, the limit is {limit}")]
    Limit {
        /// What exceeded its limit.
        what: &'static str,
        /// Its size.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// A required name is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// `seq` and `prev` disagree (`prev` must be absent exactly for seq 1).
    #[error("seq {seq} with {} prev", if *.has_prev { "a" } else { "no" })]
    BadChainStart {
        /// The event's seq.
        seq: u64,
        /// Whether it has a prev.
        has_prev: bool,
    },
    /// Deps or supersedes not strictly ascending.
    #[error("{0} are not sorted ascending without duplicates")]
    Unsorted(&'static str),
    /// The author is not a usable ed25519 key ([`NodeId::check_key`]).
    #[error("bad author: {0}")]
    BadAuthor(KeyError),
    /// An escrow transfer's recipient is not a usable ed25519 key
    /// ([`NodeId::check_key`]).
    #[error("invalid escrow op on {counter:?}: bad recipient: {key}")]
    BadRecipient {
        /// Counter name.
        counter: String,
        /// Why the recipient was refused.
        key: KeyError,
    },
    /// The hlc is beyond [`Hlc::MAX`].
    #[error("hlc {0} is beyond the last valid timestamp (year 9999)")]
    ClockOutOfRange(Hlc),
    /// An escrow amount of zero, or a transfer to oneself.
    #[error("invalid escrow op on {counter:?}: {why}")]
    BadEscrow {
        /// Counter name.
        counter: String,
        /// What is wrong.
        why: &'static str,
    },
}

fn limit(what: &'static str, got: usize, limit: usize) -> Result<(), EventError> {
    if got > limit {
        Err(EventError::Limit { what, got, limit })
    } else {
        Ok(())
    }
}

fn name(what: &'static str, s: &str, max: usize) -> Result<(), EventError> {
    if s.is_empty() {
        return Err(EventError::Empty(what));
    }
    limit(what, s.len(), max)
}

fn strictly_ascending<T: Ord>(items: &[T]) -> bool {
    items.windows(2).all(|w| w[0] < w[1])
}

impl Event {
    /// Checks the event's limits and the rules that need no other event,
    /// among them the key rule (`PROTOCOL.md` §3) on the author and on every
    /// escrow transfer's recipient.
    pub fn check(&self) -> Result<(), EventError> {
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.version) {
            return Err(EventError::UnknownVersion(self.version));
        }
        let want = Event::version_for(&self.ops);
        if self.version != want {
            return Err(EventError::WrongVersion {
                got: self.version,
                want,
            });
        }
        // The encoding only: decoding the point costs microseconds, and a
        // key that is no point fails its signature anyway.
        self.author
            .check_encoding()
            .map_err(EventError::BadAuthor)?;
        if (self.seq == 1) != self.prev.is_none() || self.seq == 0 {
            return Err(EventError::BadChainStart {
                seq: self.seq,
                has_prev: self.prev.is_some(),
            });
        }
        if self.hlc > Hlc::MAX {
            return Err(EventError::ClockOutOfRange(self.hlc));
        }
        name("stream", &self.stream, MAX_STREAM_BYTES)?;
        name("kind", &self.kind, MAX_KIND_BYTES)?;
        limit("payload", self.payload.len(), MAX_PAYLOAD_BYTES)?;
        limit("ops", self.ops.len(), MAX_OPS)?;
        limit("deps", self.deps.len(), MAX_DOTS)?;
        if !strictly_ascending(&self.deps) {
            return Err(EventError::Unsorted("deps"));
        }
        for m in [&self.meta.command_id, &self.meta.user]
            .into_iter()
            .flatten()
        {
            limit("meta string", m.len(), MAX_META_BYTES)?;
        }
        for op in &self.ops {
            op.check(self.author)?;
        }
        Ok(())
    }

    /// The format version an event holding `ops` carries: the lowest that
    /// has every one of them.
    pub fn version_for(ops: &[Op]) -> u8 {
        ops.iter()
            .map(Op::min_version)
            .max()
            .unwrap_or(MIN_FORMAT_VERSION)
    }

    /// The canonical encoding, appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail and every field type is encodable.
        let bytes = postcard::to_extend(self, std::mem::take(out)).expect("encode to Vec");
        *out = bytes;
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.payload.len());
        self.encode_into(&mut out);
        out
    }

    /// The canonical encoding and the id.
    pub fn seal(&self) -> (Vec<u8>, EventId) {
        let bytes = self.encode();
        let id = EventId(*blake3::hash(&bytes).as_bytes());
        (bytes, id)
    }

    /// Decodes `bytes` without checking canonicality or limits: for records
    /// whose id was already checked against bytes this node wrote.
    pub fn decode_trusted(bytes: &[u8]) -> Result<Event, EventError> {
        let (event, rest): (Event, _) =
            postcard::take_from_bytes(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(EventError::Trailing(rest.len()));
        }
        Ok(event)
    }

    /// Decodes bytes from outside: size, canonical form and limits are all
    /// checked. Returns the event and its id.
    pub fn decode(bytes: &[u8]) -> Result<(Event, EventId), EventError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge(bytes.len()));
        }
        // The version is the first byte (a u8 is encoded as itself), so an
        // event of a newer format is named as such rather than as garbage.
        match bytes.first() {
            Some(&v) if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&v) => {
                return Err(EventError::UnknownVersion(v))
            }
            _ => {}
        }
        let event = Event::decode_trusted(bytes)?;
        if event.encode() != bytes {
            return Err(EventError::NonCanonical);
        }
        event.check()?;
        Ok((event, EventId(*blake3::hash(bytes).as_bytes())))
    }
}

impl Op {
    /// The field or counter the op touches.
    pub fn target(&self) -> &str {
        match self {
            Op::Set { field, .. } => field,
            Op::Text { field, .. } => field,
            Op::Add { counter, .. }
            | Op::EscrowInit { counter, .. }
            | Op::EscrowTransfer { counter, .. }
            | Op::EscrowConsume { counter, .. }
            | Op::EscrowPolicy { counter, .. }
            | Op::EscrowOverdraw { counter, .. } => counter,
        }
    }

    /// The op's name, as `PROTOCOL.md` and the JSON forms spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Set { .. } => "set",
            Op::Add { .. } => "add",
            Op::EscrowInit { .. } => "escrow_init",
            Op::EscrowTransfer { .. } => "escrow_transfer",
            Op::EscrowConsume { .. } => "escrow_consume",
            Op::EscrowPolicy { .. } => "escrow_policy",
            Op::EscrowOverdraw { .. } => "escrow_overdraw",
            Op::Text { .. } => "text",
        }
    }

    /// The lowest event format version that has this op.
    pub fn min_version(&self) -> u8 {
        match self {
            Op::Set { .. }
            | Op::Add { .. }
            | Op::EscrowInit { .. }
            | Op::EscrowTransfer { .. }
            | Op::EscrowConsume { .. } => 1,
            Op::EscrowPolicy { .. } | Op::EscrowOverdraw { .. } | Op::Text { .. } => 2,
        }
    }

    /// Whether the op works on a bounded (escrow) counter.
    pub fn is_escrow(&self) -> bool {
        matches!(
            self,
            Op::EscrowInit { .. }
                | Op::EscrowTransfer { .. }
                | Op::EscrowConsume { .. }
                | Op::EscrowPolicy { .. }
                | Op::EscrowOverdraw { .. }
        )
    }

    fn check(&self, author: NodeId) -> Result<(), EventError> {
        name("field or counter name", self.target(), MAX_NAME_BYTES)?;
        let bad = |why| EventError::BadEscrow {
            counter: self.target().to_string(),
            why,
        };
        match self {
            Op::Set {
                value, supersedes, ..
            } => {
                limit("value", value.len(), MAX_VALUE_BYTES)?;
                limit("supersedes", supersedes.len(), MAX_DOTS)?;
                if !strictly_ascending(supersedes) {
                    return Err(EventError::Unsorted("supersedes"));
                }
            }
            Op::Add { .. } => {}
            Op::EscrowInit { capacity: 0, .. }
            | Op::EscrowTransfer { amount: 0, .. }
            | Op::EscrowConsume { amount: 0, .. }
            | Op::EscrowOverdraw { amount: 0, .. } => return Err(bad("amount is zero")),
            Op::EscrowPolicy {
                policy, supersedes, ..
            } => {
                limit("supersedes", supersedes.len(), MAX_DOTS)?;
                if !strictly_ascending(supersedes) {
                    return Err(EventError::Unsorted("supersedes"));
                }
                if policy.min_remaining_pct > 100 {
                    return Err(bad("min_remaining_pct is above 100"));
                }
            }
            Op::EscrowOverdraw { .. } => {}
            Op::Text { change, .. } => {
                if change.is_empty() {
                    return Err(EventError::Empty("text change"));
                }
                limit("text change", change.len(), MAX_CHANGE_BYTES)?;
            }
            Op::EscrowTransfer { to, .. } if *to == author => {
                return Err(bad("transfer to its own author"))
            }
            Op::EscrowTransfer { counter, to, .. } => {
                to.check_key().map_err(|key| EventError::BadRecipient {
                    counter: counter.clone(),
                    key,
                })?;
            }
            Op::EscrowInit { .. } | Op::EscrowConsume { .. } => {}
        }
        Ok(())
    }
}

/// A 64-byte ed25519 signature by an event's author over its id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The author is not a usable ed25519 key ([`NodeId::check_key`]).
    #[error("{0}")]
    BadKey(#[from] KeyError),
    /// S is not below the group order L: a second encoding of a scalar.
    #[error("the signature's S is not below the group order (a non-canonical scalar)")]
    NonCanonicalS,
    /// R is not the canonical encoding of a point of large order.
    #[error("the signature's R {0}")]
    BadR(PointFault),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Invalid,
}

fn signed_message(id: &EventId) -> [u8; SIG_CONTEXT.len() + 32] {
    let mut msg = [0u8; SIG_CONTEXT.len() + 32];
    msg[..SIG_CONTEXT.len()].copy_from_slice(SIG_CONTEXT);
    msg[SIG_CONTEXT.len()..].copy_from_slice(&id.0);
    msg
}

/// A node's secret key.
pub struct Keypair(SigningKey);

impl Keypair {
    /// The key for 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Keypair {
        Keypair(SigningKey::from_bytes(&secret))
    }

    /// The secret bytes, for storing the key.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The node id (public key).
    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    /// Signs an event id.
    pub fn sign(&self, id: &EventId) -> Signature {
        Signature(self.0.sign(&signed_message(id)).to_bytes())
    }
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair({:?})", self.node_id())
    }
}

/// The order of the prime subgroup, L = 2^252 + 27742317777372353535851937790883648493,
/// little-endian.
const GROUP_ORDER: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// Whether 32 little-endian bytes are a scalar below [`GROUP_ORDER`].
fn scalar_is_canonical(s: &[u8; 32]) -> bool {
    for (b, l) in s.iter().rev().zip(GROUP_ORDER.iter().rev()) {
        if b != l {
            return b < l;
        }
    }
    false
}

/// Checks that `sig` is `author`'s signature over `id`, by the strict rule
/// of `PROTOCOL.md` §3: the author passes [`NodeId::check_key`], S is below
/// the group order, R is the canonical encoding of a point not of small
/// order, and `[S]B = R + [k]A` with `k = SHA-512(R ‖ A ‖ message)`.
///
/// The checks before `verify_strict` only name the reason; `verify_strict`
/// makes them all again except the canonical encoding of the key.
pub fn verify(author: &NodeId, id: &EventId, sig: &Signature) -> Result<(), SignatureError> {
    let key = author.check_key()?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    if !scalar_is_canonical(sig.s_bytes()) {
        return Err(SignatureError::NonCanonicalS);
    }
    // verify_strict decodes R; a bad encoding is named here.
    check_encoding(sig.r_bytes()).map_err(SignatureError::BadR)?;
    key.verify_strict(&signed_message(id), &sig)
        .map_err(|_| SignatureError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Verifier, VerifyingKey};

    pub(crate) fn sample(author: NodeId) -> Event {
        Event {
            version: MIN_FORMAT_VERSION,
            author,
            seq: 1,
            prev: None,
            deps: vec![],
            hlc: Hlc::from_ms(1_700_000_000_000),
            stream: "customer/1".into(),
            kind: "Renamed".into(),
            ops: vec![Op::Set {
                field: "name".into(),
                value: b"\"Ada\"".to_vec(),
                supersedes: vec![],
            }],
            payload: b"{}".to_vec(),
            meta: Meta::default(),
        }
    }

    #[test]
    fn round_trip_and_canonical() {
        let k = Keypair::from_secret([7; 32]);
        let e = sample(k.node_id());
        let (bytes, id) = e.seal();
        let (back, id2) = Event::decode(&bytes).unwrap();
        assert_eq!(back, e);
        assert_eq!(id, id2);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Event::decode(&longer), Err(EventError::Trailing(1)));
        let mut v3 = bytes.clone();
        v3[0] = FORMAT_VERSION + 1;
        assert_eq!(
            Event::decode(&v3),
            Err(EventError::UnknownVersion(FORMAT_VERSION + 1))
        );
        // A version 1 event written as version 2 is not the canonical form.
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            Event::decode(&v2),
            Err(EventError::WrongVersion { got: 2, want: 1 })
        );
    }

    #[test]
    fn limits_are_named() {
        let k = Keypair::from_secret([7; 32]);
        let mut e = sample(k.node_id());
        e.stream = "s".repeat(MAX_STREAM_BYTES + 1);
        let err = e.check().unwrap_err().to_string();
        assert!(err.contains("stream is 257"), "{err}");
        let mut e = sample(k.node_id());
        e.payload = vec![0; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            e.check(),
            Err(EventError::Limit {
                what: "payload",
                ..
            })
        ));
        let mut e = sample(k.node_id());
        e.ops = vec![
            Op::Add {
                counter: "c".into(),
                delta: 1
            };
            MAX_OPS + 1
        ];
        assert!(matches!(
            e.check(),
            Err(EventError::Limit { what: "ops", .. })
        ));
        let mut e = sample(k.node_id());
        e.kind = "k".repeat(MAX_KIND_BYTES + 1);
        assert!(matches!(
            e.check(),
            Err(EventError::Limit { what: "kind", .. })
        ));
        let mut e = sample(k.node_id());
        e.ops = vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to: e.author,
            amount: 1,
        }];
        assert!(matches!(e.check(), Err(EventError::BadEscrow { .. })));
    }

    /// The encoding of the base point B.
    const BASE_POINT: [u8; 32] = [
        0x58, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
        0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
        0x66, 0x66,
    ];

    /// A signature by the identity point made with no secret key: R = B,
    /// S = 1, so [S]B - [k]A = B = R for every message.
    fn forged() -> Signature {
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&BASE_POINT);
        sig[32] = 1;
        Signature(sig)
    }

    #[test]
    fn small_order_key_forgery_is_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = NodeId(identity);
        let (_, id) = sample(weak).seal();
        // ed25519-dalek's lenient check takes the forgery.
        let key = VerifyingKey::from_bytes(&weak.0).unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(&forged().0);
        assert!(key.verify(&signed_message(&id), &sig).is_ok());
        let err = verify(&weak, &id, &forged()).unwrap_err();
        assert!(matches!(
            err,
            SignatureError::BadKey(KeyError { key, fault: PointFault::SmallOrder, .. }) if key == weak
        ));
        assert_eq!(
            err.to_string(),
            format!("node id {weak} is a weak (small-order) ed25519 key")
        );
        // The event itself is malformed: its author is no key.
        let (bytes, _) = sample(weak).seal();
        let err = Event::decode(&bytes).unwrap_err();
        assert!(matches!(err, EventError::BadAuthor(_)), "{err}");
        assert_eq!(
            err.to_string(),
            format!("bad author: node id {weak} is a weak (small-order) ed25519 key")
        );
    }

    #[test]
    fn a_non_canonical_s_is_refused() {
        let k = Keypair::from_secret([9; 32]);
        let (_, id) = sample(k.node_id()).seal();
        let mut sig = k.sign(&id);
        // S + L: the same scalar mod L, which the cofactorless equation
        // alone would take.
        let mut carry = 0u16;
        for (b, l) in sig.0[32..].iter_mut().zip(GROUP_ORDER) {
            let sum = *b as u16 + l as u16 + carry;
            *b = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0);
        assert_eq!(
            verify(&k.node_id(), &id, &sig),
            Err(SignatureError::NonCanonicalS)
        );
        let msg = SignatureError::NonCanonicalS.to_string();
        assert!(msg.contains("not below the group order"), "{msg}");
        assert!(!scalar_is_canonical(&GROUP_ORDER));
        let mut below = GROUP_ORDER;
        below[0] -= 1;
        assert!(scalar_is_canonical(&below));
    }

    #[test]
    fn a_bad_r_is_refused() {
        let k = Keypair::from_secret([9; 32]);
        let (_, id) = sample(k.node_id()).seal();
        let good = k.sign(&id);
        for (first, last, want) in [
            // The identity, of order 1.
            (1u8, 0u8, SignatureError::BadR(PointFault::SmallOrder)),
            // The identity with the sign bit set on x = 0.
            (1, 0x80, SignatureError::BadR(PointFault::NonCanonical)),
            // y = 2: no point; verify_strict finds it.
            (2, 0, SignatureError::Invalid),
        ] {
            let mut sig = good;
            sig.0[..32].fill(0);
            sig.0[0] = first;
            sig.0[31] = last;
            assert_eq!(verify(&k.node_id(), &id, &sig), Err(want));
        }
        let msg = SignatureError::BadR(PointFault::SmallOrder).to_string();
        assert_eq!(msg, "the signature's R is a point of small order");
    }

    #[test]
    fn an_escrow_transfer_to_a_weak_key_is_malformed() {
        let k = Keypair::from_secret([7; 32]);
        let mut e = sample(k.node_id());
        let weak = NodeId([0; 32]);
        e.ops = vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to: weak,
            amount: 1,
        }];
        let err = e.check().unwrap_err();
        assert!(matches!(err, EventError::BadRecipient { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "invalid escrow op on \"seats\": bad recipient: node id {weak} is a weak (small-order) ed25519 key"
            )
        );
        // Bytes that are no point at all are refused the same way.
        e.ops = vec![Op::EscrowTransfer {
            counter: "seats".into(),
            to: NodeId([2; 32]),
            amount: 1,
        }];
        let err = e.check().unwrap_err().to_string();
        assert!(err.contains("bad recipient"), "{err}");
    }

    #[test]
    fn signatures() {
        let k = Keypair::from_secret([9; 32]);
        let (_, id) = sample(k.node_id()).seal();
        let sig = k.sign(&id);
        assert_eq!(verify(&k.node_id(), &id, &sig), Ok(()));
        let other = EventId([1; 32]);
        assert_eq!(
            verify(&k.node_id(), &other, &sig),
            Err(SignatureError::Invalid)
        );
    }
}
