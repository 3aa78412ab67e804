// The players' page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core)
// against the real stack and the Discord simulator, started by stack.mjs on free ports.
//
// The tests run in order and share one stack and one room, as players would: create, invite,
// live presence (timed), dropout + rejoin, direct Discord joins, room full, invite states, edge
// restart, closing banner and deletion. Screenshots go to artifacts/browser/ (not committed).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

import { Stack, ARTIFACTS, USERS, LOBBY, GAMING, SLOW, waitFor, watch } from './stack.mjs';

const CHROMIUM = process.env.VR_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];
/** SC-001: presence within 300 ms. A loaded CI machine gets a looser bound (reported, see docs/CLIENT.md). */
const LATENCY_BOUND_MS = Number(process.env.VR_LATENCY_BOUND_MS || (process.env.CI ? 1000 : 300));
const T = 15000 * SLOW; // generous deadline for condition waits

let stack;
let browser;
const players = {}; // name → {context, page}
const shared = {}; // what one test hands to the next: room id, invite link
const timings = { joins: [], leaves: [] };

mkdirSync(ARTIFACTS, { recursive: true });

async function shot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** A browser context logged in as `name` through the page's own login button. */
async function player(name, path = '/') {
  const context = await browser.newContext({ baseURL: stack.base, viewport: { width: 900, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(T);
  page.on('pageerror', (e) => console.error(`[${name}] page error: ${e.message}`));
  await page.goto(path);
  await stack.simPost('/_sim/oauth/next_login', { user: name });
  await page.getByTestId('login').click();
  await page.waitForURL((u) => u.pathname === (path.split('?')[0]), { timeout: T });
  await page.getByTestId('me').filter({ hasText: name }).waitFor();
  players[name] = { context, page };
  return page;
}

const voiceItem = (page, user) => page.locator(`[data-testid=voice-list] li[data-user="${user}"]`);
const idleItem = (page, user) => page.locator(`[data-testid=idle-list] li[data-user="${user}"]`);

function stats(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const p = (q) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)];
  return { n: s.length, min: s[0], median: p(0.5), p95: p(0.95), max: s[s.length - 1] };
}

before(async () => {
  stack = await new Stack().start();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
});

after(async () => {
  writeFileSync(join(ARTIFACTS, 'latency.json'), JSON.stringify({ bound_ms: LATENCY_BOUND_MS, joins: timings.joins, leaves: timings.leaves, join_stats: timings.joins.length ? stats(timings.joins) : null, leave_stats: timings.leaves.length ? stats(timings.leaves) : null }, null, 2));
  if (browser) await browser.close();
  if (stack) await stack.stop();
});

test('a player logs in with Discord, creates a room and sees placement and the invite link', async () => {
  const page = await player('alice');
  await shot(page, '01-start');
  await page.getByLabel('Room name').fill('Friday raid');
  await page.getByRole('button', { name: 'Create room' }).click();
  await page.waitForURL(/\/rooms\/\d+$/);
  shared.room = page.url().split('/').pop();
  await page.getByRole('heading', { level: 1, name: 'Friday raid' }).waitFor();
  // alice is not in voice: Discord cannot move her, the page offers the channel link.
  const placement = page.getByTestId('placement');
  await placement.waitFor();
  assert.equal(await placement.getAttribute('data-outcome'), 'pending');
  await page.getByRole('link', { name: 'Connect to voice in Discord' }).waitFor();
  await idleItem(page, USERS.alice).waitFor();
  shared.invite = (await page.getByTestId('invite-link').textContent()).trim();
  assert.match(shared.invite, new RegExp(`^${stack.base}/invite/.+`));
  await page.locator('#conn[data-state=live]').waitFor();
  await shot(page, '02-room-created-placement-pending');
  // She connects to voice anywhere in the guild: the pending placement moves her in.
  await stack.voiceConnect(USERS.alice, LOBBY);
  await voiceItem(page, USERS.alice).waitFor();
  await waitFor('alice in the room channel', async () => (await stack.voiceChannelOf(USERS.alice)) === shared.room);
  // Nothing secret reachable from the page's JavaScript.
  const visible = await page.evaluate(() => JSON.stringify({ cookie: document.cookie, ls: { ...localStorage }, html: document.documentElement.outerHTML }));
  for (const secret of ['sim-client-secret', 'sim-bot-token', stack.env.VOICEROOMS__SESSION__KEY, 'vr_session']) {
    assert.ok(!visible.includes(secret), `page exposes ${secret}`);
  }
});

test('an invite link asks to log in first, comes back to the invite and joins the room', async () => {
  const path = new URL(shared.invite).pathname;
  const context = await browser.newContext({ baseURL: stack.base, viewport: { width: 900, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(T);
  await page.goto(path);
  await page.getByRole('heading', { name: 'You are invited to a game room' }).waitFor();
  await shot(page, '03-invite-login-first');
  await stack.simPost('/_sim/oauth/next_login', { user: 'bob' });
  await page.getByTestId('login').click();
  await page.waitForURL(new RegExp(`/rooms/${shared.room}$`));
  players.bob = { context, page };
  await page.getByRole('heading', { level: 1, name: 'Friday raid' }).waitFor();
  assert.equal(await page.getByTestId('placement').getAttribute('data-outcome'), 'pending');
  await voiceItem(page, USERS.alice).waitFor();
  await idleItem(page, USERS.bob).waitFor();
  await idleItem(players.alice.page, USERS.bob).waitFor();
});

test('two players see each other join and leave voice within the latency bound', async () => {
  const a = players.alice.page;
  const b = players.bob.page;
  const sel = `[data-testid=voice-list] li[data-user="${USERS.bob}"]`;
  const rounds = Number(process.env.VR_LATENCY_ROUNDS || 10);
  for (let i = 0; i < rounds; i++) {
    let wa = watch(a, sel, true);
    let wb = watch(b, sel, true);
    const t0 = Date.now();
    await stack.voiceConnect(USERS.bob, shared.room);
    for (const w of await Promise.all([wa, wb])) timings.joins.push(w.at - t0);
    wa = watch(a, sel, false);
    wb = watch(b, sel, false);
    const t1 = Date.now();
    await stack.voiceDisconnect(USERS.bob);
    for (const w of await Promise.all([wa, wb])) timings.leaves.push(w.at - t1);
    await b.locator('#dropout[open]').waitFor();
    await b.locator('#dropout-dismiss').click();
  }
  const j = stats(timings.joins);
  const l = stats(timings.leaves);
  console.log(`# join latency ms (simulator call → both pages' DOM): ${JSON.stringify(j)}`);
  console.log(`# leave latency ms: ${JSON.stringify(l)}`);
  assert.ok(j.p95 <= LATENCY_BOUND_MS, `join p95 ${j.p95} ms > ${LATENCY_BOUND_MS} ms`);
  assert.ok(l.p95 <= LATENCY_BOUND_MS, `leave p95 ${l.p95} ms > ${LATENCY_BOUND_MS} ms`);
});

test('the dropout dialog appears when the player leaves voice, and rejoin puts them back', async () => {
  const b = players.bob.page;
  // bob is in the room's voice channel, then hops to another channel in Discord.
  await stack.voiceConnect(USERS.bob, shared.room);
  await voiceItem(b, USERS.bob).waitFor();
  await stack.voiceConnect(USERS.bob, GAMING);
  const dialog = b.locator('#dropout[open]');
  await dialog.waitFor();
  assert.equal(await b.evaluate(() => document.activeElement && document.activeElement.id), 'rejoin', 'focus moves to the dialog');
  await shot(b, '04-dropout-dialog');
  await b.keyboard.press('Enter'); // keyboard use: the focused Rejoin button
  await voiceItem(b, USERS.bob).waitFor();
  await dialog.waitFor({ state: 'detached' }).catch(async () => b.locator('#dropout:not([open])').waitFor({ state: 'attached' }));
  assert.equal(await stack.voiceChannelOf(USERS.bob), shared.room, 'bob is back in the room channel');
  // Not in voice at all: rejoin offers the channel link (Discord cannot move him).
  await stack.voiceDisconnect(USERS.bob);
  await dialog.waitFor();
  await b.getByRole('button', { name: 'Rejoin voice' }).click();
  await b.getByTestId('channel-link').waitFor();
  await shot(b, '05-dropout-rejoin-channel-link');
  // ...and the moment he connects anywhere, he is moved in and the dialog goes away.
  await stack.voiceConnect(USERS.bob, LOBBY);
  await voiceItem(b, USERS.bob).waitFor();
  await b.locator('#dropout:not([open])').waitFor({ state: 'attached' });
});

test('someone who joins the channel directly in Discord is shown as such', async () => {
  const a = players.alice.page;
  // The room's channel is private: erin (no room role) cannot enter it by herself. A moderator
  // moves her in from the lobby, as happens in Discord without the app.
  await stack.voiceConnect(USERS.erin, LOBBY);
  await stack.simPost('/_sim/voice/move', { user_id: USERS.erin, channel_id: shared.room });
  const item = voiceItem(a, USERS.erin);
  await item.waitFor();
  await item.getByText('joined in Discord').waitFor();
  await shot(a, '06-room-live-members');
  await stack.voiceDisconnect(USERS.erin);
  await item.waitFor({ state: 'detached' });
});

test('the fifth player sees "room full" with a way forward', async () => {
  const path = new URL(shared.invite).pathname;
  for (const name of ['carol', 'dave']) {
    const p = await player(name, path);
    await p.waitForURL(new RegExp(`/rooms/${shared.room}$`));
    await p.getByRole('heading', { level: 1, name: 'Friday raid' }).waitFor();
  }
  const erin = await player('erin', path);
  const problem = erin.getByTestId('invite-problem');
  await problem.waitFor();
  assert.equal(await problem.getAttribute('data-code'), 'room_full');
  await erin.getByRole('heading', { name: 'This room is full' }).waitFor();
  await erin.getByRole('link', { name: 'Create your own room' }).waitFor();
  await shot(erin, '07-room-full');
});

test('an expired invite and an invalid invite show their state', async () => {
  const erin = players.erin.page;
  await erin.goto('/invite/not-a-real-invite');
  await erin.getByRole('heading', { name: 'This invite link is not valid' }).waitFor();
  await shot(erin, '08-invite-invalid');
  await erin.goto(`/invite/${encodeURIComponent(stack.expiredInvite(shared.room))}`);
  await erin.getByRole('heading', { name: 'This invite has expired' }).waitFor();
  assert.equal(await erin.getByTestId('invite-problem').getAttribute('data-code'), 'invite_expired');
  await shot(erin, '09-invite-expired');
});

test('after an edge restart the page reconnects and shows the current member list', async () => {
  const a = players.alice.page;
  const b = players.bob.page;
  await voiceItem(a, USERS.bob).waitFor();
  await stack.stopService('edge');
  await a.locator('#conn[data-state=reconnecting]').waitFor();
  assert.match(await a.locator('#conn').textContent(), /Reconnecting in \d+ s \(attempt \d+\)/);
  await shot(a, '10-reconnecting');
  // While the edge is down, bob leaves voice and dave joins it.
  await stack.voiceDisconnect(USERS.bob);
  await stack.voiceConnect(USERS.dave, shared.room);
  stack.startService('edge');
  for (const p of [a, b]) {
    await p.locator('#conn[data-state=live]').waitFor({ timeout: 40000 * SLOW });
    await idleItem(p, USERS.bob).waitFor();
    await voiceItem(p, USERS.dave).waitFor();
    await voiceItem(p, USERS.alice).waitFor();
  }
  const names = await a.locator('[data-testid=voice-list] li[data-user]').evaluateAll((els) => els.map((e) => e.dataset.user).sort());
  assert.deepEqual(names, [USERS.alice, USERS.dave].sort());
});

test('the closing banner counts down, and deletion returns everyone to the start page', async () => {
  const a = players.alice.page;
  const b = players.bob.page;
  // Nobody in voice → the idle scan's 30 s warning.
  await stack.voiceDisconnect(USERS.alice);
  await stack.voiceDisconnect(USERS.dave);
  // alice dropped out of voice: her dialog opens; Escape dismisses it (keyboard use).
  await a.locator('#dropout[open]').waitFor();
  await a.keyboard.press('Escape');
  await a.locator('#dropout:not([open])').waitFor({ state: 'attached' });
  // room-manager again, now with a 1 s idle limit scanned every 0.5 s: the 30 s warning follows.
  await stack.restartRoomManager({ VOICEROOMS__ROOMS__IDLE_TIMEOUT_MS: '1000', VOICEROOMS__ROOMS__CLEANUP_INTERVAL_MS: '500' });
  for (const p of [a, b]) {
    await p.getByTestId('closing-banner').filter({ hasText: /closes in (30|29|28) s/ }).waitFor();
  }
  await shot(a, '11-closing-banner');
  // The owner closes it now.
  await a.getByRole('button', { name: 'Close room' }).click();
  await a.getByTestId('confirm-close').click();
  for (const p of [a, b]) {
    await p.waitForURL((u) => u.pathname === '/');
    await p.getByTestId('flash').filter({ hasText: 'The room “Friday raid” was closed: the owner closed it.' }).waitFor();
  }
  await shot(b, '12-deleted-back-to-start');
});

test('after the ROOMS stream is deleted and created again, the page follows the new stream', async () => {
  const a = players.alice.page;
  await a.getByLabel('Room name').fill('Second wind');
  await a.getByRole('button', { name: 'Create room' }).click();
  await a.waitForURL(/\/rooms\/\d+$/);
  const room = a.url().split('/').pop();
  await a.getByRole('heading', { level: 1, name: 'Second wind' }).waitFor();
  await a.locator('#conn[data-state=live]').waitFor();
  // An operator deletes the stream and creates it again: its sequences start over. The edge
  // notices the new epoch and the client, which kept its (epoch, seq), gets a snapshot of the new
  // stream instead of waiting for sequences above its old one.
  const jsm = await stack.nc.jetstreamManager();
  const { config } = await jsm.streams.info('ROOMS');
  await jsm.streams.delete('ROOMS');
  await jsm.streams.add(config);
  // Events stored in the new stream reach the page.
  await stack.voiceConnect(USERS.carol, LOBBY);
  await stack.simPost('/_sim/voice/move', { user_id: USERS.carol, channel_id: room });
  await voiceItem(a, USERS.carol).waitFor();
  await stack.voiceDisconnect(USERS.carol);
  await voiceItem(a, USERS.carol).waitFor({ state: 'detached' });
  await a.locator('#conn[data-state=live]').waitFor();
  await shot(a, '13-after-stream-recreated');
});
