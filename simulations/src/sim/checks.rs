//! Measures and checks: convergence measurements, samples, the final
//! heal, the deadline and the oracles a run ends with.

use super::*;

impl<'a> Sim<'a> {
    /// Per author, the highest seq any node holds.
    pub(super) fn union_frontier(&self) -> BTreeMap<NodeId, u64> {
        let mut u: BTreeMap<NodeId, u64> = BTreeMap::new();
        for s in &self.slots {
            if !s.node.is_up() {
                continue;
            }
            for (a, seq, _) in s.node.state().frontier() {
                let e = u.entry(a).or_insert(0);
                *e = (*e).max(seq);
            }
        }
        u
    }

    pub(super) fn sample(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        let u = self.union_frontier();
        let total: u64 = u.values().sum();
        let divergence: u64 = self
            .slots
            .iter()
            .filter(|s| s.node.is_up())
            .map(|s| total.saturating_sub(s.node.state().len()))
            .sum();
        self.timeline.divergence.push(divergence);
        self.timeline
            .bytes
            .push(std::mem::take(&mut self.period_bytes));
        self.timeline
            .messages
            .push(std::mem::take(&mut self.period_messages));
        self.timeline
            .appends
            .push(std::mem::take(&mut self.period_appends));
        self.timeline.connections.push(self.conns.len() as u64);
        if !self.seat_counters.is_empty() {
            let seats = self.seats();
            self.timeline.seats.push(seats);
        }
        if self.log > 0 {
            let queued: usize = self
                .conns
                .values()
                .flat_map(|c| c.chans.iter())
                .flat_map(|ch| ch.queue.iter())
                .map(|m| m.bytes.len())
                .sum();
            let durable: u64 = self.slots.iter().map(|s| s.node.durable_len()).sum();
            eprintln!(
                "{:>10.3} s  sample: divergence {divergence}, {} connections, {queued} bytes in flight, {durable} durable records",
                self.now as f64 / SEC as f64,
                self.conns.len()
            );
        }
        self.after(self.sample, Ev::Sample);
    }

    pub(super) fn open_measure(&mut self) {
        let target: BTreeSet<EventId> = self
            .slots
            .iter()
            .flat_map(|s| s.node.frontier())
            .map(|h| h.id)
            .collect();
        self.measures.push(Measure {
            heal_at: self.now,
            target,
        });
        self.timeline.heals.push((ms(self.now), None));
        if !self.converge_scheduled {
            self.converge_scheduled = true;
            self.after(CONVERGE_TICK, Ev::ConvergeCheck);
        }
    }

    pub(super) fn reached(&self, target: &BTreeSet<EventId>) -> bool {
        self.slots
            .iter()
            .filter(|s| s.node.is_up())
            .all(|s| target.iter().all(|id| s.node.state().contains(id)))
    }

    pub(super) fn converge_check(&mut self) {
        self.converge_scheduled = false;
        let mut open = Vec::new();
        for m in std::mem::take(&mut self.measures) {
            if self.reached(&m.target) {
                let took = ms(self.now - m.heal_at);
                if self.log > 0 {
                    eprintln!(
                        "{:>10.3} s  converged after the heal at {} ms: {took} ms",
                        self.now as f64 / SEC as f64,
                        ms(m.heal_at)
                    );
                }
                self.report.convergence_ms.push(took);
                if let Some(h) = self
                    .timeline
                    .heals
                    .iter_mut()
                    .rev()
                    .find(|h| h.0 == ms(m.heal_at) && h.1.is_none())
                {
                    h.1 = Some(took);
                }
            } else {
                open.push(m);
            }
        }
        self.measures = open;
        if self.phase == Phase::Final && self.quiescent() {
            let took = ms(self.now - self.final_heal_at);
            self.report.final_convergence_ms = Some(took);
            self.phase = Phase::Done;
            return;
        }
        if !self.measures.is_empty() || self.phase == Phase::Final {
            self.converge_scheduled = true;
            self.after(CONVERGE_TICK, Ev::ConvergeCheck);
        }
    }

    /// Every node up, nothing waiting to be written, and every node's
    /// durable, advertised frontier (every branch head of every author)
    /// the same as its state's and as every other node's.
    pub(super) fn quiescent(&self) -> bool {
        let first = self.slots[0].node.frontier();
        self.slots.iter().all(|s| {
            s.node.is_up()
                && s.held.is_empty()
                && !s.node.is_busy()
                && s.node.durable_len() == s.node.state().len()
                && s.node.frontier() == first
        })
    }

