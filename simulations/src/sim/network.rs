//! The network: topology, links, connections, dials and handshakes,
//! message delivery with loss, retransmission and the Byzantine member's
//! tampering, and cuts.

use super::*;

impl<'a> Sim<'a> {
    pub(super) fn build_topology(&mut self, seed: u64) {
        let n = self.sc.nodes;
        let mut rng = Rng::derive(seed, "topology");
        let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
        let (sites, per_site) = match &self.sc.sites {
            Some(s) => (s.count, n / s.count),
            None => (1, n),
        };
        for site in 0..sites {
            let members: Vec<usize> = (site * per_site..(site + 1) * per_site).collect();
            match self.sc.topology {
                Topology::Mesh => {
                    for (i, &a) in members.iter().enumerate() {
                        for &b in &members[i + 1..] {
                            pairs.insert((a, b));
                        }
                    }
                }
                Topology::Random { degree } => {
                    let m = members.len();
                    for (i, &a) in members.iter().enumerate() {
                        // A ring keeps the graph connected.
                        let b = members[(i + 1) % m];
                        if a != b {
                            pairs.insert((a.min(b), a.max(b)));
                        }
                        for _ in 1..degree {
                            let b = members[rng.index(m)];
                            if a != b {
                                pairs.insert((a.min(b), a.max(b)));
                            }
                        }
                    }
                }
            }
        }
        if let Some(s) = &self.sc.sites {
            for sa in 0..sites {
                for sb in sa + 1..sites {
                    for ga in 0..s.gateways {
                        for gb in 0..s.gateways {
                            pairs.insert((sa * per_site + ga, sb * per_site + gb));
                        }
                    }
                }
            }
        }
        // Both ends list each other, as `--peer` on every node does.
        for &(a, b) in &pairs {
            self.neighbours[a].push(b);
            self.neighbours[b].push(a);
        }
    }

    pub(super) fn link(&self, a: usize, b: usize) -> &Link {
        match &self.sc.sites {
            Some(s) if self.sc.site_of(a) != self.sc.site_of(b) => &s.wan,
            _ => &self.sc.network,
        }
    }

    pub(super) fn up(&self, from: usize, to: usize) -> bool {
        self.cuts[from * self.sc.nodes + to] == 0
    }

    /// When a message of `len` bytes sent now on `conn`'s direction `d`
    /// is ready at the receiver; `None` when the transport gives up.
    pub(super) fn arrival(&mut self, conn: u64, d: usize, len: usize) -> Option<Us> {
        let (from, to) = {
            let c = &self.conns[&conn];
            (c.ends[d], c.ends[1 - d])
        };
        let link = self.link(from, to).clone();
        let tx = if link.bandwidth_kbps > 0.0 {
            (len as f64 * 8.0 / (link.bandwidth_kbps * 1000.0) * SEC as f64) as Us
        } else {
            0
        };
        let mut delay = us_of_ms(link.delay_ms + self.rng_net.exp(link.jitter_ms));
        let mut rto = us_of_ms((3.0 * (link.delay_ms + link.jitter_ms)).max(20.0));
        let mut losses = 0;
        while self.rng_net.chance(link.loss) {
            losses += 1;
            delay += rto;
            rto *= 2;
            if losses >= MAX_RETRANSMITS {
                break;
            }
        }
        if losses > 0 {
            *self.report.faults.entry("packets_lost".into()).or_default() += losses as u64;
        }
        if self.rng_net.chance(link.duplicate) {
            self.fault("packets_duplicated");
        }
        if losses >= MAX_RETRANSMITS {
            return None;
        }
        let chan = &mut self.conns.get_mut(&conn).expect("live conn").chans[d];
        let start = self.now.max(chan.busy_until);
        chan.busy_until = start + tx;
        let natural = start + tx + delay;
        let ready = natural.max(chan.last_ready);
        chan.last_ready = ready;
        if natural < ready {
            *self
                .report
                .faults
                .entry("packets_reordered".into())
                .or_default() += 1;
        }
        Some(ready)
    }

