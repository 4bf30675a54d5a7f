// The desk page: registration staff's view of one weftlog node.
//
// Everything here talks to this desk's own node (same origin): commands go
// to POST /v1/venue/commands, reads to the /v1 endpoints, and live updates
// arrive over server-sent events (/v1/events for the log, /v1/notifications
// for alerts). The node keeps working when the venue's network does not, so
// the page does too; what the cluster knows is shown, never guessed.
'use strict';

const FIELDS = [
  ['name', 'Name', 'ChangeName'],
  ['email', 'Email', 'ChangeEmail'],
  ['phone', 'Phone', 'ChangePhone'],
  ['company', 'Company', 'ChangeCompany'],
];
const FEED_MAX = 40;
const STATUS_EVERY_MS = 2000;

const S = {
  desk: null,        // GET /v1/desk
  who: { role: 'admin', name: '', auth: false },
  status: null,      // GET /v1/status
  sessions: [],
  attendees: [],
  total: 0,
  query: '',
  selected: null,    // attendee id
  attendee: null,    // GET /v1/venue/attendees/{id}
  editing: null,     // the field being edited
  notes: null,       // {text, heads} when the notes editor was opened
  conflicts: [],
  oversold: [],
  reconnects: [],
  forks: [],
  feed: [],
  nodeUp: true,
  whyOpen: new Set(), // sessions whose "why" is unfolded
};

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

/** An element: h('div', {class: 'x', onclick: f}, child, 'text', …). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Calls the node; throws an Error carrying the node's one sentence. */
async function api(method, path, body) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    setNodeUp(false);
    throw new Error('the node does not answer');
  }
  setNodeUp(true);
  if (res.status === 401) {
    location.href = '/login';
    throw new Error('sign in first');
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!res.ok) {
    const msg = (data && data.error) || `${res.status} ${res.statusText}`;
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return data;
}

function commandId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** Sends a conference command; retries keep the same command id. */
async function command(type, fields) {
  const body = { type, command_id: commandId(), ...fields };
  if (S.who.name) body.user = S.who.name;
  return api('POST', '/v1/venue/commands', body);
}

let toastTimer = null;
function toast(msg, bad) {
  const t = $('toast');
  t.textContent = msg;
  t.className = bad ? 'toast bad' : 'toast';
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 6000 : 2500);
}

/** Runs an action from a button: disables it meanwhile, reports errors. */
async function act(button, f, done) {
  if (button) button.disabled = true;
  try {
    await f();
    if (done) toast(done);
  } catch (e) {
    toast(e.message, true);
  } finally {
    if (button) button.disabled = false;
  }
}

const hlcMs = (hlc) => Math.floor(Number(hlc) / 65536);
const nowMs = () => Date.now() + (S.clockSkew || 0);

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
}

