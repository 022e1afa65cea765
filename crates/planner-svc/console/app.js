// The planner console: plain JavaScript modules, no build step, no dependencies. It talks to
// the HTTP API of the same origin (docs/http.md): JSON endpoints and live streams over SSE,
// read with fetch so that the bearer token goes in a header, never in a URL.

const GRAPH_LIMIT = 300; // above this many tasks the graph collapses into a paged table
const TASK_PAGE = 200;
const ROW = 20; // px per timeline row
const EVENT_PAGE = 1000;

const $ = (selector, root = document) => root.querySelector(selector);
const main = $('#main');
let token = sessionStorage.getItem('planner-token') || '';
let role = '';
let view = null; // the current view's teardown

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

export function notice(text, ok = false) {
  const n = h('div', { class: ok ? 'notice ok' : 'notice', role: ok ? 'status' : 'alert' }, text);
  $('#notices').append(n);
  setTimeout(() => n.remove(), ok ? 3000 : 8000);
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${body.kind || status}: ${body.message || 'request failed'}`);
    this.status = status;
    this.kind = body.kind;
  }
}

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, { method = 'GET', body, key } = {}) {
  const extra = body === undefined ? {} : { 'Content-Type': 'application/json' };
  if (key) extra['Idempotency-Key'] = key;
  const response = await fetch(path, { method, headers: headers(extra), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Server-sent events over fetch: calls onMessage({id, event, data}) per message; reconnects
// after a dropped connection, resuming with Last-Event-ID. Returns a stop function.
function live(path, onMessage, { lastId = null } = {}) {
  let stopped = false;
  let controller = null;
  (async () => {
    let delay = 500;
    while (!stopped) {
      controller = new AbortController();
      try {
        const extra = lastId === null ? {} : { 'Last-Event-ID': String(lastId) };
        const response = await fetch(path, { headers: headers(extra), signal: controller.signal });
        if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const message = { id: null, event: 'message', data: '' };
            for (const line of block.split('\n')) {
              if (line.startsWith(':')) continue;
              const i = line.indexOf(':');
              const field = i < 0 ? line : line.slice(0, i);
              const text = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
              if (field === 'id') message.id = text;
              else if (field === 'event') message.event = text;
              else if (field === 'data') message.data += (message.data ? '\n' : '') + text;
            }
            if (message.id !== null) lastId = message.id;
            if (message.data) onMessage(message);
          }
        }
      } catch (error) {
        if (stopped || error.name === 'AbortError') return;
        if (error instanceof ApiError && (error.status === 401 || error.status === 404)) { notice(error.message); return; }
      }
      if (stopped) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => { stopped = true; if (controller) controller.abort(); };
}

const paused = () => $('#paused').checked;
const pauseListeners = new Set();
$('#paused').addEventListener('change', () => { for (const f of pauseListeners) f(paused()); });

function age(ms) {
  if (!ms) return '-';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function statusBadge(status, prefix = '') {
  return h('span', { class: `status ${prefix}${status}` }, status.replace('_', ' '));
}

const can = (needed) => ['viewer', 'ui', 'operator'].indexOf(role) >= ['viewer', 'ui', 'operator'].indexOf(needed);

// ---------------------------------------------------------------------------------------
// The list of sessions.

function listView(params) {
  const state = { status: params.get('status') || '', q: params.get('q') || '', offset: Number(params.get('offset') || 0), rows: new Map() };
  const tbody = h('tbody');
  const total = h('span', { class: 'muted' });
  const status = h('select', { 'aria-label': 'status filter', onchange: () => go({ status: status.value, offset: 0 }) },
    h('option', { value: '' }, 'any status'),
    ...['not-started', 'running', 'asking', 'completed', 'failed', 'cancelled'].map((s) => h('option', { value: s, selected: s === state.status }, s)));
  const search = h('input', { type: 'search', placeholder: 'search requests ( / )', 'aria-label': 'search requests', value: state.q });
  search.addEventListener('keydown', (e) => { if (e.key === 'Enter') go({ q: search.value, offset: 0 }); });
  const prev = h('button', { onclick: () => go({ offset: Math.max(0, state.offset - 50) }) }, '← newer');
  const next = h('button', { onclick: () => go({ offset: state.offset + 50 }) }, 'older →');
  function go(change) {
    const p = new URLSearchParams({ status: state.status, q: state.q, offset: state.offset, ...change });
    for (const [k, v] of [...p]) if (!v || v === '0') p.delete(k);
    location.hash = `#/?${p}`;
  }
  const form = can('ui') ? newRequestForm() : null;
  main.replaceChildren(
    h('h1', {}, 'Sessions'),
    form,
    h('div', { class: 'toolbar' }, status, search, prev, next, total),
    h('table', { 'aria-label': 'sessions' },
      h('thead', {}, h('tr', {}, h('th', {}, 'status'), h('th', {}, 'age'), h('th', {}, 'request'), h('th', {}, 'tasks'), h('th', {}, 'questions'), h('th', {}, 'session'))),
      tbody));
  function row(s) {
    const t = s.tasks;
    const done = t.completed + t.failed + t.cancelled;
    return h('tr', { class: 'row', 'data-session': s.session },
      h('td', {}, statusBadge(s.status)),
      h('td', { title: s.started_at ? new Date(s.started_at).toISOString() : '' }, age(s.started_at)),
      h('td', {}, h('a', { href: `#/sessions/${s.session}` }, s.request || '(no request)')),
      h('td', { class: 'counts' }, `${done}/${t.total}`, t.running ? ` · ${t.running} running` : '', t.failed ? ` · ${t.failed} failed` : ''),
      h('td', {}, s.questions ? String(s.questions) : ''),
      h('td', { class: 'muted' }, s.session));
  }
  async function load() {
    try {
      const p = new URLSearchParams({ offset: state.offset, limit: 50 });
      if (state.status) p.set('status', state.status);
      if (state.q) p.set('q', state.q);
      const page = await api(`/api/sessions?${p}`);
      tbody.replaceChildren(...page.sessions.map(row));
      total.textContent = `${page.total} session${page.total === 1 ? '' : 's'}${page.complete ? '' : ' (still indexing)'}`;
      prev.disabled = state.offset === 0;
      next.disabled = page.next_offset === null || page.next_offset === undefined;
    } catch (error) { notice(error.message); }
  }
  let reload = null;
  const scheduleReload = () => { if (!reload) reload = setTimeout(() => { reload = null; load(); }, 300); };
  const stop = live('/api/live', (m) => {
    if (paused()) return;
    if (m.event === 'reload') { scheduleReload(); return; }
    const s = JSON.parse(m.data);
    const existing = tbody.querySelector(`tr[data-session="${CSS.escape(s.session)}"]`);
    const matches = (!state.status || s.status === state.status);
    if (existing && matches) existing.replaceWith(row(s));
    else scheduleReload();
  });
  const onPause = (p) => { if (!p) load(); };
  pauseListeners.add(onPause);
  const slash = (e) => { if (e.key === '/' && document.activeElement.tagName !== 'INPUT' && document.activeElement.tagName !== 'TEXTAREA') { e.preventDefault(); search.focus(); } };
  document.addEventListener('keydown', slash);
  load();
  return () => { stop(); pauseListeners.delete(onPause); document.removeEventListener('keydown', slash); clearTimeout(reload); };
}

