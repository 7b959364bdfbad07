// The Keel console: a client of /api/v1, like keelctl. Everything the server
// sends is put on the page as text (textContent), never as markup.
'use strict';

const TOKEN_KEY = 'keel-token';
const VIEWS = ['agents', 'agent', 'certificates', 'files', 'audit', 'components', 'policies', 'tasks', 'upgrade'];
/** The tab a view belongs to (one agent's page is under Agents). */
const TAB_OF = { agent: 'agents' };
const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);
let watched = null;
let watchTimer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, body) {
  return (await apiPaged(method, path, body)).data;
}

/** A call's JSON answer with the paging headers: { data, next, total }. */
async function apiPaged(method, path, body) {
  const headers = { Authorization: 'Bearer ' + token() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch('/api/v1' + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!resp.ok) {
    const msg = (data && data.error) || text || resp.statusText;
    const err = new Error(resp.status + ' ' + resp.statusText + ': ' + msg);
    err.status = resp.status;
    throw err;
  }
  const total = resp.headers.get('X-Total-Count');
  return { data, next: resp.headers.get('X-Next-Cursor'), total: total === null ? null : Number(total) };
}

function showError(e) {
  const el = $('error');
  if (!e) {
    el.hidden = true;
    el.textContent = '';
    return;
  }
  el.textContent = e.message || String(e);
  el.hidden = false;
  if (e.status === 401) signOut(true);
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  td.textContent = text === null || text === undefined || text === '' ? '-' : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(tableId, rows, render) {
  const tbody = $(tableId).querySelector('tbody');
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement('tr');
    render(tr, r);
    tbody.appendChild(tr);
  }
}

function targetText(t) {
  if (t === 'all') return 'all agents';
  if (t.tags) return 'tags ' + t.tags.join(', ');
  if (t.agents) return 'agents ' + t.agents.join(', ');
  if (t.platform) return 'platform ' + t.platform;
  return JSON.stringify(t);
}

// The agent list is paged by the server: the filters last submitted, the cursor
// of the page shown (null for the first), of the next page, and how many agents
// came before this page.
const AGENTS_PAGE = 100;
let agentsPage = { filters: '', cursor: null, next: null, offset: 0 };

/** The query string of a filter form: its non-empty fields, by name. */
function queryOf(fields) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(fields)) {
    if (value !== '' && value !== null && value !== undefined && value !== false) q.set(name, String(value));
  }
  return q;
}

function agentFilters() {
  return queryOf({
    q: $('af-q').value.trim(),
    online: $('af-online').value,
    version: $('af-version').value.trim(),
    tag: $('af-tag').value.trim(),
    plugin: $('af-plugin').value.trim(),
  });
}

async function loadAgents() {
  const q = new URLSearchParams(agentsPage.filters);
  q.set('limit', AGENTS_PAGE);
  if (agentsPage.cursor) q.set('cursor', agentsPage.cursor);
  const path = '/agents?' + q.toString();
  const page = await apiPaged('GET', path);
  const agents = page.data || [];
  agentsPage.next = page.next;
  $('agents-count').textContent = '(' + (page.total === null ? agents.length : page.total) + ')';
  const first = agents.length ? agentsPage.offset + 1 : 0;
  $('agents-range').textContent = agents.length
    ? first + '\u2013' + (agentsPage.offset + agents.length) + (page.total === null ? '' : ' of ' + page.total)
    : '';
  $('agents-next').disabled = !page.next;
  $('agents-first').disabled = !agentsPage.cursor;
  fill('agents-table', agents, (tr, a) => {
    tr.dataset.id = a.id;
    tr.className = 'clickable';
    tr.addEventListener('click', () => {
      location.hash = '#agent/' + encodeURIComponent(a.id);
    });
    cell(tr, a.id);
    cell(tr, a.hostname);
    cell(tr, a.version);
    cell(tr, a.online ? 'online' : 'offline', a.online ? 'online' : 'offline');
    cell(tr, a.instance);
    cell(tr, when(a.last_heartbeat));
    cell(tr, (a.plugins || []).map((p) => p.name + ' ' + p.version + ' (' + p.state + ')').join(', '));
    cell(tr, (a.tags || []).join(', '));
  });
}

