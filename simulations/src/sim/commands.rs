//! The nodes' side: the workload's commands, group commits, the peer
//! policy's rebalancing asks, and what the seat measures need.

use super::*;

impl<'a> Sim<'a> {
    /// After a call into a node's policy: carries out its events, lets
    /// every connection of the node send, and re-arms its timer.
    pub(super) fn after_policy(&mut self, node: usize) {
        self.retry_awaiting(node);
        self.ask_peers(node);
        self.node_events(node);
        let conns = self.slots[node].peers.take_dirty();
        for conn in conns {
            if let Some(c) = self.conns.get(&conn) {
                let side = if c.ends[0] == node { 0 } else { 1 };
                self.drive(conn, side);
            }
        }
        if self.slots[node].node.take_received() {
            self.request_commit(node);
        }
        self.note_spare(node);
        self.arm(node);
    }

    /// Sends the asks for escrow rights the node's replica says are due
    /// ([`weftlog_proto::replica::Replica::poll_asks`]) to its connected
    /// peers, as the daemon does.
    pub(super) fn ask_peers(&mut self, node: usize) {
        if !self.sc.node.rebalance || self.phase == Phase::Done {
            return;
        }
        self.answer(node, None);
        let wall = self.wall_ms(node);
        let s = &mut self.slots[node];
        let connected = s.peers.connected();
        for (peer, ask) in s.node.poll_asks(wall, &connected) {
            if s.peers.ask(&peer, ask) {
                self.report.rebalance.asks += 1;
            }
        }
    }

    /// `peer` asked `node` for escrow rights (or, with `None`, the node's
    /// open asks may be answerable now): the replica answers with
    /// transfers, or not ([`weftlog_proto::replica::Replica::handle_ask`],
    /// [`weftlog_proto::replica::Replica::poll_answers`]).
    pub(super) fn answer(&mut self, node: usize, ask: Option<(NodeId, &Ask)>) {
        if !self.sc.node.rebalance {
            return;
        }
        let wall = self.wall_ms(node);
        for (id, seq, moved) in self.slots[node].node.answer(ask, wall) {
            self.report.rebalance.transfers += 1;
            self.report.rebalance.rights_moved += moved;
            self.check_clock(node, wall);
            self.watch_append(node, seq, id);
            self.append_result(node, Ok(Some((id, seq))));
        }
    }

    /// Records the node's spare rights on each counter sold from, when
    /// they changed.
    pub(super) fn note_spare(&mut self, node: usize) {
        let now = self.now;
        let me = self.ids[node];
        let s = &mut self.slots[node];
        let up = s.node.is_up();
        for key in &self.sold_from {
            let v = if up {
                Held {
                    rights: rebalance::rights(s.node.state(), &key.0, &key.1, &me),
                    spare: rebalance::spare(s.node.state(), &key.0, &key.1, &me),
                }
            } else {
                Held {
                    rights: 0,
                    spare: 0,
                }
            };
            let h = s.spare.entry(key.clone()).or_default();
            if h.back().is_none_or(|&(_, last)| last != v) {
                h.push_back((now, v));
            }
            while h.len() > 1 && h[1].0 + SPARE_HISTORY <= now {
                h.pop_front();
            }
        }
    }

    /// Whether a sale of `amount` on `key` that `node` refused now could
    /// have been avoided: from one round trip of the link before until
    /// now, a node connected to it (and reachable both ways, with nothing
    /// older waiting on the link) held spare rights covering the sale and
    /// any debt `node` owes there; and whether such a node held rights
    /// covering it at all, reserve included.
    pub(super) fn avoidable(
        &self,
        node: usize,
        key: &(String, String),
        amount: u64,
    ) -> (bool, bool) {
        // Rights it receives repay its debt first (an overdraft's).
        let me = self.ids[node];
        let amount = amount + rebalance::owed(self.slots[node].node.state(), &key.0, &key.1, &me);
        let held: Vec<Held> = self
            .connected_peers(node)
            .into_iter()
            .filter_map(|p| {
                if !self.up(node, p) || !self.up(p, node) {
                    // Cut by a partition: an ask could not get through.
                    return None;
                }
                let link = self.link(node, p);
                let rtt = us_of_ms(2.0 * (link.delay_ms + link.jitter_ms));
                let then = self.now.saturating_sub(rtt);
                let n = self.sc.nodes;
                if self.up_since[node * n + p] > then || self.up_since[p * n + node] > then {
                    // Healed less than a round trip ago: no ask and answer
                    // could have crossed it yet.
                    return None;
                }
                if self.backlogged(node, p, then) {
                    // The transport still retransmits what a cut lost (in
                    // order): an ask would wait behind it.
                    return None;
                }
                // What it held throughout the round trip: the figure at
                // `then`, and every change since (rights it sold or gave to
                // another desk meanwhile could not have come here).
                let h = self.slots[p].spare.get(key)?;
                let start = h.iter().rposition(|(t, _)| *t <= then)?;
                h.iter().skip(start).map(|&(_, v)| v).reduce(|a, b| Held {
                    rights: a.rights.min(b.rights),
                    spare: a.spare.min(b.spare),
                })
            })
            .collect();
        (
            held.iter().any(|h| h.spare >= amount),
            held.iter().any(|h| h.rights >= amount),
        )
    }

