// voicerooms browser client (ES module, no dependencies, no build step).
//
// Served by the edge at /js/voicerooms.js; usable in a page or in Node (pass a WebSocket
// constructor). Speaks the WebSocket protocol v1 of docs/WEBSOCKET.md and the room HTTP API of
// docs/HTTP_API.md. Documentation: docs/CLIENT.md.
//
// Layout:
//   RoomModel          a room's member list: snapshot + events, applied idempotently by `seq`
//   VoiceroomsClient   one room's live connection: auth, subscribe with `since` and `epoch`,
//                      reconnect with backoff 1, 2, 4, 8, 16 s then every 16 s, resubscribe
//                      from the last applied position
//   VoiceroomsError    typed errors: a stable `code`, the WebSocket `closeCode`, a `loginUrl`
//   ApiClient          the room HTTP API (fetch), errors as VoiceroomsError

/** Reconnect delays in ms; after the last one the client keeps trying at the last delay. */
export const BACKOFF_MS = Object.freeze([1000, 2000, 4000, 8000, 16000]);

/** Close codes the edge uses (docs/WEBSOCKET.md). */
export const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  SLOW_CONSUMER: 1008,
  TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  UNAUTHENTICATED: 4001,
  SESSION_EXPIRED: 4003,
  CONNECTION_LIMIT: 4008,
  IDLE: 4009,
});

/** Connection states, in the order a healthy connection goes through them. */
export const STATE = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  AUTHENTICATING: 'authenticating',
  SUBSCRIBING: 'subscribing',
  LIVE: 'live',
  RECONNECTING: 'reconnecting',
  LOGIN_REQUIRED: 'login_required', // 4001/4003: the session is gone; see error.loginUrl
  FAILED: 'failed', // not_member, room_not_found, 1002/1007/1009: retrying would not help
  CLOSED: 'closed', // the room was deleted, or stop() was called
});

/** The delay before reconnect attempt `attempt` (1-based). */
export function backoffDelay(attempt) {
  const i = Math.min(Math.max(attempt, 1), BACKOFF_MS.length) - 1;
  return BACKOFF_MS[i];
}

/** `/auth/login?return_to=<path>`: where to send a player whose session ended. */
export function loginUrl(returnTo = '/') {
  return `/auth/login?return_to=${encodeURIComponent(returnTo)}`;
}

/** A typed error: `code` is stable (the server's error code, or one of the client's own). */
export class VoiceroomsError extends Error {
  constructor(code, message, { closeCode, loginUrl: login, status, room, retryAfterMs, detail } = {}) {
    super(message || code);
    this.name = 'VoiceroomsError';
    this.code = code;
    if (closeCode !== undefined) this.closeCode = closeCode;
    if (login !== undefined) this.loginUrl = login;
    if (status !== undefined) this.status = status;
    if (room !== undefined) this.room = room;
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
    if (detail !== undefined) this.detail = detail;
  }
}

/** Discord CDN URL of a user's avatar, or null for the default avatar. */
export function avatarUrl(user, size = 64) {
  if (!user || !user.avatar || !/^[A-Za-z0-9_]+$/.test(user.avatar)) return null;
  const ext = user.avatar.startsWith('a_') ? 'gif' : 'png';
  return `https://cdn.discordapp.com/avatars/${user.id}/${user.avatar}.${ext}?size=${size}`;
}

/** The name to show for a user. */
export function displayName(user) {
  return (user && (user.global_name || user.username)) || 'unknown';
}

/**
 * A room's state as seen by a viewer: who is a member, who is in voice, lifecycle.
 * `applySnapshot` replaces everything; `applyEvent` applies one event frame and ignores any
 * event whose `seq` is not above the last applied one (so replays and snapshot overlap are safe).
 */
export class RoomModel {
  constructor() {
    this.clear();
  }

  clear() {
    this.id = null;
    this.guild = null;
    this.name = '';
    this.owner = null;
    this.capacity = 0;
    this.state = 'unknown';
    this.closingDeadline = null;
    this.inviteExpiresAt = null;
    this.channelDeleted = false;
    this.seq = 0;
    this.members = new Map(); // user id → {user, via, joinedAt}
    this.voice = new Map(); // user id → {user, flags}
  }

