//! What others did while this node was cut off: the events it received
//! that are concurrent with its own work of a disconnected period, grouped
//! by stream and field, with the conflicts they left.
//!
//! The shell decides when a period starts and ends (a peer's connection
//! dropped, then a round with it ended in sync) and remembers the log
//! position at the start. [`reconcile`] takes the events of the log from
//! that position on, in log order, and the state now.
//!
//! **Concurrent.** A received event `e` (its author is not this node) is
//! concurrent with an own event `o` of the period iff neither is in the
//! other's causal past. Deciding that for every pair would walk the DAG;
//! a few facts make it two cheap passes over the window:
//! - the log is causally closed and in a causal order, so walking it in
//!   log order meets every event after its `prev` and `deps`;
//! - an event in the log before the period's start cannot have an own
//!   event of the period in its past (it was there before them), so a
//!   `prev` or dep outside the window knows none of them;
//! - this node's own events of the period form its chain (seqs `s+1,
//!   s+2, …`): an event that knows own seq `k` knows every own seq below
//!   it through `prev`, and the past of an own event holds the past of
//!   every earlier one.
//!
//! So, per event of the window ([`relations`]):
//! - `known(e)`, the highest own seq in its past (0: none of the
//!   period's): its own seq for an own event, else the greatest `known` of
//!   its `prev` and deps that lie in the window. Along `prev` and deps the
//!   hlc strictly grows, so an event whose hlc is not above the hlc of the
//!   period's first own event cannot know it, and needs no lookup;
//! - `known_by(e)`, the lowest own seq whose past holds `e` (none: no own
//!   event of the period saw it): walking the own events in order, each
//!   marks the part of its past not marked yet, stopping at marked events
//!   (the marked set is the union of earlier own pasts, closed downwards),
//!   so each event is marked once.
//!
//! Then `e` is concurrent with exactly the own events of the period whose
//! seq lies strictly between `known(e)` and `known_by(e)`: received during
//! the period but before this node's first edit that saw it, and not
//! having seen that edit itself.
//!
//! A forked own author (a restored copy of this node) is outside what the
//! rule assumes: its other branch's events count as received, and the
//! seqs may then claim too much or too little; the report is a notice,
//! not state, so this is accepted.
//!
//! **The report** lists, per stream that a concurrent received event
//! touched: per register field, per counter and per text field those
//! events changed, their writes (`theirs`) and this node's writes of the
//! period concurrent with at least one of them (`ours`), whether the field
//! is in conflict now, and the value the state shows. Streams, fields and
//! counters are in ascending order; writes in log order. Each list keeps
//! at most [`MAX_LISTED`] entries (the counts stay exact).

use std::collections::BTreeMap;

use crate::event::{Event, Op, Policy};
use crate::hlc::Hlc;
use crate::id::{EventId, NodeId};
use crate::state::{self, State};

/// Most writes one list of a report (`theirs` or `ours` of one field,
/// counter or text) keeps: a peer offline for days can bring thousands.
pub const MAX_LISTED: usize = 100;

/// What the events received during a disconnected period did concurrently
/// with this node's own events of the period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// This node's own events in the window.
    pub own_events: u64,
    /// Received events concurrent with at least one of them.
    pub received: u64,
    /// Per stream those events touched, ascending by stream.
    pub streams: Vec<StreamReport>,
    /// Register fields listed that are in conflict now.
    pub conflicts: u64,
}

/// One stream's part of a [`Report`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// The stream.
    pub stream: String,
    /// Register fields the concurrent events wrote, ascending.
    pub fields: Vec<FieldReport>,
    /// Counters (PN and bounded) they changed, ascending.
    pub counters: Vec<CounterReport>,
    /// Text fields they edited, ascending.
    pub texts: Vec<TextReport>,
    /// Concurrent received events of the stream.
    pub events: u64,
}

/// Who made a change, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The event's author.
    pub author: NodeId,
    /// Its acting user, if it names one.
    pub user: Option<String>,
    /// Its hlc.
    pub hlc: Hlc,
    /// Its id.
    pub event: EventId,
    /// Its kind.
    pub kind: String,
}