    /// Sends a message a node's session made: as it is, or rewritten if
    /// the node is Byzantine.
    pub(super) fn send(&mut self, conn: u64, d: usize, bytes: Vec<u8>) {
        let from = self.conns[&conn].ends[d];
        if !self.sc.byzantine.nodes.contains(&from) {
            self.send_raw(conn, d, bytes);
            return;
        }
        for m in self.byzantine(conn, d, from, bytes) {
            if !self.conns.contains_key(&conn) {
                return;
            }
            if let Ok(Some((Message::Events { frames }, _))) = decode_message(&m) {
                let open = self.byz_open.entry((conn, d)).or_default();
                for f in split_frames(&frames).unwrap_or_default() {
                    if let Some(a) = f.author {
                        if f.signed {
                            open.remove(&a);
                        } else {
                            open.insert(a);
                        }
                    }
                }
            }
            self.send_raw(conn, d, m);
        }
    }

    /// What a Byzantine member sends instead of `bytes` (see
    /// [`crate::scenario::Byzantine`]): nothing (held back), or one or two
    /// messages.
    pub(super) fn byzantine(
        &mut self,
        conn: u64,
        d: usize,
        from: usize,
        bytes: Vec<u8>,
    ) -> Vec<Vec<u8>> {
        let b = self.sc.byzantine.clone();
        let frames = match decode_message(&bytes) {
            Ok(Some((Message::Events { frames }, _))) => frames,
            _ => {
                // Any other message: what was held back goes first.
                let mut out: Vec<Vec<u8>> = self.byz_held.remove(&(conn, d)).into_iter().collect();
                out.push(bytes);
                return out;
            }
        };
        let Some(original) = split_frames(&frames) else {
            return vec![bytes];
        };
        let mut out: Vec<Frame> = Vec::with_capacity(original.len());
        let open = self.byz_open.get(&(conn, d)).cloned().unwrap_or_default();
        // Where receivers accept a frame again today (see `open_runs`).
        let allowed =
            |f: &Frame| b.open_runs || (f.signed && f.author.is_some_and(|a| !open.contains(&a)));
        let history = self.byz_history.entry(from).or_default();
        if !history.is_empty() && self.rng_byz.chance(b.replay) {
            let k = self.rng_byz.range(1, b.replay_frames.max(1) as u64) as usize;
            let mut picked: Vec<usize> =
                (0..k).map(|_| self.rng_byz.index(history.len())).collect();
            picked.sort_unstable();
            picked.dedup();
            for i in picked {
                if allowed(&history[i]) {
                    out.push(history[i].clone());
                }
            }
            let n = out.len() as u64;
            *self
                .report
                .faults
                .entry("byzantine_frames_replayed".into())
                .or_default() += n;
        }
        let mut duplicated = 0;
        for f in &original {
            out.push(f.clone());
            if self.rng_byz.chance(b.duplicate) && (b.open_runs || f.signed) {
                out.push(f.clone());
                duplicated += 1;
            }
        }
        if duplicated > 0 {
            *self
                .report
                .faults
                .entry("byzantine_frames_duplicated".into())
                .or_default() += duplicated;
        }
        if out.len() > 1 && self.rng_byz.chance(b.reorder) {
            if b.reorder_same_author {
                self.rng_byz.shuffle(&mut out);
            } else {
                out = interleave(out, &mut self.rng_byz);
            }
            self.fault("byzantine_messages_reordered");
        }
        let history = self.byz_history.entry(from).or_default();
        for f in original {
            if history.len() >= BYZ_HISTORY {
                history.pop_front();
            }
            history.push_back(f);
        }
        let mut msg = Vec::new();
        if encode_events(&out, &mut msg).is_none() {
            msg = bytes;
        }
        if let Some(held) = self.byz_held.remove(&(conn, d)) {
            // The held message goes after this one, unless that would put
            // one author's frames out of seq order and that is not allowed.
            if b.reorder_same_author || disjoint_authors(&held, &msg) {
                self.fault("byzantine_messages_swapped");
                return vec![msg, held];
            }
            return vec![held, msg];
        }
        if self.rng_byz.chance(b.swap) {
            self.byz_held.insert((conn, d), msg);
            return Vec::new();
        }
        vec![msg]
    }