function ago(ms) {
  const s = Math.max(0, Math.round((nowMs() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  const hrs = Math.floor(s / 3600);
  return `${hrs} h ${Math.round((s % 3600) / 60)} min`;
}

/** A desk's name: its own, as named in the log, or a short id. */
function deskName(id) {
  if (!id) return 'unknown desk';
  if (S.desk && id === S.desk.node) return S.desk.name ? `${S.desk.name} (this desk)` : 'this desk';
  const named = S.desk && S.desk.desks[id];
  return named || `desk ${id.slice(0, 8)}`;
}

/** A JSON value as staff read it. */
function show(v) {
  if (v === null || v === undefined) return '—';
  if (typeof v === 'string') return v || '—';
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  if (typeof v === 'object' && v.hex !== undefined) return `(binary ${v.hex.length / 2} bytes)`;
  return JSON.stringify(v);
}

function streamLabel(stream) {
  const [kind, id] = [stream.split('/')[0], stream.slice(stream.indexOf('/') + 1)];
  if (kind === 'attendee') {
    const a = S.attendees.find((x) => x.id === id);
    return a && a.name ? a.name : `attendee ${id}`;
  }
  if (kind === 'session') {
    const s = S.sessions.find((x) => x.id === id);
    return s && s.name ? s.name : `session ${id}`;
  }
  return stream;
}

// ---------------------------------------------------------------- loading

const loaders = {
  async desk() {
    S.desk = await api('GET', '/v1/desk');
    S.clockSkew = S.desk.now_ms - Date.now();
  },
  async who() {
    S.who = await api('GET', '/v1/whoami');
    if (!S.who.auth) S.who.name = localStorage.getItem('weftlog.staff') || '';
  },
  async status() { S.status = await api('GET', '/v1/status'); },
  async sessions() { S.sessions = (await api('GET', '/v1/venue/sessions')).sessions; },
  async attendees() {
    const q = encodeURIComponent(S.query);
    const r = await api('GET', `/v1/venue/attendees?q=${q}&limit=200`);
    S.attendees = r.attendees;
    S.total = r.total;
  },
  async attendee() {
    if (!S.selected) { S.attendee = null; return; }
    try {
      S.attendee = await api('GET', `/v1/venue/attendees/${encodeURIComponent(S.selected)}`);
    } catch (e) {
      if (e.status === 404) { S.attendee = null; return; }
      throw e;
    }
  },
  async conflicts() { S.conflicts = await api('GET', '/v1/conflicts'); },
  async oversold() { S.oversold = await api('GET', '/v1/oversold'); },
  async reconnects() {
    try {
      S.reconnects = (await api('GET', '/v1/reconnects?limit=20')).reconnects;
    } catch (e) {
      if (e.status !== 404) throw e;
    }
  },
};

const renders = {
  desk: () => { renderHeader(); renderAttendees(); renderAttendee(); renderSessions(); renderConflicts(); renderPeers(); },
  who: renderHeader,
  status: () => { renderHeader(); renderPeers(); renderSessions(); },
  sessions: () => { renderSessions(); renderAttendee(); },
  attendees: renderAttendees,
  attendee: () => { renderAttendee(); renderSessions(); },
  conflicts: () => { renderConflicts(); renderAttendees(); },
  oversold: renderAlerts,
  reconnects: renderAlerts,
};

const dirty = new Set();
let flushTimer = null;

/** Reloads the named parts soon, once however often it is asked. */
function reload(...parts) {
  for (const p of parts) dirty.add(p);
  if (!flushTimer) flushTimer = setTimeout(flush, 120);
}

async function flush() {
  flushTimer = null;
  const parts = [...dirty];
  dirty.clear();
  await Promise.all(parts.map(async (p) => {
    try {
      await loaders[p]();
      renders[p]();
    } catch (e) {
      if (S.nodeUp) console.warn(p, e.message);
    }
  }));
}

function setNodeUp(up) {
  if (S.nodeUp === up) return;
  S.nodeUp = up;
  $('node-down').hidden = up;
  if (up) reload('desk', 'status', 'sessions', 'attendees', 'attendee', 'conflicts', 'oversold', 'reconnects');
}

// ---------------------------------------------------------------- header

function connectivity() {
  const st = S.status;
  if (!st) return { state: 'unknown', text: 'Connecting…' };
  const peers = (st.peers || []).filter((p) => p.node !== S.desk?.node);
  const up = peers.filter((p) => p.connected).length;
  const last = st.last_round_ms;
  if (peers.length === 0) return { state: 'offline', text: 'No other desks configured' };
  if (up === 0) {
    const since = S.offlineSince || last;
    return { state: 'offline', text: since ? `Offline for ${duration(nowMs() - since)}` : 'Offline' };
  }
  if (up < peers.length) return { state: 'partial', text: `Online with ${up} of ${peers.length} desks` };
  return { state: 'online', text: `Online with ${up} desk${up === 1 ? '' : 's'}` };
}

function renderHeader() {
  if (S.desk) {
    $('desk-name').textContent = S.desk.name || 'Registration desk';
    $('desk-id').textContent = `node ${S.desk.node.slice(0, 16)}…`;
    document.title = `${S.desk.name || 'Desk'} · weftlog`;
  }
  const c = connectivity();
  $('conn').dataset.state = c.state;
  $('conn-text').textContent = c.text;
  $('who-name').textContent = S.who.auth ? `${S.who.name || 'signed in'} · ${S.who.role}` : '';
  $('logout').hidden = !S.who.auth;
  // Without sign-in (a desk on loopback), staff say who they are here; it
  // is sent as each command's user.
  $('who-ask').hidden = S.who.auth;
  const drill = $('drill');
  const canDrill = S.desk && S.desk.demo && (S.who.role === 'admin');
  drill.hidden = !canDrill;
  if (canDrill) {
    const cut = (S.status?.blocked || []).length > 0;
    drill.textContent = cut ? 'Heal this desk\'s network' : 'Cut this desk\'s network';
    drill.dataset.cut = cut ? '1' : '';
  }
}

$('who-input').addEventListener('change', (ev) => {
  S.who.name = ev.target.value.trim();
  localStorage.setItem('weftlog.staff', S.who.name);
  toast(S.who.name ? `Changes are recorded as ${S.who.name}'s` : 'Changes are recorded without a name');
});

$('drill').addEventListener('click', (ev) => act(ev.target, async () => {
  const cut = ev.target.dataset.cut === '1';
  const others = Object.keys(S.desk.desks).filter((id) => id !== S.desk.node);
  for (const p of S.status.peers || []) if (p.node && !others.includes(p.node)) others.push(p.node);
  await api('POST', '/v1/admin/partition', { block: cut ? [] : others });
  if (!cut) S.offlineSince = nowMs();
  reload('status');
}, null));

// ---------------------------------------------------------------- alerts

function dismissed() {
  try { return JSON.parse(localStorage.getItem('weftlog.dismissed') || '{}'); } catch (_) { return {}; }
}
function dismiss(key) {
  const d = dismissed();
  d[key] = true;
  localStorage.setItem('weftlog.dismissed', JSON.stringify(d));
  renderAlerts();
}

function renderAlerts() {
  const box = $('alerts');
  box.replaceChildren();
  const gone = dismissed();
  for (const f of S.forks) {
    box.append(h('div', { class: 'alert fork' },
      h('div', { class: 'icon' }, '⑂'),
      h('div', {}, h('div', { class: 'title' }, `${deskName(f.author)} forked its log`),
        h('div', { class: 'body' }, `Two events with seq ${f.seq} were signed by one desk (a restored copy, or a cloned laptop). Both branches are kept; seats sold on both show below as oversold.`)),
      h('div', { class: 'actions' })));
  }
  for (const r of S.reconnects) {
    const key = `reconnect:${S.desk?.node}:${r.seq}`;
    if (gone[key]) continue;
    box.append(reconnectAlert(r, () => dismiss(key)));
  }
  for (const o of S.oversold) {
    const key = `oversold:${o.sale}:${o.state}:${o.compensation?.action || ''}:${o.compensation?.by || ''}`;
    if (gone[key] || o.state === 'void') continue;
    box.append(oversoldAlert(o, () => dismiss(key)));
  }
}

function oversoldAlert(o, close) {
  const session = streamLabel(o.stream);
  const c = o.compensation;
  const seats = `${o.units} seat${o.units === 1 ? '' : 's'}`;
  const title = c
    ? `${session}: ${seats} oversold, ${c.by === 'staff' ? 'decided by staff' : 'compensated'}: ${actionText(c.action)}`
    : `${session}: ${seats} oversold`;
  const body = [`A sale by ${deskName(o.author)} at ${clock(hlcMs(o.hlc))} went past the capacity while desks could not see each other. Every desk marks the same sale.`];
  const actions = h('div', { class: 'actions' });
  const canDecide = S.who.role !== 'read';
  const open = !c || c.by === 'staff' || (o.override_until_ms && nowMs() < o.override_until_ms);
  if (c && c.by === 'auto' && o.override_until_ms) {
    body.push(open
      ? ` Staff may override until ${clock(o.override_until_ms)} (${duration(o.override_until_ms - nowMs())} left).`
      : ' The override window has closed.');
  }
  if (canDecide && open) {
    for (const a of ['honour', 'cancel', 'waitlist']) {
      if (c && c.action === a) continue;
      actions.append(h('button', {
        class: a === 'honour' ? 'small primary' : 'small',
        onclick: (ev) => act(ev.target, async () => {
          await command('DecideOversell', { sale: o.sale, action: a });
          reload('oversold', 'sessions');
        }, `Decision recorded: ${actionText(a)}`),
      }, a === 'honour' ? 'Honour the sale' : a === 'cancel' ? 'Cancel it' : 'Waitlist it'));
    }
  }
  actions.append(h('button', { class: 'small ghost', onclick: close, title: 'Hide on this page' }, 'Dismiss'));
  return h('div', { class: `alert oversell${c ? ' done' : ''}`, 'data-sale': o.sale },
    h('div', { class: 'icon' }, '⚠'),
    h('div', {}, h('div', { class: 'title' }, title), h('div', { class: 'body' }, body.join(''))),
    actions);
}

function actionText(a) {
  return { honour: 'the sale is honoured (capacity raised)', cancel: 'the sale is cancelled, seats released',
    waitlist: 'the buyer is moved to the waitlist', notify: 'staff are notified' }[a] || a;
}

function reconnectAlert(r, close) {
  const peer = r.peer ? deskName(r.peer) : 'the other desks';
  const streams = r.streams || [];
  const title = `Back in touch with ${peer} after ${duration(r.offline_ms)}`;
  const summary = streams.length === 0
    ? `Nothing the others did conflicts with the ${r.own_events} change${r.own_events === 1 ? '' : 's'} made here meanwhile.`
    : `While apart, others made ${r.received} change${r.received === 1 ? '' : 's'} at the same time as the ${r.own_events} made here, on ${streams.length} record${streams.length === 1 ? '' : 's'}${r.conflicts ? `; ${r.conflicts} field${r.conflicts === 1 ? ' is' : 's are'} in conflict` : ''}. The merged result is shown below; keep, change or drop your edit.`;
  const list = h('ul', { class: 'changes' });
  for (const s of streams.slice(0, 8)) {
    const lines = [];
    for (const f of s.fields || []) {
      // Compensations show as oversell alerts.
      if (f.field.startsWith('oversold/')) continue;
      const theirs = (f.theirs || []).map((w) => `${show(w.value)} (${deskName(w.author)}${w.user ? `, ${w.user}` : ''})`).join(', ');
      const ours = (f.ours || []).map((w) => show(w.value)).join(', ');
      const name = f.field.startsWith('waitlist/')
        ? `waitlist: ${streamLabel(`attendee/${f.field.slice('waitlist/'.length)}`)}`
        : f.field;
      const row = h('div', { class: 'vals' },
        h('span', {}, h('b', {}, name), ': theirs ', theirs || '—', ours ? `; yours ${ours}` : ''),
        f.conflict ? h('span', { class: 'tag bad' }, 'conflict') : h('span', { class: 'tag ok' }, `now ${show(f.shown)}`));
      if (f.conflict && (f.ours || []).length && (f.theirs || []).length && S.who.role !== 'read') {
        row.append(
          h('button', { class: 'small', onclick: (ev) => act(ev.target, () => resolve(s.stream, f.field, f.ours[0].value), 'Kept yours') }, 'Keep mine'),
          h('button', { class: 'small', onclick: (ev) => act(ev.target, () => resolve(s.stream, f.field, f.theirs[0].value), 'Kept theirs') }, 'Keep theirs'));
      }
      lines.push(row);
    }
    for (const t of s.texts || []) {
      const merged = typeof t.text === 'string' ? `: “${t.text.length > 80 ? `${t.text.slice(0, 80)}…` : t.text}”` : '';
      lines.push(h('div', { class: 'vals' }, h('span', {}, h('b', {}, t.field), ` edited on both sides, merged${merged}`)));
    }
    for (const c of s.counters || []) {
      const sum = (list, k) => (list || []).reduce((n, w) => n + Number((w.change && w.change[k]) || 0), 0);
      const parts = [];
      const key = c.escrow ? 'sold' : 'add';
      const verb = c.escrow ? 'sold ' : '';
      const theirs = sum(c.theirs, key);
      const ours = sum(c.ours, key);
      if (theirs) parts.push(`others ${verb}${c.escrow ? theirs : `${theirs > 0 ? '+' : ''}${theirs}`}`);
      if (ours) parts.push(`this desk ${verb}${c.escrow ? ours : `${ours > 0 ? '+' : ''}${ours}`}`);
      if (!parts.length) parts.push('changed by others');
      if (c.oversold) parts.push(`${c.oversold} oversold`);
      const label = c.counter.startsWith('held/')
        ? `seats held by ${streamLabel(`attendee/${c.counter.slice('held/'.length)}`)}`
        : c.counter;
      lines.push(h('div', { class: 'vals' }, h('span', {}, h('b', {}, label), `: ${parts.join(', ')}`),
        c.oversold ? h('span', { class: 'tag bad' }, 'oversold') : null));
    }
    const open = s.stream.startsWith('attendee/')
      ? h('button', { class: 'link', onclick: () => select(s.stream.slice('attendee/'.length)) }, 'open')
      : null;
    list.append(h('li', {}, h('span', { class: 'stream' }, streamLabel(s.stream)), ' ', h('span', { class: 'tag' }, `${s.events} event${s.events === 1 ? '' : 's'}`), ' ', open, lines));
  }
  return h('div', { class: 'alert reconnect', 'data-reconnect': String(r.seq) },
    h('div', { class: 'icon' }, '⟳'),
    h('div', {}, h('div', { class: 'title' }, title), h('div', { class: 'body' }, summary), streams.length ? list : null),
    h('div', { class: 'actions' }, h('button', { class: 'small ghost', onclick: close }, 'Dismiss')));
}

async function resolve(stream, field, value) {
  await command('ResolveConflict', { stream, field, value });
  reload('conflicts', 'attendee', 'attendees', 'sessions');
}

// ---------------------------------------------------------------- attendees

function renderAttendees() {
  const list = $('att-list');
  list.replaceChildren();
  const conflicted = new Set(S.conflicts.map((c) => c.stream));
  for (const a of S.attendees) {
    const meta = [a.email, a.company].filter((x) => typeof x === 'string' && x).join(' · ');
    const li = h('li', { class: a.id === S.selected ? 'selected' : '', 'data-attendee': a.id, onclick: () => select(a.id) },
      h('div', { style: 'min-width:0' }, h('div', { class: 'name' }, show(a.name)), h('div', { class: 'meta' }, meta)),
      conflicted.has(`attendee/${a.id}`) ? h('span', { class: 'tag bad' }, 'conflict') : a.badge_printed ? h('span', { class: 'tag ok' }, 'badge') : null);
    list.append(li);
  }
  $('att-count').textContent = S.query
    ? `${S.attendees.length} of ${S.total} match “${S.query}”`
    : `${S.total} attendee${S.total === 1 ? '' : 's'}`;
}

function select(id) {
  if (S.selected !== id) { S.editing = null; S.notes = null; }
  S.selected = id;
  $('register-card').hidden = true;
  renderAttendees();
  reload('attendee');
}

let searchTimer = null;
$('search').addEventListener('input', (ev) => {
  S.query = ev.target.value.trim();
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => reload('attendees'), 150);
});

$('new-attendee').addEventListener('click', () => {
  $('register-card').hidden = false;
  $('register-error').textContent = '';
  $('register-form').name.focus();
});
$('register-cancel').addEventListener('click', () => { $('register-card').hidden = true; });
$('register-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const id = commandId().replace(/-/g, '').slice(0, 12);
  const fields = { attendee_id: id, name: f.name.value.trim(), email: f.email.value.trim() };
  if (f.phone.value.trim()) fields.phone = f.phone.value.trim();
  if (f.company.value.trim()) fields.company = f.company.value.trim();
  act(f.querySelector('button[type=submit]'), async () => {
    try {
      await command('RegisterAttendee', fields);
    } catch (e) {
      $('register-error').textContent = e.message;
      throw e;
    }
    f.reset();
    $('register-card').hidden = true;
    S.selected = id;
    reload('attendees', 'attendee');
  }, `${fields.name} registered`);
});

function renderAttendee() {
  const a = S.attendee;
  $('attendee-empty').hidden = !!a;
  const box = $('attendee');
  box.hidden = !a;
  if (!a) return;
  // Keep what staff are typing: an editor open is not redrawn under them.
  const active = document.activeElement;
  if (active && box.contains(active) && (active.tagName === 'INPUT' || active.tagName === 'TEXTAREA')) {
    markNotesMoved();
    return;
  }
  box.replaceChildren(
    h('div', { class: 'person-head' },
      h('div', {}, h('h2', {}, show(a.fields?.name?.value ?? a.name)), h('div', { class: 'sub mono' }, `attendee/${a.id} · version ${a.version}`)),
      h('div', { class: 'row-actions' },
        a.badge_printed ? h('span', { class: 'tag ok' }, 'Badge printed') : null,
        S.who.role !== 'read' ? h('button', { class: 'small', id: 'print-badge', onclick: (ev) => act(ev.target, async () => {
          await command('PrintBadge', { attendee_id: a.id });
          reload('attendee', 'attendees');
        }, 'Badge printed') }, a.badge_printed ? 'Print again' : 'Print badge') : null)),
    fieldsGrid(a),
    seatsSection(a),
    notesSection(a));
}

function fieldsGrid(a) {
  const grid = h('div', { class: 'fields' });
  for (const [field, label, type] of FIELDS) {
    const f = (a.fields || {})[field];
    const conflict = f && f.conflict && f.conflict.length > 1 ? f.conflict : null;
    grid.append(h('div', { class: 'label' }, label));
    if (S.editing === field) {
      const input = h('input', { value: f ? (typeof f.value === 'string' ? f.value : show(f.value)) : '', 'data-field': field });
      const save = () => act(null, async () => {
        await command(type, { attendee_id: a.id, value: input.value.trim() });
        S.editing = null;
        input.blur();
        reload('attendee', 'attendees', 'conflicts');
      }, `${label} saved`);
      input.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter') save();
        if (ev.key === 'Escape') { S.editing = null; input.blur(); renderAttendee(); }
      });
      grid.append(h('div', { class: 'edit-row' }, input,
        h('button', { class: 'small primary', onclick: save }, 'Save'),
        h('button', { class: 'small ghost', onclick: () => { S.editing = null; renderAttendee(); } }, 'Cancel')));
      setTimeout(() => input.focus(), 0);
      continue;
    }
    grid.append(
      h('div', { class: `value${conflict ? ' conflict' : ''}`, 'data-field': field }, conflict ? `${conflict.length} values` : show(f && f.value)),
      S.who.role !== 'read' ? h('button', { class: 'small ghost', 'data-edit': field, onclick: () => { S.editing = field; renderAttendee(); } }, 'Edit') : h('span'));
    if (conflict) {
      const choices = h('div', { class: 'choices', 'data-conflict': field });
      for (const w of conflict) {
        choices.append(h('div', { class: 'choice' },
          h('div', {}, h('div', {}, show(w.value)), h('div', { class: 'by' }, `${deskName(w.author)}${w.user ? ` · ${w.user}` : ''} · ${clock(hlcMs(w.hlc))}`)),
          S.who.role !== 'read' ? h('button', { class: 'small', onclick: (ev) => act(ev.target, () => resolve(`attendee/${a.id}`, field, w.value), `Kept ${show(w.value)}`) }, 'Keep this') : null));
      }
      grid.append(h('div', { class: 'label' }), choices);
    }
  }
  return grid;
}