    /// Whether a connection between `a` and `b` holds, either way, a
    /// message sent before `then` and not delivered yet.
    pub(super) fn backlogged(&self, a: usize, b: usize, then: Us) -> bool {
        self.pair_conns
            .get(&(a.min(b), a.max(b)))
            .into_iter()
            .flatten()
            .filter_map(|c| self.conns.get(c))
            .any(|c| {
                c.chans
                    .iter()
                    .any(|ch| ch.queue.front().is_some_and(|m| m.sent < then))
            })
    }

    pub(super) fn request_commit(&mut self, node: usize) {
        let s = &mut self.slots[node];
        if s.commit_scheduled || s.node.is_writing() || !s.node.has_pending() || !s.node.is_up() {
            return;
        }
        s.commit_scheduled = true;
        let epoch = s.epoch;
        self.after(0, Ev::CommitStart { node, epoch });
    }

    pub(super) fn commit_start(&mut self, node: usize, epoch: u64) {
        let s = &mut self.slots[node];
        if s.epoch != epoch {
            return;
        }
        s.commit_scheduled = false;
        if !s.node.start_commit() {
            return;
        }
        let p = &self.sc.node;
        let d = us_of_ms(p.fsync_ms + self.rng_disk.exp(p.fsync_jitter_ms)).max(1);
        self.after(d, Ev::CommitEnd { node, epoch });
        if let Some(down) = self.slots[node].crash_in_write.take() {
            // The armed crash lands inside this write.
            let at = self.rng_disk.below(d.max(1));
            self.after(at, Ev::Crash { node, epoch, down });
        }
    }

    pub(super) fn commit_end(&mut self, node: usize, epoch: u64) {
        if self.slots[node].epoch != epoch {
            return;
        }
        let c = match self.slots[node].node.finish_commit() {
            Ok(c) => c,
            Err(e) => {
                self.violation(
                    "durability",
                    format!("node {node}: a log write failed: {e}"),
                );
                return;
            }
        };
        self.report.commits += 1;
        self.tr(b'W', &[node as u64, c.records, c.bytes], &[]);
        let at_ms = ms(self.now);
        for (id, bytes) in &c.events {
            self.fold_durable(*id, bytes);
        }
        for (id, _) in &c.acked {
            self.acked.insert(*id, (node, at_ms));
            self.report.appends.acked += 1;
            self.report.events += 1;
            self.period_appends += 1;
        }
        // Live push: the policy learns of the batch's signed heads.
        let s = &mut self.slots[node];
        s.peers
            .handle_stored(&c.heads, &s.node.store(), &mut self.rng_peers);
        self.after_policy(node);
        self.request_commit(node);
    }

    /// Folds an event a node just made durable into `cluster`, the first
    /// time any node does.
    pub(super) fn fold_durable(&mut self, id: EventId, bytes: &[u8]) {
        if self.cluster.contains(&id) {
            return;
        }
        // The node wrote these bytes and checked them against their id.
        let Ok(event) = Event::decode_trusted(bytes) else {
            return;
        };
        for op in &event.ops {
            if let weftlog_proto::Op::EscrowInit { counter, .. } = op {
                self.seat_counters
                    .insert((event.stream.clone(), counter.clone()));
            }
        }
        // A node stores an event only after its prev and deps and writes
        // its log in that order, and validity is a function of the causal
        // past: the insert cannot fail. Were it to, the event would only be
        // missing from the seats timeline (a measure, not an oracle).
        let _ = self.cluster.insert(&event, id);
    }

