// Tests of the client module with a fake WebSocket and a fake clock (node --test clients/js/).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  ApiClient,
  BACKOFF_MS,
  RoomModel,
  STATE,
  VoiceroomsClient,
  VoiceroomsError,
  backoffDelay,
  loginUrl,
} from './voicerooms.js';

// ---- fakes -------------------------------------------------------------------------------

/** A clock whose timers fire only when the test advances it. */
class FakeClock {
  constructor() {
    this.t = 1_000_000;
    this.timers = new Map();
    this.nextId = 1;
  }
  setTimeout = (fn, ms) => {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + ms, fn });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  now = () => this.t;
  /** Moves time forward by `ms`, firing due timers in order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const [id, tm] of this.timers) if (tm.at <= end && (!next || tm.at < next[1].at)) next = [id, tm];
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }
}

/** Records every socket the client opens; the test plays the server. */
function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }
    send(text) {
      assert.equal(this.readyState, 1, 'send on an open socket only');
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // server side
    open() {
      this.readyState = 1;
      this.onopen && this.onopen({});
    }
    frame(obj) {
      this.onmessage && this.onmessage({ data: JSON.stringify({ v: 1, ts: 1, ...obj }) });
    }
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose && this.onclose({ code, reason });
    }
    authOk() {
      this.frame({ type: 'ack', event: 'auth.ok', payload: { user: { id: '1', username: 'alice' }, session_expires_at: 9 } });
    }
  }
  return { FakeWebSocket, sockets };
}

const ROOM = '1187716447235293214';
const alice = { id: '300000000000000001', username: 'alice' };
const bob = { id: '300000000000000002', username: 'bob' };
const carol = { id: '300000000000000003', username: 'carol', avatar: 'abc' };

function view(seq, { members = [alice], voice = [] } = {}) {
  return {
    id: ROOM,
    guild: '200000000000000001',
    name: 'Friday raid',
    owner: alice,
    role: '9',
    capacity: 4,
    state: 'open',
    members: members.map((u) => ({ user: u, via: u === alice ? 'owner' : 'invite', joined_at: 1 })),
    voice: voice.map((u) => ({ user: u, flags: {}, member: members.includes(u) })),
    created_at: 1,
    last_activity: 1,
    invite_expires_at: 2,
    seq,
  };
}

function ev(seq, event, payload) {
  return { type: 'event', event, room: ROOM, guild: '200000000000000001', seq, payload, received_at: 1 };
}

const EPOCH = '1764099000123456789';

function subscribedFresh(seq, v, epoch = EPOCH) {
  return { type: 'ack', event: 'subscribed', room: ROOM, payload: { recovered: false, snapshot: v, seq, epoch, replayed: 0 } };
}

function setup(extra = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const client = new VoiceroomsClient({
    url: 'ws://edge/ws',
    room: ROOM,
    WebSocket: FakeWebSocket,
    timers: clock,
    returnTo: `/?room=${ROOM}`,
    ...extra,
  });
  const states = [];
  const errors = [];
  client.on('state', (s) => states.push(s.state));
  client.on('error', (e) => errors.push(e));
  return { clock, sockets, client, states, errors };
}

/** Brings the client to `live` on a fresh socket with the given snapshot. */
function goLive(t, snapshot, { since } = {}) {
  const ws = t.sockets.at(-1);
  ws.open();
  ws.authOk();
  const sub = ws.sent.at(-1);
  assert.equal(sub.type, 'subscribe');
  assert.equal(sub.payload.room, ROOM);
  assert.equal(sub.payload.since, since);
  assert.equal(sub.payload.epoch, since === undefined ? undefined : EPOCH);
  ws.frame(subscribedFresh(snapshot.seq, snapshot));
  assert.equal(t.client.state, STATE.LIVE);
  return ws;
}

const names = (model) => model.list().map((e) => `${e.user.username}${e.inVoice ? '*' : ''}`);

// ---- model ------------------------------------------------------------------------------

