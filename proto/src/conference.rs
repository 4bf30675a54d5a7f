//! The conference domain: task-based commands for a venue's registration
//! desks, each turned into one event of the generic API ([`Draft`]).
//!
//! Nothing here does IO: [`Request::parse`] checks a command's JSON body,
//! and [`Command::draft`] turns it into a draft against a replica's
//! [`State`], the only input a command needs beyond its own fields. The
//! node (`src/venue.rs`) appends the draft like any other; the simulator can
//! drive the same functions.
//!
//! **The model.** Two kinds of stream, and everything a desk shows is a
//! read of the CRDT fold, so every replica holding the same events shows the
//! same sessions and attendees:
//! - `session/{id}`: registers `name`, `starts`, `room`, `capacity` (stated
//!   at scheduling); the escrow counter [`SEATS`] (capacity, rights per
//!   desk, seat policy); PN counters `held/{attendee}` ([`held_counter`]);
//!   registers `waitlist/{attendee}` ([`waitlist_field`]);
//! - `attendee/{id}`: registers `name`, `email`, `phone`, `company`,
//!   `badge_printed`; the text field `notes` (merged by automerge).
//!
//! **One event per intent.** A command states what the person at the desk
//! meant (`EmailChanged`, `SeatsPurchased`), not which fields moved, so the
//! log reads as the desk's history; each carries the command id (a retry
//! takes effect once: the fold's command-id rule, keyed by stream and id),
//! the acting user, and an expected version where a stale screen must not
//! win (scheduling and registering expect version 0: an id is taken once).
//!
//! **Why `held/{attendee}` counters.** What each attendee holds in a
//! session is a sum of purchases and cancellations made at any desk,
//! offline or not. A PN counter per attendee adds concurrent purchases at
//! two desks instead of letting one overwrite the other (a register would
//! keep one value, or show a conflict where there is none), and it lives
//! in the session's stream, next to the seats it counts, so one event
//! moves both the escrow counter and the attendee's holding atomically.
//!
//! **Why a cancellation is an `EscrowInit`.** The escrow counter only
//! grows by inits and shrinks by consumes; there is no "unconsume", because
//! a desk may only spend rights it holds, and a returned seat must become a
//! right somewhere to be sold again. The desk that takes the seat back is
//! the one that can prove it (the attendee holds it in its causal past), so
//! it adds one unit of capacity with the rights to it: the seat goes back
//! on sale at this desk, at once and without asking anyone, and rebalancing
//! moves the right to where the sales are like any other.
//!
//! **Why the waitlist is registers ordered by `(hlc, author)`.** Desks
//! add people to the waitlist while cut off from each other; a list that
//! each desk appends to would need a merge rule for positions. A register
//! per attendee (`{"seats": n}`, or `null` once they leave it) merges like
//! any field, and the queue order is the canonical order of the standing
//! writes, `(hlc, author)`: a function of the events, the same on every
//! replica, and close to "who asked first" as far as the clocks can tell.
//!
//! `DecideOversell` is the one command that is not a draft: the staff
//! decision on an oversold sale is the node's own rule (it checks the
//! override window against its clock), so [`Command::draft`] hands it back
//! as [`Planned::Decide`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{Compensation, Meta, Op, Policy, MAX_NAME_BYTES, MAX_STREAM_BYTES};
use crate::id::{EventId, NodeId};
use crate::state::{Draft, State};
use crate::text::{self, Splice, TextEdit};

/// The escrow counter of a session's seats.
pub const SEATS: &str = "seats";

/// The text field of an attendee's notes.
pub const NOTES: &str = "notes";

/// Longest id of a session or attendee, in bytes (`[A-Za-z0-9_-]`).
pub const MAX_ID_BYTES: usize = 64;

/// Longest command id, in bytes.
pub const MAX_COMMAND_ID_BYTES: usize = 128;

/// Longest user name, in bytes.
pub const MAX_USER_BYTES: usize = 96;

/// Longest text value of a field (a name, an email, a room), in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

/// Most seats one command may move.
pub const MAX_SEATS: u64 = 1_000_000;

/// Most splices one notes edit may carry.
pub const MAX_SPLICES: usize = 256;

/// Longest JSON value a `ResolveConflict` may write, in bytes.
pub const MAX_RESOLVE_BYTES: usize = 16 * 1024;

/// The command types, as the `type` field names them.
pub const TYPES: [&str; 17] = [
    "ScheduleSession",
    "AddSeats",
    "ChangeSeatPolicy",
    "GiveSeatRights",
    "RegisterAttendee",
    "ChangeName",
    "ChangeEmail",
    "ChangePhone",
    "ChangeCompany",
    "EditNotes",
    "PurchaseSeats",
    "CancelSeats",
    "JoinWaitlist",
    "LeaveWaitlist",
    "PrintBadge",
    "ResolveConflict",
    "DecideOversell",
];

/// The stream of session `id`.
pub fn session_stream(id: &str) -> String {
    format!("session/{id}")
}

/// The stream of attendee `id`.
pub fn attendee_stream(id: &str) -> String {
    format!("attendee/{id}")
}

/// The PN counter of the seats `attendee` holds in a session.
pub fn held_counter(attendee: &str) -> String {
    format!("held/{attendee}")
}

/// The register of `attendee`'s place on a session's waitlist.
pub fn waitlist_field(attendee: &str) -> String {
    format!("waitlist/{attendee}")
}

/// A checked command body: the command, its id and the acting user.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Idempotency key: a retry with the same id takes effect once.
    pub command_id: String,
    /// The acting user, as the page names them.
    pub user: Option<String>,
    /// What to do.
    pub command: Command,
}