  /** Replaces the state with a RoomView (`ack subscribed` snapshot or an API answer). */
  applySnapshot(view) {
    this.clear();
    this.id = view.id;
    this.guild = view.guild;
    this.name = view.name;
    this.owner = view.owner;
    this.capacity = view.capacity;
    this.state = view.state;
    this.closingDeadline = view.closing_deadline ?? null;
    this.inviteExpiresAt = view.invite_expires_at ?? null;
    this.seq = view.seq ?? 0;
    for (const m of view.members || []) {
      this.members.set(m.user.id, { user: m.user, via: m.via, joinedAt: m.joined_at });
    }
    for (const v of view.voice || []) {
      this.voice.set(v.user.id, { user: v.user, flags: v.flags || {} });
    }
  }

  /**
   * Applies one `event` frame (`{event, seq, payload}`). Returns false when it was already
   * applied (its `seq` is not above the model's), true otherwise.
   */
  applyEvent(frame) {
    const seq = frame.seq;
    if (typeof seq === 'number' && seq <= this.seq) return false;
    const p = frame.payload || {};
    switch (frame.event) {
      case 'voice.joined':
        this.voice.set(p.user.id, { user: p.user, flags: p.flags || {} });
        this.#refreshUser(p.user);
        break;
      case 'voice.left':
        this.voice.delete(p.user.id);
        break;
      case 'voice.updated':
        this.voice.set(p.user.id, { user: p.user, flags: p.flags || {} });
        break;
      case 'room.created':
        this.name = p.name;
        this.owner = p.owner;
        this.capacity = p.capacity;
        this.inviteExpiresAt = p.invite_expires_at;
        if (this.state === 'unknown' || this.state === 'creating') this.state = 'open';
        break;
      case 'room.member_added':
        if (!this.members.has(p.user.id)) {
          this.members.set(p.user.id, { user: p.user, via: p.via, joinedAt: frame.received_at ?? null });
        }
        this.#refreshUser(p.user);
        break;
      case 'room.member_removed':
        this.members.delete(p.user.id);
        break;
      case 'room.closing':
        this.state = 'closing';
        this.closingDeadline = p.deadline;
        break;
      case 'room.closing_cancelled':
        this.state = 'open';
        this.closingDeadline = null;
        break;
      case 'room.deleted':
        this.state = 'deleted';
        this.closingDeadline = null;
        this.voice.clear();
        break;
      case 'channel.updated':
        if (typeof p.user_limit === 'number' && p.user_limit > 0) this.capacity = p.user_limit;
        break;
      case 'channel.deleted':
        this.channelDeleted = true;
        this.voice.clear();
        break;
      default:
        break; // a kind from a newer server: keep the sequence, change nothing
    }
    if (typeof seq === 'number') this.seq = seq;
    return true;
  }

  #refreshUser(user) {
    const m = this.members.get(user.id);
    if (m) m.user = user;
    const v = this.voice.get(user.id);
    if (v) v.user = user;
  }

  /** Whether `userId` is connected to the room's voice channel. */
  inVoice(userId) {
    return this.voice.has(userId);
  }

  /**
   * The member list to draw: every member and every voice occupant, once, sorted by name.
   * Each entry: {user, inVoice, member, direct (in voice without being a member), owner, flags}.
   */
  list() {
    const ids = new Set([...this.members.keys(), ...this.voice.keys()]);
    const out = [];
    for (const id of ids) {
      const m = this.members.get(id);
      const v = this.voice.get(id);
      const user = (v && v.user) || m.user;
      out.push({
        user,
        inVoice: !!v,
        member: !!m,
        direct: !!v && !m,
        owner: !!this.owner && this.owner.id === id,
        flags: v ? v.flags : null,
      });
    }
    out.sort((a, b) => displayName(a.user).localeCompare(displayName(b.user)) || a.user.id.localeCompare(b.user.id));
    return out;
  }
}

const defaultTimers = {
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (id) => clearTimeout(id),
  now: () => Date.now(),
};

/**
 * A live subscription to one room.
 *
 *   const client = new VoiceroomsClient({ url: 'wss://rooms.example.com/ws', room: '1187…' });
 *   client.on('room', (model) => draw(model.list()));
 *   client.on('state', ({ state, nextAttemptAt }) => indicator(state, nextAttemptAt));
 *   client.on('error', (err) => console.warn(err.code, err.message));
 *   client.start();
 *
 * Options: `url` (the edge's /ws), `room`, `WebSocket` (constructor; defaults to the global),
 * `session` (send an `auth` frame with it; browsers leave it out: the HttpOnly cookie
 * authenticates), `returnTo` (path for the login URL), `timers` ({setTimeout, clearTimeout, now}),
 * `pingIntervalMs` (liveness pings; 0 disables), `pongTimeoutMs`.
 */