    pub(super) fn send_raw(&mut self, conn: u64, d: usize, bytes: Vec<u8>) {
        let (from, to) = {
            let c = &self.conns[&conn];
            (c.ends[d], c.ends[1 - d])
        };
        self.report.messages += 1;
        self.report.bytes += bytes.len() as u64;
        self.period_bytes += bytes.len() as u64;
        self.period_messages += 1;
        let ready = if self.up(from, to) {
            match self.arrival(conn, d, bytes.len()) {
                Some(t) => Some(t),
                None => {
                    self.close(conn, "too many retransmissions");
                    return;
                }
            }
        } else {
            None
        };
        let c = self.conns.get_mut(&conn).expect("live conn");
        c.chans[d].queue.push_back(Msg {
            bytes,
            ready,
            sent: self.now,
        });
        if let Some(t) = ready {
            self.at(t, Ev::Deliver { conn, dir: d });
        }
    }

    pub(super) fn deliver(&mut self, conn: u64, d: usize) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let (from, to) = (c.ends[d], c.ends[1 - d]);
            match c.chans[d].queue.front() {
                Some(Msg { ready: Some(t), .. }) if *t <= self.now => {}
                _ => return,
            }
            if self.cuts[from * self.sc.nodes + to] > 0 {
                // The packets were lost on the cut link; the transport
                // retransmits them once it heals.
                for m in &mut c.chans[d].queue {
                    m.ready = None;
                }
                return;
            }
            let msg = c.chans[d].queue.pop_front().expect("front checked");
            self.tr(b'D', &[conn, d as u64], &msg.bytes);
            let now = ms(self.now);
            let wall = self.wall_ms(to);
            let s = &mut self.slots[to];
            // As the node does before it stores received events.
            s.node.handle_time(wall);
            s.peers
                .handle_message(conn, &msg.bytes, now, &mut s.node.store());
            self.after_policy(to);
            if self.conns.contains_key(&conn) {
                self.drive(conn, d);
            }
        }
    }

    /// Sends what `conn`'s end `side` has while the direction's window has
    /// room (the daemon's bounded writer queue).
    pub(super) fn drive(&mut self, conn: ConnId, side: usize) {
        let window = self.sc.peers.window;
        loop {
            let Some(c) = self.conns.get(&conn) else {
                return;
            };
            if c.chans[side].queue.len() >= window {
                return;
            }
            let node = c.ends[side];
            let now = ms(self.now);
            let s = &mut self.slots[node];
            let msg = s.peers.poll_transmit(conn, now, &s.node.store());
            let quiet = msg.is_none();
            if let Some(msg) = msg {
                self.send(conn, side, msg);
            }
            self.node_events(node);
            if quiet {
                return;
            }
        }
    }

    /// Carries out the events a node's policy queued.
    pub(super) fn node_events(&mut self, node: usize) {
        while let Some(e) = self.slots[node].peers.poll_event() {
            match e {
                PeerEvent::Dial { target } => self.dial(node, target),
                PeerEvent::Close {
                    conn, reason, last, ..
                } => {
                    if let Some(last) = last {
                        // The goodbye goes out; the close follows it at once.
                        self.report.messages += 1;
                        self.report.bytes += last.len() as u64;
                    }
                    self.close(conn, &reason);
                }
                PeerEvent::Synced { .. } => {
                    self.report.rounds += 1;
                    let wall = self.wall_ms(node);
                    self.slots[node].node.handle_synced(wall);
                }
                PeerEvent::Asked { peer, ask } => self.answer(node, Some((peer, &ask))),
                PeerEvent::OwnHead { peer, seq, .. } => self.own_head(node, peer, seq),
                PeerEvent::Received { count, .. } => {
                    self.tr(b'R', &[node as u64, count], &[]);
                    self.request_commit(node);
                }
                PeerEvent::Equivocation { proof: eq, .. } => {
                    let restored = self
                        .ids
                        .iter()
                        .position(|i| *i == eq.author)
                        .is_some_and(|a| self.slots[a].restored);
                    if !restored {
                        self.violation(
                            "equivocation",
                            format!(
                                "node {node} saw two events for seq {} of author {} ({} and {}, {})",
                                eq.seq,
                                eq.author.short(),
                                eq.held.short(),
                                eq.other.short(),
                                if eq.proven { "proven" } else { "claimed" }
                            ),
                        );
                    } else if self.slots[node].forks.insert(eq.author) {
                        // A restored node's author forked: expected. The
                        // node records it (as the daemon's equivocation
                        // file does), once per author.
                        self.fault("forks_reported");
                        self.tr(b'f', &[node as u64, eq.seq], &eq.author.0);
                    }
                }
                PeerEvent::SessionFailed { peer, error, .. }
                    if !matches!(error, SyncError::Peer { .. }) =>
                {
                    let peer = self.ids.iter().position(|i| *i == peer);
                    let peer = peer.unwrap_or(usize::MAX);
                    let byzantine = self.sc.byzantine.nodes.contains(&peer);
                    let local = matches!(
                        error,
                        SyncError::LocalMissing { .. }
                            | SyncError::LocalUnsigned { .. }
                            | SyncError::LocalFrontierTooLarge { .. }
                    );
                    if byzantine && !local {
                        // A rewritten stream the receiver refuses (a run
                        // a replayed unsigned frame opened and nothing
                        // ends): the session ends, the peer redials, and
                        // the oracles say whether anything was lost.
                        self.fault("byzantine_sessions_refused");
                        continue;
                    }
                    self.violation(
                        "session",
                        format!("node {node}'s session with node {peer} failed: {error}"),
                    );
                }
                _ => {}
            }
        }
    }

    /// Schedules the node's policy timer if it is due earlier than the one
    /// scheduled.
    pub(super) fn arm(&mut self, node: usize) {
        let s = &mut self.slots[node];
        if !s.node.is_up() {
            return;
        }
        let Some(at) = s.peers.poll_timeout() else {
            return;
        };
        let at = (at * MS).max(self.now);
        if s.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        s.timer_at = Some(at);
        let epoch = s.epoch;
        self.at(at, Ev::PeerTimer { node, epoch, at });
    }

    pub(super) fn peer_timer(&mut self, node: usize, epoch: u64, at: Us) {
        let s = &mut self.slots[node];
        if s.epoch != epoch || s.timer_at != Some(at) || !s.node.is_up() {
            return;
        }
        s.timer_at = None;
        if self.phase != Phase::Done {
            let now = ms(self.now);
            let wall = self.wall_ms(node);
            let s = &mut self.slots[node];
            s.node.handle_time(wall);
            s.peers
                .handle_timeout(now, &s.node.store(), &mut self.rng_peers);
        }
        self.after_policy(node);
    }

    pub(super) fn close(&mut self, conn: ConnId, why: &str) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.tr(b'X', &[conn], why.as_bytes());
        let (a, b) = (c.ends[0], c.ends[1]);
        self.slots[a].conns.remove(&conn);
        self.slots[b].conns.remove(&conn);
        let key = (a.min(b), a.max(b));
        if let Some(set) = self.pair_conns.get_mut(&key) {
            set.remove(&conn);
            if set.is_empty() {
                self.pair_conns.remove(&key);
            }
        }
        // Policy reasons are short phrases; a session error names events,
        // and is counted under one key (the error itself is traced).
        let kind = if why.len() <= 48 && !why.contains(['(', ':']) {
            why.replace(' ', "_")
        } else {
            "a_session_error".to_string()
        };
        self.fault(&format!("connections_closed_{kind}"));
        self.byz_held.retain(|(c, _), _| *c != conn);
        self.byz_open.retain(|(c, _), _| *c != conn);
        let now = ms(self.now);
        for end in [a, b] {
            let s = &mut self.slots[end];
            if s.node.is_up() {
                s.peers.handle_closed(conn, why, now, &mut self.rng_peers);
                self.after_policy(end);
            }
        }
    }

    /// A node's policy dials `target` (a neighbour): the handshake takes
    /// one round trip if the path is up both ways and the peer runs, and
    /// gets no answer within the connect timeout otherwise.
    pub(super) fn dial(&mut self, node: usize, target: TargetId) {
        let b = target as usize;
        let epoch = self.slots[node].epoch;
        if self.slots[b].node.is_up() && self.up(node, b) && self.up(b, node) {
            let link = self.link(node, b).clone();
            let rtt = 2 * us_of_ms(link.delay_ms + self.rng_net.exp(link.jitter_ms));
            let peer_epoch = self.slots[b].epoch;
            self.after(
                rtt,
                Ev::Handshake {
                    node,
                    epoch,
                    target,
                    peer_epoch,
                },
            );
        } else {
            let wait = self.sc.peers.connect_timeout_ms * MS;
            self.after(
                wait,
                Ev::DialFailed {
                    node,
                    epoch,
                    target,
                },
            );
        }
    }

    pub(super) fn dial_failed(&mut self, node: usize, epoch: u64, target: TargetId, why: &str) {
        let s = &mut self.slots[node];
        if s.epoch != epoch || !s.node.is_up() {
            return;
        }
        let now = ms(self.now);
        s.peers
            .handle_dial_failed(target, why.to_string(), now, &mut self.rng_peers);
        self.after_policy(node);
    }

    pub(super) fn handshake(&mut self, a: usize, epoch: u64, target: TargetId, peer_epoch: u64) {
        let b = target as usize;
        if self.slots[a].epoch != epoch || !self.slots[a].node.is_up() {
            return;
        }
        let alive = self.slots[b].node.is_up() && self.slots[b].epoch == peer_epoch;
        if !(alive && self.up(a, b) && self.up(b, a)) {
            self.dial_failed(a, epoch, target, "the handshake broke off");
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                ends: [a, b],
                chans: [Chan::default(), Chan::default()],
            },
        );
        self.pair_conns
            .entry((a.min(b), a.max(b)))
            .or_default()
            .insert(id);
        self.slots[a].conns.insert(id);
        self.slots[b].conns.insert(id);
        self.tr(b'C', &[id, a as u64, b as u64], &[]);
        let now = ms(self.now);
        let (ia, ib) = (self.ids[a], self.ids[b]);
        // A node's incarnation, as its peers see it: its epoch, which every
        // crash bumps.
        let (ea, eb) = (self.slots[a].epoch, self.slots[b].epoch);
        let s = &mut self.slots[a];
        s.peers
            .handle_connected(id, ib, true, eb, Some(target), now, &s.node.store());
        let s = &mut self.slots[b];
        s.peers
            .handle_connected(id, ia, false, ea, None, now, &s.node.store());
        self.after_policy(a);
        self.after_policy(b);
    }

    pub(super) fn idle_check(&mut self, from: usize, to: usize, since: Us) {
        let ix = from * self.sc.nodes + to;
        if self.cuts[ix] == 0 || self.down_since[ix] != since {
            return;
        }
        let key = (from.min(to), from.max(to));
        let conns: Vec<ConnId> = self
            .pair_conns
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for conn in conns {
            self.close(conn, "idle timeout");
        }
    }

    pub(super) fn cut(&mut self, from: usize, to: usize) {
        let ix = from * self.sc.nodes + to;
        self.cuts[ix] += 1;
        if self.cuts[ix] == 1 {
            if self.cut_links == 0 && !self.measures.is_empty() {
                // A new partition before the last heal converged: what
                // follows measures the new partition, not the heal.
                self.report.convergence_interrupted += self.measures.len() as u64;
                self.measures.clear();
            }
            self.cut_links += 1;
            self.down_since[ix] = self.now;
            let key = (from.min(to), from.max(to));
            if self.pair_conns.contains_key(&key) {
                let idle = self.sc.peers.idle_timeout_ms * MS;
                self.after(
                    idle,
                    Ev::IdleCheck {
                        from,
                        to,
                        since: self.now,
                    },
                );
            }
        }
    }

    pub(super) fn uncut(&mut self, from: usize, to: usize) {
        let ix = from * self.sc.nodes + to;
        debug_assert!(self.cuts[ix] > 0);
        self.cuts[ix] -= 1;
        if self.cuts[ix] > 0 {
            return;
        }
        self.up_since[ix] = self.now;
        self.cut_links -= 1;
        let key = (from.min(to), from.max(to));
        let conns: Vec<ConnId> = self
            .pair_conns
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for conn in conns {
            self.retransmit(conn, from);
        }
    }

    /// The transport retransmits what a cut lost on `conn`'s direction
    /// from `from`, after a backed-off probe timeout.
    pub(super) fn retransmit(&mut self, conn: ConnId, from: usize) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let d = if self.conns[&conn].ends[0] == from {
            0
        } else {
            1
        };
        // The transport retransmits what was lost, after a backed-off
        // probe timeout.
        let n = self.conns[&conn].chans[d].queue.len();
        let mut first = None;
        for i in 0..n {
            if self.conns[&conn].chans[d].queue[i].ready.is_some() {
                continue;
            }
            let len = self.conns[&conn].chans[d].queue[i].bytes.len();
            let pto = us_of_ms(self.rng_net.exp(200.0));
            let Some(t) = self.arrival(conn, d, len) else {
                self.close(conn, "too many retransmissions");
                return;
            };
            let t = t + pto;
            let chan = &mut self.conns.get_mut(&conn).expect("live conn").chans[d];
            chan.last_ready = chan.last_ready.max(t);
            chan.queue[i].ready = Some(t);
            first.get_or_insert(t);
        }
        // One event per message keeps delivery simple: each checks the front.
        let times: Vec<Us> = self.conns[&conn].chans[d]
            .queue
            .iter()
            .filter_map(|m| m.ready)
            .collect();
        for t in times {
            self.at(t, Ev::Deliver { conn, dir: d });
        }
    }

    // ----- nodes -----
}