/// A register write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// Who and when.
    pub origin: Origin,
    /// The value bytes (JSON text by convention).
    pub value: Vec<u8>,
}

/// One register field of a [`StreamReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldReport {
    /// The field.
    pub field: String,
    /// The concurrent received writes, in log order.
    pub theirs: Vec<Write>,
    /// This node's writes of the period concurrent with one of them.
    pub ours: Vec<Write>,
    /// More than one write stands on the field now.
    pub conflict: bool,
    /// The value the state shows now.
    pub shown: Option<Vec<u8>>,
}

/// A change to a counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A PN-counter increment.
    Add(i64),
    /// Bounded counter: capacity added.
    Init(u64),
    /// Bounded counter: rights moved to a node.
    Transfer {
        /// The node receiving them.
        to: NodeId,
        /// How many.
        amount: u64,
    },
    /// Bounded counter: units sold (a consume, or an overdraft sale).
    Sold(u64),
    /// Bounded counter: its seat policy set.
    Policy(Policy),
}

/// A counter change with its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// Who and when.
    pub origin: Origin,
    /// What.
    pub change: Change,
}

/// One counter of a [`StreamReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterReport {
    /// The counter.
    pub counter: String,
    /// A bounded counter (escrow), not a PN counter.
    pub escrow: bool,
    /// The concurrent received changes, in log order.
    pub theirs: Vec<Changed>,
    /// This node's changes of the period concurrent with one of them.
    pub ours: Vec<Changed>,
    /// The value now: a PN counter's sum; a bounded counter's capacity
    /// (with honoured oversold units) minus units sold.
    pub value: i128,
    /// A bounded counter's oversold sales now.
    pub oversold: u64,
}

/// One text field of a [`StreamReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextReport {
    /// The field.
    pub field: String,
    /// The concurrent received edits, in log order.
    pub theirs: Vec<Origin>,
    /// This node's edits of the period concurrent with one of them.
    pub ours: Vec<Origin>,
    /// The merged text now.
    pub text: String,
}

/// How one event of a period's window relates to this node's own events
/// of the period (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relation {
    /// The highest own seq of the window in the event's causal past,
    /// itself included (0: none).
    pub known: u64,
    /// The lowest own seq of the window whose causal past holds the
    /// event, itself included (`None`: none).
    pub known_by: Option<u64>,
}

impl Relation {
    /// Whether the event is concurrent with the own event of seq `own`.
    pub fn concurrent_with(&self, own: u64) -> bool {
        self.known < own && self.known_by.is_none_or(|f| own < f)
    }
}

/// Per event of `window` (the log from a period's start, in log order),
/// its [`Relation`] to `me`'s events in the window. Module docs give the
/// rule.
pub fn relations(window: &[(Event, EventId)], me: &NodeId) -> Vec<Relation> {
    let index: BTreeMap<EventId, usize> = window
        .iter()
        .enumerate()
        .map(|(i, (_, id))| (*id, i))
        .collect();
    let parents = |i: usize| {
        let e = &window[i].0;
        e.prev
            .iter()
            .chain(&e.deps)
            .filter_map(|p| index.get(p).copied())
            // A log is causal, so a parent comes first; a window that is
            // not (a damaged file) leaves such a link out, never indexes
            // past what is related.
            .filter(move |&p| p < i)
    };
    let mut out: Vec<Relation> = Vec::with_capacity(window.len());
    // The hlc of the first own event of the window: nothing at or below it
    // can know an own event of the period.
    let mut first_own: Option<Hlc> = None;
    let mut stack: Vec<usize> = Vec::new();
    for (i, (e, _)) in window.iter().enumerate() {
        let mine = e.author == *me;
        let known = if mine {
            first_own.get_or_insert(e.hlc);
            e.seq
        } else if first_own.is_none_or(|h| e.hlc <= h) {
            0
        } else {
            // Parents come before `i` in a causal order: already related.
            parents(i).map(|p| out[p].known).max().unwrap_or(0)
        };
        out.push(Relation {
            known,
            known_by: None,
        });
        if mine {
            // Mark the part of this own event's past not marked yet.
            stack.push(i);
            while let Some(j) = stack.pop() {
                if out[j].known_by.is_some() {
                    continue;
                }
                out[j].known_by = Some(e.seq);
                stack.extend(parents(j).filter(|&p| out[p].known_by.is_none()));
            }
        }
    }
    out
}