function bytes(n) {
  if (n === null || n === undefined || n === '') return '';
  let v = Number(n);
  for (const unit of ['B', 'KiB', 'MiB', 'GiB']) {
    if (Math.abs(v) < 1024 || unit === 'GiB') return (unit === 'B' ? v : v.toFixed(1)) + ' ' + unit;
    v /= 1024;
  }
  return String(n);
}

/** An RFC 3339 time (or Unix ms) as `YYYY-MM-DD HH:MM:SS` UTC. */
function when(t) {
  if (t === null || t === undefined || t === '') return '';
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toISOString().slice(0, 19).replace('T', ' ');
}

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

function svgText(parent, x, y, text, anchor) {
  const t = svg('text', { x, y, 'text-anchor': anchor || 'start' }, parent);
  t.textContent = text;
  return t;
}

/**
 * A line chart of `points` ([t ms, value]) from `from` to `to` ms, drawn as SVG
 * by hand: the axes, the largest value and the time span as labels.
 */
function lineChart(containerId, points, from, to, format) {
  const W = 360, H = 120, L = 52, B = 16, T = 6;
  const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img' });
  const max = Math.max(0, ...points.map((p) => p[1]));
  const top = max > 0 ? max : 1;
  const x = (t) => L + Math.min(Math.max((t - from) / (to - from), 0), 1) * (W - L - 4);
  const y = (v) => H - B - (v / top) * (H - B - T);
  svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - 4, y2: H - B }, root);
  svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }, root);
  svgText(root, L - 4, T + 8, format(max), 'end');
  svgText(root, L - 4, H - B, format(0), 'end');
  svgText(root, L, H - 3, '24 h ago');
  svgText(root, W - 4, H - 3, 'now', 'end');
  const title = svg('title', {}, root);
  if (points.length === 0) {
    title.textContent = 'no samples yet';
    svgText(root, (L + W) / 2, H / 2, 'no samples yet', 'middle');
  } else {
    title.textContent = points.length + ' samples, at most ' + format(max);
    svg('polyline', { class: 'line', points: points.map((p) => x(p[0]).toFixed(1) + ',' + y(p[1]).toFixed(1)).join(' ') }, root);
    for (const p of points) svg('circle', { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 1.8, class: 'sev-none' }, root);
  }
  $(containerId).replaceChildren(root);
}

let shownAgent = null;

function facts(list) {
  const dl = $('ag-facts');
  dl.replaceChildren();
  for (const [name, value] of list) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value === null || value === undefined || value === '' ? '-' : String(value);
    dl.append(dt, dd);
  }
}