impl Random for Rng {
    fn next_u64(&mut self) -> u64 {
        Rng::next_u64(self)
    }
}

/// One wire frame a Byzantine member sends, with what it needs to know
/// of it.
#[derive(Clone)]
pub(super) struct Frame {
    bytes: Vec<u8>,
    /// The event's author, if it decodes.
    author: Option<NodeId>,
    /// Whether the frame carries a signature (it ends its author's run).
    signed: bool,
}

/// The wire frames of an Events message, each whole; `None` if they do not
/// split (a session never makes such a message).
fn split_frames(frames: &[u8]) -> Option<Vec<Frame>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < frames.len() {
        let (event, sig, len) = decode_wire_frame(&frames[off..]).ok()?;
        out.push(Frame {
            bytes: frames[off..off + len].to_vec(),
            author: Event::decode_trusted(event).ok().map(|e| e.author),
            signed: sig.is_some(),
        });
        off += len;
    }
    Some(out)
}

/// An Events message of `frames`, or `None` if it would be too large.
fn encode_events(frames: &[Frame], out: &mut Vec<u8>) -> Option<()> {
    let total: usize = frames.iter().map(|f| f.bytes.len()).sum();
    if total + 16 > MAX_MESSAGE_BYTES || frames.is_empty() {
        return None;
    }
    let msg = Message::Events {
        frames: frames
            .iter()
            .flat_map(|f| f.bytes.iter().copied())
            .collect(),
    };
    encode_message(&msg, out);
    Some(())
}