/// The report of a period: `window` is the log from the period's start
/// position on, in log order; `me` this node; `state` the state now (it
/// holds every event of the window).
pub fn reconcile(window: &[(Event, EventId)], me: &NodeId, state: &State) -> Report {
    let rel = relations(window, me);
    let own: Vec<usize> = (0..window.len())
        .filter(|&i| window[i].0.author == *me)
        .collect();
    // Ascending: the own events of the window are its chain, in log order.
    let mut own_seqs: Vec<u64> = own.iter().map(|&i| window[i].0.seq).collect();
    own_seqs.sort_unstable();
    let mut report = Report {
        own_events: own.len() as u64,
        ..Report::default()
    };
    // Received events concurrent with an own event of the period, by stream.
    let mut by_stream: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (e, _)) in window.iter().enumerate() {
        // The first own seq above what `e` knows is the one to test.
        let next = own_seqs.partition_point(|&s| s <= rel[i].known);
        let concurrent = own_seqs
            .get(next)
            .is_some_and(|&s| rel[i].concurrent_with(s));
        if e.author != *me && concurrent {
            by_stream.entry(e.stream.as_str()).or_default().push(i);
            report.received += 1;
        }
    }
    for (stream, theirs) in by_stream {
        let mut acc = Gather::default();
        for &i in &theirs {
            acc.take(&window[i], Key::Theirs(rel[i]));
        }
        for &i in &own {
            if window[i].0.stream == stream {
                acc.take(&window[i], Key::Ours(window[i].0.seq));
            }
        }
        let s = acc.finish(stream, state);
        report.conflicts += s.fields.iter().filter(|f| f.conflict).count() as u64;
        report.streams.push(StreamReport {
            events: theirs.len() as u64,
            ..s
        });
    }
    report
}

/// Which side an event of a stream is on: a concurrent received one with
/// its relation, or an own one with its seq.
#[derive(Clone, Copy)]
enum Key {
    Theirs(Relation),
    Ours(u64),
}

/// One field's or counter's changes: theirs with their relations, ours
/// with their seqs.
struct Lists<T> {
    theirs: Vec<(Relation, T)>,
    ours: Vec<(u64, T)>,
}

impl<T> Default for Lists<T> {
    fn default() -> Self {
        Lists {
            theirs: Vec::new(),
            ours: Vec::new(),
        }
    }
}

impl<T> Lists<T> {
    fn push(&mut self, key: Key, t: T) {
        match key {
            Key::Theirs(r) => self.theirs.push((r, t)),
            Key::Ours(seq) => self.ours.push((seq, t)),
        }
    }

    fn last_is(&self, key: Key, same: impl Fn(&T) -> bool) -> bool {
        match key {
            Key::Theirs(_) => self.theirs.last().is_some_and(|(_, t)| same(t)),
            Key::Ours(_) => self.ours.last().is_some_and(|(_, t)| same(t)),
        }
    }

    /// `theirs`, and `ours` concurrent with at least one of them, each cut
    /// to [`MAX_LISTED`]. `None` when nobody else touched it.
    fn split(self) -> Option<(Vec<T>, Vec<T>)> {
        if self.theirs.is_empty() {
            return None;
        }
        let rels: Vec<Relation> = self.theirs.iter().map(|(r, _)| *r).collect();
        let theirs = self
            .theirs
            .into_iter()
            .map(|(_, t)| t)
            .take(MAX_LISTED)
            .collect();
        let ours = self
            .ours
            .into_iter()
            .filter(|(seq, _)| rels.iter().any(|r| r.concurrent_with(*seq)))
            .map(|(_, t)| t)
            .take(MAX_LISTED)
            .collect();
        Some((theirs, ours))
    }
}

/// One stream's changes, gathered from its events.
#[derive(Default)]
struct Gather {
    fields: BTreeMap<String, Lists<Write>>,
    counters: BTreeMap<String, (bool, Lists<Changed>)>,
    texts: BTreeMap<String, Lists<Origin>>,
}