export class VoiceroomsClient {
  constructor(opts) {
    if (!opts || !opts.url || !opts.room) throw new TypeError('url and room are required');
    this.url = opts.url;
    this.room = String(opts.room);
    this.WebSocket = opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError('no WebSocket: pass opts.WebSocket');
    this.session = opts.session || null;
    this.returnTo = opts.returnTo || (globalThis.location ? location.pathname + location.search : '/');
    this.timers = { ...defaultTimers, ...(opts.timers || {}) };
    this.pingIntervalMs = opts.pingIntervalMs ?? 20000;
    this.pongTimeoutMs = opts.pongTimeoutMs ?? 10000;
    this.model = new RoomModel();
    this.state = STATE.IDLE;
    this.attempt = 0; // consecutive failed attempts since the last live subscription
    this.nextAttemptAt = null; // ms epoch of the next reconnect, while reconnecting
    this.lastError = null;
    this.user = null; // from ack auth.ok
    this.hasState = false; // whether the model holds a snapshot to resume from
    this.epoch = null; // the stream the model's sequence belongs to (from ack subscribed)
    this.lastClose = null; // {code, reason} of the last close
    this.#handlers = new Map();
  }

  #handlers;
  #ws = null;
  #retryTimer = null;
  #pingTimer = null;
  #pongTimer = null;

  /** The last applied sequence (what the next subscribe sends as `since`). */
  get lastSeq() {
    return this.model.seq;
  }

  /** The position the next subscribe resumes from: `{seq, epoch}`, or null before a snapshot. */
  get position() {
    return this.hasState && this.epoch !== null ? { seq: this.model.seq, epoch: this.epoch } : null;
  }