test('a snapshot then events build the member list, who is in voice and who came directly', () => {
  const m = new RoomModel();
  m.applySnapshot(view(10, { members: [alice, bob], voice: [alice] }));
  assert.deepEqual(names(m), ['alice*', 'bob']);
  assert.ok(m.applyEvent(ev(12, 'voice.joined', { user: bob, flags: {} })));
  assert.ok(m.applyEvent(ev(15, 'voice.joined', { user: carol, flags: {} })));
  const list = m.list();
  assert.deepEqual(names(m), ['alice*', 'bob*', 'carol*']);
  assert.deepEqual(
    list.map((e) => [e.user.username, e.member, e.direct, e.owner]),
    [
      ['alice', true, false, true],
      ['bob', true, false, false],
      ['carol', false, true, false],
    ],
  );
  assert.ok(m.applyEvent(ev(16, 'voice.left', { user: alice })));
  assert.deepEqual(names(m), ['alice', 'bob*', 'carol*']);
  assert.equal(m.seq, 16);
});

test('events at or below the applied sequence are ignored, so replays are idempotent', () => {
  const m = new RoomModel();
  m.applySnapshot(view(20, { members: [alice], voice: [alice] }));
  // The snapshot already contains the effect of seq 18 and 20.
  assert.equal(m.applyEvent(ev(18, 'voice.left', { user: alice })), false);
  assert.equal(m.applyEvent(ev(20, 'voice.left', { user: alice })), false);
  assert.deepEqual(names(m), ['alice*']);
  assert.equal(m.applyEvent(ev(25, 'voice.left', { user: alice })), true);
  assert.equal(m.applyEvent(ev(25, 'voice.joined', { user: alice, flags: {} })), false);
  assert.deepEqual(names(m), ['alice']);
});

test('joined twice and left twice leave one consistent entry', () => {
  const m = new RoomModel();
  m.applySnapshot(view(1));
  m.applyEvent(ev(2, 'voice.joined', { user: bob, flags: {} }));
  m.applyEvent(ev(3, 'voice.joined', { user: bob, flags: { self_mute: true } }));
  assert.deepEqual(names(m), ['alice', 'bob*']);
  assert.equal(m.list()[1].flags.self_mute, true);
  m.applyEvent(ev(4, 'voice.left', { user: bob }));
  m.applyEvent(ev(5, 'voice.left', { user: bob }));
  assert.deepEqual(names(m), ['alice']);
});

test('membership, closing, cancel and deletion events change the room state', () => {
  const m = new RoomModel();
  m.applySnapshot(view(1));
  m.applyEvent(ev(2, 'room.member_added', { user: bob, via: 'invite' }));
  assert.deepEqual(names(m), ['alice', 'bob']);
  m.applyEvent(ev(3, 'room.closing', { deadline: 5000, reason: 'idle' }));
  assert.equal(m.state, 'closing');
  assert.equal(m.closingDeadline, 5000);
  m.applyEvent(ev(4, 'room.closing_cancelled', { by: bob }));
  assert.equal(m.state, 'open');
  assert.equal(m.closingDeadline, null);
  m.applyEvent(ev(5, 'room.member_removed', { user: bob, reason: 'left' }));
  assert.deepEqual(names(m), ['alice']);
  m.applyEvent(ev(6, 'room.deleted', { reason: 'owner' }));
  assert.equal(m.state, 'deleted');
});

// ---- connection -------------------------------------------------------------------------

test('connects, is authenticated by the cookie, subscribes without since and applies the snapshot', () => {
  const t = setup();
  t.client.start();
  assert.equal(t.client.state, STATE.CONNECTING);
  const ws = t.sockets[0];
  assert.equal(ws.url, 'ws://edge/ws');
  ws.open();
  assert.equal(t.client.state, STATE.AUTHENTICATING);
  assert.equal(ws.sent.length, 0, 'no auth frame: the HttpOnly cookie authenticates');
  ws.authOk();
  assert.deepEqual(ws.sent, [{ v: 1, type: 'subscribe', payload: { room: ROOM } }]);
  let rooms = 0;
  t.client.on('room', () => rooms++);
  ws.frame(subscribedFresh(7, view(7, { members: [alice, bob], voice: [bob] })));
  assert.equal(t.client.state, STATE.LIVE);
  assert.equal(t.client.lastSeq, 7);
  assert.equal(rooms, 1);
  assert.deepEqual(names(t.client.model), ['alice', 'bob*']);
  assert.deepEqual(t.states, ['connecting', 'authenticating', 'subscribing', 'live']);
});

test('with a session option it sends an auth frame first (for non-browser clients)', () => {
  const t = setup({ session: 'cookie-value' });
  t.client.start();
  t.sockets[0].open();
  assert.deepEqual(t.sockets[0].sent, [{ v: 1, type: 'auth', payload: { session: 'cookie-value' } }]);
});