    /// The seats of every escrow counter in `cluster`, now.
    pub(super) fn seats(&self) -> Seats {
        let mut out = Seats {
            at_ms: ms(self.now),
            ..Seats::default()
        };
        let units = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
        for (stream, counter) in &self.seat_counters {
            let Some(e) = self
                .cluster
                .stream(stream)
                .and_then(|s| s.escrow.get(counter))
            else {
                continue;
            };
            out.sold = out.sold.saturating_add(units(e.consumed));
            out.capacity = out
                .capacity
                .saturating_add(units(e.capacity.saturating_add(e.honoured)));
            for m in e.oversold.values() {
                out.oversold = out.oversold.saturating_add(m.units);
                if m.compensation.is_some() {
                    out.compensated = out.compensated.saturating_add(m.units);
                }
            }
        }
        out
    }

    pub(super) fn connected_peers(&self, node: usize) -> Vec<usize> {
        self.slots[node]
            .conns
            .iter()
            .filter_map(|c| self.conns.get(c))
            .map(|c| {
                if c.ends[0] == node {
                    c.ends[1]
                } else {
                    c.ends[0]
                }
            })
            .collect()
    }

    pub(super) fn command(&mut self) {
        if self.phase != Phase::Main {
            return;
        }
        let rate = self.sc.workload.rate_per_node_s() * self.sc.nodes as f64;
        let next = us_of_s(self.rng_node.exp(1.0 / rate)).max(1);
        self.after(next, Ev::Command);
        let node = self.rng_node.index(self.sc.nodes);
        if !self.slots[node].node.is_up() {
            self.report.appends.attempted += 1;
            self.report.appends.node_down += 1;
            return;
        }
        let connected = self.connected_peers(node);
        let view = View {
            me: node,
            state: self.slots[node].node.state(),
            ids: &self.ids,
            connected: &connected,
        };
        let Some(mut cmd) = self.workload.next(&view) else {
            return;
        };
        let clients = &self.sc.clients;
        if clients.retry > 0.0 && cmd.tag.from_client() {
            self.next_command += 1;
            cmd.draft.meta.command_id = Some(format!("c{}", self.next_command));
            if self.rng_client.chance(clients.retry) {
                let other = self.rng_client.index(self.sc.nodes - 1);
                let other = if other >= node { other + 1 } else { other };
                let [lo, hi] = clients.retry_after_ms;
                let wait = us_of_ms(self.rng_client.uniform(lo, hi)).max(1);
                self.after(
                    wait,
                    Ev::Retry {
                        node: other,
                        cmd: Box::new(cmd.clone()),
                    },
                );
            }
        }
        self.command_at(node, cmd);
    }

    /// A client retries a command at `node` (see [`Ev::Retry`]).
    pub(super) fn retry(&mut self, node: usize, cmd: crate::workload::Cmd) {
        if self.phase != Phase::Main {
            return;
        }
        self.report.retries.sent += 1;
        self.tr(b'y', &[node as u64], b"");
        if !self.slots[node].node.is_up() {
            self.report.appends.attempted += 1;
            self.report.appends.node_down += 1;
            return;
        }
        self.submit(node, cmd, true);
    }

    pub(super) fn command_at(&mut self, node: usize, cmd: crate::workload::Cmd) {
        self.submit(node, cmd, false);
    }

    /// A command reaches `node`: it runs at once, or waits behind the
    /// node's hold while no peer has confirmed its own log (the node's
    /// HTTP API holds append requests the same way: they wait, in order,
    /// and none is refused).
    pub(super) fn submit(&mut self, node: usize, cmd: crate::workload::Cmd, retry: bool) {
        self.report.appends.attempted += 1;
        let wall = self.wall_ms(node);
        let held = self.slots[node].node.appends_held(wall).is_some();
        if self.slots[node].holding && !held {
            // The wait passed by the node's clock before its timer fired.
            self.release(node);
        }
        let s = &mut self.slots[node];
        if held {
            s.held.push_back(HeldCmd {
                cmd,
                since: self.now,
                retry,
            });
            self.report.held.commands += 1;
            self.tr(b'h', &[node as u64], &[]);
            return;
        }
        self.run_command(node, cmd, retry);
    }