function newRequestForm() {
  const input = h('textarea', { rows: 3, 'aria-label': 'new request', placeholder: 'A new request, e.g. "1. Search flights to Oslo\n2. Which dates suit you?\n3. Summarize the options"' });
  const submit = h('button', { type: 'submit' }, 'Start session');
  return h('form', { class: 'panel new-request', onsubmit: async (e) => {
    e.preventDefault();
    if (!input.value.trim()) { notice('malformed: the request is empty'); return; }
    submit.disabled = true;
    try {
      const key = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
      const result = await api('/api/sessions', { method: 'POST', body: { type: 'initialize', input: input.value }, key });
      location.hash = `#/sessions/${result.session}`;
    } catch (error) { notice(error.message); } finally { submit.disabled = false; }
  } }, input, h('div', { class: 'toolbar' }, submit));
}

// ---------------------------------------------------------------------------------------
// One session.

function sessionView(id) {
  const s = { latest: 0, at: null, state: null, events: [], stop: null, refetch: null, taskPage: 0, taskFilter: '' };
  const title = h('h1', {}, 'Session ', h('span', { class: 'muted' }, id));
  const summary = h('div', { class: 'toolbar' });
  const graph = h('div', { class: 'graph', 'aria-label': 'task graph' });
  const questions = h('div', { 'aria-label': 'questions' });
  const scrubber = h('input', { type: 'range', class: 'scrubber', min: 0, max: 0, value: 0, 'aria-label': 'version (time travel)' });
  const travel = h('div', { class: 'toolbar' });
  const timeline = h('div', { class: 'timeline', tabindex: 0, 'aria-label': 'event timeline (arrow keys move the version)' });
  const rows = h('div', { class: 'rows' });
  timeline.append(rows);
  const actions = h('div', { class: 'toolbar' });
  main.replaceChildren(title, summary, actions,
    h('div', { class: 'grid' },
      h('div', {}, h('section', { class: 'panel' }, h('h2', {}, 'Tasks'), graph)),
      h('div', {},
        h('section', { class: 'panel' }, h('h2', {}, 'Questions'), questions),
        h('section', { class: 'panel' }, h('h2', {}, 'Timeline'), travel, scrubber, timeline))));

  async function send(command, okText) {
    try { await api(`/api/sessions/${id}/commands`, { method: 'POST', body: command }); notice(okText, true); scheduleRefetch(0); }
    catch (error) { notice(error.message); }
  }
  if (can('ui')) {
    actions.append(
      h('button', { onclick: () => { if (confirm('Cancel the whole plan?')) send({ type: 'cancel', target: { scope: 'plan' } }, 'plan cancelled'); } }, 'Cancel plan'),
      h('button', { onclick: () => send({ type: 'continue' }, 'continued') }, 'Continue'));
  }

  function renderSummary(view) {
    const x = view.summary;
    const origin = view.state.forked_from;
    summary.replaceChildren(...[statusBadge(x.status), ` version ${x.version} of ${view.latest_version} · ${x.tasks.total} tasks · ${x.questions} questions · `, h('span', { class: 'request' }, x.request),
      origin ? h('span', { class: 'muted' }, ' · forked from ', h('a', { href: `#/sessions/${origin.session}` }, origin.session), ` at version ${origin.version}`) : null].filter(Boolean));
  }

  function renderQuestions(state) {
    const open = Object.entries(state.awaiting_answer || {});
    if (!open.length) { questions.replaceChildren(h('p', { class: 'muted' }, 'No open question.')); return; }
    const byId = new Map(state.tasks.map((t) => [t.id, t]));
    questions.replaceChildren(...open.map(([taskId]) => {
      const task = byId.get(taskId) || {};
      const input = h('input', { type: 'text', 'aria-label': `answer to ${taskId}`, placeholder: 'your answer' });
      const live = s.at === null;
      return h('div', { class: 'question', 'data-task': taskId },
        h('strong', {}, taskId), ' ', task.question || task.description || '',
        can('ui') && live ? h('form', { onsubmit: (e) => { e.preventDefault(); if (!input.value.trim()) { notice('malformed: the answer is empty'); return; } send({ type: 'answer_clarification', task_id: taskId, answer: input.value }, `answered ${taskId}`); } },
          input, h('button', { type: 'submit' }, 'Answer')) : null);
    }));
  }

  function cancelButton(task) {
    if (!can('ui') || s.at !== null || ['completed', 'failed', 'cancelled'].includes(task.status)) return null;
    return h('button', { class: 'cancel-task', 'data-task': task.id, onclick: () => send({ type: 'cancel', target: { scope: 'task', task_id: task.id } }, `cancelled ${task.id}`) }, 'Cancel');
  }

  function renderGraph(state) {
    const tasks = state.tasks;
    if (tasks.length > GRAPH_LIMIT) { renderTaskTable(tasks); return; }
    const index = new Map(tasks.map((t, i) => [t.id, i]));
    const depth = new Array(tasks.length).fill(0);
    tasks.forEach((t, i) => { for (const d of t.dependencies) { const j = index.get(d); if (j !== undefined && j < i) depth[i] = Math.max(depth[i], depth[j] + 1); } });
    const columns = [];
    tasks.forEach((t, i) => { (columns[depth[i]] ||= []).push(i); });
    const W = 150, H = 26, GX = 40, GY = 10;
    const pos = new Array(tasks.length);
    columns.forEach((col, c) => col.forEach((i, r) => { pos[i] = [c * (W + GX) + 5, r * (H + GY) + 5]; }));
    const width = columns.length * (W + GX) + 10, height = Math.max(...columns.map((c) => c.length), 1) * (H + GY) + 10;
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('width', width); svg.setAttribute('height', height); svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', `${tasks.length} tasks coloured by status`);
    tasks.forEach((t, i) => { for (const d of t.dependencies) { const j = index.get(d); if (j === undefined) continue;
      const p = document.createElementNS(ns, 'path'); const [x1, y1] = pos[j], [x2, y2] = pos[i];
      p.setAttribute('d', `M${x1 + W},${y1 + H / 2} C${x1 + W + GX / 2},${y1 + H / 2} ${x2 - GX / 2},${y2 + H / 2} ${x2},${y2 + H / 2}`); p.setAttribute('class', 'edge'); svg.append(p); } });
    tasks.forEach((t, i) => {
      const g = document.createElementNS(ns, 'g'); g.setAttribute('class', `node s-${t.status}`); g.setAttribute('data-task', t.id);
      const [x, y] = pos[i];
      const r = document.createElementNS(ns, 'rect'); r.setAttribute('x', x); r.setAttribute('y', y); r.setAttribute('width', W); r.setAttribute('height', H);
      const title = document.createElementNS(ns, 'title'); title.textContent = `${t.id} (${t.status}): ${t.description}`;
      const text = document.createElementNS(ns, 'text'); text.setAttribute('x', x + 6); text.setAttribute('y', y + 17);
      text.textContent = `${t.id} ${t.description}`.slice(0, 22);
      g.append(r, title, text); svg.append(g);
    });
    const table = h('table', { class: 'tasks' }, h('tbody', {}, ...tasks.map((t) => h('tr', { class: 'row', 'data-task': t.id },
      h('td', {}, t.id), h('td', {}, statusBadge(t.status, 's-')), h('td', {}, t.description), h('td', {}, cancelButton(t))))));
    graph.replaceChildren(svg, table);
  }

  function renderTaskTable(tasks) {
    const counts = {};
    for (const t of tasks) counts[t.status] = (counts[t.status] || 0) + 1;
    const bar = h('div', { class: 'bar', role: 'img', 'aria-label': Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(', ') },
      ...Object.entries(counts).map(([k, v]) => h('span', { style: `width:${(100 * v) / tasks.length}%;background:var(--${k})`, title: `${v} ${k}` })));
    const filtered = s.taskFilter ? tasks.filter((t) => t.status === s.taskFilter) : tasks;
    const pages = Math.max(1, Math.ceil(filtered.length / TASK_PAGE));
    s.taskPage = Math.min(s.taskPage, pages - 1);
    const shown = filtered.slice(s.taskPage * TASK_PAGE, (s.taskPage + 1) * TASK_PAGE);
    const filter = h('select', { 'aria-label': 'task status filter', onchange: () => { s.taskFilter = filter.value; s.taskPage = 0; renderTaskTable(tasks); } },
      h('option', { value: '' }, 'all statuses'), ...Object.keys(counts).map((k) => h('option', { value: k, selected: k === s.taskFilter }, `${k} (${counts[k]})`)));
    graph.replaceChildren(
      h('p', { class: 'muted' }, `${tasks.length} tasks: the graph is collapsed above ${GRAPH_LIMIT}.`), bar,
      h('div', { class: 'toolbar' }, filter,
        h('button', { disabled: s.taskPage === 0, onclick: () => { s.taskPage -= 1; renderTaskTable(tasks); } }, '← previous'),
        `page ${s.taskPage + 1} of ${pages}`,
        h('button', { disabled: s.taskPage >= pages - 1, onclick: () => { s.taskPage += 1; renderTaskTable(tasks); } }, 'next →')),
      h('table', { class: 'tasks' }, h('tbody', {}, ...shown.map((t) => h('tr', { class: 'row', 'data-task': t.id },
        h('td', {}, t.id), h('td', {}, statusBadge(t.status, 's-')), h('td', {}, t.description), h('td', {}, cancelButton(t)))))));
  }

  // The timeline: a virtual list, only the rows in view are in the DOM; pages of events are
  // fetched as they scroll into view.
  const loading = new Set();
  function eventText(e) {
    const ev = e.event;
    const task = ev.task_id ? ` ${ev.task_id}` : '';
    const extra = ev.status ? ` ${typeof ev.status === 'string' ? ev.status : ev.status.status || ''}` : '';
    return `#${e.version} ${ev.type}${task}${extra}`;
  }
  function renderTimeline() {
    rows.style.height = `${s.latest * ROW}px`;
    const top = timeline.scrollTop, bottom = top + timeline.clientHeight;
    const first = Math.max(0, Math.floor(top / ROW) - 5), last = Math.min(s.latest, Math.ceil(bottom / ROW) + 5);
    const current = s.at === null ? s.latest : s.at;
    const children = [];
    for (let i = first; i < last; i++) {
      const e = s.events[i];
      if (!e) { fetchPage(Math.floor(i / EVENT_PAGE) * EVENT_PAGE); }
      const cls = `ev${i + 1 === current ? ' current' : ''}${i + 1 > current ? ' future' : ''}`;
      children.push(h('div', { class: cls, style: `top:${i * ROW}px`, 'data-version': i + 1, onclick: () => travelTo(i + 1) }, e ? eventText(e) : `#${i + 1} …`));
    }
    rows.replaceChildren(...children);
  }
  async function fetchPage(from) {
    if (loading.has(from)) return;
    loading.add(from);
    try {
      const page = await api(`/api/sessions/${id}/events?from=${from}&limit=${EVENT_PAGE}`);
      for (const e of page.events) s.events[e.version - 1] = e;
      renderTimeline();
    } catch (error) { loading.delete(from); notice(error.message); }
  }
  timeline.addEventListener('scroll', () => requestAnimationFrame(renderTimeline));
  timeline.addEventListener('keydown', (e) => {
    const current = s.at === null ? s.latest : s.at;
    const step = { ArrowUp: -1, ArrowDown: 1, PageUp: -20, PageDown: 20, Home: -Infinity, End: Infinity }[e.key];
    if (step === undefined) return;
    e.preventDefault();
    travelTo(Math.max(1, Math.min(s.latest, current + step)));
  });

  let travelTimer = null;
  // The version is read when the person moves the scrubber: a live event within the debounce
  // moves the scrubber back to the latest version, and reading it later travelled there.
  scrubber.addEventListener('input', () => { clearTimeout(travelTimer); const wanted = Number(scrubber.value); travelTimer = setTimeout(() => travelTo(wanted), 150); });
  async function forkHere() {
    const at = s.at === null ? s.latest : s.at;
    try {
      const result = await api(`/api/sessions/${id}/fork`, { method: 'POST', body: { at } });
      notice(`forked at version ${at}`, true);
      location.hash = `#/sessions/${result.session}`;
    } catch (error) { notice(error.message); }
  }
  function renderTravel() {
    const fork = can('operator') && s.latest > 0 ? h('button', { onclick: forkHere }, 'Fork from here') : null;
    // (replaceChildren would print a null as "null": h() drops it.)
    if (s.at === null) travel.replaceChildren(h('span', {}, h('span', { class: 'muted' }, `live at version ${s.latest}`), ' ', fork));
    else travel.replaceChildren(h('span', {}, h('span', { class: 'travel' }, `time travel: version ${s.at} of ${s.latest}`), ' ', h('button', { onclick: () => travelTo(null) }, 'Back to live'), ' ', fork));
  }
  async function travelTo(version) {
    s.at = version === null || version >= s.latest ? null : version;
    scrubber.value = s.at === null ? s.latest : s.at;
    renderTravel();
    const target = (s.at === null ? s.latest : s.at) - 1;
    if (target * ROW < timeline.scrollTop || target * ROW > timeline.scrollTop + timeline.clientHeight - ROW) timeline.scrollTop = Math.max(0, target * ROW - timeline.clientHeight / 2);
    renderTimeline();
    await refetch();
  }

  async function refetch() {
    try {
      const view = await api(`/api/sessions/${id}${s.at === null ? '' : `?at=${s.at}`}`);
      const grew = view.latest_version !== s.latest;
      s.latest = view.latest_version;
      scrubber.max = s.latest;
      if (s.at === null) scrubber.value = s.latest;
      s.state = view.state;
      renderSummary(view);
      renderGraph(view.state);
      renderQuestions(view.state);
      renderTravel();
      if (grew) renderTimeline();
      main.dataset.version = String(view.summary.version);
    } catch (error) { notice(error.message); }
  }
  function scheduleRefetch(delay = 250) {
    if (s.refetch) return;
    s.refetch = setTimeout(() => { s.refetch = null; if (!paused() && s.at === null) refetch(); }, delay);
  }

  (async () => {
    await refetch();
    if (!s.state) return;
    scrubber.min = 1;
    renderTimeline();
    // Live: events after what the page shows; the graph follows unless paused or travelling.
    s.stop = live(`/api/sessions/${id}/live?from=${s.latest}`, (m) => {
      const e = JSON.parse(m.data);
      s.events[e.version - 1] = e;
      if (e.version > s.latest) { s.latest = e.version; scrubber.max = s.latest; }
      if (!paused()) { renderTimeline(); if (s.at === null) { scrubber.value = s.latest; renderTravel(); } scheduleRefetch(); }
    });
    main.dataset.ready = 'true';
  })();
  const onPause = (p) => { if (!p) scheduleRefetch(0); };
  pauseListeners.add(onPause);
  return () => { if (s.stop) s.stop(); pauseListeners.delete(onPause); clearTimeout(s.refetch); clearTimeout(travelTimer); };
}

