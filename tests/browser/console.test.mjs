// The console in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core),
// against a real daemon (`planner-svc serve --http`) on a real nats-server with a simulated
// executor pool: sign in, start a request, watch the graph update live, answer a question,
// cancel a task, scrub the timeline back and forward, fork from a past version. A screenshot per step goes to
// target/browser/; any browser console error fails the test.
//
// Needs: target/debug/planner-svc built, NATS_SERVER_BIN (scripts/test sets it).
// Run: cd tests/browser && npm ci && npm test

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const root = resolve(import.meta.dirname, '../..');
const bin = process.env.PLANNER_BIN || join(root, 'target/debug/planner-svc');
const natsBin = process.env.NATS_SERVER_BIN;
const shots = join(root, 'target/browser');
mkdirSync(shots, { recursive: true });
const OPERATOR = 'browser-operator-token';
const VIEWER = 'browser-viewer-token';

const children = [];
let base;
let browser;
let natsUrl;
let executors;

function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => { const { port } = server.address(); server.close(() => ok(port)); });
    server.on('error', fail);
  });
}

function start(cmd, args, env = {}) {
  const child = spawn(cmd, args, { cwd: tmpdir(), env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr.on('data', (d) => { log = (log + d).slice(-20000); });
  child.log = () => log;
  children.push(child);
  return child;
}

async function until(what, check, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    try { const v = await check(); if (v) return v; } catch { /* not yet */ }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function api(path, { method = 'GET', body, token = OPERATOR } = {}) {
  const response = await fetch(`${base}${path}`, {
    method, body: body && JSON.stringify(body),
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
  });
  const data = await response.json();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${JSON.stringify(data)}`);
  return data;
}

before(async () => {
  assert.ok(natsBin, 'set NATS_SERVER_BIN to a nats-server 2.10+ (scripts/test does)');
  const natsPort = await freePort();
  const httpPort = await freePort();
  const store = mkdtempSync(join(tmpdir(), 'planner-browser-'));
  start(natsBin, ['-js', '-a', '127.0.0.1', '-p', String(natsPort), '-sd', store]);
  const nats = `nats://127.0.0.1:${natsPort}`;
  const env = {
    PLANNER_NATS__URL: nats,
    PLANNER_HTTP__OPERATOR_TOKENS: OPERATOR,
    PLANNER_HTTP__VIEWER_TOKENS: VIEWER,
    PLANNER_HTTP__MAX_BODY_BYTES: '2000000',
    PLANNER_PLANNER__MAX_PLAN_TASKS: '5000',
    PLANNER_PLANNER__MAX_PARALLEL: '256',
    // The large session's failed attempts are retried, never its plan failed.
    PLANNER_PLANNER__RETRY__MAX_ATTEMPTS: '20',
    PLANNER_PLANNER__RETRY__INITIAL_BACKOFF_MS: '10',
    PLANNER_PLANNER__RETRY__MAX_BACKOFF_MS: '50',
  };
  const daemon = start(bin, ['serve', '--http', `127.0.0.1:${httpPort}`], env);
  base = `http://127.0.0.1:${httpPort}`;
  await until('the HTTP API', async () => (await fetch(`${base}/api/openapi.json`)).ok).catch((e) => { throw new Error(`${e.message}\n${daemon.log()}`); });
  natsUrl = nats;
  executors = start(bin, ['executor', '--latency-ms', '400', '--concurrency', '64'], { PLANNER_NATS__URL: nats });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  if (browser) await browser.close();
  for (const child of children.reverse()) child.kill('SIGTERM');
});

async function page() {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const p = await context.newPage();
  const errors = [];
  p.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  p.on('pageerror', (e) => errors.push(String(e)));
  p.errors = errors;
  return p;
}

test('a person drives a session from the console', async () => {
  const p = await page();
  const shot = (name) => p.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  await p.goto(base + '/');
  // Sign in.
  await p.getByLabel('bearer token').fill(OPERATOR);
  await p.keyboard.press('Enter');
  await p.getByText('role: operator').waitFor();
  await shot('01-signed-in');

  // Start a request from the form.
  const request = '1. Search flights to Oslo\n2. Which dates suit you?\n3. Compare the prices\n4. Which seat do you want?\n5. Book the flight';
  await p.getByLabel('new request').fill(request);
  await p.getByRole('button', { name: 'Start session' }).click();
  await p.waitForURL(/#\/sessions\//);
  const session = p.url().split('/').pop();
  await p.locator('main[data-ready="true"]').waitFor();
  await shot('02-started');

  // The graph updates live: t1 completes without a reload.
  await p.locator('g.node.s-completed[data-task="t1"]').waitFor({ timeout: 20000 });
  await shot('03-graph-live');

  // Answer the question in the inbox.
  const answer = p.getByLabel('answer to t2');
  await answer.waitFor({ timeout: 20000 });
  await answer.fill('the first week of May');
  await answer.press('Enter');
  await p.locator('g.node.s-completed[data-task="t2"]').waitFor({ timeout: 20000 });
  await shot('04-answered');

  // Cancel a task: the second question, when it is asked (t5 depends on it and goes too).
  await p.getByLabel('answer to t4').waitFor({ timeout: 20000 });
  await p.locator('button.cancel-task[data-task="t4"]').click();
  await p.locator('g.node.s-cancelled[data-task="t4"]').waitFor({ timeout: 20000 });
  await p.locator('g.node.s-cancelled[data-task="t5"]').waitFor({ timeout: 20000 });
  await shot('05-cancelled');
  const state = await api(`/api/sessions/${session}`);
  assert.equal(state.state.tasks.find((t) => t.id === 't4').status, 'cancelled');

  // Scrub back: at version 3 no task has completed yet; then forward to live again.
  const scrubber = p.getByLabel('version (time travel)');
  await scrubber.fill('3');
  await p.getByText('time travel: version 3').waitFor();
  await p.locator('g.node[data-task="t1"]:not(.s-completed)').waitFor();
  await p.locator('main[data-version="3"]').waitFor();
  await shot('06-scrubbed-back');
  // Forward with the keyboard on the timeline.
  await p.locator('.timeline').focus();
  await p.keyboard.press('ArrowDown');
  await p.locator('main[data-version="4"]').waitFor();
  await p.keyboard.press('End');
  await p.getByText(/live at version/).waitFor();
  await p.locator('g.node.s-cancelled[data-task="t4"]').waitFor();
  await shot('07-scrubbed-forward');

  // Fork from version 6 (t1 done, t2 about to ask): the fork asks again and runs on its own.
  await scrubber.fill('6');
  await p.getByText('time travel: version 6').waitFor();
  await p.getByRole('button', { name: 'Fork from here' }).click();
  await p.waitForURL((url) => !url.hash.endsWith(session));
  await p.getByText('forked from').waitFor();
  const forked = p.getByLabel('answer to t2');
  await forked.waitFor({ timeout: 20000 });
  await forked.fill('June');
  await forked.press('Enter');
  await p.locator('g.node.s-completed[data-task="t3"]').waitFor({ timeout: 20000 });
  await shot('08-forked');
  const fork = p.url().split('/').pop();
  assert.equal((await api(`/api/sessions/${fork}`)).state.forked_from.session, session);

  // No stray text from empty parts of the page.
  assert.ok(!(await p.locator('main').innerText()).includes('null'), 'the page shows "null"');

  // The list shows the session with its status.
  await p.goto(`${base}/#/`);
  await p.locator(`tr[data-session="${session}"]`).waitFor();
  await shot('09-list');
  assert.deepEqual(p.errors, [], 'browser console errors');
  await p.context().close();
});

test('a viewer sees no command buttons, and a bad token gets the sign-in form back', async () => {
  const p = await page();
  await p.goto(base + '/');
  await p.getByLabel('bearer token').fill('wrong');
  await p.keyboard.press('Enter');
  await p.getByRole('alert').filter({ hasText: 'forbidden' }).waitFor();
  await p.getByLabel('bearer token').fill(VIEWER);
  await p.keyboard.press('Enter');
  await p.getByText('role: viewer').waitFor();
  assert.equal(await p.getByLabel('new request').count(), 0);
  await p.screenshot({ path: join(shots, '10-viewer.png') });
  // The 401 of the wrong token is an expected network error, not a script error.
  assert.deepEqual(p.errors.filter((e) => !e.includes('401')), []);
  await p.context().close();
});

// A benchmark, not a timed test: run it with CONSOLE_BENCH=1 (docs/benchmarks.md).
test('benchmark: a session with 5,000 tasks and 20,000 events is interactive in under 2 s', { skip: !process.env.CONSOLE_BENCH && 'set CONSOLE_BENCH=1' }, async () => {
  const tasks = Array.from({ length: 5000 }, (_, i) => ({ id: `t${i + 1}`, description: `step ${i + 1}`, kind: 'tool_call', target: 'web_search' }));
  // Executors that fail 30% of attempts: retries bring 5,000 tasks to over 20,000 events.
  executors.kill('SIGTERM');
  await new Promise((r) => executors.on('exit', r));
  start(bin, ['executor', '--latency-ms', '0', '--concurrency', '256', '--fail-percent', '30'], { PLANNER_NATS__URL: natsUrl });
  const started = await api('/api/sessions', { method: 'POST', body: { type: 'initialize', input: 'a large plan', plan: { tasks } } });
  const session = started.session;
  const done = await until('the large plan to end', async () => {
    const view = await api(`/api/sessions/${session}`);
    return view.summary.status !== 'running' && view.summary;
  }, 600000);
  assert.equal(done.status, 'completed');
  assert.ok(done.version >= 20000, `${done.version} events`);
  console.log(`large session: ${done.tasks.total} tasks, ${done.version} events`);
  const runs = [];
  for (let i = 0; i < 3; i++) {
    const p = await page();
    await p.goto(`${base}/`);
    await p.getByLabel('bearer token').fill(OPERATOR);
    await p.keyboard.press('Enter');
    await p.getByText('role: operator').waitFor();
    await p.goto(`${base}/#/sessions/${session}`);
    await p.locator('main[data-ready="true"]').waitFor({ timeout: 30000 });
    // Measured on a fresh load of the session's page: from the navigation's start (the
    // page's own clock) until the next page of tasks has answered a click.
    await p.reload();
    await p.locator('main[data-ready="true"]').waitFor({ timeout: 30000 });
    await p.getByRole('button', { name: 'next →' }).click();
    await p.getByText('page 2 of').waitFor();
    runs.push(Math.round(await p.evaluate(() => performance.now())));
    if (i === 0) await p.screenshot({ path: join(shots, '11-large-session.png') });
    assert.deepEqual(p.errors, []);
    await p.context().close();
  }
  runs.sort((a, b) => a - b);
  console.log(`large session interactive: runs ${runs.join(', ')} ms, median ${runs[1]} ms`);
  assert.ok(runs[1] < 2000, `median ${runs[1]} ms`);
});