    /// Runs a command at `node` (it is up and not holding).
    pub(super) fn run_command(&mut self, node: usize, cmd: crate::workload::Cmd, retry: bool) {
        let wall = self.wall_ms(node);
        let sale = match cmd.tag {
            crate::workload::Tag::Consume(amount) => cmd.draft.ops.iter().find_map(|op| match op {
                weftlog_proto::Op::EscrowConsume { counter, .. }
                | weftlog_proto::Op::EscrowOverdraw { counter, .. } => {
                    Some(((cmd.draft.stream.clone(), counter.clone()), amount))
                }
                _ => None,
            }),
            _ => None,
        };
        if let Some((key, _)) = &sale {
            if self.sold_from.insert(key.clone()) {
                for n in 0..self.slots.len() {
                    self.note_spare(n);
                }
            }
        }
        let keep = sale.as_ref().map(|_| cmd.clone());
        let res = self.slots[node].node.append(wall, cmd.draft);
        if let (Some(cmd), Err(Refusal::AwaitingRights { until_ms })) = (keep, &res) {
            let (key, _) = sale.expect("kept only for a sale");
            self.report.rebalance.waited += 1;
            let epoch = self.slots[node].epoch;
            let d = us_of_ms(until_ms.saturating_sub(wall) as f64).max(MS);
            self.after(d, Ev::RightsWait { node, epoch });
            self.slots[node].awaiting.push(AwaitingSale {
                cmd,
                until_ms: *until_ms,
                since: self.now,
                retry,
                key,
            });
            self.check_clock(node, wall);
            if self.sc.node.rebalance {
                // Its ask goes now.
                self.after_policy(node);
            }
            return;
        }
        self.command_done(node, sale, res, retry, wall);
    }

    /// Gives again the sales waiting at `node` for rights, as the node
    /// does after each durable batch and at the deadline.
    pub(super) fn retry_awaiting(&mut self, node: usize) {
        if self.slots[node].awaiting.is_empty() || !self.slots[node].node.is_up() {
            return;
        }
        let wall = self.wall_ms(node);
        let waiting = std::mem::take(&mut self.slots[node].awaiting);
        for a in waiting {
            let res =
                self.slots[node]
                    .node
                    .append_held(wall, a.cmd.draft.clone(), Some(a.until_ms));
            if matches!(res, Err(Refusal::AwaitingRights { .. })) {
                self.slots[node].awaiting.push(a);
                continue;
            }
            let waited = ms(self.now - a.since);
            self.report.rebalance.wait_ms += waited;
            if res.is_ok() {
                self.report.rebalance.waited_sold += 1;
                let r = &mut self.report.rebalance;
                r.sold_wait_max_ms = r.sold_wait_max_ms.max(waited);
            }
            let amount = match a.cmd.tag {
                crate::workload::Tag::Consume(amount) => amount,
                _ => 0,
            };
            self.command_done(node, Some((a.key, amount)), res, a.retry, wall);
        }
    }

    /// What follows a command's outcome at `node` (not a wait for rights).
    pub(super) fn command_done(
        &mut self,
        node: usize,
        sale: Option<((String, String), u64)>,
        res: AppendResult,
        retry: bool,
        wall: u64,
    ) {
        if let (Some((key, amount)), Err(r)) = (&sale, &res) {
            if r.is_rights() {
                self.report.rebalance.refusals += 1;
                let (avoidable, covered) = self.avoidable(node, key, *amount);
                self.report.rebalance.covered += covered as u64;
                if avoidable {
                    self.report.rebalance.avoidable += 1;
                }
            }
        }
        self.check_clock(node, wall);
        if retry && matches!(res, Ok(None)) {
            self.report.retries.answered_existing += 1;
        }
        if let Ok(Some((id, seq))) = res {
            self.watch_append(node, seq, id);
        }
        self.append_result(node, res);
        if self.sc.node.rebalance {
            // A sale may have taken the node below its low-water mark, or
            // been refused: its asks go now.
            self.after_policy(node);
        }
    }

    /// Whether `node`'s new own event `id` at `seq` starts a branch: its
    /// prev already has another successor on some other node (down nodes
    /// by their disk). Extending a branch of an author that forked before
    /// is not a new fork.
    pub(super) fn diverges(&self, node: usize, seq: u64, id: EventId) -> bool {
        let me = self.ids[node];
        let prev = if seq > 1 {
            let Some(p) = self.slots[node].node.state().chain_id(&id, seq - 1) else {
                return false;
            };
            Some(p)
        } else {
            None
        };
        (0..self.slots.len()).filter(|&i| i != node).any(|i| {
            let n = &self.slots[i].node;
            let reloaded;
            let st = if n.is_up() {
                n.state()
            } else {
                match n.reload() {
                    Ok((st, _)) => {
                        reloaded = st;
                        &reloaded
                    }
                    Err(_) => return false,
                }
            };
            st.frontier()
                .into_iter()
                .filter(|&(a, s, _)| a == me && s >= seq)
                .any(|(_, _, h)| {
                    let at = st.chain_id(&h, seq);
                    at.is_some_and(|x| x != id) && (seq == 1 || st.chain_id(&h, seq - 1) == prev)
                })
        })
    }