// ---------------------------------------------------------------------------------------
// Sign-in and routing.

function signIn() {
  const input = h('input', { type: 'password', 'aria-label': 'bearer token', autocomplete: 'off' });
  main.replaceChildren(h('h1', {}, 'Sign in'),
    h('form', { class: 'panel', onsubmit: (e) => { e.preventDefault(); token = input.value.trim(); sessionStorage.setItem('planner-token', token); start(); } },
      h('p', {}, 'Paste a token (viewer, ui or operator) from the daemon\'s http settings.'), input, ' ', h('button', { type: 'submit' }, 'Sign in')));
  input.focus();
}

function route() {
  if (view) view();
  view = null;
  const hash = location.hash.slice(1) || '/';
  const [path, query] = hash.split('?');
  const match = path.match(/^\/sessions\/([A-Za-z0-9_-]{1,64})$/);
  view = match ? sessionView(match[1]) : listView(new URLSearchParams(query || ''));
}

async function start() {
  try {
    role = (await api('/api/whoami')).role;
    if (role === 'none') { signIn(); return; }
  } catch (error) {
    if (error.status === 401) { if (token) notice(error.message); token = ''; sessionStorage.removeItem('planner-token'); signIn(); return; }
    notice(error.message);
    return;
  }
  $('#role').textContent = `role: ${role}`;
  route();
}

window.addEventListener('hashchange', () => { if (role && role !== 'none') route(); });
start();
