//! Helpers shared by the crate's unit tests (compiled for tests only).
//!
//! [`Desk`] is one author with its own replica: a [`State`], an
//! [`HlcClock`], and the events it holds in the order it inserted them,
//! which is a causal order, so another desk can learn them in that order.

use crate::event::{Event, Keypair};
use crate::hlc::HlcClock;
use crate::id::{EventId, NodeId};
use crate::state::{Appended, Draft, Inserted, PrepareError, State};

/// One author with its own replica.
pub(crate) struct Desk {
    /// The author: the node id of the key made from the desk's secret.
    pub(crate) id: NodeId,
    pub(crate) state: State,
    pub(crate) clock: HlcClock,
    /// The events it holds, in the order it inserted them.
    pub(crate) log: Vec<(Event, EventId)>,
}

impl Desk {
    /// A desk whose key is made from the secret `[secret; 32]`.
    pub(crate) fn new(secret: u8) -> Desk {
        Desk {
            id: Keypair::from_secret([secret; 32]).node_id(),
            state: State::new(),
            clock: HlcClock::default(),
            log: Vec::new(),
        }
    }

    /// Appends a draft as a node does ([`State::append_local`]) at wall
    /// time `wall`: the new event's id, or the id of the event that already
    /// carried out its command.
    pub(crate) fn append(&mut self, wall: u64, draft: Draft) -> Result<EventId, PrepareError> {
        match self
            .state
            .append_local(self.id, &mut self.clock, wall, draft)?
        {
            Appended::New { event, id, .. } => {
                self.log.push((event, id));
                Ok(id)
            }
            Appended::Existing(r) => Ok(r.id),
        }
    }

    /// Inserts `from` (a causal order), skipping what it holds, as a node
    /// does at wall time `wall`: the clock observes what is within its
    /// horizon.
    ///
    /// # Panics
    /// If an event is refused.
    pub(crate) fn learn(&mut self, from: &[(Event, EventId)], wall: u64) {
        for (e, id) in from {
            match self.state.insert(e, *id) {
                Ok(Inserted::New) => {
                    self.clock.observe_at(e.hlc, wall);
                    self.log.push((e.clone(), *id));
                }
                Ok(Inserted::Duplicate) => {}
                Err(err) => panic!("refused {id:?}: {err}"),
            }
        }
    }

    /// Inserts everything `from` holds, in its order; the clock observes
    /// every timestamp.
    ///
    /// # Panics
    /// If an event is refused.
    pub(crate) fn merge(&mut self, from: &Desk) {
        // The horizon at the end of time is above every valid hlc.
        self.learn(&from.log, u64::MAX);
    }
}
