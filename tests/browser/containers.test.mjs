// Smoke test of the container stack (run by scripts/test-containers once every container is
// healthy): the players' page in headless Chromium through the ports docker-compose publishes —
// VR_BASE (the edge, http://localhost:8080) and VR_SIM (the simulator, http://localhost:8790) —
// exactly as a developer's browser uses them after `docker-compose --profile dev up`.
// A player logs in through the simulator's OAuth2 page, creates a room, and a voice join made
// through the simulator's API appears live on the page.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

import { SimClient, ARTIFACTS, USERS, LOBBY, SLOW, waitFor, watch } from './stack.mjs';

const BASE = process.env.VR_BASE;
const SIM = process.env.VR_SIM;
const CHROMIUM = process.env.VR_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];
const T = 20000 * SLOW;

let browser;
mkdirSync(ARTIFACTS, { recursive: true });

before(async () => {
  assert.ok(BASE && SIM, 'VR_BASE and VR_SIM name the published edge and simulator');
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
});

after(async () => {
  if (browser) await browser.close();
});

test('through the published ports: log in with the simulator, create a room, see a voice join live', async () => {
  const sim = new SimClient(SIM);
  const context = await browser.newContext({ baseURL: BASE, viewport: { width: 900, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(T);
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  const visited = [];
  page.on('request', (r) => { if (r.isNavigationRequest()) visited.push(r.url()); });

  await page.goto('/');
  await sim.simPost('/_sim/oauth/next_login', { user: 'alice' });
  await page.getByTestId('login').click();
  await page.waitForURL((u) => u.pathname === '/', { timeout: T });
  await page.getByTestId('me').filter({ hasText: 'alice' }).waitFor();
  // The browser itself went to the simulator's published port to log in (not discord-sim, a
  // name only the compose network resolves) and came back to the page's own origin.
  assert.ok(visited.some((u) => u.startsWith(`${SIM}/oauth2/authorize`)), `login went through ${SIM}: ${visited.join(' ')}`);
  assert.ok(visited.some((u) => u.startsWith(`${BASE}/auth/callback`)), `callback on ${BASE}: ${visited.join(' ')}`);

  await page.getByLabel('Room name').fill('Container smoke');
  await page.getByRole('button', { name: 'Create room' }).click();
  await page.waitForURL(/\/rooms\/\d+$/);
  const room = page.url().split('/').pop();
  await page.getByRole('heading', { level: 1, name: 'Container smoke' }).waitFor();
  await page.locator('#conn[data-state=live]').waitFor();

  // alice connects to voice in the guild's lobby: room-manager's pending placement moves her into
  // the room's channel, and the page shows her in voice, pushed over the WebSocket.
  const selector = `[data-testid=voice-list] li[data-user="${USERS.alice}"]`;
  assert.equal(await page.locator(selector).count(), 0, 'alice is not in voice yet');
  const seen = watch(page, selector, true);
  // Evaluations run in order: once this one answers, the watcher above is armed.
  await page.evaluate(() => true);
  const t0 = Date.now();
  await sim.voiceConnect(USERS.alice, LOBBY);
  const { at, already } = await seen;
  assert.equal(already, false, 'alice was not in voice before the join');
  await waitFor('alice moved into the room channel', async () => (await sim.voiceChannelOf(USERS.alice)) === room, T);
  await page.screenshot({ path: join(ARTIFACTS, 'containers-room-live.png'), fullPage: true });
  console.log(`voice join (lobby connect → placement → live on the page): ${at - t0} ms`);
  await context.close();
});