impl Gather {
    /// Takes an event's ops.
    fn take(&mut self, (e, id): &(Event, EventId), key: Key) {
        let origin = || Origin {
            author: e.author,
            user: e.meta.user.clone(),
            hlc: e.hlc,
            event: *id,
            kind: e.kind.clone(),
        };
        for op in &e.ops {
            let (counter, escrow, change) = match op {
                Op::Set { field, value, .. } => {
                    let w = Write {
                        origin: origin(),
                        value: value.clone(),
                    };
                    self.fields.entry(field.clone()).or_default().push(key, w);
                    continue;
                }
                Op::Text { field, .. } => {
                    let edits = self.texts.entry(field.clone()).or_default();
                    // One entry per event, however many changes it carries.
                    if !edits.last_is(key, |o| o.event == *id) {
                        edits.push(key, origin());
                    }
                    continue;
                }
                Op::Add { counter, delta } => (counter, false, Change::Add(*delta)),
                Op::EscrowInit { counter, capacity } => (counter, true, Change::Init(*capacity)),
                Op::EscrowTransfer {
                    counter,
                    to,
                    amount,
                } => (
                    counter,
                    true,
                    Change::Transfer {
                        to: *to,
                        amount: *amount,
                    },
                ),
                Op::EscrowConsume { counter, amount }
                | Op::EscrowOverdraw {
                    counter, amount, ..
                } => (counter, true, Change::Sold(*amount)),
                Op::EscrowPolicy {
                    counter, policy, ..
                } => (counter, true, Change::Policy(*policy)),
            };
            let c = self.counters.entry(counter.clone()).or_default();
            c.0 |= escrow;
            c.1.push(
                key,
                Changed {
                    origin: origin(),
                    change,
                },
            );
        }
    }