test('reconnects with backoff 1, 2, 4, 8, 16 s and then keeps trying every 16 s, visibly', () => {
  const t = setup();
  t.client.start();
  goLive(t, view(3));
  t.sockets[0].serverClose(1006);
  const delays = [];
  for (let i = 0; i < 7; i++) {
    assert.equal(t.client.state, STATE.RECONNECTING);
    const wait = t.client.nextAttemptAt - t.clock.now();
    delays.push(wait);
    const before = t.sockets.length;
    t.clock.advance(wait - 1);
    assert.equal(t.sockets.length, before, 'no attempt before the announced time');
    t.clock.advance(1);
    assert.equal(t.sockets.length, before + 1, 'an attempt at the announced time');
    t.sockets.at(-1).serverClose(1006); // the edge is still down
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 16000, 16000, 16000]);
  assert.deepEqual(BACKOFF_MS, [1000, 2000, 4000, 8000, 16000]);
  assert.equal(backoffDelay(99), 16000);
  assert.equal(t.errors.at(-1).code, 'connection_lost');
  assert.equal(t.errors.at(-1).closeCode, 1006);
});

test('a successful resubscription resets the backoff', () => {
  const t = setup();
  t.client.start();
  goLive(t, view(3));
  t.sockets[0].serverClose(1006);
  t.clock.advance(1000);
  t.sockets.at(-1).serverClose(1006);
  t.clock.advance(2000);
  goLive(t, view(9), { since: 3 });
  t.sockets.at(-1).serverClose(1001);
  assert.equal(t.client.nextAttemptAt - t.clock.now(), 1000);
  assert.equal(t.errors.at(-1).code, 'server_going_away');
});

test('after a reconnect it resubscribes from the last applied sequence and keeps its state on recovery', () => {
  const t = setup();
  t.client.start();
  const ws1 = goLive(t, view(10, { members: [alice, bob] }));
  ws1.frame(ev(14, 'voice.joined', { user: bob, flags: {} }));
  ws1.frame(ev(17, 'voice.joined', { user: alice, flags: {} }));
  assert.equal(t.client.lastSeq, 17);
  ws1.serverClose(1001);
  t.clock.advance(1000);
  const ws2 = t.sockets[1];
  ws2.open();
  ws2.authOk();
  assert.deepEqual(ws2.sent.at(-1), { v: 1, type: 'subscribe', payload: { room: ROOM, since: 17, epoch: EPOCH } });
  ws2.frame({ type: 'ack', event: 'subscribed', room: ROOM, payload: { recovered: true, seq: 17, epoch: EPOCH, replayed: 2 } });
  // The replay: one event the client had already seen (harmless), one it missed.
  ws2.frame(ev(17, 'voice.joined', { user: alice, flags: {} }));
  ws2.frame(ev(21, 'voice.left', { user: bob }));
  assert.equal(t.client.state, STATE.LIVE);
  assert.deepEqual(names(t.client.model), ['alice*', 'bob']);
  assert.equal(t.client.lastSeq, 21);
});

test('recovered:false replaces the state with the fresh snapshot', () => {
  const t = setup();
  t.client.start();
  const ws1 = goLive(t, view(10, { members: [alice, bob], voice: [alice, bob] }));
  ws1.serverClose(1008);
  assert.equal(t.errors.at(-1).code, 'slow_consumer');
  t.clock.advance(1000);
  const ws2 = t.sockets[1];
  ws2.open();
  ws2.authOk();
  assert.equal(ws2.sent.at(-1).payload.since, 10);
  assert.equal(ws2.sent.at(-1).payload.epoch, EPOCH);
  // Too far behind: a snapshot at 500 where bob has left the room and carol came in directly.
  const fresh = view(500, { members: [alice], voice: [carol] });
  ws2.frame(subscribedFresh(500, fresh));
  assert.deepEqual(names(t.client.model), ['alice', 'carol*']);
  assert.equal(t.client.lastSeq, 500);
  ws2.frame(ev(499, 'voice.joined', { user: bob, flags: {} }));
  assert.deepEqual(names(t.client.model), ['alice', 'carol*'], 'events older than the snapshot are ignored');
});

test('an error resubscribe makes the client subscribe again from its sequence', () => {
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(10));
  ws.frame(ev(12, 'voice.joined', { user: bob, flags: {} }));
  ws.frame({ type: 'error', room: ROOM, error: { code: 'resubscribe', message: 'gap' } });
  assert.deepEqual(ws.sent.at(-1), { v: 1, type: 'subscribe', payload: { room: ROOM, since: 12, epoch: EPOCH } });
});