function seatsSection(a) {
  const rows = h('ul', { class: 'seat-rows' });
  for (const s of a.seats || []) {
    if (!s.held) continue;
    rows.append(h('li', {},
      h('span', {}, h('b', {}, s.name || s.session), ` · ${s.held} seat${s.held === 1 ? '' : 's'}`),
      S.who.role !== 'read' ? h('button', { class: 'small danger', onclick: (ev) => {
        const n = s.held === 1 ? 1 : Number(prompt(`Cancel how many of ${s.held} seats?`, String(s.held)));
        if (!n) return;
        act(ev.target, async () => {
          await command('CancelSeats', { session_id: s.session, attendee_id: a.id, seats: n });
          reload('attendee', 'sessions');
        }, `${n} seat${n === 1 ? '' : 's'} cancelled`);
      } }, 'Cancel seats') : null));
  }
  if (!rows.children.length) rows.append(h('li', { class: 'hint' }, 'No seats yet.'));
  const body = [h('h3', {}, 'Seats'), rows];
  if (S.who.role !== 'read' && S.sessions.length) {
    const sel = h('select', { 'aria-label': 'Session' }, S.sessions.map((s) => h('option', { value: s.id }, `${s.name || s.id} — ${s.available} left`)));
    const qty = h('input', { type: 'number', min: '1', value: '1', style: 'width:70px', 'aria-label': 'Seats' });
    body.push(h('div', { class: 'row-actions' }, sel, qty,
      h('button', { class: 'primary', id: 'buy', onclick: (ev) => buy(ev.target, sel.value, a.id, Number(qty.value)) }, 'Sell seats'),
      h('button', { class: 'small', onclick: (ev) => act(ev.target, async () => {
        await command('JoinWaitlist', { session_id: sel.value, attendee_id: a.id, seats: Number(qty.value) || 1 });
        reload('sessions');
      }, 'Added to the waitlist') }, 'Waitlist')));
  }
  return h('div', { class: 'section' }, body);
}