/// A conference command, tagged by `"type"` in JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// Opens a session with a capacity.
    ScheduleSession(ScheduleSession),
    /// Adds seats to a session.
    AddSeats(Seats),
    /// Sets a session's seat policy.
    ChangeSeatPolicy(ChangeSeatPolicy),
    /// Moves this desk's rights to sell seats to another desk.
    GiveSeatRights(GiveSeatRights),
    /// Registers an attendee.
    RegisterAttendee(RegisterAttendee),
    /// Changes an attendee's name.
    ChangeName(ChangeField),
    /// Changes an attendee's email.
    ChangeEmail(ChangeField),
    /// Changes an attendee's phone.
    ChangePhone(ChangeField),
    /// Changes an attendee's company.
    ChangeCompany(ChangeField),
    /// Edits an attendee's notes.
    EditNotes(EditNotes),
    /// Sells seats of a session to an attendee.
    PurchaseSeats(AttendeeSeats),
    /// Takes back seats an attendee holds.
    CancelSeats(AttendeeSeats),
    /// Puts an attendee on a session's waitlist.
    JoinWaitlist(Waitlist),
    /// Takes an attendee off a session's waitlist.
    LeaveWaitlist(Waitlist),
    /// Records that an attendee's badge was printed.
    PrintBadge(Attendee),
    /// Writes one value over every standing write of a field.
    ResolveConflict(ResolveConflict),
    /// A staff decision on an oversold sale.
    DecideOversell(DecideOversell),
}

/// `ScheduleSession`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSession {
    /// The session.
    pub session_id: String,
    /// Its title.
    pub name: String,
    /// Seats; at least 1.
    pub capacity: u64,
    /// When, as free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts: Option<String>,
    /// Where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// A seat policy, `{"mode", …}` as `escrow_policy` takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Map<String, Value>>,
}

/// `AddSeats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seats {
    /// The session.
    pub session_id: String,
    /// Seats added; at least 1.
    pub seats: u64,
}

/// `ChangeSeatPolicy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSeatPolicy {
    /// The session.
    pub session_id: String,
    /// The policy, `{"mode", …}`.
    pub policy: Map<String, Value>,
}

/// `GiveSeatRights`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiveSeatRights {
    /// The session.
    pub session_id: String,
    /// The desk receiving the rights (node id, 64 hex digits).
    pub to: String,
    /// Rights moved; at least 1.
    pub seats: u64,
}

/// `RegisterAttendee`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterAttendee {
    /// The attendee.
    pub attendee_id: String,
    /// Full name.
    pub name: String,
    /// Email; contains `@`.
    pub email: String,
    /// Phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Company.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
}

/// `ChangeName`, `ChangeEmail`, `ChangePhone`, `ChangeCompany`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeField {
    /// The attendee.
    pub attendee_id: String,
    /// The new value (phone and company may be empty: cleared).
    pub value: String,
    /// Refuse unless the attendee's stream is at this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
}

/// `EditNotes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditNotes {
    /// The attendee.
    pub attendee_id: String,
    /// `[pos, delete, "insert"]`, applied in order, in UTF-16 units.
    pub splices: Vec<(u64, u64, String)>,
    /// The notes' heads the client saw (64 hex digits each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Vec<String>>,
}

/// `PurchaseSeats`, `CancelSeats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttendeeSeats {
    /// The session.
    pub session_id: String,
    /// The attendee.
    pub attendee_id: String,
    /// Seats; at least 1.
    pub seats: u64,
}

/// `JoinWaitlist`, `LeaveWaitlist`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waitlist {
    /// The session.
    pub session_id: String,
    /// The attendee.
    pub attendee_id: String,
    /// Seats wanted (joining; default 1). Leaving ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u64>,
}

/// `PrintBadge`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attendee {
    /// The attendee.
    pub attendee_id: String,
}

/// `ResolveConflict`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveConflict {
    /// The stream.
    pub stream: String,
    /// The register field.
    pub field: String,
    /// The value that stands from now on (any JSON).
    pub value: Value,
}

/// `DecideOversell`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideOversell {
    /// The oversold sale (event id, 64 hex digits).
    pub sale: String,
    /// `honour`, `cancel`, `waitlist` or `notify`.
    pub action: String,
}

/// What a command becomes.
#[derive(Clone, Debug)]
pub enum Planned {
    /// One event to append.
    Append(Draft),
    /// A staff decision on an oversold sale, which the node makes.
    Decide {
        /// The sale.
        sale: EventId,
        /// The compensation decided.
        action: Compensation,
    },
}

/// Why a command body is not a valid command (a client's mistake).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The body does not parse as JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("the body must be a JSON object with a \"type\" and a \"command_id\"")]
    NotObject,
    /// No `type`, or it is not a string.
    #[error("type is missing: it names the command ({known})", known = known_types())]
    MissingType,
    /// A `type` that names no command.
    #[error("unknown command type {name:?} ({known})", name = .0, known = known_types())]
    UnknownType(String),
    /// No `command_id`.
    #[error("command_id is missing: every command carries one, so that a retry takes effect once")]
    MissingCommandId,
    /// A field is missing, of the wrong type, or out of its bounds.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a valid command cannot be carried out against this replica's state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No session with this id.
    #[error("no session {0:?}: schedule it first")]
    UnknownSession(String),
    /// No attendee with this id.
    #[error("no attendee {0:?}: register them first")]
    UnknownAttendee(String),
    /// No stream with this name.
    #[error("no stream {0:?}")]
    UnknownStream(String),
    /// A cancellation of more seats than the attendee holds in the session.
    #[error("attendee {attendee:?} holds {held} seats in session {session:?}, fewer than the {seats} to cancel")]
    NotHeld {
        /// The session.
        session: String,
        /// The attendee.
        attendee: String,
        /// Seats held now.
        held: i128,
        /// Seats the command would cancel.
        seats: u64,
    },
    /// A field of the command cannot be turned into an op.
    #[error(transparent)]
    Invalid(#[from] CommandError),
}

impl Refusal {
    /// Whether the command names something this replica does not hold
    /// (a 404 for HTTP).
    pub fn is_unknown(&self) -> bool {
        matches!(
            self,
            Refusal::UnknownSession(_) | Refusal::UnknownAttendee(_) | Refusal::UnknownStream(_)
        )
    }
}

fn known_types() -> String {
    format!("known: {}", TYPES.join(", "))
}

fn invalid(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Deserializes one variant's fields, naming the field that is wrong.
fn fields<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, CommandError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // A missing or unknown field: serde names it in the message.
            let field = inner.split('`').nth(1).unwrap_or("body").to_string();
            CommandError::Invalid {
                field,
                reason: inner,
            }
        } else {
            CommandError::Invalid {
                field: path,
                reason: inner,
            }
        }
    })
}

