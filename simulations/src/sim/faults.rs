//! Faults: partitions, crashes and restarts, clock steps and jumps,
//! backups restored.

use super::*;

impl<'a> Sim<'a> {
    pub(super) fn partition_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.partitions_per_min));
        self.after(d.max(1), Ev::PartitionNext);
        let shape = *self.rng_fault.pick(&f.shapes);
        let len = us_of_s(self.rng_fault.uniform(f.partition_s[0], f.partition_s[1]));
        let cuts = self.draw(shape);
        self.start_partition(shape, cuts, len);
    }

    pub(super) fn start_partition(&mut self, shape: Shape, cuts: Vec<(usize, usize)>, len: Us) {
        if cuts.is_empty() {
            return;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        for &(a, b) in &cuts {
            self.cut(a, b);
        }
        self.fault(&format!("partition_{}", shape.name()));
        self.tr(b'p', &[id, cuts.len() as u64, len], shape.name().as_bytes());
        let end = (self.now + len).min(self.duration);
        let roll = us_of_s(self.sc.faults.rolling_period_s).max(MS);
        self.partitions.insert(
            id,
            Partition {
                shape,
                cuts,
                start: self.now,
                end,
            },
        );
        self.at(end, Ev::PartitionHeal { id });
        if shape == Shape::Rolling && self.now + roll < end {
            self.after(roll, Ev::PartitionRoll { id });
        }
    }

    pub(super) fn partition_roll(&mut self, id: u64) {
        let roll = us_of_s(self.sc.faults.rolling_period_s).max(MS);
        let Some(p) = self.partitions.get(&id) else {
            return;
        };
        if self.now + roll >= p.end || self.phase != Phase::Main {
            return;
        }
        let old = p.cuts.clone();
        let new = self.draw(Shape::Split);
        // Apply the new split before lifting the old: links in both stay cut.
        for &(a, b) in &new {
            self.cut(a, b);
        }
        for &(a, b) in &old {
            self.uncut(a, b);
        }
        self.fault("partition_changes");
        self.tr(b'r', &[id, new.len() as u64], &[]);
        let p = self.partitions.get_mut(&id).expect("checked above");
        p.cuts = new;
        self.after(roll, Ev::PartitionRoll { id });
    }

    pub(super) fn partition_heal(&mut self, id: u64) {
        let Some(p) = self.partitions.remove(&id) else {
            return;
        };
        for &(a, b) in &p.cuts {
            self.uncut(a, b);
        }
        self.fault("heals");
        self.tr(b'h', &[id], &[]);
        self.timeline
            .partitions
            .push((ms(p.start), ms(self.now), p.shape.name().to_string()));
        if self.cut_links == 0 && self.phase == Phase::Main {
            self.open_measure();
        }
    }

    /// Directed cuts for a partition of `shape`.
    pub(super) fn draw(&mut self, shape: Shape) -> Vec<(usize, usize)> {
        let n = self.sc.nodes;
        let mut cuts = Vec::new();
        let both = |a: usize, b: usize, cuts: &mut Vec<(usize, usize)>| {
            cuts.push((a, b));
            cuts.push((b, a));
        };
        match shape {
            Shape::Split | Shape::Rolling => {
                let k = if n >= 6 && self.rng_fault.chance(0.3) {
                    3
                } else {
                    2
                };
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                // Each group gets at least one node.
                let mut group = vec![0usize; n];
                for (i, &x) in order.iter().enumerate() {
                    group[x] = if i < k { i } else { self.rng_fault.index(k) };
                }
                for a in 0..n {
                    for b in a + 1..n {
                        if group[a] != group[b] {
                            both(a, b, &mut cuts);
                        }
                    }
                }
            }
            Shape::Isolate => {
                let x = self.rng_fault.index(n);
                for b in 0..n {
                    if b != x {
                        both(x, b, &mut cuts);
                    }
                }
            }
            Shape::OneWay => {
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                let k = self.rng_fault.range(1, (n / 2).max(1) as u64) as usize;
                let (from, to) = order.split_at(k);
                for &a in from {
                    for &b in to {
                        cuts.push((a, b));
                    }
                }
            }
            Shape::Bridge => {
                let mut order: Vec<usize> = (0..n).collect();
                self.rng_fault.shuffle(&mut order);
                // Ends X and Z with at least one node each; the rest bridge.
                let x_len = self.rng_fault.range(1, (n / 3).max(1) as u64) as usize;
                let z_len = self.rng_fault.range(1, (n / 3).max(1) as u64) as usize;
                let x = &order[..x_len];
                let z = &order[x_len..(x_len + z_len).min(n)];
                for &a in x {
                    for &b in z {
                        both(a, b, &mut cuts);
                    }
                }
            }
            Shape::Flaky => {
                for a in 0..n {
                    for b in a + 1..n {
                        if self.rng_fault.chance(0.5) {
                            both(a, b, &mut cuts);
                        }
                    }
                }
            }
            Shape::Site => {
                if let Some(s) = &self.sc.sites {
                    let site = self.rng_fault.index(s.count);
                    let per = n / s.count;
                    for a in site * per..(site + 1) * per {
                        for b in 0..n {
                            if b / per != site {
                                both(a, b, &mut cuts);
                            }
                        }
                    }
                }
            }
        }
        cuts
    }

    pub(super) fn scheduled(&mut self, index: usize) {
        if self.phase != Phase::Main {
            return;
        }
        let n = self.sc.nodes;
        match self.sc.schedule[index].clone() {
            Scheduled::Split { for_s, groups, .. } => {
                let mut group = vec![usize::MAX; n];
                for (g, members) in groups.iter().enumerate() {
                    for &m in members {
                        group[m] = g;
                    }
                }
                let mut cuts = Vec::new();
                for a in 0..n {
                    for b in 0..n {
                        if a != b
                            && group[a] != usize::MAX
                            && group[b] != usize::MAX
                            && group[a] != group[b]
                        {
                            cuts.push((a, b));
                        }
                    }
                }
                self.start_partition(Shape::Split, cuts, us_of_s(for_s));
            }
            Scheduled::Cut {
                for_s, from, to, ..
            } => {
                let cuts: Vec<(usize, usize)> = from
                    .iter()
                    .flat_map(|&a| to.iter().filter(move |&&b| b != a).map(move |&b| (a, b)))
                    .collect();
                self.start_partition(Shape::OneWay, cuts, us_of_s(for_s));
            }
            Scheduled::SiteSplit { for_s, site, .. } => {
                let per = n / self.sc.sites.as_ref().map_or(1, |s| s.count);
                let mut cuts = Vec::new();
                for a in site * per..(site + 1) * per {
                    for b in 0..n {
                        if b / per != site {
                            cuts.push((a, b));
                            cuts.push((b, a));
                        }
                    }
                }
                self.start_partition(Shape::Site, cuts, us_of_s(for_s));
            }
            Scheduled::Crash {
                node,
                down_s,
                in_write,
                ..
            } => {
                let down = us_of_s(down_s);
                if in_write {
                    self.slots[node].crash_in_write = Some(down);
                } else {
                    self.crash(node, down);
                }
            }
            Scheduled::ClockStep { node, ms: step, .. } => {
                self.slots[node].step_ms += step as f64;
                self.fault("clock_steps");
                self.tr(b'k', &[node as u64, step as u64], &[]);
            }
            Scheduled::ClockJump {
                node,
                ms: jump,
                for_s,
                ..
            } => self.clock_jump(node, jump, us_of_s(for_s)),
            // Scheduled as a backup (`run`).
            Scheduled::Restore { .. } => {}
        }
    }

    pub(super) fn crash_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.crashes_per_min));
        self.after(d.max(1), Ev::CrashNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let down = us_of_s(self.rng_fault.uniform(f.crash_down_s[0], f.crash_down_s[1]));
        if !self.slots[node].node.is_up() || self.slots[node].crash_in_write.is_some() {
            return;
        }
        if self.rng_fault.chance(f.crash_in_write) {
            self.slots[node].crash_in_write = Some(down);
        } else {
            self.crash(node, down);
        }
    }

    pub(super) fn crash(&mut self, node: usize, down: Us) {
        if !self.slots[node].node.is_up() {
            return;
        }
        // How much of a running write reaches the disk: nothing, all of
        // it, or a torn prefix.
        let keep = match self.rng_disk.below(4) {
            0 => 0.0,
            1 => 2.0,
            _ => self.rng_disk.unit(),
        };
        let synced = self.slots[node].node.durable_len();
        let c = self.slots[node].node.crash(keep);
        let s = &mut self.slots[node];
        s.synced_at_crash = synced;
        s.epoch += 1;
        s.commit_scheduled = false;
        s.crash_in_write = None;
        // Held requests die with the process: their clients see an error.
        self.report.held.lost += s.held.len() as u64;
        s.held.clear();
        self.report.rebalance.wait_lost += s.awaiting.len() as u64;
        s.awaiting.clear();
        s.holding = false;
        let epoch = s.epoch;
        self.fault("crashes");
        if c.in_write {
            self.fault("crashes_during_write");
            if c.kept_bytes > 0 && c.kept_bytes < c.batch_bytes {
                self.fault("torn_writes");
            }
        }
        self.report.appends.lost_unacked += c.unacked;
        self.tr(b'K', &[node as u64, c.kept_bytes, c.batch_bytes], &[]);
        self.timeline
            .crashes
            .push((ms(self.now), node, ms(self.now + down)));
        let conns: Vec<u64> = self.slots[node].conns.iter().copied().collect();
        for conn in conns {
            self.close(conn, "peer crashed");
        }
        // The process is gone, and its policy with it.
        let s = &mut self.slots[node];
        let st = s.peers.stats();
        s.peer_stats += st;
        s.peers = Peers::new(
            self.sc.peers.clone(),
            SessionConfig::new(CLUSTER, self.ids[node]),
        );
        s.timer_at = None;
        self.note_spare(node);
        self.after(down, Ev::Restart { node, epoch });
    }

    pub(super) fn restart(&mut self, node: usize) {
        if self.slots[node].node.is_up() {
            return;
        }
        let wall = self.wall_ms(node);
        match self.slots[node].node.restart(wall) {
            Ok(r) => {
                let synced = self.slots[node].synced_at_crash;
                if r.records < synced {
                    self.violation(
                        "durability",
                        format!(
                            "node {node} recovered {} records after a crash, but {synced} were synced before it",
                            r.records
                        ),
                    );
                }
                self.fault("restarts");
                // What only this node held, and its copy does not, the
                // restore lost: an operator's loss, not the protocol's.
                let only_here = std::mem::take(&mut self.slots[node].restore_only_here);
                let state = self.slots[node].node.state();
                let lost: Vec<EventId> = only_here
                    .into_iter()
                    .filter(|id| !state.contains(id))
                    .collect();
                for id in &lost {
                    self.acked.remove(id);
                }
                if !lost.is_empty() {
                    *self
                        .report
                        .faults
                        .entry("acked_lost_in_restores".into())
                        .or_default() += lost.len() as u64;
                }
                if r.torn.is_some() {
                    self.fault("torn_tails_recovered");
                }
                self.tr(b'S', &[node as u64, r.records], &[]);
            }
            Err(e) => {
                self.violation("recovery", format!("node {node} cannot recover: {e}"));
                return;
            }
        }
        if let Some(isolated) = self.slots[node].restore_pending.take() {
            self.watch_restore(node, isolated);
        }
        // As the node at start: with peers, appends wait for one of them to
        // confirm the own log, or for the wait to pass.
        let wait = self.sc.node.confirm_wait_ms;
        if wait > 0 && !self.neighbours[node].is_empty() {
            let epoch = self.slots[node].epoch;
            let s = &mut self.slots[node];
            s.node.await_confirmation(wall.saturating_add(wait));
            s.holding = true;
            self.report.held.restarts += 1;
            self.after(us_of_ms(wait as f64), Ev::HoldEnd { node, epoch });
        }
        let now = ms(self.now);
        for i in 0..self.neighbours[node].len() {
            let b = self.neighbours[node][i];
            self.slots[node].peers.add_target(b as TargetId, now);
        }
        self.arm(node);
    }

    /// `node` restarted from a restored copy: starts its fork watch (the
    /// last one ends, [`Sim::end_watch`]).
    pub(super) fn watch_restore(&mut self, node: usize, isolated: bool) {
        self.end_watch(node);
        let me = self.ids[node];
        let copy_seq = self.slots[node].node.state().max_seq(&me);
        let peer_max = (0..self.slots.len())
            .filter(|&i| i != node)
            .map(|i| {
                let n = &self.slots[i].node;
                if n.is_up() {
                    n.state().max_seq(&me)
                } else {
                    n.reload().map_or(0, |(st, _)| st.max_seq(&me))
                }
            })
            .max()
            .unwrap_or(0);
        let bound_at = self.now + us_of_ms(self.sc.node.confirm_wait_ms as f64);
        self.slots[node].watch = Some(RestoreWatch {
            isolated,
            copy_seq,
            peer_max,
            bound_at,
            full_round_at: None,
            forked_at: None,
            forked_unconfirmed: false,
        });
    }

    /// Ends `node`'s fork watch: counts the restore, and checks the
    /// `restore-fork` oracle: a restore with peers reachable at restart
    /// must not fork by an append made unconfirmed before
    /// `confirm_wait_ms` passed (the hold lets none go), nor after a peer
    /// that held every newer own event finished a sync round with it (that
    /// round brought them back). A peer that lacked some of them may
    /// confirm first: the node then forks over the ones it lacked, which
    /// the report counts.
    pub(super) fn end_watch(&mut self, node: usize) {
        let Some(w) = self.slots[node].watch.take() else {
            return;
        };
        let r = &mut self.report.restores;
        let forked = w.forked_at.is_some();
        if w.isolated {
            r.isolated += 1;
            r.isolated_forked += forked as u64;
            return;
        }
        r.with_peers += 1;
        r.with_peers_forked += forked as u64;
        r.with_peers_forked_unconfirmed += (forked && w.forked_unconfirmed) as u64;
        let Some(fork) = w.forked_at else {
            return;
        };
        let why = if w.full_round_at.is_some_and(|round| round <= fork) {
            "after a peer holding all its newer events finished a round with it"
        } else if w.forked_unconfirmed && fork < w.bound_at {
            "unconfirmed before the wait passed"
        } else {
            return;
        };
        self.violation(
            "restore-fork",
            format!(
                "node {node}, restored with peers reachable (its copy to seq {}, peers to seq {}), forked at {} ms, {why}",
                w.copy_seq,
                w.peer_max,
                ms(fork),
            ),
        );
    }

    pub(super) fn clock_step_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.clock_steps_per_min));
        self.after(d.max(1), Ev::ClockStepNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let step = self.rng_fault.uniform(-f.clock_step_ms, f.clock_step_ms);
        self.slots[node].step_ms += step;
        self.fault("clock_steps");
        self.tr(b'k', &[node as u64, step as i64 as u64], &[]);
    }

    pub(super) fn clock_jump_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.clock_jumps_per_min));
        self.after(d.max(1), Ev::ClockJumpNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let jump = f.clock_jump_ms as u64;
        let len = us_of_s(self.rng_fault.uniform(f.clock_jump_s[0], f.clock_jump_s[1]));
        if self.slots[node].jump_ms == 0.0 {
            self.clock_jump(node, jump, len);
        }
    }

    /// `node`'s wall clock jumps `jump` ms ahead, and back after `len`.
    pub(super) fn clock_jump(&mut self, node: usize, jump: u64, len: Us) {
        if self.slots[node].jump_ms != 0.0 {
            // The jump replaces one under way, which ends here.
            self.fault("clock_jumps_back");
        }
        let s = &mut self.slots[node];
        s.jump_ms = jump as f64;
        s.jumped = true;
        s.jump_gen += 1;
        let gen = s.jump_gen;
        self.fault("clock_jumps");
        self.tr(b'j', &[node as u64, jump], &[]);
        self.after(len.max(1), Ev::ClockJumpBack { node, gen });
    }

    pub(super) fn clock_jump_back(&mut self, node: usize, gen: u64) {
        let s = &mut self.slots[node];
        if s.jump_gen != gen || s.jump_ms == 0.0 {
            return;
        }
        s.jump_ms = 0.0;
        self.fault("clock_jumps_back");
        self.tr(b'J', &[node as u64], &[]);
    }

    pub(super) fn restore_next(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let f = &self.sc.faults;
        let d = us_of_s(self.rng_fault.exp(60.0 / f.restores_per_min));
        self.after(d.max(1), Ev::RestoreNext);
        let node = self.rng_fault.index(self.sc.nodes);
        let age = us_of_s(
            self.rng_fault
                .uniform(f.restore_age_s[0], f.restore_age_s[1]),
        );
        let down = us_of_s(
            self.rng_fault
                .uniform(f.restore_down_s[0], f.restore_down_s[1]),
        );
        let isolate = if self.rng_fault.chance(f.restore_isolated) {
            us_of_s(
                self.rng_fault
                    .uniform(f.restore_isolated_s[0], f.restore_isolated_s[1]),
            )
        } else {
            0
        };
        self.backup(node, age, down, isolate);
    }

    /// A copy of `node`'s storage is taken, to be restored `age` later.
    pub(super) fn backup(&mut self, node: usize, age: Us, down: Us, isolate: Us) {
        if self.phase != Phase::Main || self.slots[node].backup.is_some() {
            return;
        }
        let copy = self.slots[node].node.backup();
        self.slots[node].backup = Some(copy);
        self.fault("backups");
        self.tr(b'b', &[node as u64, age], &[]);
        self.after(
            age,
            Ev::Restore {
                node,
                down,
                isolate,
            },
        );
    }

    /// `node` crashes (if it runs) and restarts from its copy after `down`
    /// (or when its restart is due, if it was down), cut off from every
    /// peer until `isolate` after that if `isolate` is above zero.
    pub(super) fn restore(&mut self, node: usize, down: Us, isolate: Us) {
        if self.phase != Phase::Main {
            self.slots[node].backup = None;
            return;
        }
        let Some(copy) = self.slots[node].backup.take() else {
            return;
        };
        if isolate > 0 {
            let n = self.sc.nodes;
            let cuts: Vec<(usize, usize)> = (0..n)
                .filter(|&b| b != node)
                .flat_map(|b| [(node, b), (b, node)])
                .collect();
            self.start_partition(Shape::Isolate, cuts, down + isolate);
            self.fault("restores_isolated");
        }
        // What each node holds: a node that is down holds what its disk
        // holds (its memory is gone, and a pending restore has already
        // replaced the disk).
        let on_disk: Vec<Option<State>> = (0..self.slots.len())
            .map(|i| {
                let n = &self.slots[i].node;
                (!n.is_up()).then(|| n.reload().map(|(st, _)| st).unwrap_or_default())
            })
            .collect();
        let holds = |i: usize, id: &EventId| match &on_disk[i] {
            Some(st) => st.contains(id),
            None => self.slots[i].node.state().contains(id),
        };
        // Any acknowledged event this node alone holds, its own or
        // received: after earlier restores of the others, the only copy
        // can be here.
        let only_here: BTreeSet<EventId> = self
            .acked
            .keys()
            .filter(|id| {
                holds(node, id) && !(0..self.slots.len()).any(|i| i != node && holds(i, id))
            })
            .copied()
            .collect();
        self.crash(node, down);
        let s = &mut self.slots[node];
        s.restore_only_here.extend(only_here);
        s.node.restore(copy);
        // Recovery returns the copy, not what was synced before the crash.
        s.synced_at_crash = 0;
        s.restored = true;
        s.restore_pending = Some(isolate > 0);
        self.fault("restores");
        self.tr(b'B', &[node as u64], &[]);
    }

    // ----- measuring -----
}