function buy(button, session, attendee, seats) {
  return act(button, async () => {
    await command('PurchaseSeats', { session_id: session, attendee_id: attendee, seats: seats || 1 });
    reload('attendee', 'sessions', 'oversold');
  }, `${seats || 1} seat${seats === 1 ? '' : 's'} sold`);
}

function notesSection(a) {
  const text = typeof a.notes === 'string' ? a.notes : '';
  const area = h('textarea', { id: 'notes', placeholder: 'Notes (diet, access, anything staff should know). Two desks may edit at once: edits merge.' });
  area.value = S.notes ? S.notes.draft : text;
  area.addEventListener('focus', () => {
    if (!S.notes) S.notes = { text, heads: a.notes_heads || [], draft: area.value };
  });
  area.addEventListener('input', () => { if (S.notes) S.notes.draft = area.value; });
  const state = h('div', { class: 'notes-state', id: 'notes-state' }, S.notes && S.notes.text !== text ? 'Changed on another desk while you typed; saving merges both.' : '');
  const save = h('button', { class: 'small primary', id: 'save-notes', onclick: (ev) => act(ev.target, async () => {
    const base = S.notes || { text, heads: a.notes_heads || [] };
    const splices = diff(base.text, area.value);
    if (!splices.length) { S.notes = null; return; }
    await command('EditNotes', { attendee_id: a.id, splices, base: base.heads });
    S.notes = null;
    area.blur();
    reload('attendee');
  }, 'Notes saved') }, 'Save notes');
  const revert = h('button', { class: 'small ghost', onclick: () => { S.notes = null; area.blur(); renderAttendee(); } }, 'Discard');
  return h('div', { class: 'section' }, h('h3', {}, 'Notes'), area, state,
    S.who.role !== 'read' ? h('div', { class: 'row-actions', style: 'margin-top:6px' }, save, revert) : null);
}

