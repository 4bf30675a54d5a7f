//! What another replica lacks, judged from its branch heads: the rule an
//! export file follows (`weftlog export --since`).
//!
//! # The model
//!
//! A replica's frontier is one head `(author, seq, id)` per branch: one per
//! author, or one per branch of an author that forked ([`State::frontier`]).
//! A head names its whole chain (every event has its `prev`), so the other
//! replica holds, of an author, exactly the chains that end at its heads of
//! that author. What it lacks of ours is, for each of our heads, the part of
//! the chain ending there above the highest seq that chain shares with any
//! of its heads of that author ([`lacking`]). A seq alone cannot say this
//! once an author forked: a higher seq on another branch holds nothing of
//! ours above the point where the branches diverge.
//!
//! How much our chain ending at `h` shares with the other's head `o`:
//!
//! - **We hold `o`**: exactly [`State::common_seq`].
//! - **We do not hold `o`**, so we cannot walk its chain. Then:
//!   - if the author is not known to fork (this replica holds one branch of
//!     it, the other names one head of it, and `o`'s seq is above every
//!     seq we hold of it), `o` is taken to extend our chain: the other is
//!     ahead, and holds all of ours. This is the common case (a node is
//!     always ahead on its own events) and what the sync protocol assumes
//!     too. Its cost: if the other in fact holds a branch we have not seen
//!     that forked below our head, the export lacks our branch above the
//!     divergence. Nothing in a frontier can tell; the first exchange the
//!     other way (its export imported here, or a sync round) shows the fork,
//!     and the next export sends our branch.
//!   - otherwise (the author is known to fork, or `o` sits at a seq we hold
//!     with another id, which proves a fork), the divergence point is
//!     unknown and taken to be 0: our chain is sent from its first event,
//!     the same rule as sync's for a branch new to both ends (`sync` module
//!     docs, Forks). The cost is the shared prefix, sent again and skipped
//!     by id on import (counted there as duplicates), once per export until
//!     the other holds our branch heads.
//!
//! A head that names an event this replica holds at another author or seq
//! is a contradiction ([`SinceError::Contradicts`]), not something to
//! guess around: the heads were not that replica's frontier.
//!
//! The sync protocol applies the same rule per head, but incrementally
//! (what the peer holds grows as a round sends, and unforked authors are
//! tracked by seq), so it keeps its own bookkeeping (`sync::Session`).

use std::collections::{BTreeMap, BTreeSet};

use crate::id::{Dot, EventId, NodeId};
use crate::state::State;
use crate::sync::{Head, MAX_FRONTIER_ENTRIES};

/// The most heads [`lacking`] takes from the other replica: as many as a
/// frontier in the sync protocol may name.
pub const MAX_SINCE_HEADS: usize = MAX_FRONTIER_ENTRIES;

/// Why the other replica's heads were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinceError {
    /// More heads than [`MAX_SINCE_HEADS`].
    #[error("{heads} heads, above the limit of {MAX_SINCE_HEADS}")]
    TooMany {
        /// How many were given.
        heads: usize,
    },
    /// A head at seq 0 (seqs start at 1).
    #[error("a head of {author} has seq 0")]
    ZeroSeq {
        /// Its author.
        author: NodeId,
    },
    /// A head names an event this replica holds, at another author or seq.
    #[error("the head {id} is named as {author} seq {seq}, but that event is {held} here")]
    Contradicts {
        /// The author the head names.
        author: NodeId,
        /// The seq the head names.
        seq: u64,
        /// The event id the head names.
        id: EventId,
        /// Where this replica holds that event.
        held: Dot,
    },
}

/// A run of one of our chains the other replica lacks: seqs
/// `from..=head.seq` of the chain that ends at `head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    /// Our branch head the chain ends at.
    pub head: Head,
    /// The first seq the other replica lacks (at least 1).
    pub from: u64,
}

impl Span {
    /// The ids of the span, ascending by seq, as `state` holds them.
    pub fn ids<'a>(&self, state: &'a State) -> impl Iterator<Item = EventId> + 'a {
        let head = self.head.id;
        (self.from..=self.head.seq).filter_map(move |s| state.chain_id(&head, s))
    }
}

