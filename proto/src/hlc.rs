//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! An [`Hlc`] is one `u64`: the upper 48 bits are milliseconds since the Unix
//! epoch, the lower 16 bits a logical counter. Ordering is plain integer
//! ordering. The clock never reads the time itself: callers pass `now_ms`.
//!
//! Invariants the rest of the system relies on:
//! - every event's hlc is strictly greater than the hlc of its `prev` and of
//!   each of its `deps`, so `{e : e.hlc <= x}` is always causally closed;
//! - a node's clock is monotone across restarts (it is re-seeded from the
//!   largest hlc in the log) and across wall-clock steps backwards.
//!
//! # How far ahead the clock follows
//!
//! An HLC follows the largest timestamp it sees, so one node whose wall
//! clock runs ahead drags every clock that hears from it ahead too, and
//! nothing but [`MAX_MS`] stops it. The local clock therefore follows a
//! timestamp only up to [`MAX_CLOCK_AHEAD_MS`] past the local wall time
//! ([`Hlc::horizon`]): it neither observes ([`HlcClock::observe_at`]), nor
//! seeds itself from, nor takes as a dependency an event beyond that. Such
//! events are still valid and stored, synced and folded like any other:
//! validity never depends on the receiver's clock (`DESIGN.md` §2), only
//! what a node builds on top does. Once the local wall time catches up, the
//! events are within the horizon and become ordinary dependencies.
//!
//! A node's own events are never beyond its own horizon, unless its wall
//! clock stepped backwards by more than the bound after it made them: the
//! clock never goes back, so its next event still follows its own last
//! one (the chain's `prev`), as before.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp. See the module docs for the layout.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc(pub u64);

const LOGICAL_BITS: u32 = 16;

/// The last millisecond an event may carry: 9999-12-31T23:59:59.999Z.
/// Bounding the clock keeps one far-future event from exhausting it.
pub const MAX_MS: u64 = 253_402_300_799_999;

/// How far ahead of the local wall time an hlc may be for the local clock
/// to follow it (see the module docs): one minute.
///
/// Hosts kept by NTP agree within milliseconds; a laptop or a VM that was
/// suspended, or a host without time sync, is off by seconds to tens of
/// seconds. A minute lets every such honest clock count as "now", so its
/// events become dependencies at once, while one clock that is wrong by
/// more (a misconfigured zone, a dead RTC battery, a nemesis) can move the
/// others' hlcs at most a minute past their wall time. Events beyond the
/// bound only lose being dependencies of new local events until the local
/// wall time catches up: writes made meanwhile are concurrent with them
/// (register conflicts show both values, the displayed one still the
/// greatest hlc), never refused.
pub const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

impl Hlc {
    /// The zero timestamp, below every real one.
    pub const ZERO: Hlc = Hlc(0);
    /// The largest valid timestamp; events above it are refused.
    pub const MAX: Hlc = Hlc((MAX_MS << LOGICAL_BITS) | 0xffff);

    /// The timestamp for physical time `ms` with logical counter 0.
    pub fn from_ms(ms: u64) -> Hlc {
        Hlc(ms << LOGICAL_BITS)
    }

    /// The largest hlc the local clock follows at wall time `now_ms`: the
    /// last of millisecond `now_ms + MAX_CLOCK_AHEAD_MS`, saturating at
    /// [`Hlc::MAX`].
    pub fn horizon(now_ms: u64) -> Hlc {
        let ms = now_ms.saturating_add(MAX_CLOCK_AHEAD_MS).min(MAX_MS);
        Hlc((ms << LOGICAL_BITS) | 0xffff)
    }

    /// Milliseconds since the Unix epoch.
    pub fn ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        self.0 as u16
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node's clock. Feed it the wall time; it hands out strictly increasing
/// timestamps that are also above every timestamp it was told about.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that will only issue timestamps above `last` (the largest hlc
    /// in the log when a node opens).
    pub fn new(last: Hlc) -> HlcClock {
        HlcClock { last }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Records a timestamp seen on a received event, however far ahead it
    /// is. A node observes through [`HlcClock::observe_at`], which bounds it.
    pub fn observe(&mut self, hlc: Hlc) {
        self.last = self.last.max(hlc);
    }

    /// Records a timestamp seen on a received event at wall time `now_ms`,
    /// unless it is beyond [`Hlc::horizon`]`(now_ms)`: returns whether it
    /// was observed.
    pub fn observe_at(&mut self, hlc: Hlc, now_ms: u64) -> bool {
        let within = hlc <= Hlc::horizon(now_ms);
        if within {
            self.observe(hlc);
        }
        within
    }

    /// A new timestamp for an event, strictly above everything issued or
    /// observed so far and above `after` (the largest hlc of its prev and
    /// deps), and at least the wall time `now_ms` when the wall clock is ahead.
    /// Past [`Hlc::MAX`] the result is out of range and an event carrying it
    /// is refused by [`crate::Event::check`]; the clock itself never wraps.
    pub fn tick(&mut self, now_ms: u64, after: Hlc) -> Hlc {
        let floor = self.last.max(after);
        let wall = Hlc::from_ms(now_ms.min(MAX_MS));
        let next = if wall > floor {
            wall
        } else {
            Hlc(floor.0.saturating_add(1))
        };
        self.last = next;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotone_across_backward_steps_and_restarts() {
        let mut c = HlcClock::default();
        let a = c.tick(1_000, Hlc::ZERO);
        assert_eq!(a, Hlc::from_ms(1_000));
        let b = c.tick(500, Hlc::ZERO); // wall clock stepped back
        assert!(b > a);
        assert_eq!(b.ms(), 1_000);
        assert_eq!(b.logical(), 1);
        let mut restarted = HlcClock::new(b);
        let c2 = restarted.tick(10, Hlc::ZERO);
        assert!(c2 > b);
        let d = restarted.tick(10, Hlc::from_ms(5_000));
        assert!(d > Hlc::from_ms(5_000));
        let e = restarted.tick(9_000, Hlc::ZERO);
        assert_eq!(e, Hlc::from_ms(9_000));
    }

    #[test]
    fn the_clock_does_not_follow_an_hlc_beyond_the_horizon() {
        let now = 1_000_000;
        let mut c = HlcClock::new(Hlc::from_ms(now));
        let far = Hlc::from_ms(now + MAX_CLOCK_AHEAD_MS + 1);
        assert!(!c.observe_at(far, now));
        assert_eq!(c.last(), Hlc::from_ms(now));
        let near = Hlc(Hlc::from_ms(now + MAX_CLOCK_AHEAD_MS).0 | 0xffff);
        assert_eq!(Hlc::horizon(now), near);
        assert!(c.observe_at(near, now));
        assert_eq!(c.last(), near);
        // Once the wall time catches up, the far one is followed too.
        assert!(c.observe_at(far, now + 1));
        assert_eq!(c.last(), far);
        assert_eq!(Hlc::horizon(u64::MAX), Hlc::MAX);
    }

    #[test]
    fn the_end_of_the_range_does_not_wrap() {
        let mut c = HlcClock::new(Hlc(u64::MAX));
        assert_eq!(c.tick(1, Hlc::ZERO), Hlc(u64::MAX));
        let mut c = HlcClock::new(Hlc::MAX);
        assert!(c.tick(u64::MAX, Hlc::ZERO) > Hlc::MAX);
    }
}