function markNotesMoved() {
  const el = $('notes-state');
  if (el && S.notes && S.attendee && S.attendee.notes !== S.notes.text) {
    el.textContent = 'Changed on another desk while you typed; saving merges both.';
  }
}

/** One splice [pos, delete, insert] turning `a` into `b` (UTF-16 units, as JS counts). */
function diff(a, b) {
  if (a === b) return [];
  let p = 0;
  while (p < a.length && p < b.length && a[p] === b[p]) p++;
  let s = 0;
  while (s < a.length - p && s < b.length - p && a[a.length - 1 - s] === b[b.length - 1 - s]) s++;
  // Never split a surrogate pair.
  const hi = (c) => c >= 0xd800 && c <= 0xdbff;
  if (p > 0 && hi(a.charCodeAt(p - 1))) p--;
  if (s > 0 && hi(a.charCodeAt(a.length - s - 1))) s--;
  return [[p, a.length - p - s, b.slice(p, b.length - s)]];
}

// ---------------------------------------------------------------- sessions

function policyLine(s) {
  const r = s.rule || {};
  const p = s.policy || r.policy;
  if (!p) return { text: 'No seat policy yet.', limited: false };
  const parts = [];
  const st = S.status;
  const last = st && st.last_round_ms;
  const c = connectivity();
  if (c.state === 'offline' && last) parts.push(`offline for ${duration(nowMs() - last)}`);
  if (p.mode === 'risk-window') {
    if (last) {
      const left = p.window_s * 1000 - (nowMs() - last);
      parts.push(left > 0 ? `risk window: ${duration(left)} left` : 'risk window closed');
    } else {
      parts.push('risk window: no sync yet');
    }
    const owed = r.held < 0 ? -r.held : 0;
    parts.push(`${owed} of ${p.max_overdraft} overdraft seats used`);
  } else if (p.mode === 'strict') {
    parts.push(`strict: sells only while synced within ${duration(p.window_s * 1000)}`);
  } else {
    parts.push('escrow: sells only the seats this desk holds');
  }
  parts.push(`this desk may sell ${r.may_sell ?? 0} now (holds ${Math.max(0, r.held ?? 0)})`);
  let text = parts.join('; ');
  text = text.charAt(0).toUpperCase() + text.slice(1);
  return { text, why: r.limited_by || null, limited: !!r.limited_by || (r.may_sell ?? 0) === 0 };
}