  /** Subscribes to 'state', 'room', 'event', 'error', 'auth'. Returns an unsubscribe function. */
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.#handlers.get(type).delete(fn);
  }

  #emit(type, value) {
    for (const fn of this.#handlers.get(type) || []) {
      try {
        fn(value);
      } catch (e) {
        // A faulty handler must not break the connection.
        if (globalThis.console) console.error('voicerooms handler failed', e);
      }
    }
  }

  #setState(state) {
    this.state = state;
    this.#emit('state', { state, attempt: this.attempt, nextAttemptAt: this.nextAttemptAt, error: this.lastError });
  }

  #fail(err) {
    this.lastError = err;
    this.#emit('error', err);
  }

  /** Opens the connection (no-op when already running). */
  start() {
    if (this.#ws || this.#retryTimer) return;
    this.#connect();
  }

  /** Closes the connection and stops reconnecting. */
  stop() {
    this.#clearTimers();
    if (this.#retryTimer) this.timers.clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.nextAttemptAt = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(CLOSE.NORMAL, 'bye');
      } catch (_) {
        /* already closed */
      }
    }
    this.#setState(STATE.CLOSED);
  }

  /** Reconnects now instead of waiting for the next attempt (e.g. a "retry now" button). */
  retryNow() {
    if (this.state !== STATE.RECONNECTING) return;
    if (this.#retryTimer) this.timers.clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#connect();
  }

  #connect() {
    this.#retryTimer = null;
    this.nextAttemptAt = null;
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (e) {
      this.#fail(new VoiceroomsError('connect_failed', String(e && e.message ? e.message : e)));
      this.#scheduleReconnect();
      return;
    }
    this.#ws = ws;
    this.#setState(STATE.CONNECTING);
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#setState(STATE.AUTHENTICATING);
      if (this.session) this.#send({ v: 1, type: 'auth', payload: { session: this.session } });
      // Otherwise the cookie on the upgrade authenticates and `ack auth.ok` arrives by itself.
    };
    ws.onmessage = (msg) => {
      if (ws !== this.#ws) return;
      let frame;
      try {
        frame = JSON.parse(typeof msg.data === 'string' ? msg.data : String(msg.data));
      } catch (_) {
        this.#fail(new VoiceroomsError('bad_frame', 'the server sent a frame that is not JSON'));
        return;
      }
      this.#onFrame(frame);
    };
    ws.onerror = () => {
      // The close event that follows carries the code; nothing to do here.
    };
    ws.onclose = (ev) => {
      if (ws !== this.#ws) return;
      this.#ws = null;
      this.#clearTimers();
      this.#onClose(ev.code, ev.reason || '');
    };
  }

  #send(frame) {
    if (this.#ws && this.#ws.readyState === 1) this.#ws.send(JSON.stringify(frame));
  }

  #subscribe() {
    const payload = { room: this.room };
    // A sequence means something only with the stream it came from: without a known epoch the
    // server would answer with a snapshot anyway.
    const position = this.position;
    if (position) {
      payload.since = position.seq;
      payload.epoch = position.epoch;
    }
    this.#setState(STATE.SUBSCRIBING);
    this.#send({ v: 1, type: 'subscribe', payload });
  }

  #onFrame(frame) {
    this.#armPing();
    if (frame.type === 'ack') {
      switch (frame.event) {
        case 'auth.ok':
          this.user = frame.payload && frame.payload.user;
          this.#emit('auth', frame.payload);
          this.#subscribe();
          return;
        case 'subscribed': {
          const p = frame.payload || {};
          if (!p.recovered) {
            this.model.applySnapshot(p.snapshot);
            this.model.seq = p.seq; // the snapshot is as of `seq`
          }
          // Sequences restart when the server's stream is recreated; the epoch tells them apart.
          this.epoch = typeof p.epoch === 'string' ? p.epoch : null;
          this.hasState = true;
          this.attempt = 0;
          this.lastError = null;
          this.#setState(STATE.LIVE);
          this.#emit('room', this.model);
          return;
        }
        default:
          return; // pong, unsubscribed
      }
    }
    if (frame.type === 'event') {
      if (frame.room !== undefined && String(frame.room) !== this.room) return;
      if (this.model.applyEvent(frame)) {
        this.#emit('event', frame);
        this.#emit('room', this.model);
        if (frame.event === 'room.deleted') {
          this.stop();
        }
      }
      return;
    }
    if (frame.type === 'error') {
      const e = frame.error || {};
      const err = new VoiceroomsError(e.code || 'unknown', e.message, { room: frame.room });
      switch (e.code) {
        case 'resubscribe':
          this.#fail(err);
          this.#subscribe();
          return;
        case 'not_member':
        case 'room_not_found':
          this.#fail(err);
          this.#terminal(STATE.FAILED, 'room unavailable');
          return;
        case 'room_deleted':
          this.#fail(err);
          this.#terminal(STATE.CLOSED, 'room deleted');
          return;
        case 'session_expired':
        case 'session_ended':
        case 'invalid_token':
        case 'auth_timeout':
          err.loginUrl = loginUrl(this.returnTo);
          this.#fail(err); // the close (4001/4003) that follows sets the state
          return;
        case 'unavailable':
        case 'timeout':
        case 'internal':
          this.#fail(err);
          // A subscribe the server could not serve now: try again on a new connection, with
          // backoff.
          if (this.state === STATE.SUBSCRIBING && frame.room !== undefined) this.#retryLater('subscribe failed');
          return;
        default:
          this.#fail(err);
      }
    }
  }

  /** Closes the socket without hearing of it again. */
  #dropSocket(reason) {
    this.#clearTimers();
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(CLOSE.NORMAL, reason);
      } catch (_) {
        /* already closed */
      }
    }
  }

  #retryLater(reason) {
    this.#dropSocket(reason);
    this.#scheduleReconnect();
  }

  #terminal(state, reason) {
    this.#dropSocket(reason);
    this.#setState(state);
  }

  #onClose(code, reason) {
    this.lastClose = { code, reason };
    if (code === CLOSE.SESSION_EXPIRED || code === CLOSE.UNAUTHENTICATED) {
      const err = new VoiceroomsError(
        code === CLOSE.SESSION_EXPIRED ? 'session_expired' : 'unauthenticated',
        code === CLOSE.SESSION_EXPIRED ? 'Your session expired: log in again.' : 'Log in to see this room.',
        { closeCode: code, loginUrl: loginUrl(this.returnTo) },
      );
      this.#fail(err);
      this.#setState(STATE.LOGIN_REQUIRED);
      return;
    }
    const refused = {
      [CLOSE.TOO_BIG]: ['frame_too_big', 'the server refused a frame as too big'],
      [CLOSE.INVALID_DATA]: ['invalid_data', 'the server refused a frame that is not valid UTF-8'],
      [CLOSE.PROTOCOL_ERROR]: ['protocol_error', 'the server refused a frame as a protocol error'],
    }[code];
    if (refused) {
      this.#fail(new VoiceroomsError(refused[0], refused[1], { closeCode: code }));
      this.#setState(STATE.FAILED);
      return;
    }
    const codes = {
      [CLOSE.GOING_AWAY]: 'server_going_away',
      [CLOSE.TRY_AGAIN_LATER]: 'server_busy',
      [CLOSE.SLOW_CONSUMER]: 'slow_consumer',
      [CLOSE.CONNECTION_LIMIT]: 'connection_limit',
      [CLOSE.IDLE]: 'idle',
    };
    this.#fail(new VoiceroomsError(codes[code] || 'connection_lost', reason || `connection closed (${code})`, { closeCode: code }));
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    this.attempt += 1;
    const delay = backoffDelay(this.attempt);
    this.nextAttemptAt = this.timers.now() + delay;
    this.#retryTimer = this.timers.setTimeout(() => this.#connect(), delay);
    this.#setState(STATE.RECONNECTING);
  }

  // Liveness: browsers cannot see WebSocket pings, so a silently dead connection (no FIN) is
  // found by an application ping that gets no answer.
  #armPing() {
    if (!this.pingIntervalMs) return;
    if (this.#pongTimer) this.timers.clearTimeout(this.#pongTimer);
    this.#pongTimer = null;
    if (this.#pingTimer) this.timers.clearTimeout(this.#pingTimer);
    this.#pingTimer = this.timers.setTimeout(() => {
      this.#pingTimer = null;
      this.#send({ v: 1, type: 'ping' });
      this.#pongTimer = this.timers.setTimeout(() => {
        this.#pongTimer = null;
        const ws = this.#ws;
        if (!ws) return;
        this.#ws = null;
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          ws.close(CLOSE.NORMAL, 'no pong');
        } catch (_) {
          /* already closed */
        }
        this.#onClose(CLOSE.IDLE, 'no answer to ping');
      }, this.pongTimeoutMs);
    }, this.pingIntervalMs);
  }

  #clearTimers() {
    if (this.#pingTimer) this.timers.clearTimeout(this.#pingTimer);
    if (this.#pongTimer) this.timers.clearTimeout(this.#pongTimer);
    this.#pingTimer = this.#pongTimer = null;
  }
}