test('it keeps the stream epoch and recovers when the server\'s stream was recreated', () => {
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(40, { members: [alice, bob], voice: [alice] }));
  ws.frame(ev(41, 'voice.joined', { user: bob, flags: {} }));
  assert.deepEqual(t.client.position, { seq: 41, epoch: EPOCH });
  // The stream was deleted and created again: sequences restart under a new epoch.
  ws.frame({ type: 'error', room: ROOM, error: { code: 'resubscribe', message: 'stream recreated' } });
  assert.deepEqual(ws.sent.at(-1).payload, { room: ROOM, since: 41, epoch: EPOCH });
  const next = '1764199000000000001';
  ws.frame(subscribedFresh(0, view(40, { members: [alice, bob], voice: [alice, bob] }), next));
  assert.equal(t.client.epoch, next);
  assert.equal(t.client.lastSeq, 0, 'the new stream\'s position, below the old one');
  // Events of the new stream apply although their sequences are below the old epoch's.
  ws.frame(ev(1, 'voice.left', { user: alice }));
  ws.frame(ev(2, 'voice.joined', { user: carol, flags: {} }));
  assert.deepEqual(names(t.client.model), ['alice', 'bob*', 'carol*']);
  assert.deepEqual(t.client.position, { seq: 2, epoch: next });
  // And after a reconnect it resumes in the new epoch.
  ws.serverClose(1006);
  t.clock.advance(1000);
  const ws2 = t.sockets.at(-1);
  ws2.open();
  ws2.authOk();
  assert.deepEqual(ws2.sent.at(-1).payload, { room: ROOM, since: 2, epoch: next });
});

test('without an epoch from the server it subscribes without since (a snapshot each time)', () => {
  const t = setup();
  t.client.start();
  const ws = t.sockets[0];
  ws.open();
  ws.authOk();
  ws.frame({ type: 'ack', event: 'subscribed', room: ROOM, payload: { recovered: false, snapshot: view(5), seq: 5, replayed: 0 } });
  ws.serverClose(1001);
  t.clock.advance(1000);
  t.sockets[1].open();
  t.sockets[1].authOk();
  assert.deepEqual(t.sockets[1].sent.at(-1).payload, { room: ROOM });
});

test('the server ending the subscription: removed → failed, deleted → closed, session ended → log in', () => {
  for (const [code, state] of [['not_member', STATE.FAILED], ['room_deleted', STATE.CLOSED]]) {
    const t = setup();
    t.client.start();
    const ws = goLive(t, view(3));
    ws.frame({ type: 'error', room: ROOM, error: { code, message: 'ended' } });
    assert.equal(t.client.state, state, code);
    assert.equal(t.errors.at(-1).code, code);
    t.clock.advance(60000);
    assert.equal(t.sockets.length, 1, `${code}: no reconnect`);
  }
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(3));
  ws.frame({ type: 'error', error: { code: 'session_ended', message: 'logged out' } });
  ws.serverClose(4003, 'logged out');
  assert.equal(t.client.state, STATE.LOGIN_REQUIRED);
  assert.equal(t.errors.find((e) => e.code === 'session_ended').loginUrl, `/auth/login?return_to=${encodeURIComponent(`/?room=${ROOM}`)}`);
  t.clock.advance(60000);
  assert.equal(t.sockets.length, 1, 'no reconnect');
});

test('a subscribe the server cannot serve now is tried again with backoff', () => {
  const t = setup();
  t.client.start();
  const ws = t.sockets[0];
  ws.open();
  ws.authOk();
  ws.frame({ type: 'error', room: ROOM, error: { code: 'unavailable', message: 'reading the stream' } });
  assert.equal(t.client.state, STATE.RECONNECTING);
  assert.equal(ws.closedWith.code, 1000);
  t.clock.advance(1000);
  goLive(t, view(4));
});

test('1002 and 1007 (frames the server refused) are terminal; 1013 is retried', () => {
  for (const [code, error] of [[1002, 'protocol_error'], [1007, 'invalid_data'], [1009, 'frame_too_big']]) {
    const t = setup();
    t.client.start();
    goLive(t, view(1)).serverClose(code);
    assert.equal(t.client.state, STATE.FAILED, `${code}`);
    assert.equal(t.errors.at(-1).code, error);
  }
  const t = setup();
  t.client.start();
  goLive(t, view(1)).serverClose(1013);
  assert.equal(t.client.state, STATE.RECONNECTING);
  assert.equal(t.errors.at(-1).code, 'server_busy');
});