function renderSessions() {
  const list = $('sessions');
  // Keep a seat count being typed: redraw once it loses focus.
  if (list.contains(document.activeElement) && document.activeElement.tagName === 'INPUT') return;
  list.replaceChildren();
  $('sessions-hint').textContent = S.sessions.length ? '' : 'none scheduled';
  for (const s of S.sessions) {
    const cap = Number(s.capacity) || 0;
    const sold = Number(s.sold) || 0;
    const over = Number(s.oversold) || 0;
    const soldPct = cap ? Math.min(100, ((sold - over) / Math.max(cap, sold)) * 100) : 0;
    const overPct = cap ? Math.min(100, (over / Math.max(cap, sold)) * 100) : 0;
    const pl = policyLine(s);
    const sell = h('div', { class: 'sell' });
    if (S.who.role !== 'read') {
      const qty = h('input', { type: 'number', min: '1', value: '1', 'aria-label': 'Seats' });
      sell.append(qty, h('button', {
        class: 'small primary',
        'data-sell': s.id,
        disabled: !S.attendee,
        title: S.attendee ? '' : 'Select an attendee first',
        onclick: (ev) => buy(ev.target, s.id, S.attendee.id, Number(qty.value)),
      }, S.attendee ? `Sell to ${show(S.attendee.fields?.name?.value ?? S.attendee.name)}` : 'Select an attendee to sell'));
    }
    const wl = (s.waitlist || []).length
      ? h('div', { class: 'waitlist' }, `Waitlist: ${s.waitlist.map((w, i) => `${i + 1}. ${streamLabel(`attendee/${w.attendee}`)} (${w.seats})`).join(', ')}`)
      : null;
    list.append(h('li', { class: 'session', 'data-session': s.id },
      h('div', { class: 'top-line' }, h('b', {}, s.name || s.id), h('span', { class: 'where' }, [s.room, s.starts].filter((x) => typeof x === 'string' && x).join(' · '))),
      h('div', { class: 'bar', title: `${sold} sold of ${cap}` }, h('div', { class: 'sold', style: `width:${soldPct}%` }), h('div', { class: 'over', style: `width:${overPct}%` })),
      h('div', { class: 'figures' },
        h('span', {}, `${sold} sold of ${cap}`),
        over ? h('span', { class: 'tag bad' }, `${over} oversold`) : h('span', { class: 'avail' }, `${s.available} available`)),
      h('div', { class: `policy${pl.limited ? ' limited' : ''}` }, pl.text),
      pl.why ? h('details', {
        class: 'why',
        open: S.whyOpen.has(s.id),
        ontoggle: (ev) => (ev.target.open ? S.whyOpen.add(s.id) : S.whyOpen.delete(s.id)),
      }, h('summary', {}, 'Why this desk cannot sell more'), pl.why) : null,
      wl, sell));
  }
}