impl Request {
    /// Parses and checks a command body: a JSON object with `type`,
    /// `command_id`, `user` (optional) and the command's fields.
    pub fn parse(body: &[u8]) -> Result<Request, CommandError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| CommandError::NotJson(e.to_string()))?;
        Request::from_json(v)
    }

    /// [`Request::parse`] from a JSON value.
    pub fn from_json(v: Value) -> Result<Request, CommandError> {
        let Value::Object(mut map) = v else {
            return Err(CommandError::NotObject);
        };
        let ty = match map.remove("type") {
            Some(Value::String(t)) => t,
            _ => return Err(CommandError::MissingType),
        };
        let command_id = match map.remove("command_id") {
            None | Some(Value::Null) => return Err(CommandError::MissingCommandId),
            Some(Value::String(c)) => c,
            Some(_) => return Err(invalid("command_id", "must be a string")),
        };
        if command_id.trim().is_empty() {
            return Err(invalid("command_id", "must not be empty"));
        }
        if command_id.len() > MAX_COMMAND_ID_BYTES {
            return Err(invalid(
                "command_id",
                format!("longer than {MAX_COMMAND_ID_BYTES} bytes"),
            ));
        }
        let user = match map.remove("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) if u.len() > MAX_USER_BYTES => {
                return Err(invalid(
                    "user",
                    format!("longer than {MAX_USER_BYTES} bytes"),
                ))
            }
            Some(Value::String(u)) if u.trim().is_empty() => None,
            Some(Value::String(u)) => Some(u),
            Some(_) => return Err(invalid("user", "must be a string")),
        };
        if ty == "ResolveConflict" && !map.contains_key("value") {
            return Err(invalid(
                "value",
                "missing field `value` (the JSON value that stands from now on)",
            ));
        }
        let command = match ty.as_str() {
            "ScheduleSession" => Command::ScheduleSession(fields(map)?),
            "AddSeats" => Command::AddSeats(fields(map)?),
            "ChangeSeatPolicy" => Command::ChangeSeatPolicy(fields(map)?),
            "GiveSeatRights" => Command::GiveSeatRights(fields(map)?),
            "RegisterAttendee" => Command::RegisterAttendee(fields(map)?),
            "ChangeName" => Command::ChangeName(fields(map)?),
            "ChangeEmail" => Command::ChangeEmail(fields(map)?),
            "ChangePhone" => Command::ChangePhone(fields(map)?),
            "ChangeCompany" => Command::ChangeCompany(fields(map)?),
            "EditNotes" => Command::EditNotes(fields(map)?),
            "PurchaseSeats" => Command::PurchaseSeats(fields(map)?),
            "CancelSeats" => Command::CancelSeats(fields(map)?),
            "JoinWaitlist" => Command::JoinWaitlist(fields(map)?),
            "LeaveWaitlist" => Command::LeaveWaitlist(fields(map)?),
            "PrintBadge" => Command::PrintBadge(fields(map)?),
            "ResolveConflict" => Command::ResolveConflict(fields(map)?),
            "DecideOversell" => Command::DecideOversell(fields(map)?),
            _ => return Err(CommandError::UnknownType(ty)),
        };
        command.validate()?;
        Ok(Request {
            command_id,
            user,
            command,
        })
    }

    /// The command's [`Planned`] effect against `state`, carrying the
    /// command id and user ([`Command::draft`]).
    pub fn draft(&self, state: &State) -> Result<Planned, Refusal> {
        let meta = Meta {
            command_id: Some(self.command_id.clone()),
            user: self.user.clone(),
        };
        self.command.draft(meta, state)
    }
}