async function showAgent(id) {
  shownAgent = id;
  const path = '/agents/' + encodeURIComponent(id);
  const [a, act] = await Promise.all([api('GET', path), api('GET', path + '/activity')]);
  if (shownAgent !== id) return;
  const hb = a.heartbeat || {};
  $('ag-id').textContent = a.id;
  $('ag-state').textContent = a.online ? 'online' : 'offline';
  $('ag-state').className = a.online ? 'online' : 'offline';
  const addresses = [].concat(a.intranet_ipv4, a.extranet_ipv4, a.intranet_ipv6, a.extranet_ipv6).filter(Boolean);
  facts([
    ['Host', a.hostname],
    ['Name', a.name],
    ['Addresses', addresses.join(', ')],
    ['Product', a.product],
    ['Version', a.version],
    ['Platform', [hb.platform, hb.platform_version].filter(Boolean).join(' ')],
    ['Kernel', hb.kernel_version],
    ['Architecture', hb.arch],
    ['Instance', a.instance],
    ['Connected', when(a.connected_at)],
    ['First seen', when(a.first_seen)],
    ['Last heartbeat', when(a.last_heartbeat)],
    ['CPU', hb.cpu === undefined ? '' : Number(hb.cpu).toFixed(2) + ' %'],
    ['Memory', bytes(hb.rss)],
    ['Spool', bytes(hb.spool_bytes)],
    ['Records dropped', hb.dropped],
  ]);
  $('ag-tags').value = (a.tags || []).join(', ');
  const c = act.certificate;
  if (c) {
    const days = Math.floor((Date.parse(c.not_after) - Date.now()) / 86400000);
    $('ag-cert').textContent = 'serial ' + c.serial + ', issued ' + when(c.issued_at) + ', valid until ' + when(c.not_after) +
      ' (' + days + ' days)';
  } else {
    $('ag-cert').textContent = 'no valid certificate';
  }
  const to = Date.now();
  const from = to - 24 * 3600 * 1000;
  const series = (key) => act.samples.map((s) => [s.at, s[key]]);
  lineChart('chart-cpu', series('cpu'), from, to, (v) => v.toFixed(1) + ' %');
  lineChart('chart-rss', series('rss'), from, to, bytes);
  lineChart('chart-records', series('records_per_s'), from, to, (v) => v.toFixed(1) + '/s');
  lineChart('chart-spool', series('spool_bytes'), from, to, bytes);
  fill('ag-plugins', a.plugins || [], (tr, p) => {
    const h = p.heartbeat || {};
    cell(tr, p.name);
    cell(tr, p.version);
    cell(tr, p.state);
    cell(tr, h.restarts);
    cell(tr, h.last_fault);
    cell(tr, p.lost_records);
    cell(tr, when(p.updated_at));
  });
  fill('ag-tasks', act.tasks, (tr, t) => {
    cell(tr, when(t.created_at));
    cell(tr, t.data_type);
    cell(tr, t.object_name);
    cell(tr, t.status);
    cell(tr, when(t.finished_at));
    cell(tr, t.message);
  });
  fill('ag-sessions', act.sessions, (tr, s) => {
    cell(tr, when(s.connected_at));
    cell(tr, when(s.disconnected_at) || (a.online && s === act.sessions[0] ? 'open' : 'ended with its instance'));
    cell(tr, s.instance);
  });
}

async function saveTags(ev) {
  ev.preventDefault();
  if (!shownAgent) return;
  const tags = $('ag-tags').value.split(',').map((t) => t.trim()).filter(Boolean);
  await api('PUT', '/agents/' + encodeURIComponent(shownAgent) + '/tags', tags);
  await showAgent(shownAgent);
}

const SEVERITIES = ['low', 'medium', 'high', 'critical'];

function worst(cert) {
  const f = cert.findings || [];
  return f.length ? f.reduce((w, x) => (SEVERITIES.indexOf(x.severity) > SEVERITIES.indexOf(w.severity) ? x : w)) : null;
}

/** Certificates by expiry over the next year; expired ones at the left edge. */
function expiryTimeline(certs) {
  const W = 1200, H = 70, L = 8, R = 8, Y = 34;
  const now = Date.now();
  const span = 365 * 86400000;
  const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img' });
  const x = (t) => L + Math.min(Math.max((t - now) / span, 0), 1) * (W - L - R);
  svg('line', { class: 'axis', x1: L, y1: Y, x2: W - R, y2: Y }, root);
  for (const d of [0, 30, 90, 180, 365]) {
    const px = x(now + d * 86400000);
    svg('line', { class: d === 0 ? 'now' : 'axis', x1: px, y1: Y - 20, x2: px, y2: Y + 8 }, root);
    svgText(root, px, Y + 22, d === 0 ? 'now' : d + ' d', d === 365 ? 'end' : d === 0 ? 'start' : 'middle');
  }
  const title = svg('title', {}, root);
  title.textContent = certs.length + ' certificates';
  certs.forEach((c, i) => {
    const w = worst(c);
    const dot = svg('circle', { cx: x(c.not_after).toFixed(1), cy: Y - 6 - (i % 4) * 4, r: 4, class: 'sev-' + (w ? w.severity : 'none') }, root);
    const t = svg('title', {}, dot);
    t.textContent = c.target + ': ' + new Date(c.not_after).toISOString();
  });
  $('certs-timeline').replaceChildren(root);
}