// ---------------------------------------------------------------- conflicts

function renderConflicts() {
  const list = $('conflicts');
  list.replaceChildren();
  const n = S.conflicts.length;
  $('conflict-count').textContent = String(n);
  $('conflict-count').className = n ? 'badge hot' : 'badge';
  if (!n) {
    list.append(h('li', { class: 'empty-note' }, 'No conflicts.'));
    return;
  }
  for (const c of S.conflicts) {
    const li = h('li', { 'data-stream': c.stream, 'data-field': c.field },
      h('div', { class: 'what' }, `${streamLabel(c.stream)} · ${c.field}`));
    for (const w of c.values) {
      li.append(h('div', { class: 'choice' },
        h('div', {}, h('div', {}, show(w.value)), h('div', { class: 'by' }, `${deskName(w.author)} · ${clock(hlcMs(w.hlc))}`)),
        S.who.role !== 'read' ? h('button', { class: 'small', onclick: (ev) => act(ev.target, () => resolve(c.stream, c.field, w.value), `Kept ${show(w.value)}`) }, 'Keep') : null));
    }
    if (c.stream.startsWith('attendee/')) {
      li.append(h('button', { class: 'link', onclick: () => select(c.stream.slice('attendee/'.length)) }, 'Open the record'));
    }
    list.append(li);
  }
}