/// `frames` in a random order that keeps each author's frames in the order
/// they had (a random merge of the authors' sequences).
fn interleave(frames: Vec<Frame>, rng: &mut Rng) -> Vec<Frame> {
    let mut by_author: BTreeMap<Option<NodeId>, VecDeque<Frame>> = BTreeMap::new();
    for f in frames {
        by_author.entry(f.author).or_default().push_back(f);
    }
    let mut queues: Vec<VecDeque<Frame>> = by_author.into_values().collect();
    let mut out = Vec::new();
    while !queues.is_empty() {
        let i = rng.index(queues.len());
        if let Some(f) = queues[i].pop_front() {
            out.push(f);
        }
        if queues[i].is_empty() {
            queues.swap_remove(i);
        }
    }
    out
}

/// Whether two Events messages carry frames of no common author.
fn disjoint_authors(a: &[u8], b: &[u8]) -> bool {
    let authors = |m: &[u8]| -> Option<BTreeSet<NodeId>> {
        let Ok(Some((Message::Events { frames }, _))) = decode_message(m) else {
            return None;
        };
        split_frames(&frames)?.iter().map(|f| f.author).collect()
    };
    match (authors(a), authors(b)) {
        (Some(x), Some(y)) => x.is_disjoint(&y),
        _ => false,
    }
}