async function loadCertificates() {
  const q = queryOf({ agent: $('cf-agent').value.trim(), expiring_within_days: $('cf-days').value });
  let certs = await api('GET', '/certificates' + (q.toString() ? '?' + q.toString() : ''));
  const host = $('cf-host').value.trim().toLowerCase();
  if (host) {
    certs = certs.filter((c) => c.target.toLowerCase().includes(host) || (c.names || []).some((n) => n.toLowerCase().includes(host)));
  }
  // The finding codes of the targets shown are offered; a target passes when
  // one finding has the chosen code and at least the chosen severity.
  const codes = [...new Set(certs.flatMap((c) => (c.findings || []).map((f) => f.code)))].sort();
  const codeSelect = $('cf-code');
  const code = codeSelect.value;
  codeSelect.replaceChildren(new Option('any finding', ''), ...codes.map((x) => new Option(x, x)));
  if (codes.includes(code)) codeSelect.value = code;
  const min = SEVERITIES.indexOf($('cf-severity').value);
  if (min >= 0 || codeSelect.value) {
    const wanted = (f) => SEVERITIES.indexOf(f.severity) >= min && (!codeSelect.value || f.code === codeSelect.value);
    certs = certs.filter((c) => (c.findings || []).some(wanted));
  }
  $('certs-count').textContent = '(' + certs.length + ')';
  expiryTimeline(certs);
  fill('certs-table', certs, (tr, c) => {
    tr.className = 'clickable';
    tr.addEventListener('click', () => showCertificate(c));
    const w = worst(c);
    cell(tr, c.target);
    cell(tr, c.agent_id);
    cell(tr, c.subject);
    cell(tr, when(c.not_after));
    cell(tr, Math.floor((c.not_after - Date.now()) / 86400000));
    cell(tr, w ? w.severity + ': ' + w.code : '', w ? 'sev-' + w.severity : '');
    cell(tr, (c.findings || []).length);
  });
  $('cert-detail').hidden = true;
}

function showCertificate(c) {
  $('cert-detail').hidden = false;
  $('cd-target').textContent = c.target + ' (through ' + c.agent_id + ')';
  const tls = c.tls || {};
  const accepted = (tls.protocols || []).filter((p) => p.accepted);
  const versions = accepted.map((p) => p.version + (p.suite ? ' (' + p.suite + ')' : '')).join(', ');
  $('cd-tls').textContent = (versions ? 'Accepts ' + versions : 'No protocol seen accepted') +
    (tls.weak_suite ? '; chose weak suite ' + tls.weak_suite : '');
  fill('cd-findings', c.findings || [], (tr, f) => {
    cell(tr, f.severity, 'sev-' + f.severity);
    cell(tr, f.code);
    cell(tr, f.message);
  });
  fill('cd-chain', c.chain || [], (tr, x) => {
    cell(tr, x.subject);
    cell(tr, x.issuer);
    cell(tr, x.serial);
    cell(tr, when(x.not_after));
    cell(tr, x.key_type + ' ' + x.key_bits + (x.curve ? ' ' + x.curve : ''));
    cell(tr, x.signature);
    cell(tr, (x.sans || []).join(', '));
  });
}