// ---------------------------------------------------------------- cluster

function renderPeers() {
  const st = S.status;
  const body = $('peers');
  body.replaceChildren();
  if (!st) return;
  const peers = (st.peers || []).filter((p) => p.node !== S.desk?.node);
  if (!peers.length) body.append(h('tr', {}, h('td', { colspan: '4', class: 'hint' }, 'No peers: this desk works alone.')));
  for (const p of peers) {
    const blocked = (st.blocked || []).includes(p.node);
    body.append(h('tr', { 'data-peer': p.node || p.addr },
      h('td', {}, p.node ? deskName(p.node) : p.addr),
      h('td', {}, blocked ? h('span', { class: 'tag warn' }, 'cut') : p.connected ? h('span', { class: 'tag ok' }, 'connected') : h('span', { class: 'tag bad', title: p.last_error || '' }, 'down')),
      h('td', { class: 'num' }, p.behind === null || p.behind === undefined ? '—' : String(p.behind)),
      h('td', { class: 'num' }, String(p.events_received ?? 0))));
  }
  $('last-round').textContent = st.last_round_ms ? `last sync ${ago(st.last_round_ms)}` : 'not synced yet';
}

function renderFeed() {
  const list = $('feed');
  list.replaceChildren();
  if (!S.feed.length) list.append(h('li', { class: 'hint' }, 'Events from other desks appear here as they arrive.'));
  for (const e of S.feed) {
    list.append(h('li', {}, h('span', { class: 't' }, clock(hlcMs(e.hlc))),
      h('span', {}, h('b', {}, e.kind), ` · ${streamLabel(e.stream)} · ${deskName(e.author)}${e.meta && e.meta.user ? ` (${e.meta.user})` : ''}`)));
  }
}

// ---------------------------------------------------------------- live

function onEvent(e) {
  if (S.desk && e.author !== S.desk.node) {
    S.feed.unshift(e);
    S.feed.length = Math.min(S.feed.length, FEED_MAX);
    renderFeed();
  }
  const parts = ['conflicts', 'status'];
  if (e.stream.startsWith('session/')) parts.push('sessions', 'oversold', 'attendee');
  if (e.stream.startsWith('attendee/')) {
    parts.push('attendees');
    if (S.selected && e.stream === `attendee/${S.selected}`) parts.push('attendee');
  }
  if (e.stream.startsWith('desk/')) parts.push('desk');
  reload(...parts);
}

function listen() {
  const events = new EventSource('/v1/events');
  events.addEventListener('event', (m) => {
    try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn('event', e); }
  });
  events.addEventListener('reset', () => reload('sessions', 'attendees', 'attendee', 'conflicts', 'oversold'));
  events.onopen = () => setNodeUp(true);
  events.onerror = () => { if (events.readyState !== EventSource.OPEN) setNodeUp(false); };
  const notes = new EventSource('/v1/notifications');
  notes.addEventListener('oversold', () => reload('oversold', 'sessions'));
  notes.addEventListener('reconciled', () => reload('reconnects', 'conflicts'));
  notes.addEventListener('fork', (m) => {
    try {
      const f = JSON.parse(m.data);
      if (!S.forks.some((x) => x.author === f.author && x.seq === f.seq)) S.forks.push(f);
      renderAlerts();
    } catch (e) { console.warn('fork', e); }
  });
  notes.addEventListener('epoch', () => reload('desk', 'sessions', 'attendees', 'attendee', 'conflicts', 'oversold'));
}

function trackOffline() {
  const c = connectivity();
  if (c.state === 'offline' && !S.offlineSince) S.offlineSince = (S.status && S.status.last_round_ms) || nowMs();
  if (c.state !== 'offline') S.offlineSince = null;
}

async function start() {
  await Promise.all([loaders.desk(), loaders.who()]).catch((e) => toast(e.message, true));
  await Promise.all(['status', 'sessions', 'attendees', 'conflicts', 'oversold', 'reconnects'].map((p) => loaders[p]().catch((e) => console.warn(p, e.message))));
  try { S.forks = await api('GET', '/v1/forks'); } catch (_) { S.forks = []; }
  trackOffline();
  $('who-input').value = S.who.auth ? '' : S.who.name;
  renderHeader(); renderAlerts(); renderAttendees(); renderAttendee(); renderSessions(); renderConflicts(); renderPeers(); renderFeed();
  listen();
  setInterval(async () => {
    try { await loaders.status(); } catch (_) { return; }
    trackOffline();
    renderHeader(); renderPeers();
    // Policy lines and override windows count down.
    renderSessions();
    if (S.oversold.some((o) => o.override_until_ms)) renderAlerts();
  }, STATUS_EVERY_MS);
}

start();