/// What a replica whose branch heads are `theirs` lacks of the chains ending
/// at `ours` (heads `state` holds, such as its frontier or its signed
/// durable heads): one span per head of ours it does not hold all of,
/// ascending by head. Spans of one author may overlap below the point where
/// their branches diverge; an event is in the export if any span holds it.
/// `theirs` empty: everything, each chain from seq 1. The rule, and what it
/// costs when a head is not held here, are in the module docs.
pub fn lacking(state: &State, ours: &[Head], theirs: &[Head]) -> Result<Vec<Span>, SinceError> {
    if theirs.len() > MAX_SINCE_HEADS {
        return Err(SinceError::TooMany {
            heads: theirs.len(),
        });
    }
    let mut by_author: BTreeMap<NodeId, BTreeSet<(u64, EventId)>> = BTreeMap::new();
    for h in theirs {
        if h.seq == 0 {
            return Err(SinceError::ZeroSeq { author: h.author });
        }
        if let Some(held) = state.dot_of(&h.id) {
            if held.author != h.author || held.seq != h.seq {
                return Err(SinceError::Contradicts {
                    author: h.author,
                    seq: h.seq,
                    id: h.id,
                    held,
                });
            }
        }
        by_author.entry(h.author).or_default().insert((h.seq, h.id));
    }
    let mut ours: Vec<Head> = ours.to_vec();
    ours.sort_unstable();
    ours.dedup();
    let mut branches: BTreeMap<NodeId, usize> = BTreeMap::new();
    for h in &ours {
        *branches.entry(h.author).or_default() += 1;
    }
    let none = BTreeSet::new();
    let mut out = Vec::new();
    for h in ours {
        debug_assert!(state.contains(&h.id), "our heads are held");
        let other = by_author.get(&h.author).unwrap_or(&none);
        let max_seq = state.max_seq(&h.author);
        let forked = state.is_forked(&h.author)
            || branches.get(&h.author).is_some_and(|&n| n > 1)
            || other.len() > 1
            || other
                .iter()
                .any(|&(seq, id)| seq <= max_seq && !state.contains(&id));
        let shared = other
            .iter()
            .map(|&(seq, id)| {
                if state.contains(&id) {
                    state.common_seq(&h.id, &id)
                } else if forked {
                    0
                } else {
                    // Unforked, and `seq` is above all we hold: ahead of us.
                    h.seq.min(seq)
                }
            })
            .max()
            .unwrap_or(0);
        if shared < h.seq {
            out.push(Span {
                head: h,
                from: shared + 1,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Keypair, Op};
    use crate::hlc::HlcClock;
    use crate::state::{Appended, Draft};

    const T: u64 = 1_700_000_000_000;

    /// One author's replica: a state and a clock, appending one event a
    /// call.
    #[derive(Clone)]
    struct Desk {
        author: NodeId,
        state: State,
        clock: HlcClock,
        wall: u64,
        /// Every event made, by id.
        made: BTreeMap<EventId, Event>,
    }

    impl Desk {
        fn new(secret: u8) -> Desk {
            Desk {
                author: Keypair::from_secret([secret; 32]).node_id(),
                state: State::new(),
                clock: HlcClock::default(),
                wall: T,
                made: BTreeMap::new(),
            }
        }

        /// Appends `n` events; returns their ids.
        fn append(&mut self, n: u64) -> Vec<EventId> {
            (0..n)
                .map(|_| {
                    self.wall += 1;
                    let draft = Draft {
                        stream: "s/1".into(),
                        kind: "Edited".into(),
                        ops: vec![Op::Set {
                            field: "f".into(),
                            value: self.wall.to_string().into_bytes(),
                            supersedes: vec![],
                        }],
                        ..Draft::default()
                    };
                    match self
                        .state
                        .append_local(self.author, &mut self.clock, self.wall, draft)
                    {
                        Ok(Appended::New { event, id, .. }) => {
                            self.made.insert(id, event);
                            id
                        }
                        other => panic!("append refused: {other:?}"),
                    }
                })
                .collect()
        }

        fn heads(&self) -> Vec<Head> {
            heads(&self.state)
        }
    }

    fn heads(state: &State) -> Vec<Head> {
        state
            .frontier()
            .into_iter()
            .map(|(author, seq, id)| Head { author, seq, id })
            .collect()
    }

    /// Inserts into `into` the chain `from` holds ending at `head`, in
    /// chain order.
    fn take(into: &mut State, from: &Desk, head: &Head) {
        for s in 1..=head.seq {
            let id = from.state.chain_id(&head.id, s).expect("chain held");
            if !into.contains(&id) {
                into.insert(&from.made[&id], id).expect("valid");
            }
        }
    }

    /// The ids `lacking` selects, ascending.
    fn selected(state: &State, ours: &[Head], theirs: &[Head]) -> BTreeSet<EventId> {
        lacking(state, ours, theirs)
            .unwrap()
            .iter()
            .flat_map(|s| s.ids(state).collect::<Vec<_>>())
            .collect()
    }

    /// Two desks that share seqs 1..=2 and then fork: `x` with 3..=5, `y`
    /// with 3..=4.
    fn forked() -> (Desk, Desk, Vec<EventId>, Vec<EventId>, Vec<EventId>) {
        let mut x = Desk::new(1);
        let common = x.append(2);
        let mut y = x.clone();
        let xs = x.append(3);
        y.wall += 100;
        let ys = y.append(2);
        (x, y, common, xs, ys)
    }

    #[test]
    fn without_a_fork_the_other_lacks_what_is_above_its_seq() {
        let mut a = Desk::new(1);
        let ids = a.append(5);
        // Equal: nothing.
        assert!(lacking(&a.state, &a.heads(), &a.heads())
            .unwrap()
            .is_empty());
        // Nothing given: everything from seq 1.
        let all = lacking(&a.state, &a.heads(), &[]).unwrap();
        assert_eq!(
            all,
            vec![Span {
                head: a.heads()[0],
                from: 1
            }]
        );
        // A head of another author changes nothing of ours.
        let mut b = Desk::new(2);
        b.append(1);
        assert_eq!(lacking(&a.state, &a.heads(), &b.heads()).unwrap(), all);
        // Ahead of the other (which holds 1..=3): 4 and 5.
        let old = Head {
            author: a.author,
            seq: 3,
            id: ids[2],
        };
        assert_eq!(
            selected(&a.state, &a.heads(), &[old]),
            ids[3..].iter().copied().collect()
        );
    }

    #[test]
    fn an_other_side_ahead_on_an_unforked_author_lacks_nothing_of_it() {
        let mut a = Desk::new(1);
        a.append(3);
        let mut ahead = a.clone();
        ahead.append(2);
        // We hold 1..=3; the other names seq 5, an id we do not hold.
        assert!(lacking(&a.state, &a.heads(), &ahead.heads())
            .unwrap()
            .is_empty());
        // The documented cost: if its 5 is on a branch that left ours at
        // 2 (unseen here), a frontier cannot tell, and our 3 is not sent.
        let mut base = Desk::new(1);
        base.append(2);
        let mut other = base.clone();
        other.wall += 100;
        other.append(3);
        let ours = a.heads();
        assert!(lacking(&a.state, &ours, &other.heads()).unwrap().is_empty());
        // Once it names two heads, one we hold (the fork known there), the
        // unheld one counts for nothing and the held one says what it has.
        let two = [a.state.chain_id(&ours[0].id, 2).map(|id| Head {
            author: a.author,
            seq: 2,
            id,
        })];
        let mut theirs: Vec<Head> = two.into_iter().flatten().collect();
        theirs.extend(other.heads());
        assert_eq!(
            lacking(&a.state, &ours, &theirs).unwrap(),
            vec![Span {
                head: ours[0],
                from: 3
            }],
            "the held head gives the divergence exactly"
        );
    }

    #[test]
    fn an_other_side_forked_on_a_branch_we_lack_gets_ours_from_the_divergence() {
        let (x, y, _, xs, _) = forked();
        // The other holds both: its heads are x's 5 (held here) and y's 4
        // (not held): ours, x's chain, is all held there.
        let mut both = x.state.clone();
        take(&mut both, &y, &y.heads()[0]);
        assert!(lacking(&x.state, &x.heads(), &heads(&both))
            .unwrap()
            .is_empty());
        // The other holds x's chain up to 3 and y's branch: it lacks 4, 5,
        // found exactly through the held head.
        let mut other = y.state.clone();
        let x3 = Head {
            author: x.author,
            seq: 3,
            id: xs[0],
        };
        take(&mut other, &x, &x3);
        assert_eq!(heads(&other).len(), 2);
        assert_eq!(
            selected(&x.state, &x.heads(), &heads(&other)),
            xs[1..].iter().copied().collect()
        );
        // The other holds only y's branch, at a seq we hold with another id
        // (a proven fork, divergence unknown): ours from seq 1.
        let y4 = y.heads()[0];
        assert_eq!(y4.seq, 4);
        assert_eq!(
            lacking(&x.state, &x.heads(), &[y4]).unwrap(),
            vec![Span {
                head: x.heads()[0],
                from: 1
            }]
        );
    }

    #[test]
    fn we_forked_and_the_other_holds_one_branch() {
        let (x, y, common, xs, ys) = forked();
        let mut both = x.state.clone();
        take(&mut both, &y, &y.heads()[0]);
        let ours = heads(&both);
        assert_eq!(ours.len(), 2);
        // The other holds y's branch: it lacks x's above the shared 2.
        let got = selected(&both, &ours, &y.heads());
        assert_eq!(got, xs.iter().copied().collect());
        assert!(got
            .iter()
            .all(|id| !common.contains(id) && !ys.contains(id)));
        // The other holds x's branch: it lacks y's 3 and 4.
        assert_eq!(
            selected(&both, &ours, &x.heads()),
            ys.iter().copied().collect()
        );
        // The other holds the common prefix only: both branches above 2.
        let c2 = Head {
            author: x.author,
            seq: 2,
            id: common[1],
        };
        assert_eq!(selected(&both, &ours, &[c2]).len(), 5);
    }

    #[test]
    fn a_head_we_do_not_hold_of_a_forked_author_sends_every_branch_from_one() {
        let (x, y, _, _, ys) = forked();
        let mut both = x.state.clone();
        take(&mut both, &y, &y.heads()[0]);
        // The other went on from x's 5 to 7: we cannot tell which branch
        // its 7 extends, so both go from seq 1 (shared prefix once).
        let mut ahead = x.clone();
        ahead.append(2);
        let spans = lacking(&both, &heads(&both), &ahead.heads()).unwrap();
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(|s| s.from == 1));
        assert_eq!(selected(&both, &heads(&both), &ahead.heads()).len(), 7);
        // Naming as well a head we hold on x's chain narrows it to y's.
        let x5 = x.heads()[0];
        let got = selected(&both, &heads(&both), &[x5, ahead.heads()[0]]);
        assert_eq!(
            got,
            ys.iter().copied().collect(),
            "x's chain is held, and y's up to where it leaves x's"
        );
    }

    #[test]
    fn contradicting_or_malformed_heads_are_refused() {
        let mut a = Desk::new(1);
        let ids = a.append(3);
        let ours = a.heads();
        let wrong_seq = Head {
            author: a.author,
            seq: 2,
            id: ids[2],
        };
        assert!(matches!(
            lacking(&a.state, &ours, &[wrong_seq]),
            Err(SinceError::Contradicts { seq: 2, .. })
        ));
        let b = Desk::new(2).author;
        let wrong_author = Head {
            author: b,
            seq: 3,
            id: ids[2],
        };
        assert!(matches!(
            lacking(&a.state, &ours, &[wrong_author]),
            Err(SinceError::Contradicts { .. })
        ));
        let zero = Head {
            author: a.author,
            seq: 0,
            id: ids[0],
        };
        assert_eq!(
            lacking(&a.state, &ours, &[zero]),
            Err(SinceError::ZeroSeq { author: a.author })
        );
        let many = vec![ours[0]; MAX_SINCE_HEADS + 1];
        assert!(matches!(
            lacking(&a.state, &ours, &many),
            Err(SinceError::TooMany { .. })
        ));
    }
}