async function loadFiles() {
  const q = queryOf({ agent: $('ff-agent').value.trim(), name: $('ff-name').value.trim(), behind: $('ff-behind').checked });
  const rows = await api('GET', '/files/status' + (q.toString() ? '?' + q.toString() : ''));
  $('files-count').textContent = '(' + rows.length + ')';
  fill('files-table', rows, (tr, r) => {
    cell(tr, r.agent_id);
    cell(tr, r.name);
    cell(tr, r.wanted_removed ? 'removed' : r.wanted_version);
    cell(tr, r.held_version);
    cell(tr, r.held_state);
    cell(tr, r.behind ? 'behind' : 'current', r.behind ? 'behind' : '');
    cell(tr, when(r.updated_at));
  });
}

/** A datetime-local field's value as RFC 3339, or ''. */
function rfc3339(field) {
  const v = $(field).value;
  return v ? new Date(v).toISOString() : '';
}

async function loadAudit() {
  const q = queryOf({
    actor: $('au-actor').value.trim(),
    target: $('au-target').value.trim(),
    since: rfc3339('au-since'),
    until: rfc3339('au-until'),
    limit: 500,
  });
  const rows = await api('GET', '/audit?' + q.toString());
  $('audit-count').textContent = '(' + rows.length + ')';
  fill('audit-table', rows, (tr, e) => {
    cell(tr, when(e.at));
    cell(tr, e.actor);
    cell(tr, e.action);
    cell(tr, e.target);
    cell(tr, e.status);
    cell(tr, e.outcome);
  });
}

/** Packages grouped by component and version, newest upload first. */
function versions(packages) {
  const byKey = new Map();
  for (const p of packages) {
    const key = p.name + '\u0000' + p.version;
    if (!byKey.has(key)) byKey.set(key, { name: p.name, version: p.version, packages: [], at: p.created_at });
    const v = byKey.get(key);
    v.packages.push(p.arch + ' ' + p.type);
    if (p.created_at > v.at) v.at = p.created_at;
  }
  return [...byKey.values()].sort((a, b) => a.name.localeCompare(b.name) || b.at.localeCompare(a.at));
}

async function loadComponents() {
  const list = versions(await api('GET', '/components'));
  fill('components-table', list, (tr, v) => {
    cell(tr, v.name);
    cell(tr, v.version);
    cell(tr, v.packages.join(', '));
    cell(tr, v.at);
  });
  return list;
}

async function loadPolicies() {
  const policies = await api('GET', '/policies');
  fill('policies-table', policies, (tr, p) => {
    cell(tr, p.name);
    cell(tr, p.component);
    cell(tr, p.version);
    cell(tr, targetText(p.target));
    cell(tr, p.created_at);
  });
}

function progressOf(c) {
  const done = c.succeeded + c.failed + c.timed_out + c.cancelled;
  return { done, total: done + c.pending + c.sent };
}

async function loadTasks() {
  const tasks = await api('GET', '/tasks');
  fill('tasks-table', tasks, (tr, t) => {
    tr.className = 'clickable';
    tr.dataset.id = t.id;
    tr.addEventListener('click', () => {
      location.hash = '#tasks/' + t.id;
    });
    const p = progressOf(t.counts);
    cell(tr, t.id);
    cell(tr, t.kind);
    cell(tr, t.state);
    cell(tr, p.done + ' / ' + p.total);
    cell(tr, t.created_at);
  });
}

/** A task sent to one agent (found by its token), shown as a task of one subtask. */
function single(s) {
  const counts = { pending: 0, sent: 0, succeeded: 0, failed: 0, timed_out: 0, cancelled: 0 };
  if (s.status in counts) counts[s.status] = 1;
  return { id: s.token, state: s.status, reason: '', counts, subtasks: [s] };
}

