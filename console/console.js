// The Keel console: a client of /api/v1, like keelctl. Everything the server
// sends is put on the page as text (textContent), never as markup.
'use strict';

const TOKEN_KEY = 'keel-token';
const VIEWS = ['agents', 'components', 'policies', 'tasks', 'upgrade'];
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

// The agent list is paged by the server: the cursor of the page shown (null for
// the first), of the next page, and how many agents came before this page.
const AGENTS_PAGE = 100;
let agentsPage = { cursor: null, next: null, offset: 0 };

async function loadAgents() {
  let path = '/agents?limit=' + AGENTS_PAGE;
  if (agentsPage.cursor) path += '&cursor=' + encodeURIComponent(agentsPage.cursor);
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
    cell(tr, a.id);
    cell(tr, a.hostname);
    cell(tr, a.version);
    cell(tr, a.online ? 'online' : 'offline', a.online ? 'online' : 'offline');
    cell(tr, a.instance);
    cell(tr, a.last_heartbeat);
    cell(tr, (a.plugins || []).map((p) => p.name + ' ' + p.version + ' (' + p.state + ')').join(', '));
    cell(tr, (a.tags || []).join(', '));
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
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.tab === current);
  if (current !== 'tasks' || !arg) {
    watched = null;
    $('task-detail').hidden = true;
  }
  showError(null);
  try {
    if (current === 'agents') await loadAgents();
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
    agentsPage = { cursor: agentsPage.next, next: null, offset: agentsPage.offset + AGENTS_PAGE };
    loadAgents().catch(showError);
  });
  $('agents-first').addEventListener('click', () => {
    agentsPage = { cursor: null, next: null, offset: 0 };
    loadAgents().catch(showError);
  });
  window.addEventListener('hashchange', route);
  signedIn(Boolean(token()));
  route();
});