/**
 * The room HTTP API (same origin, cookie session). Every method resolves to the JSON answer or
 * rejects with a VoiceroomsError carrying the server's `code`, `status` and, for 401, `loginUrl`.
 */
export class ApiClient {
  constructor({ base = '', fetch: f, returnTo } = {}) {
    this.base = base;
    this.fetch = f || globalThis.fetch.bind(globalThis);
    this.returnTo = returnTo;
  }

  async request(method, path, body) {
    const headers = { Accept: 'application/json' };
    const returnTo = this.returnTo ?? (globalThis.location ? location.pathname + location.search : undefined);
    if (returnTo) headers['X-Return-To'] = returnTo;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await this.fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'same-origin',
      });
    } catch (e) {
      throw new VoiceroomsError('network', 'The server could not be reached.', { detail: String(e) });
    }
    let data = null;
    try {
      data = await res.json();
    } catch (_) {
      data = null;
    }
    if (res.ok) return data;
    const e = (data && data.error) || {};
    throw new VoiceroomsError(e.code || `http_${res.status}`, e.message || `HTTP ${res.status}`, {
      status: res.status,
      loginUrl: e.login_url,
      retryAfterMs: e.retry_after_ms,
    });
  }

  me() {
    return this.request('GET', '/api/me');
  }
  createRoom(name, idempotencyKey) {
    const body = { name };
    if (idempotencyKey) body.idempotency_key = idempotencyKey;
    return this.request('POST', '/api/rooms', body);
  }
  joinRoom(invite) {
    return this.request('POST', '/api/rooms/join', { invite });
  }
  listRooms() {
    return this.request('GET', '/api/rooms');
  }
  getRoom(room) {
    return this.request('GET', `/api/rooms/${encodeURIComponent(room)}`);
  }
  leaveRoom(room) {
    return this.request('POST', `/api/rooms/${encodeURIComponent(room)}/leave`);
  }
  closeRoom(room) {
    return this.request('POST', `/api/rooms/${encodeURIComponent(room)}/close`);
  }
  rotateInvite(room) {
    return this.request('POST', `/api/rooms/${encodeURIComponent(room)}/invite`);
  }
  logout() {
    return this.request('POST', '/auth/logout');
  }
}