async function showTask(id) {
  watched = id;
  clearTimeout(watchTimer);
  let t = await api('GET', '/tasks/' + encodeURIComponent(id));
  if (watched !== id) return;
  if (!t.counts) t = single(t);
  $('task-detail').hidden = false;
  $('task-id').textContent = t.id;
  $('task-state').textContent = t.state;
  $('task-reason').textContent = t.reason || '';
  const c = t.counts;
  const p = progressOf(c);
  $('task-progress').max = Math.max(p.total, 1);
  $('task-progress').value = p.done;
  $('task-counts').textContent =
    c.succeeded + ' succeeded, ' + c.failed + ' failed, ' + c.timed_out + ' timed out, ' +
    c.sent + ' waiting, ' + c.pending + ' not sent, ' + c.cancelled + ' cancelled';
  $('task-pause').disabled = t.state !== 'running';
  $('task-resume').disabled = t.state !== 'paused';
  $('task-cancel').disabled = t.state !== 'running' && t.state !== 'paused';
  const finished = c.succeeded + c.failed + c.timed_out;
  if (t.batch_size) {
    const share = finished ? ((c.failed + c.timed_out) / finished) * 100 : 0;
    $('task-threshold').textContent = 'Batches of ' + t.batch_size + '; pauses when more than ' +
      (t.failure_threshold * 100).toFixed(0) + ' % of finished subtasks fail since it was last started or resumed (' +
      share.toFixed(0) + ' % of all finished so far).';
  } else {
    $('task-threshold').textContent = '';
  }
  const batches = [];
  const size = t.batch_size || Math.max((t.subtasks || []).length, 1);
  (t.subtasks || []).forEach((s, i) => {
    const b = Math.floor(i / size);
    if (!batches[b]) batches[b] = { n: b + 1, agents: 0, succeeded: 0, failed: 0, timed_out: 0, sent: 0, pending: 0 };
    batches[b].agents += 1;
    if (s.status in batches[b]) batches[b][s.status] += 1;
  });
  fill('batches-table', batches, (tr, b) => {
    cell(tr, b.n);
    cell(tr, b.agents);
    cell(tr, b.succeeded);
    cell(tr, b.failed, b.failed ? 'offline' : '');
    cell(tr, b.timed_out);
    cell(tr, b.sent);
    cell(tr, b.pending);
  });
  fill('subtasks-table', t.subtasks || [], (tr, s) => {
    cell(tr, s.agent_id);
    cell(tr, s.status);
    cell(tr, s.finished_at);
    cell(tr, s.result ? s.result.msg : '');
  });
  if (['running', 'paused', 'pending', 'sent'].includes(t.state)) {
    watchTimer = setTimeout(() => {
      if (watched === id) showTask(id).catch(showError);
    }, 1000);
  } else {
    loadTasks().catch(showError);
  }
}

async function taskAction(action) {
  if (!watched) return;
  await api('POST', '/tasks/' + encodeURIComponent(watched) + '/' + action);
  await showTask(watched);
}

async function loadUpgradeForm() {
  const list = await loadComponents();
  const components = [...new Set(list.map((v) => v.name))];
  const select = $('up-component');
  const chosen = select.value;
  select.replaceChildren(...components.map((n) => new Option(n, n)));
  if (components.includes(chosen)) select.value = chosen;
  const fillVersions = () => {
    const vs = list.filter((v) => v.name === select.value).map((v) => v.version);
    $('up-version').replaceChildren(...vs.map((v) => new Option(v, v)));
  };
  select.onchange = fillVersions;
  fillVersions();
}

function formTarget() {
  const kind = $('up-target-kind').value;
  if (kind === 'all') return 'all';
  const values = $('up-target').value.split(',').map((s) => s.trim()).filter(Boolean);
  if (values.length === 0) throw new Error('name at least one ' + (kind === 'tags' ? 'tag' : 'agent ID'));
  return { [kind]: values };
}

