// Starts the real stack on free ports for the browser tests and stops it afterwards:
// nats-server (JetStream, temp dir), discord-sim, gateway-listener, room-manager and edge
// binaries (from $CARGO_TARGET_DIR or target/, built by `cargo build --bins`), configured as
// scripts/dev does. Then checks that room-manager answers commands and that gateway-listener
// holds a gateway session with the simulator; if either does not, the tests fail loudly.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync, openSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { randomBytes, createHmac } from 'node:crypto';
import { connect } from 'nats';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const ARTIFACTS = process.env.VR_ARTIFACTS || join(ROOT, 'artifacts', 'browser');
export const GUILD = '200000000000000001';
export const USERS = { alice: '300000000000000001', bob: '300000000000000002', carol: '300000000000000003', dave: '300000000000000004', erin: '300000000000000005' };
export const LOBBY = '200000000000000101';
export const GAMING = '200000000000000102';

/** Deadlines scale with VR_SLOW (e.g. 2 on a loaded CI machine). */
export const SLOW = Number(process.env.VR_SLOW || (process.env.CI ? 2 : 1));

export function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** Polls `check` until it returns a truthy value or `ms` pass. */
export async function waitFor(what, check, ms = 10000) {
  const deadline = Date.now() + ms * SLOW;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

async function ok(url) {
  const res = await fetch(url).catch(() => null);
  return res && res.ok;
}

function bin(name) {
  const target = process.env.CARGO_TARGET_DIR || join(ROOT, 'target');
  return join(target, 'debug', name);
}

/**
 * Arms a watcher in `page` that resolves with the browser's Date.now() when `selector` is
 * present (appear) or absent (disappear). The DOM is checked on every mutation.
 */
export function watch(page, selector, appear) {
  return page.evaluate(([sel, want]) => new Promise((resolve) => {
    const check = () => (!!document.querySelector(sel)) === want;
    if (check()) return resolve({ at: Date.now(), already: true });
    const obs = new MutationObserver(() => {
      if (check()) {
        obs.disconnect();
        resolve({ at: Date.now(), already: false });
      }
    });
    obs.observe(document.body, { subtree: true, childList: true, attributes: true });
  }), [selector, appear]);
}

/** The simulator's control API at `sim` (http://host:port). */
export class SimClient {
  constructor(sim) {
    this.sim = sim;
  }

  async simPost(path, body) {
    const res = await fetch(`${this.sim}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
    return res.json().catch(() => ({}));
  }
  voiceConnect(user, channel) {
    return this.simPost('/_sim/voice/connect', { user_id: user, channel_id: channel });
  }
  voiceDisconnect(user) {
    return this.simPost('/_sim/voice/disconnect', { user_id: user });
  }
  async voiceChannelOf(user) {
    const state = await (await fetch(`${this.sim}/_sim/state`)).json();
    for (const g of state.guilds) for (const v of g.voice_states || []) if (v.user_id === user) return v.channel_id;
    return null;
  }
}

export class Stack extends SimClient {
  constructor() {
    super(null);
    this.procs = new Map();
    this.dir = mkdtempSync(join(tmpdir(), 'vr-browser-'));
    this.logs = join(this.dir, 'logs');
    mkdirSync(this.logs);
  }

  spawn(name, cmd, args, env) {
    const out = openSync(join(this.logs, `${name}.log`), 'a');
    const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', out, out] });
    this.procs.set(name, child);
    return child;
  }

  async start() {
    this.natsPort = await freePort();
    this.simPort = await freePort();
    this.ports = { 'gateway-listener': await freePort(), 'room-manager': await freePort(), edge: await freePort() };
    this.natsUrl = `nats://127.0.0.1:${this.natsPort}`;
    this.sim = `http://127.0.0.1:${this.simPort}`;
    this.base = `http://127.0.0.1:${this.ports.edge}`;
    this.spawn('nats-server', 'nats-server', ['-a', '127.0.0.1', '-p', String(this.natsPort), '-js', '-sd', join(this.dir, 'nats')], {
      PATH: `${process.env.PATH}:/usr/sbin`,
    });
    this.spawn('discord-sim', bin('discord-sim'), [], { DISCORD_SIM__BIND: `127.0.0.1:${this.simPort}`, DISCORD_SIM__HEARTBEAT_INTERVAL_MS: '5000' });
    await waitFor('nats-server', () => new Promise((r) => {
      const s = net.connect(this.natsPort, '127.0.0.1', () => { s.end(); r(true); });
      s.on('error', () => r(false));
    }));
    await waitFor('discord-sim', () => ok(`${this.sim}/_sim`));
    this.env = {
      VOICEROOMS__NATS__URL: this.natsUrl,
      VOICEROOMS__LOG__FORMAT: 'json',
      VOICEROOMS__DISCORD__API_BASE: `${this.sim}/api/v10`,
      VOICEROOMS__DISCORD__TOKEN: 'sim-bot-token',
      VOICEROOMS__OAUTH__CLIENT_ID: '100000000000000001',
      VOICEROOMS__OAUTH__CLIENT_SECRET: 'sim-client-secret',
      VOICEROOMS__OAUTH__AUTHORIZE_URL: `${this.sim}/oauth2/authorize`,
      VOICEROOMS__OAUTH__TOKEN_URL: `${this.sim}/api/oauth2/token`,
      VOICEROOMS__OAUTH__REVOKE_URL: `${this.sim}/api/oauth2/token/revoke`,
      VOICEROOMS__OAUTH__API_BASE: `${this.sim}/api/v10`,
      VOICEROOMS__OAUTH__REDIRECT_URL: `${this.base}/auth/callback`,
      VOICEROOMS__EDGE__DEFAULT_GUILD: GUILD,
      VOICEROOMS__SESSION__KEY: randomBytes(48).toString('base64'),
      // Known to the tests, so they can sign an already-expired invite.
      VOICEROOMS__INVITES__SECRET: randomBytes(48).toString('base64'),
    };
    for (const name of ['gateway-listener', 'room-manager', 'edge']) this.startService(name);
    for (const name of ['gateway-listener', 'room-manager', 'edge']) {
      await waitFor(`${name} ready`, () => ok(`http://127.0.0.1:${this.ports[name]}/readyz`), 30000);
    }
    this.nc = await connect({ servers: this.natsUrl, name: 'browser-tests' });
    await this.requireRealServices();
    return this;
  }

  startService(name) {
    return this.spawn(name, bin(name), [], { ...this.env, VOICEROOMS__HTTP__PORT: String(this.ports[name]) });
  }

  /** Stops a service with SIGTERM (graceful) and waits for it to exit. */
  async stopService(name, signal = 'SIGTERM') {
    const child = this.procs.get(name);
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill(signal);
    await exited;
    this.procs.delete(name);
  }

  async restartEdge() {
    await this.stopService('edge');
    this.startService('edge');
    await waitFor('edge ready again', () => ok(`${this.base}/readyz`), 30000);
  }

  /** The real room-manager answers, and the real gateway-listener holds a gateway session. */
  async requireRealServices() {
    const reply = await this.nc.request('roommgr.v1.list_mine', JSON.stringify({ requester: { id: USERS.alice, username: 'alice' } }), { timeout: 10000 });
    const body = JSON.parse(new TextDecoder().decode(reply.data));
    if (!(body && body.ok && Array.isArray(body.ok.rooms))) throw new Error(`room-manager answered ${JSON.stringify(body)}`);
    await waitFor('gateway-listener holds a gateway session with the simulator', async () => {
      const s = await (await fetch(`${this.sim}/_sim/sessions`)).json();
      return s.sessions.some((x) => x.connected);
    }, 30000);
  }

  /** An invite for `room` signed with room-manager's key whose 24 h ended an hour ago. */
  expiredInvite(room) {
    const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
    const now = Math.floor(Date.now() / 1000);
    const header = b64({ alg: 'HS256', typ: 'JWT' });
    const claims = b64({ room, guild: GUILD, channel: room, role: '1', sub: USERS.alice, iat: now - 90000, exp: now - 3600, jti: 'expired' });
    const signature = createHmac('sha256', this.env.VOICEROOMS__INVITES__SECRET).update(`${header}.${claims}`).digest('base64url');
    return `${header}.${claims}.${signature}`;
  }

  /** Restarts room-manager with extra settings (e.g. short idle times) and waits until ready. */
  async restartRoomManager(extra) {
    await this.stopService('room-manager');
    this.spawn('room-manager', bin('room-manager'), [], { ...this.env, ...extra, VOICEROOMS__HTTP__PORT: String(this.ports['room-manager']) });
    await waitFor('room-manager ready again', () => ok(`http://127.0.0.1:${this.ports['room-manager']}/readyz`), 30000);
  }

  async stop() {
    if (this.nc) await this.nc.close().catch(() => {});
    for (const name of ['edge', 'room-manager', 'gateway-listener', 'discord-sim', 'nats-server']) {
      await this.stopService(name).catch(() => {});
    }
    if (process.env.VR_KEEP_LOGS) console.log(`logs kept in ${this.logs}`);
    else rmSync(this.dir, { recursive: true, force: true });
  }
}