    fn finish(self, stream: &str, state: &State) -> StreamReport {
        let s = state.stream(stream);
        let fields = self
            .fields
            .into_iter()
            .filter_map(|(field, lists)| {
                let (theirs, ours) = lists.split()?;
                let standing = s.and_then(|s| s.fields.get(&field));
                Some(FieldReport {
                    conflict: standing.is_some_and(|w| w.len() > 1),
                    shown: standing
                        .and_then(state::shown)
                        .map(|(_, w)| w.value.clone()),
                    field,
                    theirs,
                    ours,
                })
            })
            .collect();
        let counters = self
            .counters
            .into_iter()
            .filter_map(|(counter, (escrow, lists))| {
                let (theirs, ours) = lists.split()?;
                let (value, oversold) = match (escrow, s) {
                    (false, Some(s)) => (s.counters.get(&counter).copied().unwrap_or(0), 0),
                    (true, Some(s)) => s.escrow.get(&counter).map_or((0, 0), |e| {
                        // Each sum is far inside i128 (see `Account::balance`).
                        (
                            (e.capacity + e.honoured) as i128 - e.consumed as i128,
                            e.oversold.len() as u64,
                        )
                    }),
                    (_, None) => (0, 0),
                };
                Some(CounterReport {
                    counter,
                    escrow,
                    theirs,
                    ours,
                    value,
                    oversold,
                })
            })
            .collect();
        let texts = self
            .texts
            .into_iter()
            .filter_map(|(field, lists)| {
                let (theirs, ours) = lists.split()?;
                let text = s
                    .and_then(|s| s.text(&field))
                    .map(|t| t.text.clone())
                    .unwrap_or_default();
                Some(TextReport {
                    field,
                    theirs,
                    ours,
                    text,
                })
            })
            .collect();
        StreamReport {
            stream: stream.to_string(),
            fields,
            counters,
            texts,
            events: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::event::Meta;
    use crate::state::Draft;
    use crate::testkit::Desk;

    fn set(stream: &str, field: &str, value: &str, user: &str) -> Draft {
        Draft {
            stream: stream.into(),
            kind: "Changed".into(),
            ops: vec![Op::Set {
                field: field.into(),
                value: value.as_bytes().to_vec(),
                supersedes: Vec::new(),
            }],
            meta: Meta {
                command_id: None,
                user: Some(user.into()),
            },
            ..Draft::default()
        }
    }

    fn add(stream: &str, counter: &str, delta: i64) -> Draft {
        Draft {
            stream: stream.into(),
            kind: "Added".into(),
            ops: vec![Op::Add {
                counter: counter.into(),
                delta,
            }],
            ..Draft::default()
        }
    }

    /// The events of `desk`'s log from position `from` on.
    fn window(desk: &Desk, from: usize) -> Vec<(Event, EventId)> {
        desk.log[from..].to_vec()
    }

    #[test]
    fn both_sides_edit_one_field_and_the_report_marks_the_conflict() {
        let mut a = Desk::new(1);
        let mut b = Desk::new(2);
        a.append(1000, set("attendee/7", "email", "\"x@a\"", "ann"))
            .unwrap();
        b.merge(&a);
        let start = a.log.len();
        // Cut off: both edit the email; b edits another field and counter.
        a.append(2000, set("attendee/7", "email", "\"ann@a\"", "ann"))
            .unwrap();
        b.append(2100, set("attendee/7", "email", "\"bob@b\"", "bob"))
            .unwrap();
        b.append(2200, set("attendee/8", "phone", "\"555\"", "bob"))
            .unwrap();
        b.append(2300, add("session/1", "held/7", 2)).unwrap();
        a.merge(&b);
        let r = reconcile(&window(&a, start), &a.id, &a.state);
        assert_eq!((r.own_events, r.received, r.conflicts), (1, 3, 1));
        let names: Vec<&str> = r.streams.iter().map(|s| s.stream.as_str()).collect();
        assert_eq!(names, ["attendee/7", "attendee/8", "session/1"]);
        let email = &r.streams[0].fields[0];
        assert_eq!(email.field, "email");
        assert!(email.conflict);
        assert_eq!(email.theirs[0].value, b"\"bob@b\"");
        assert_eq!(email.theirs[0].origin.user.as_deref(), Some("bob"));
        assert_eq!(email.ours[0].value, b"\"ann@a\"");
        assert_eq!(email.shown.as_deref(), Some(&b"\"bob@b\""[..]));
        let phone = &r.streams[1].fields[0];
        assert!(!phone.conflict && phone.ours.is_empty());
        let held = &r.streams[2].counters[0];
        assert_eq!((held.escrow, held.value), (false, 2));
        assert_eq!(held.theirs[0].change, Change::Add(2));
    }

    #[test]
    fn an_event_that_saw_our_work_is_not_concurrent() {
        let mut a = Desk::new(1);
        let mut b = Desk::new(2);
        let start = a.log.len();
        a.append(1000, set("s", "f", "1", "ann")).unwrap();
        b.merge(&a);
        // b saw a's write before it wrote: a causal successor, no news.
        b.append(1100, set("s", "f", "2", "bob")).unwrap();
        a.merge(&b);
        let r = reconcile(&window(&a, start), &a.id, &a.state);
        assert_eq!((r.own_events, r.received), (1, 0));
        assert!(r.streams.is_empty());
    }

    #[test]
    fn an_event_received_before_our_work_is_in_its_past() {
        let mut a = Desk::new(1);
        let mut b = Desk::new(2);
        b.append(1000, set("s", "f", "1", "bob")).unwrap();
        // Received at the start of the period, then seen by a's edit.
        a.merge(&b);
        a.append(1100, set("s", "f", "2", "ann")).unwrap();
        let r = reconcile(&window(&a, 0), &a.id, &a.state);
        assert_eq!((r.own_events, r.received), (1, 0));
    }

    #[test]
    fn nothing_of_ours_means_nothing_concurrent() {
        let mut a = Desk::new(1);
        let mut b = Desk::new(2);
        b.append(1000, set("s", "f", "1", "bob")).unwrap();
        a.merge(&b);
        let r = reconcile(&window(&a, 0), &a.id, &a.state);
        assert_eq!(r, Report::default());
    }

    #[test]
    fn only_the_own_writes_after_what_they_knew_are_listed() {
        let mut a = Desk::new(1);
        let mut b = Desk::new(2);
        a.append(1000, set("s", "f", "1", "ann")).unwrap();
        b.merge(&a);
        a.append(1100, set("s", "f", "2", "ann")).unwrap();
        // b knows a's first write, not its second.
        b.append(1200, set("s", "f", "3", "bob")).unwrap();
        a.merge(&b);
        let r = reconcile(&window(&a, 0), &a.id, &a.state);
        let f = &r.streams[0].fields[0];
        assert_eq!(f.ours.len(), 1);
        assert_eq!(f.ours[0].value, b"2");
        assert!(f.conflict);
    }

    /// The causal past of `id`, itself included, by walking it.
    fn past(all: &BTreeMap<EventId, Event>, id: &EventId) -> BTreeSet<EventId> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![*id];
        while let Some(x) = todo.pop() {
            if seen.insert(x) {
                let e = &all[&x];
                todo.extend(e.prev.iter().chain(&e.deps).copied());
            }
        }
        seen
    }

    /// A step of a random history: a desk appends, or learns a prefix of
    /// another desk's log.
    #[derive(Clone, Debug)]
    enum Step {
        Append(usize, u8),
        Learn(usize, usize, u8),
    }

    fn step(desks: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..desks, any::<u8>()).prop_map(|(d, f)| Step::Append(d, f)),
            (0..desks, 0..desks, any::<u8>()).prop_map(|(d, from, cut)| Step::Learn(d, from, cut)),
        ]
    }

    fn run(desks: &mut [Desk], steps: &[Step], wall: &mut u64, cut_off: bool) {
        for s in steps {
            *wall += 10;
            match *s {
                Step::Append(d, f) => {
                    let draft = set("s", &format!("f{}", f % 3), &f.to_string(), "u");
                    desks[d].append(*wall, draft).unwrap();
                }
                Step::Learn(d, from, cut) if d != from => {
                    // During the partition desk 0 neither sends nor hears.
                    if cut_off && (d == 0 || from == 0) {
                        continue;
                    }
                    let log = desks[from].log.clone();
                    let n = log.len() * usize::from(cut) / 255;
                    desks[d].learn(&log[..n], *wall);
                }
                Step::Learn(..) => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The fast rule names, for every received event of the window,
        /// exactly the own events of the period it is concurrent with.
        #[test]
        fn fast_rule_equals_the_causal_past(
            desks in 2usize..=3,
            before in proptest::collection::vec(step(3), 0..20),
            during in proptest::collection::vec(step(3), 0..30),
            after in proptest::collection::vec(step(3), 0..10),
        ) {
            let mut d: Vec<Desk> = (0..desks).map(|i| Desk::new(i as u8 + 1)).collect();
            let fit = |s: &[Step]| -> Vec<Step> {
                s.iter().map(|s| match *s {
                    Step::Append(a, f) => Step::Append(a % desks, f),
                    Step::Learn(a, b, c) => Step::Learn(a % desks, b % desks, c),
                }).collect()
            };
            let mut wall = 1000;
            run(&mut d, &fit(&before), &mut wall, false);
            let start = d[0].log.len();
            run(&mut d, &fit(&during), &mut wall, true);
            run(&mut d, &fit(&after), &mut wall, false);
            for i in 1..desks {
                let log = d[i].log.clone();
                d[0].learn(&log, u64::MAX);
            }
            let me = d[0].id;
            let win = window(&d[0], start);
            let all: BTreeMap<EventId, Event> =
                d[0].log.iter().map(|(e, id)| (*id, e.clone())).collect();
            let pasts: BTreeMap<EventId, BTreeSet<EventId>> =
                win.iter().map(|(_, id)| (*id, past(&all, id))).collect();
            let rel = relations(&win, &me);
            let mut concurrent = 0;
            for (i, (e, id)) in win.iter().enumerate() {
                if e.author == me {
                    continue;
                }
                let mut any = false;
                for (o, oid) in win.iter().filter(|(o, _)| o.author == me) {
                    let brute = !pasts[id].contains(oid) && !pasts[oid].contains(id);
                    prop_assert_eq!(rel[i].concurrent_with(o.seq), brute);
                    any |= brute;
                }
                concurrent += u64::from(any);
            }
            let r = reconcile(&win, &me, &d[0].state);
            prop_assert_eq!(r.received, concurrent);
        }
    }
}