    pub(super) fn final_heal(&mut self) {
        self.phase = Phase::Final;
        self.final_heal_at = self.now;
        self.timeline.final_heal_ms = ms(self.now);
        self.tr(b'F', &[], &[]);
        let ids: Vec<u64> = self.partitions.keys().copied().collect();
        for id in ids {
            self.partition_heal(id);
        }
        for node in 0..self.sc.nodes {
            let gen = self.slots[node].jump_gen;
            self.clock_jump_back(node, gen);
            self.slots[node].backup = None;
            self.slots[node].crash_in_write = None;
            if !self.slots[node].node.is_up() {
                self.restart(node);
            }
        }
        debug_assert_eq!(self.cut_links, 0);
        self.open_measure();
    }

    pub(super) fn deadline(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        let u = self.union_frontier();
        let total: u64 = u.values().sum();
        let behind: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.node.is_up() || s.node.state().len() < total || s.node.is_busy())
            .map(|(i, s)| {
                format!(
                    "node {i} ({}, {} of {total} events, {} durable)",
                    if s.node.is_up() { "up" } else { "down" },
                    s.node.state().len(),
                    s.node.durable_len()
                )
            })
            .take(8)
            .collect();
        self.violation(
            "convergence",
            format!(
                "no quiescence {} s after the final heal; behind: {}",
                self.sc.quiesce_timeout_s,
                if behind.is_empty() {
                    "none (advertised frontiers differ)".to_string()
                } else {
                    behind.join(", ")
                }
            ),
        );
        self.phase = Phase::Done;
    }

    // ----- the end -----

    pub(super) fn finish(mut self) -> RunReport {
        self.report.virtual_ms = ms(self.now);
        let mut total = PeerStats::default();
        for s in &self.slots {
            for st in [s.peer_stats, s.peers.stats()] {
                total += st;
            }
        }
        let (sent, duplicates) = (total.events_sent, total.duplicates);
        self.report.delivered = total.delivered;
        self.report.gossip = crate::report::Gossip {
            announcements: total.announcements_sent,
            grafts: total.grafts,
            prunes: total.prunes,
        };
        self.report.event_frames = sent;
        self.report.duplicate_deliveries = duplicates;
        for node in 0..self.slots.len() {
            self.end_watch(node);
        }
        if self.slots.iter().all(|s| s.node.is_up()) {
            self.check_oracles();
        }
        if let Some(s) = self.slots.first() {
            self.report.state_hash = s
                .node
                .state()
                .state_hash()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
        }
        let hash = self.report.state_hash.clone();
        self.tr(b'E', &[], hash.as_bytes());
        self.report.trace_hash = self.trace.finalize().to_hex().to_string();
        if !self.seat_counters.is_empty() {
            // The end of the run, after the last sample period.
            let seats = self.seats();
            if self.timeline.seats.last().map(|s| s.at_ms) != Some(seats.at_ms) {
                self.timeline.seats.push(seats);
            }
        }
        self.report.timeline = std::mem::take(&mut self.timeline);
        self.report
    }

    pub(super) fn check_oracles(&mut self) {
        let at = ms(self.now);
        let mut found: Vec<(&str, String)> = Vec::new();
        let finals: Vec<NodeFinal<'_>> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| NodeFinal {
                ix,
                state: s.node.state(),
                advertised: s.node.frontier(),
            })
            .collect();
        for v in oracle::convergence(&finals) {
            found.push(("convergence", v));
        }
        drop(finals);
        let states: Vec<(usize, &weftlog_proto::State)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| (ix, s.node.state()))
            .collect();
        for v in oracle::escrow_identical(&states) {
            found.push(("escrow-marks", v));
        }
        let clocks: Vec<oracle::ClockView> = self
            .slots
            .iter()
            .enumerate()
            .map(|(ix, s)| oracle::ClockView {
                ix,
                jumped: s.jumped,
                last_hlc_ms: s.node.last_hlc().map(|h| h.ms()),
                wall_ms: self.wall_ms(ix),
                first_ahead: s.clock_ahead,
            })
            .collect();
        for v in oracle::clock(&clocks) {
            found.push(("clock", v));
        }
        if self.slots.iter().any(|s| s.jumped) {
            // The jumps reached the others: events still beyond their
            // clock's horizon (`State::ahead`), summed over the nodes.
            let ahead: u64 = (0..self.slots.len())
                .map(|ix| self.slots[ix].node.state().ahead(self.wall_ms(ix)).events)
                .sum();
            *self
                .report
                .faults
                .entry("events_ahead_at_end".into())
                .or_default() += ahead;
        }
        // With a restored node, authors may fork: an acknowledged event is
        // kept if any node holds it, on whichever branch.
        let forking = self.slots.iter().any(|s| s.restored);
        let mut held: BTreeSet<EventId> = BTreeSet::new();
        let mut dots: BTreeMap<(NodeId, u64), BTreeSet<EventId>> = BTreeMap::new();
        // One node's log at a time (they are large); node 0's events are
        // kept for the conflict oracle, which checks every node's standing
        // writes against them (the event sets are equal, or the
        // convergence oracle has said otherwise).
        let mut events0: Option<Vec<(weftlog_proto::Event, EventId)>> = None;
        for (ix, s) in self.slots.iter().enumerate() {
            let r = oracle::Reloaded {
                ix,
                state: s.node.state(),
                log: s.node.reload(),
            };
            for v in oracle::durability(&r) {
                found.push(("durability", v));
            }
            if !forking {
                for v in oracle::acknowledged(&self.acked, &r) {
                    found.push(("acknowledged", v));
                }
            }
            let Ok((_, events)) = r.log else {
                continue;
            };
            if forking {
                held.extend(events.iter().map(|(_, id)| *id));
                held.extend(
                    self.acked
                        .keys()
                        .filter(|id| s.node.state().contains(id))
                        .copied(),
                );
            }
            for (e, id) in &events {
                dots.entry((e.author, e.seq)).or_default().insert(*id);
            }
            // What status shows: the replica's fork list, a function of
            // the events it holds, against the branches its log holds.
            let listed: BTreeMap<NodeId, u64> = s
                .node
                .state()
                .forks()
                .iter()
                .map(|f| (f.author, f.seq))
                .collect();
            for v in oracle::forks_reported(ix, &oracle::forks_held(&events), &listed) {
                found.push(("forks", v));
            }
            if let Err(v) = oracle::causal_order(&events) {
                found.push(("causal-order", format!("node {ix}: {v}")));
            }
            match oracle::commands(&events, s.node.state()) {
                Ok(stats) if ix == 0 => {
                    self.report.retries.carried_twice = stats.carried_twice;
                    self.report.retries.duplicates = stats.duplicates;
                }
                Ok(_) => {}
                Err(vs) => {
                    for v in vs.into_iter().take(3) {
                        found.push(("commands", format!("node {ix}: {v}")));
                    }
                }
            }
            match oracle::escrow(s.node.state().streams(), &events) {
                Ok(f) if ix == 0 => {
                    // From the state: a sale retried on two nodes counts once.
                    self.report.escrow_consumed = f.consumed as u64;
                    self.report.escrow_capacity = f.capacity as u64;
                    self.report.oversold = crate::report::Oversold {
                        seats: f.oversold as u64,
                        compensated: f.compensated as u64,
                        released: f.released as u64,
                        honoured: f.honoured as u64,
                    };
                }
                Ok(_) => {}
                Err(vs) => {
                    for v in vs {
                        found.push(("escrow", format!("node {ix}: {v}")));
                    }
                }
            }
            if ix == 0 {
                events0 = Some(events);
            }
        }
        if forking {
            for v in oracle::acknowledged_anywhere(&self.acked, &held) {
                found.push(("acknowledged", v));
            }
        }
        self.report.forks = dots.values().filter(|ids| ids.len() > 1).count() as u64;
        if let Some(events) = &events0 {
            for (ix, s) in self.slots.iter().enumerate() {
                match oracle::conflicts(events, s.node.state().streams()) {
                    Ok(stats) if ix == 0 => {
                        self.report.conflicts = stats.conflicts;
                        self.report.concurrent_writes = stats.concurrent_pairs;
                    }
                    Ok(_) => {}
                    Err(vs) => {
                        for v in vs.into_iter().take(3) {
                            found.push(("conflicts", format!("node {ix}: {v}")));
                        }
                    }
                }
            }
        }
        for (oracle, detail) in found {
            self.report.violations.push(Violation {
                oracle: oracle.to_string(),
                at_ms: at,
                detail,
            });
        }
    }
}