async function startUpgrade(ev) {
  ev.preventDefault();
  const component = $('up-component').value;
  const version = $('up-version').value;
  const target = formTarget();
  const name = $('up-policy').value.trim() || component;
  const existing = (await api('GET', '/policies')).find((p) => p.name === name);
  if (existing) {
    if (existing.component !== component || JSON.stringify(existing.target) !== JSON.stringify(target)) {
      throw new Error('policy ' + name + ' is for ' + existing.component + ', ' + targetText(existing.target) +
        '; give another policy name');
    }
    await api('PUT', '/policies/' + encodeURIComponent(name), { version });
  } else {
    await api('POST', '/policies', { name, component, version, target });
  }
  const task = await api('POST', '/tasks', {
    kind: 'sync-config',
    target,
    batch_size: Number($('up-batch').value),
    failure_threshold: Number($('up-threshold').value),
  });
  location.hash = '#tasks/' + task.id;
}

async function route() {
  if (!token()) return;
  const [view, arg] = (location.hash.slice(1) || 'agents').split('/');
  const current = VIEWS.includes(view) ? view : 'agents';
  for (const v of VIEWS) $(v).hidden = v !== current;
  const tab = TAB_OF[current] || current;
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.tab === tab);
  if (current !== 'agent') shownAgent = null;
  if (current !== 'tasks' || !arg) {
    watched = null;
    $('task-detail').hidden = true;
  }
  showError(null);
  try {
    if (current === 'agents') await loadAgents();
    if (current === 'agent' && arg) await showAgent(decodeURIComponent(arg));
    if (current === 'certificates') await loadCertificates();
    if (current === 'files') await loadFiles();
    if (current === 'audit') await loadAudit();
    if (current === 'components') await loadComponents();
    if (current === 'policies') await loadPolicies();
    if (current === 'tasks') {
      await loadTasks();
      if (arg) await showTask(decodeURIComponent(arg));
    }
    if (current === 'upgrade') await loadUpgradeForm();
  } catch (e) {
    showError(e);
  }
}

function signedIn(yes) {
  $('login').hidden = yes;
  $('tabs').hidden = !yes;
  $('signout').hidden = !yes;
  if (!yes) for (const v of VIEWS) $(v).hidden = true;
}

function signOut(keepError) {
  sessionStorage.removeItem(TOKEN_KEY);
  watched = null;
  signedIn(false);
  if (!keepError) showError(null);
}

async function signIn(ev) {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('token').value.trim());
  $('token').value = '';
  try {
    await api('GET', '/agents');
  } catch (e) {
    showError(e);
    return;
  }
  signedIn(true);
  await route();
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', () => signOut(false));
  $('upgrade-form').addEventListener('submit', (ev) => startUpgrade(ev).catch(showError));
  $('task-pause').addEventListener('click', () => taskAction('pause').catch(showError));
  $('task-resume').addEventListener('click', () => taskAction('resume').catch(showError));
  $('task-cancel').addEventListener('click', () => taskAction('cancel').catch(showError));
  $('agents-next').addEventListener('click', () => {
    if (!agentsPage.next) return;
    agentsPage = { ...agentsPage, cursor: agentsPage.next, next: null, offset: agentsPage.offset + AGENTS_PAGE };
    loadAgents().catch(showError);
  });
  const filter = (form, load) =>
    $(form).addEventListener('submit', (ev) => {
      ev.preventDefault();
      load().catch(showError);
    });
  filter('agents-filter', () => {
    agentsPage = { filters: agentFilters().toString(), cursor: null, next: null, offset: 0 };
    return loadAgents();
  });
  filter('certs-filter', loadCertificates);
  filter('files-filter', loadFiles);
  filter('audit-filter', loadAudit);
  $('ag-tags-form').addEventListener('submit', (ev) => saveTags(ev).catch(showError));
  $('agents-first').addEventListener('click', () => {
    agentsPage = { ...agentsPage, cursor: null, next: null, offset: 0 };
    loadAgents().catch(showError);
  });
  window.addEventListener('hashchange', route);
  signedIn(Boolean(token()));
  route();
});