fn check_id(field: &str, id: &str) -> Result<(), CommandError> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(field, format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(invalid(
            field,
            format!("{c:?} is not allowed in an id (letters, digits, _ and - only)"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, v: &str, required: bool) -> Result<(), CommandError> {
    if required && v.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if v.len() > MAX_TEXT_BYTES {
        return Err(invalid(
            field,
            format!("longer than {MAX_TEXT_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_email(field: &str, v: &str) -> Result<(), CommandError> {
    check_text(field, v, true)?;
    if !v.contains('@') {
        return Err(invalid(
            field,
            format!("{v:?} is not an email address (no @)"),
        ));
    }
    Ok(())
}

fn check_seats(field: &str, n: u64) -> Result<(), CommandError> {
    if n == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    if n > MAX_SEATS {
        return Err(invalid(field, format!("more than {MAX_SEATS}")));
    }
    Ok(())
}

/// A seat policy from its JSON form (`{"mode", "window_s", …}`): `mode` is
/// required, the other settings default to [`Policy::new`]'s.
pub fn policy_from_json(spec: &Map<String, Value>) -> Result<Policy, String> {
    let mode = match spec.get("mode") {
        Some(Value::String(m)) => m.parse()?,
        Some(other) => return Err(format!("mode {other} is not a string")),
        None => return Err("mode is missing (escrow, risk-window or strict)".into()),
    };
    let mut policy = Policy::new(mode);
    for (k, v) in spec.iter().filter(|(k, _)| *k != "mode") {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(format!("{k}: {other} is neither a number nor a string")),
        };
        policy.set(k, &text)?;
    }
    Ok(policy)
}

fn parse_policy(spec: &Map<String, Value>) -> Result<Policy, CommandError> {
    policy_from_json(spec).map_err(|e| invalid("policy", e))
}

fn parse_node(field: &str, s: &str) -> Result<NodeId, CommandError> {
    s.parse().map_err(|e| invalid(field, format!("{s:?}: {e}")))
}

fn parse_base(base: &[String]) -> Result<Vec<text::Head>, CommandError> {
    base.iter()
        .map(|h| {
            text::parse_head(h)
                .ok_or_else(|| invalid("base", format!("{h:?} is not 64 hex digits")))
        })
        .collect()
}

fn json_bytes(v: &Value) -> Vec<u8> {
    // A `Value` has string keys only: serialising it cannot fail.
    serde_json::to_vec(v).expect("a JSON value serialises")
}

fn set(field: &str, v: Value) -> Op {
    Op::Set {
        field: field.to_string(),
        value: json_bytes(&v),
        supersedes: vec![],
    }
}

impl Command {
    /// The `type` that names this command.
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::ScheduleSession(_) => "ScheduleSession",
            Command::AddSeats(_) => "AddSeats",
            Command::ChangeSeatPolicy(_) => "ChangeSeatPolicy",
            Command::GiveSeatRights(_) => "GiveSeatRights",
            Command::RegisterAttendee(_) => "RegisterAttendee",
            Command::ChangeName(_) => "ChangeName",
            Command::ChangeEmail(_) => "ChangeEmail",
            Command::ChangePhone(_) => "ChangePhone",
            Command::ChangeCompany(_) => "ChangeCompany",
            Command::EditNotes(_) => "EditNotes",
            Command::PurchaseSeats(_) => "PurchaseSeats",
            Command::CancelSeats(_) => "CancelSeats",
            Command::JoinWaitlist(_) => "JoinWaitlist",
            Command::LeaveWaitlist(_) => "LeaveWaitlist",
            Command::PrintBadge(_) => "PrintBadge",
            Command::ResolveConflict(_) => "ResolveConflict",
            Command::DecideOversell(_) => "DecideOversell",
        }
    }

    /// The kind of the event the command becomes (`None`: `DecideOversell`,
    /// whose event the node's decision rule names).
    pub fn kind(&self) -> Option<&'static str> {
        Some(match self {
            Command::ScheduleSession(_) => "SessionScheduled",
            Command::AddSeats(_) => "SeatsAdded",
            Command::ChangeSeatPolicy(_) => "SeatPolicyChanged",
            Command::GiveSeatRights(_) => "SeatRightsGiven",
            Command::RegisterAttendee(_) => "AttendeeRegistered",
            Command::ChangeName(_) => "NameChanged",
            Command::ChangeEmail(_) => "EmailChanged",
            Command::ChangePhone(_) => "PhoneChanged",
            Command::ChangeCompany(_) => "CompanyChanged",
            Command::EditNotes(_) => "NotesEdited",
            Command::PurchaseSeats(_) => "SeatsPurchased",
            Command::CancelSeats(_) => "SeatsCancelled",
            Command::JoinWaitlist(_) => "WaitlistJoined",
            Command::LeaveWaitlist(_) => "WaitlistLeft",
            Command::PrintBadge(_) => "BadgePrinted",
            Command::ResolveConflict(_) => "ConflictResolved",
            Command::DecideOversell(_) => return None,
        })
    }

    /// The stream the command's event goes to (`None`: `DecideOversell`,
    /// whose stream is the sale's).
    pub fn stream(&self) -> Option<String> {
        Some(match self {
            Command::ScheduleSession(c) => session_stream(&c.session_id),
            Command::AddSeats(c) => session_stream(&c.session_id),
            Command::ChangeSeatPolicy(c) => session_stream(&c.session_id),
            Command::GiveSeatRights(c) => session_stream(&c.session_id),
            Command::PurchaseSeats(c) | Command::CancelSeats(c) => session_stream(&c.session_id),
            Command::JoinWaitlist(c) | Command::LeaveWaitlist(c) => session_stream(&c.session_id),
            Command::RegisterAttendee(c) => attendee_stream(&c.attendee_id),
            Command::ChangeName(c)
            | Command::ChangeEmail(c)
            | Command::ChangePhone(c)
            | Command::ChangeCompany(c) => attendee_stream(&c.attendee_id),
            Command::EditNotes(c) => attendee_stream(&c.attendee_id),
            Command::PrintBadge(c) => attendee_stream(&c.attendee_id),
            Command::ResolveConflict(c) => c.stream.clone(),
            Command::DecideOversell(_) => return None,
        })
    }

    /// Checks the fields: ids, non-empty text, emails, seat counts,
    /// policies, node and event ids. The first problem, naming its field.
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            Command::ScheduleSession(c) => {
                check_id("session_id", &c.session_id)?;
                check_text("name", &c.name, true)?;
                check_seats("capacity", c.capacity)?;
                check_text("starts", c.starts.as_deref().unwrap_or(""), false)?;
                check_text("room", c.room.as_deref().unwrap_or(""), false)?;
                if let Some(p) = &c.policy {
                    parse_policy(p)?;
                }
            }
            Command::AddSeats(c) => {
                check_id("session_id", &c.session_id)?;
                check_seats("seats", c.seats)?;
            }
            Command::ChangeSeatPolicy(c) => {
                check_id("session_id", &c.session_id)?;
                parse_policy(&c.policy)?;
            }
            Command::GiveSeatRights(c) => {
                check_id("session_id", &c.session_id)?;
                parse_node("to", &c.to)?;
                check_seats("seats", c.seats)?;
            }
            Command::RegisterAttendee(c) => {
                check_id("attendee_id", &c.attendee_id)?;
                check_text("name", &c.name, true)?;
                check_email("email", &c.email)?;
                check_text("phone", c.phone.as_deref().unwrap_or(""), false)?;
                check_text("company", c.company.as_deref().unwrap_or(""), false)?;
            }
            Command::ChangeName(c) => {
                check_id("attendee_id", &c.attendee_id)?;
                check_text("value", &c.value, true)?;
            }
            Command::ChangeEmail(c) => {
                check_id("attendee_id", &c.attendee_id)?;
                check_email("value", &c.value)?;
            }
            Command::ChangePhone(c) | Command::ChangeCompany(c) => {
                check_id("attendee_id", &c.attendee_id)?;
                check_text("value", &c.value, false)?;
            }
            Command::EditNotes(c) => {
                check_id("attendee_id", &c.attendee_id)?;
                if c.splices.is_empty() {
                    return Err(invalid("splices", "must not be empty"));
                }
                if c.splices.len() > MAX_SPLICES {
                    return Err(invalid("splices", format!("more than {MAX_SPLICES}")));
                }
                if let Some(b) = &c.base {
                    parse_base(b)?;
                }
            }
            Command::PurchaseSeats(c) | Command::CancelSeats(c) => {
                check_id("session_id", &c.session_id)?;
                check_id("attendee_id", &c.attendee_id)?;
                check_seats("seats", c.seats)?;
            }
            Command::JoinWaitlist(c) | Command::LeaveWaitlist(c) => {
                check_id("session_id", &c.session_id)?;
                check_id("attendee_id", &c.attendee_id)?;
                if let Some(n) = c.seats {
                    check_seats("seats", n)?;
                }
            }
            Command::PrintBadge(c) => check_id("attendee_id", &c.attendee_id)?,
            Command::ResolveConflict(c) => {
                if c.stream.is_empty() {
                    return Err(invalid("stream", "must not be empty"));
                }
                if c.stream.len() > MAX_STREAM_BYTES {
                    return Err(invalid(
                        "stream",
                        format!("longer than {MAX_STREAM_BYTES} bytes"),
                    ));
                }
                if c.field.is_empty() {
                    return Err(invalid("field", "must not be empty"));
                }
                if c.field.len() > MAX_NAME_BYTES {
                    return Err(invalid(
                        "field",
                        format!("longer than {MAX_NAME_BYTES} bytes"),
                    ));
                }
                if json_bytes(&c.value).len() > MAX_RESOLVE_BYTES {
                    return Err(invalid(
                        "value",
                        format!("longer than {MAX_RESOLVE_BYTES} bytes as JSON"),
                    ));
                }
            }
            Command::DecideOversell(c) => {
                c.sale
                    .parse::<EventId>()
                    .map_err(|e| invalid("sale", format!("{:?}: {e}", c.sale)))?;
                c.action
                    .parse::<Compensation>()
                    .map_err(|e| invalid("action", e))?;
            }
        }
        Ok(())
    }

    /// The command's effect against `state`, the replica it will be
    /// appended to: one draft (stream, kind, ops, `meta`, expected version),
    /// or the staff decision the node makes. Refused when it names a
    /// session or attendee `state` does not hold, or cancels more seats
    /// than the attendee holds. A command whose id `state` already holds on
    /// its stream skips those checks: it is a retry, and appending it
    /// answers with the event that took effect.
    pub fn draft(&self, meta: Meta, state: &State) -> Result<Planned, Refusal> {
        self.validate()?;
        let (Some(stream), Some(kind)) = (self.stream(), self.kind()) else {
            let Command::DecideOversell(c) = self else {
                unreachable!("only DecideOversell has no stream or kind");
            };
            // `validate` parsed both.
            let sale = c
                .sale
                .parse()
                .map_err(|e| invalid("sale", format!("{e}")))?;
            let action = c.action.parse().map_err(|e| invalid("action", e))?;
            return Ok(Planned::Decide { sale, action });
        };
        let retry = meta
            .command_id
            .as_deref()
            .is_some_and(|id| state.command(&stream, id).is_some());
        let session = |id: &str| -> Result<(), Refusal> {
            if retry || state.version(&session_stream(id)) > 0 {
                Ok(())
            } else {
                Err(Refusal::UnknownSession(id.to_string()))
            }
        };
        let attendee = |id: &str| -> Result<(), Refusal> {
            if retry || state.version(&attendee_stream(id)) > 0 {
                Ok(())
            } else {
                Err(Refusal::UnknownAttendee(id.to_string()))
            }
        };
        let mut ops = Vec::new();
        let mut texts = Vec::new();
        let mut expected_version = None;
        match self {
            Command::ScheduleSession(c) => {
                ops.push(set("name", Value::from(c.name.clone())));
                ops.push(set("capacity", Value::from(c.capacity)));
                if let Some(s) = &c.starts {
                    ops.push(set("starts", Value::from(s.clone())));
                }
                if let Some(r) = &c.room {
                    ops.push(set("room", Value::from(r.clone())));
                }
                ops.push(Op::EscrowInit {
                    counter: SEATS.into(),
                    capacity: c.capacity,
                });
                if let Some(p) = &c.policy {
                    ops.push(Op::EscrowPolicy {
                        counter: SEATS.into(),
                        policy: parse_policy(p)?,
                        supersedes: vec![],
                    });
                }
                expected_version = Some(0);
            }
            Command::AddSeats(c) => {
                session(&c.session_id)?;
                ops.push(Op::EscrowInit {
                    counter: SEATS.into(),
                    capacity: c.seats,
                });
            }
            Command::ChangeSeatPolicy(c) => {
                session(&c.session_id)?;
                ops.push(Op::EscrowPolicy {
                    counter: SEATS.into(),
                    policy: parse_policy(&c.policy)?,
                    supersedes: vec![],
                });
            }
            Command::GiveSeatRights(c) => {
                session(&c.session_id)?;
                ops.push(Op::EscrowTransfer {
                    counter: SEATS.into(),
                    to: parse_node("to", &c.to)?,
                    amount: c.seats,
                });
            }
            Command::RegisterAttendee(c) => {
                ops.push(set("name", Value::from(c.name.clone())));
                ops.push(set("email", Value::from(c.email.clone())));
                if let Some(p) = &c.phone {
                    ops.push(set("phone", Value::from(p.clone())));
                }
                if let Some(co) = &c.company {
                    ops.push(set("company", Value::from(co.clone())));
                }
                expected_version = Some(0);
            }
            Command::ChangeName(c)
            | Command::ChangeEmail(c)
            | Command::ChangePhone(c)
            | Command::ChangeCompany(c) => {
                attendee(&c.attendee_id)?;
                let field = match self {
                    Command::ChangeName(_) => "name",
                    Command::ChangeEmail(_) => "email",
                    Command::ChangePhone(_) => "phone",
                    _ => "company",
                };
                ops.push(set(field, Value::from(c.value.clone())));
                expected_version = c.expected_version;
            }
            Command::EditNotes(c) => {
                attendee(&c.attendee_id)?;
                let base = c.base.as_deref().map(parse_base).transpose()?;
                texts.push(TextEdit {
                    field: NOTES.into(),
                    splices: c
                        .splices
                        .iter()
                        .map(|(pos, delete, insert)| Splice {
                            pos: *pos,
                            delete: *delete,
                            insert: insert.clone(),
                        })
                        .collect(),
                    base,
                });
            }
            Command::PurchaseSeats(c) => {
                session(&c.session_id)?;
                attendee(&c.attendee_id)?;
                ops.push(Op::EscrowConsume {
                    counter: SEATS.into(),
                    amount: c.seats,
                });
                ops.push(Op::Add {
                    counter: held_counter(&c.attendee_id),
                    delta: i64::try_from(c.seats).unwrap_or(i64::MAX),
                });
            }
            Command::CancelSeats(c) => {
                session(&c.session_id)?;
                attendee(&c.attendee_id)?;
                if !retry {
                    let held = held(state, &c.session_id, &c.attendee_id);
                    if held < i128::from(c.seats) {
                        return Err(Refusal::NotHeld {
                            session: c.session_id.clone(),
                            attendee: c.attendee_id.clone(),
                            held,
                            seats: c.seats,
                        });
                    }
                }
                ops.push(Op::Add {
                    counter: held_counter(&c.attendee_id),
                    // `validate` bounds seats by MAX_SEATS, far inside i64.
                    delta: -i64::try_from(c.seats).unwrap_or(i64::MAX),
                });
                ops.push(Op::EscrowInit {
                    counter: SEATS.into(),
                    capacity: c.seats,
                });
            }
            Command::JoinWaitlist(c) => {
                session(&c.session_id)?;
                attendee(&c.attendee_id)?;
                let seats = c.seats.unwrap_or(1);
                ops.push(set(
                    &waitlist_field(&c.attendee_id),
                    serde_json::json!({ "seats": seats }),
                ));
            }
            Command::LeaveWaitlist(c) => {
                session(&c.session_id)?;
                attendee(&c.attendee_id)?;
                ops.push(set(&waitlist_field(&c.attendee_id), Value::Null));
            }
            Command::PrintBadge(c) => {
                attendee(&c.attendee_id)?;
                ops.push(set("badge_printed", Value::Bool(true)));
            }
            Command::ResolveConflict(c) => {
                if !retry && state.version(&c.stream) == 0 {
                    return Err(Refusal::UnknownStream(c.stream.clone()));
                }
                ops.push(set(&c.field, c.value.clone()));
            }
            Command::DecideOversell(_) => unreachable!("handled above"),
        }
        Ok(Planned::Append(Draft {
            stream,
            kind: kind.to_string(),
            ops,
            payload: Vec::new(),
            meta,
            expected_version,
            texts,
        }))
    }
}

/// The seats `attendee` holds in `session`, by `state`'s fold.
pub fn held(state: &State, session: &str, attendee: &str) -> i128 {
    state
        .stream(&session_stream(session))
        .and_then(|s| s.counters.get(&held_counter(attendee)))
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::HlcClock;
    use crate::state::Appended;
    use crate::Keypair;
    use proptest::prelude::*;
    use serde_json::json;

    const T0: u64 = 1_700_000_000_000;

    /// One replica that appends drafts as a desk would.
    struct Desk {
        id: NodeId,
        clock: HlcClock,
        state: State,
        now: u64,
    }

    impl Desk {
        fn new() -> Desk {
            Desk {
                id: Keypair::from_secret([7; 32]).node_id(),
                clock: HlcClock::default(),
                state: State::new(),
                now: T0,
            }
        }

        fn plan(&self, body: Value) -> Result<Planned, Refusal> {
            Request::from_json(body)?.draft(&self.state)
        }

        fn run(&mut self, body: Value) -> Draft {
            let Planned::Append(d) = self.plan(body).expect("a valid command") else {
                panic!("expected a draft");
            };
            self.now += 1;
            match self
                .state
                .append_local(self.id, &mut self.clock, self.now, d.clone())
            {
                Ok(Appended::New { .. }) | Ok(Appended::Existing(_)) => {}
                Err(e) => panic!("refused: {e}"),
            }
            d
        }

        fn field(&self, stream: &str, field: &str) -> Value {
            let w = self.state.stream(stream).and_then(|s| s.shown(field));
            w.map_or(Value::Null, |(_, w)| {
                serde_json::from_slice(&w.value).unwrap()
            })
        }
    }

    fn desk_with_session() -> Desk {
        let mut d = Desk::new();
        d.run(
            json!({"type": "ScheduleSession", "command_id": "c1", "user": "ana",
            "session_id": "s1", "name": "Keynote", "capacity": 10, "room": "A"}),
        );
        d.run(json!({"type": "RegisterAttendee", "command_id": "c2",
            "attendee_id": "a1", "name": "Bo", "email": "bo@x.org"}));
        d
    }

    fn err(body: Value) -> String {
        match Request::from_json(body) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("accepted: {r:?}"),
        }
    }

    #[test]
    fn schedule_session_sets_fields_and_seats() {
        let d = desk_with_session();
        let s = d.state.stream("session/s1").unwrap();
        assert_eq!(s.escrow[SEATS].capacity, 10);
        assert_eq!(d.field("session/s1", "name"), json!("Keynote"));
        assert_eq!(d.field("session/s1", "capacity"), json!(10));
        assert_eq!(d.field("session/s1", "room"), json!("A"));
        let again = d.plan(json!({"type": "ScheduleSession", "command_id": "c9",
            "session_id": "s1", "name": "K", "capacity": 1}));
        let Ok(Planned::Append(draft)) = again else {
            panic!()
        };
        assert_eq!(draft.expected_version, Some(0));
        assert_eq!(draft.kind, "SessionScheduled");
        assert_eq!(draft.meta.command_id.as_deref(), Some("c9"));
    }

    #[test]
    fn schedule_with_policy_and_change_policy() {
        let mut d = Desk::new();
        let draft = d.run(json!({"type": "ScheduleSession", "command_id": "c1",
            "session_id": "s1", "name": "K", "capacity": 3,
            "policy": {"mode": "risk-window", "max_overdraft": 2}}));
        assert!(matches!(draft.ops.last(), Some(Op::EscrowPolicy { .. })));
        assert_eq!(d.state.policy_of("session/s1", SEATS).max_overdraft, 2);
        let draft = d.run(json!({"type": "ChangeSeatPolicy", "command_id": "c2",
            "session_id": "s1", "policy": {"mode": "strict"}}));
        assert_eq!(draft.kind, "SeatPolicyChanged");
        assert_eq!(d.state.policy_of("session/s1", SEATS).mode.name(), "strict");
        assert!(err(json!({"type": "ChangeSeatPolicy", "command_id": "c",
            "session_id": "s1", "policy": {"mode": "lax"}}))
        .starts_with("policy: "));
    }

    #[test]
    fn add_seats_inits_more() {
        let mut d = desk_with_session();
        let draft = d.run(json!({"type": "AddSeats", "command_id": "c3",
            "session_id": "s1", "seats": 5}));
        assert_eq!(draft.kind, "SeatsAdded");
        assert_eq!(
            d.state.stream("session/s1").unwrap().escrow[SEATS].capacity,
            15
        );
    }

    #[test]
    fn give_seat_rights_transfers() {
        let mut d = desk_with_session();
        let other = Keypair::from_secret([8; 32]).node_id();
        let draft = d.run(json!({"type": "GiveSeatRights", "command_id": "c3",
            "session_id": "s1", "to": other.to_string(), "seats": 4}));
        assert_eq!(draft.kind, "SeatRightsGiven");
        let e = &d.state.stream("session/s1").unwrap().escrow[SEATS];
        assert_eq!(e.accounts[&other].rights(), 4);
        assert_eq!(e.accounts[&d.id].rights(), 6);
        assert!(err(json!({"type": "GiveSeatRights", "command_id": "c",
            "session_id": "s1", "to": "nope", "seats": 1}))
        .starts_with("to: "));
    }

    #[test]
    fn register_and_change_fields() {
        let mut d = desk_with_session();
        assert_eq!(d.field("attendee/a1", "email"), json!("bo@x.org"));
        for (ty, field, kind, value) in [
            ("ChangeName", "name", "NameChanged", "Bo Li"),
            ("ChangeEmail", "email", "EmailChanged", "bo@y.org"),
            ("ChangePhone", "phone", "PhoneChanged", "+1 555"),
            ("ChangeCompany", "company", "CompanyChanged", "Acme"),
        ] {
            let draft = d.run(json!({"type": ty, "command_id": format!("x-{ty}"),
                "attendee_id": "a1", "value": value}));
            assert_eq!(draft.kind, kind);
            assert_eq!(d.field("attendee/a1", field), json!(value));
        }
        let v = d.state.version("attendee/a1");
        let Ok(Planned::Append(draft)) = d.plan(json!({"type": "ChangeName",
            "command_id": "y", "attendee_id": "a1", "value": "Z", "expected_version": v}))
        else {
            panic!()
        };
        assert_eq!(draft.expected_version, Some(v));
    }

    #[test]
    fn edit_notes_is_a_text_edit() {
        let mut d = desk_with_session();
        d.run(
            json!({"type": "EditNotes", "command_id": "n1", "attendee_id": "a1",
            "splices": [[0, 0, "vegan"]]}),
        );
        let heads = d
            .state
            .stream("attendee/a1")
            .unwrap()
            .text(NOTES)
            .unwrap()
            .heads
            .clone();
        let base: Vec<String> = heads.iter().map(|h| text::Hex(h).to_string()).collect();
        let draft = d.run(
            json!({"type": "EditNotes", "command_id": "n2", "attendee_id": "a1",
            "splices": [[5, 0, ", no nuts"]], "base": base}),
        );
        assert_eq!(draft.kind, "NotesEdited");
        let text = &d
            .state
            .stream("attendee/a1")
            .unwrap()
            .text(NOTES)
            .unwrap()
            .text;
        assert_eq!(text, "vegan, no nuts");
        assert!(err(
            json!({"type": "EditNotes", "command_id": "n", "attendee_id": "a1",
            "splices": [[0, 0, "x"]], "base": ["zz"]})
        )
        .starts_with("base: "));
    }

    #[test]
    fn purchase_and_cancel_move_seats() {
        let mut d = desk_with_session();
        let draft = d.run(json!({"type": "PurchaseSeats", "command_id": "p1",
            "session_id": "s1", "attendee_id": "a1", "seats": 3}));
        assert_eq!(draft.kind, "SeatsPurchased");
        assert_eq!(held(&d.state, "s1", "a1"), 3);
        assert_eq!(
            d.state.stream("session/s1").unwrap().escrow[SEATS].consumed,
            3
        );
        let draft = d.run(json!({"type": "CancelSeats", "command_id": "k1",
            "session_id": "s1", "attendee_id": "a1", "seats": 2}));
        assert_eq!(draft.kind, "SeatsCancelled");
        assert_eq!(held(&d.state, "s1", "a1"), 1);
        let e = &d.state.stream("session/s1").unwrap().escrow[SEATS];
        assert_eq!((e.capacity, e.consumed), (12, 3));
        assert_eq!(e.accounts[&d.id].rights(), 9);
        let over = d.plan(json!({"type": "CancelSeats", "command_id": "k2",
            "session_id": "s1", "attendee_id": "a1", "seats": 2}));
        assert!(matches!(
            over,
            Err(Refusal::NotHeld {
                held: 1,
                seats: 2,
                ..
            })
        ));
        // A retry of a cancellation that took effect is not refused: the
        // append answers with the event that did.
        assert!(d
            .plan(json!({"type": "CancelSeats", "command_id": "k1",
                "session_id": "s1", "attendee_id": "a1", "seats": 2}))
            .is_ok());
    }

    #[test]
    fn waitlist_join_and_leave() {
        let mut d = desk_with_session();
        let draft = d.run(json!({"type": "JoinWaitlist", "command_id": "w1",
            "session_id": "s1", "attendee_id": "a1", "seats": 2}));
        assert_eq!(draft.kind, "WaitlistJoined");
        assert_eq!(d.field("session/s1", "waitlist/a1"), json!({"seats": 2}));
        let draft = d.run(json!({"type": "LeaveWaitlist", "command_id": "w2",
            "session_id": "s1", "attendee_id": "a1"}));
        assert_eq!(draft.kind, "WaitlistLeft");
        assert_eq!(d.field("session/s1", "waitlist/a1"), Value::Null);
        assert!(d
            .state
            .stream("session/s1")
            .unwrap()
            .fields
            .contains_key("waitlist/a1"));
    }

    #[test]
    fn print_badge_and_resolve() {
        let mut d = desk_with_session();
        let draft = d.run(json!({"type": "PrintBadge", "command_id": "b1", "attendee_id": "a1"}));
        assert_eq!(draft.kind, "BadgePrinted");
        assert_eq!(d.field("attendee/a1", "badge_printed"), json!(true));
        let draft = d.run(json!({"type": "ResolveConflict", "command_id": "r1",
            "stream": "attendee/a1", "field": "email", "value": "bo@z.org"}));
        assert_eq!(draft.kind, "ConflictResolved");
        assert_eq!(d.field("attendee/a1", "email"), json!("bo@z.org"));
        assert!(matches!(
            d.plan(json!({"type": "ResolveConflict", "command_id": "r2",
                "stream": "attendee/zz", "field": "email", "value": 1})),
            Err(Refusal::UnknownStream(_))
        ));
        assert_eq!(
            err(json!({"type": "ResolveConflict", "command_id": "r3",
                "stream": "attendee/a1", "field": "email"}))
            .split(':')
            .next(),
            Some("value")
        );
    }

    #[test]
    fn decide_oversell_is_handed_to_the_node() {
        let d = Desk::new();
        let sale = EventId([3; 32]).to_string();
        let p = d.plan(json!({"type": "DecideOversell", "command_id": "d1",
            "sale": sale, "action": "honour"}));
        assert!(matches!(
            p,
            Ok(Planned::Decide {
                action: Compensation::Honour,
                ..
            })
        ));
        assert!(err(json!({"type": "DecideOversell", "command_id": "d1",
            "sale": sale, "action": "shrug"}))
        .starts_with("action: "));
    }

    #[test]
    fn unknown_session_or_attendee_is_refused() {
        let d = desk_with_session();
        assert!(matches!(
            d.plan(json!({"type": "PurchaseSeats", "command_id": "p",
                "session_id": "s9", "attendee_id": "a1", "seats": 1})),
            Err(Refusal::UnknownSession(s)) if s == "s9"
        ));
        let r = d
            .plan(json!({"type": "PrintBadge", "command_id": "p", "attendee_id": "a9"}))
            .unwrap_err();
        assert!(r.is_unknown());
        assert!(matches!(r, Refusal::UnknownAttendee(_)));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert!(err(json!({"type": "Dance", "command_id": "x"})).contains("ScheduleSession"));
        assert!(err(json!({"command_id": "x"})).starts_with("type is missing"));
        assert!(err(json!({"type": "PrintBadge", "attendee_id": "a"})).starts_with("command_id"));
        assert!(err(json!({"type": "PrintBadge", "command_id": ""})).starts_with("command_id"));
        assert!(err(json!({"type": "PrintBadge", "command_id": "c"})).starts_with("attendee_id"));
        assert!(
            err(json!({"type": "PrintBadge", "command_id": "c", "attendee_id": "a b"}))
                .starts_with("attendee_id: ")
        );
        assert!(err(
            json!({"type": "RegisterAttendee", "command_id": "c", "attendee_id": "a",
            "name": "N", "email": "nope"})
        )
        .starts_with("email: "));
        assert!(err(
            json!({"type": "PurchaseSeats", "command_id": "c", "session_id": "s",
            "attendee_id": "a", "seats": 0})
        )
        .starts_with("seats: "));
        assert!(err(
            json!({"type": "PurchaseSeats", "command_id": "c", "session_id": "s",
            "attendee_id": "a", "seats": "two"})
        )
        .starts_with("seats: "));
        assert!(err(
            json!({"type": "PrintBadge", "command_id": "c", "attendee_id": "a",
            "colour": "red"})
        )
        .starts_with("colour: "));
        assert!(err(
            json!({"type": "RegisterAttendee", "command_id": "c", "attendee_id": "a",
            "name": "  ", "email": "a@b"})
        )
        .starts_with("name: "));
        assert!(err(json!([1])).contains("JSON object"));
        assert!(Request::parse(b"{")
            .unwrap_err()
            .to_string()
            .starts_with("the body is not JSON"));
    }

    #[test]
    fn commands_round_trip_through_serde() {
        let r = Request::from_json(json!({"type": "JoinWaitlist", "command_id": "c",
            "session_id": "s", "attendee_id": "a", "seats": 2}))
        .unwrap();
        let mut v = serde_json::to_value(&r.command).unwrap();
        assert_eq!(v["type"], "JoinWaitlist");
        v["command_id"] = json!("c");
        assert_eq!(Request::from_json(v).unwrap(), r);
    }

    /// Arbitrary JSON, biased towards command-shaped objects.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (0u64..4).prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-z@ _-]{0,8}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let names = prop::sample::select(vec![
            "type",
            "command_id",
            "user",
            "session_id",
            "attendee_id",
            "name",
            "email",
            "capacity",
            "seats",
            "value",
            "splices",
            "base",
            "policy",
            "to",
            "stream",
            "field",
            "sale",
            "action",
            "expected_version",
        ]);
        let ty = prop::sample::select(TYPES.to_vec());
        (ty, prop::collection::vec((names, value), 0..8)).prop_map(|(ty, kv)| {
            let mut m: Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            m.entry("type").or_insert_with(|| Value::from(ty));
            Value::Object(m)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any body parses into a command that validates and drafts, or is
        /// refused with one sentence; never a panic.
        #[test]
        fn any_body_parses_or_says_why(v in any_json()) {
            let d = desk_with_session();
            match Request::from_json(v) {
                Ok(r) => {
                    prop_assert!(r.command.validate().is_ok());
                    let _ = r.draft(&d.state);
                }
                Err(e) => {
                    let s = e.to_string();
                    prop_assert!(!s.is_empty());
                    prop_assert!(!s.contains('\n'), "{}", s);
                }
            }
        }

        /// Raw bytes never panic the parser.
        #[test]
        fn any_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::parse(&b);
        }
    }
}