    /// The fork watch of a restored node, on each own event it makes.
    pub(super) fn watch_append(&mut self, node: usize, seq: u64, id: EventId) {
        let wall = self.wall_ms(node);
        let candidate = self.slots[node]
            .watch
            .as_ref()
            .is_some_and(|w| w.forked_at.is_none() && seq <= w.peer_max);
        if !candidate || !self.diverges(node, seq, id) {
            return;
        }
        let s = &mut self.slots[node];
        let unconfirmed = !s.node.own_frontier().confirmed;
        let now = self.now;
        if let Some(w) = s.watch.as_mut() {
            if w.forked_at.is_none() {
                w.forked_at = Some(now);
                w.forked_unconfirmed = unconfirmed;
                debug_assert!(s.node.appends_held(wall).is_none());
                self.tr(b'x', &[node as u64, seq], &[]);
            }
        }
    }

    /// A sync round of `node` with `peer` ended, the peer holding `node`'s
    /// own events up to `seq`: the replica decides whether that confirms
    /// the node's own log, and a confirmation lets the held commands go.
    pub(super) fn own_head(&mut self, node: usize, peer: NodeId, seq: u64) {
        let wall = self.wall_ms(node);
        let now = self.now;
        let s = &mut self.slots[node];
        if let Some(w) = s.watch.as_mut() {
            if seq > w.copy_seq && seq >= w.peer_max && w.full_round_at.is_none() {
                w.full_round_at = Some(now);
            }
        }
        let confirmed = s.node.handle_own_head(peer, seq, wall);
        if confirmed && s.holding && s.node.appends_held(wall).is_none() {
            self.release(node);
        }
    }

    /// The wait of `node`'s hold is due: its held commands go unless the
    /// node's clock says the wait has not passed (a clock stepped back).
    pub(super) fn hold_end(&mut self, node: usize) {
        if !self.slots[node].node.is_up() || !self.slots[node].holding {
            return;
        }
        let wall = self.wall_ms(node);
        match self.slots[node].node.appends_held(wall) {
            Some(until) => {
                let epoch = self.slots[node].epoch;
                let d = us_of_ms(until.saturating_sub(wall) as f64).max(MS);
                self.after(d, Ev::HoldEnd { node, epoch });
            }
            None => self.release(node),
        }
    }

    /// `node`'s hold ended (a peer confirmed its own log, or the wait
    /// passed): its held commands run, in the order they arrived.
    pub(super) fn release(&mut self, node: usize) {
        let s = &mut self.slots[node];
        s.holding = false;
        if s.node.own_frontier().confirmed {
            self.report.held.confirmed += 1;
        } else {
            self.report.held.timed_out += 1;
        }
        let held = std::mem::take(&mut s.held);
        self.tr(b'H', &[node as u64, held.len() as u64], &[]);
        for h in held {
            let waited = ms(self.now - h.since);
            self.report.held.total_ms += waited;
            self.report.held.max_ms = self.report.held.max_ms.max(waited);
            self.run_command(node, h.cmd, h.retry);
        }
    }

    /// The clock oracle, on each local event: its hlc is at most
    /// [`MAX_CLOCK_AHEAD_MS`] past the highest wall time the node's clock
    /// has shown, whatever it received from a clock that jumped ahead.
    pub(super) fn check_clock(&mut self, node: usize, wall: u64) {
        let s = &mut self.slots[node];
        s.max_wall_ms = s.max_wall_ms.max(wall);
        if let Some(hlc) = s.node.last_hlc() {
            if hlc.ms() > s.max_wall_ms.saturating_add(MAX_CLOCK_AHEAD_MS)
                && s.clock_ahead.is_none()
            {
                s.clock_ahead = Some((hlc.ms(), s.max_wall_ms));
            }
        }
    }

    pub(super) fn append_result(&mut self, node: usize, res: AppendResult) {
        match res {
            Ok(Some((id, seq))) => {
                self.tr(b'P', &[node as u64, seq], &id.0);
                self.request_commit(node);
            }
            Ok(None) => {}
            Err(Refusal::Prepare(PrepareError::VersionMismatch { .. })) => {
                self.report.appends.refused_version += 1
            }
            Err(r) if r.is_rights() => {
                self.report.appends.refused_rights += 1;
                self.report.oversell_refused += 1;
            }
            Err(e) => {
                self.report.appends.refused_other += 1;
                self.violation(
                    "workload",
                    format!("node {node} refused a command for an unexpected reason: {e}"),
                );
            }
        }
    }

    // ----- faults -----
}