test('close 4003 asks the player to log in again, with the login URL, and does not retry', () => {
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(1));
  ws.frame({ type: 'error', error: { code: 'session_expired', message: 'session expired' } });
  ws.serverClose(4003, 'session expired');
  assert.equal(t.client.state, STATE.LOGIN_REQUIRED);
  const err = t.errors.at(-1);
  assert.ok(err instanceof VoiceroomsError);
  assert.equal(err.code, 'session_expired');
  assert.equal(err.closeCode, 4003);
  assert.equal(err.loginUrl, `/auth/login?return_to=${encodeURIComponent(`/?room=${ROOM}`)}`);
  t.clock.advance(60_000);
  assert.equal(t.sockets.length, 1, 'no reconnect without a session');
});

test('close 4001 without a session is "log in", not a retry loop', () => {
  const t = setup();
  t.client.start();
  t.sockets[0].open();
  t.sockets[0].serverClose(4001);
  assert.equal(t.client.state, STATE.LOGIN_REQUIRED);
  assert.equal(t.errors.at(-1).code, 'unauthenticated');
  assert.equal(t.errors.at(-1).loginUrl, loginUrl(`/?room=${ROOM}`));
});

test('not_member on subscribe is a terminal, typed error', () => {
  const t = setup();
  t.client.start();
  const ws = t.sockets[0];
  ws.open();
  ws.authOk();
  ws.frame({ type: 'error', room: ROOM, error: { code: 'not_member', message: 'not a member' } });
  assert.equal(t.client.state, STATE.FAILED);
  assert.equal(t.errors.at(-1).code, 'not_member');
  assert.equal(ws.closedWith.code, 1000);
  t.clock.advance(60_000);
  assert.equal(t.sockets.length, 1);
});

test('room.deleted closes the client for good', () => {
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(1));
  ws.frame(ev(2, 'room.deleted', { reason: 'owner' }));
  assert.equal(t.client.state, STATE.CLOSED);
  assert.equal(t.client.model.state, 'deleted');
  assert.equal(ws.closedWith.code, 1000);
  t.clock.advance(60_000);
  assert.equal(t.sockets.length, 1);
});

test('a connection that stops answering is detected by a ping without pong and replaced', () => {
  const t = setup({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
  t.client.start();
  const ws = goLive(t, view(1));
  t.clock.advance(20_000);
  assert.deepEqual(ws.sent.at(-1), { v: 1, type: 'ping' });
  t.clock.advance(10_000);
  assert.equal(ws.closedWith.code, 1000);
  assert.equal(t.client.state, STATE.RECONNECTING);
  assert.equal(t.errors.at(-1).code, 'idle');
  t.clock.advance(1000);
  assert.equal(t.sockets.length, 2);
});

test('events of another room and frames after stop() are not applied', () => {
  const t = setup();
  t.client.start();
  const ws = goLive(t, view(1));
  ws.frame({ ...ev(5, 'voice.joined', { user: bob, flags: {} }), room: '42' });
  assert.deepEqual(names(t.client.model), ['alice']);
  t.client.stop();
  assert.equal(t.client.state, STATE.CLOSED);
  ws.frame(ev(6, 'voice.joined', { user: bob, flags: {} }));
  assert.deepEqual(names(t.client.model), ['alice']);
});

// ---- HTTP API ---------------------------------------------------------------------------

test('API errors are typed, and a 401 carries the login URL', async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    return {
      ok: false,
      status: 401,
      json: async () => ({ error: { code: 'unauthorized', message: 'log in', login_url: '/auth/login?return_to=%2F' } }),
    };
  };
  const api = new ApiClient({ fetch, returnTo: '/?invite=abc' });
  await assert.rejects(api.joinRoom('abc'), (e) => {
    assert.ok(e instanceof VoiceroomsError);
    assert.equal(e.code, 'unauthorized');
    assert.equal(e.status, 401);
    assert.equal(e.loginUrl, '/auth/login?return_to=%2F');
    return true;
  });
  assert.equal(calls[0].url, '/api/rooms/join');
  assert.equal(calls[0].init.method, 'POST');
  assert.equal(calls[0].init.headers['X-Return-To'], '/?invite=abc');
  assert.equal(calls[0].init.body, JSON.stringify({ invite: 'abc' }));
});
