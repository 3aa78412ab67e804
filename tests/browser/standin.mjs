// Stand-ins for room-manager and gateway-listener, used by the browser tests only while those
// services are not on main yet (stack.mjs decides). They speak the same wire as the real ones
// (docs/ARCHITECTURE.md): commands on `roommgr.v1.*` answered `{v:1, ok|error}`, room snapshots
// in the KV bucket `rooms` with the sequence they reflect, events published to the ROOMS stream
// on `rooms.<guild>.<room>.<kind>`. They are deliberately small: no Discord roles, no signed
// invites, no cleanup scan — just enough behaviour for the page's flows to run end to end.
import { randomBytes } from 'node:crypto';
import { headers as natsHeaders } from 'nats';

const enc = (v) => new TextEncoder().encode(JSON.stringify(v));
const dec = (b) => JSON.parse(new TextDecoder().decode(b));
const now = () => Date.now();

function userRef(u) {
  const out = { id: String(u.id), username: u.username };
  if (u.global_name) out.global_name = u.global_name;
  if (u.avatar) out.avatar = u.avatar;
  return out;
}

class CommandError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class RoomManagerStandIn {
  constructor({ nc, sim, guild }) {
    this.nc = nc;
    this.sim = sim;
    this.guild = guild;
    this.js = nc.jetstream();
    this.rooms = new Map(); // room id → RoomView
    this.invites = new Map(); // token → {room, expires_at}
    this.pendingMoves = new Map(); // user id → room id
    this.closers = new Map(); // room id → timer
    this.subs = [];
  }

  async start() {
    const jsm = await this.nc.jetstreamManager();
    this.kv = await this.js.views.kv('rooms', { history: 1 });
    void jsm;
    const sub = this.nc.subscribe('roommgr.v1.*', { queue: 'room-manager' });
    this.subs.push(sub);
    (async () => {
      for await (const msg of sub) this.handle(msg);
    })();
    await this.followVoiceEvents();
  }

  /** Applies voice events of rooms (from whichever gateway publishes them) to the snapshots. */
  async followVoiceEvents() {
    if (this.following) return;
    this.following = true;
    const sub = this.nc.subscribe('live.rooms.*.*.voice.*');
    this.subs.push(sub);
    (async () => {
      for await (const msg of sub) {
        try {
          const seq = Number(msg.headers && msg.headers.get('Nats-Sequence'));
          await this.onVoiceEvent(dec(msg.data), seq);
        } catch (e) {
          console.error('stand-in room-manager: voice event', e);
        }
      }
    })();
  }

  stop() {
    for (const s of this.subs) s.unsubscribe();
    for (const t of this.closers.values()) clearTimeout(t);
  }

  async handle(msg) {
    const kind = msg.subject.split('.').pop();
    try {
      const req = dec(msg.data);
      const ok = await this[`cmd_${kind}`](req);
      msg.respond(enc({ v: 1, ok }));
    } catch (e) {
      const code = e.code || 'internal';
      msg.respond(enc({ v: 1, error: { code, message: e.message } }));
    }
  }

  async simJson(method, path, body) {
    const res = await fetch(`${this.sim}${path}`, { method, headers: { 'content-type': 'application/json' }, body: body && JSON.stringify(body) });
    const text = await res.text();
    if (!res.ok) throw Object.assign(new Error(`${path}: ${res.status} ${text}`), { status: res.status });
    return text ? JSON.parse(text) : {};
  }

  async voiceChannelOf(user) {
    const state = await this.simJson('GET', '/_sim/state');
    for (const g of state.guilds) for (const v of g.voice_states || []) if (v.user_id === user) return v.channel_id;
    return null;
  }

  async publish(room, kind, data) {
    const event = { v: 1, guild: room.guild, room: room.id, received_at: now(), published_at: now(), id: `standin:${randomBytes(8).toString('hex')}`, kind, data };
    const ack = await this.js.publish(`rooms.${room.guild}.${room.id}.${kind}`, enc(event), { msgID: event.id });
    this.apply(room, kind, data, ack.seq);
    return ack.seq;
  }

  apply(room, kind, data, seq) {
    if (seq <= room.seq) return;
    switch (kind) {
      case 'room.member_added':
        if (!room.members.some((m) => m.user.id === data.user.id)) room.members.push({ user: data.user, via: data.via, joined_at: now() });
        break;
      case 'room.member_removed':
        room.members = room.members.filter((m) => m.user.id !== data.user.id);
        break;
      case 'room.closing':
        room.state = 'closing';
        room.closing_deadline = data.deadline;
        break;
      case 'room.closing_cancelled':
        room.state = 'open';
        delete room.closing_deadline;
        break;
      case 'voice.joined':
      case 'voice.updated':
        room.voice = room.voice.filter((v) => v.user.id !== data.user.id);
        room.voice.push({ user: data.user, flags: data.flags || {}, member: room.members.some((m) => m.user.id === data.user.id) });
        room.last_activity = now();
        break;
      case 'voice.left':
        room.voice = room.voice.filter((v) => v.user.id !== data.user.id);
        room.last_activity = now();
        break;
      default:
        break;
    }
    room.seq = seq;
    if (kind !== 'room.deleted') this.kv.put(room.id, enc(room)).catch((e) => console.error('stand-in kv', e));
  }

  async onVoiceEvent(event, seq) {
    const room = this.rooms.get(event.room);
    if (room) {
      this.apply(room, event.kind, event.data, seq);
      if (event.kind === 'voice.joined' && room.state === 'closing') this.cancelClosing(room, event.data.user);
    }
    // A pending placement fires the moment the player connects anywhere in the guild.
    if (event.kind === 'voice.joined') {
      const target = this.pendingMoves.get(event.data.user.id);
      if (target && target !== event.room && this.rooms.has(target)) {
        this.pendingMoves.delete(event.data.user.id);
        await this.simJson('POST', '/_sim/voice/move', { user_id: event.data.user.id, channel_id: target }).catch(() => {});
      } else if (target === event.room) {
        this.pendingMoves.delete(event.data.user.id);
      }
    }
  }

  newInvite(room, ttlMs = 24 * 3600 * 1000) {
    const token = `si.${randomBytes(18).toString('base64url')}`;
    const invite = { token, expires_at: now() + ttlMs };
    this.invites.set(token, { room: room.id, expires_at: invite.expires_at });
    room.invite_expires_at = invite.expires_at;
    return invite;
  }

  /** Test control: an invite for `room` that expired a minute ago. */
  expiredInvite(roomId) {
    const token = `si.${randomBytes(18).toString('base64url')}`;
    this.invites.set(token, { room: roomId, expires_at: now() - 60_000 });
    return token;
  }

  async place(user, room) {
    const channel = await this.voiceChannelOf(user.id);
    if (channel === room.id) return { outcome: 'already_there', channel: room.id };
    if (channel) {
      try {
        await this.simJson('POST', '/_sim/voice/move', { user_id: user.id, channel_id: room.id });
        return { outcome: 'moved', channel: room.id };
      } catch (e) {
        return { outcome: 'failed', code: 'discord_unavailable', message: 'Discord refused the move' };
      }
    }
    this.pendingMoves.set(user.id, room.id);
    return { outcome: 'pending', channel: room.id, channel_url: `https://discord.com/channels/${room.guild}/${room.id}`, expires_at: now() + 10 * 60_000 };
  }

  room(id, requester, { member = true } = {}) {
    const room = this.rooms.get(String(id));
    if (!room) throw new CommandError('room_not_found', 'no such room');
    if (member && !room.members.some((m) => m.user.id === requester.id)) throw new CommandError('not_member', 'not a member of this room');
    return room;
  }

  async cmd_create(req) {
    const user = userRef(req.requester);
    const name = String(req.name || '').trim();
    if (!name || name.length > 100) throw new CommandError('validation', 'name: 1-100 characters');
    const ch = await this.simJson('POST', `/_sim/guilds/${req.guild}/channels`, { name, type: 2, user_limit: 4 });
    const room = {
      id: String(ch.id), guild: String(req.guild), name, owner: user, role: '9', capacity: 4, state: 'open',
      members: [], voice: [], created_at: now(), last_activity: now(), invite_expires_at: 0, seq: 0,
    };
    this.rooms.set(room.id, room);
    const invite = this.newInvite(room);
    await this.publish(room, 'room.created', { name, owner: user, role: room.role, capacity: 4, invite_expires_at: invite.expires_at });
    await this.publish(room, 'room.member_added', { user, via: 'owner' });
    const placement = await this.place(user, room);
    return { room, invite, placement };
  }

  async cmd_join(req) {
    const user = userRef(req.requester);
    const inv = this.invites.get(req.invite);
    if (!inv) throw new CommandError('invite_invalid', 'this invite is not valid');
    if (inv.expires_at <= now()) throw new CommandError('invite_expired', 'this invite has expired');
    const room = this.room(inv.room, user, { member: false });
    if (room.state === 'closing' || room.state === 'deleting') throw new CommandError('room_closing', 'the room is closing');
    if (!room.members.some((m) => m.user.id === user.id)) {
      if (room.members.length >= room.capacity) throw new CommandError('room_full', 'the room is full');
      await this.publish(room, 'room.member_added', { user, via: 'invite' });
    }
    const placement = await this.place(user, room);
    return { room, placement };
  }

  async cmd_get(req) {
    return this.room(req.room, req.requester);
  }

  async cmd_list_mine(req) {
    return { rooms: [...this.rooms.values()].filter((r) => r.members.some((m) => m.user.id === req.requester.id)) };
  }

  async cmd_leave(req) {
    const room = this.room(req.room, req.requester);
    await this.publish(room, 'room.member_removed', { user: userRef(req.requester), reason: 'left' });
    return {};
  }

  async cmd_rotate_invite(req) {
    const room = this.room(req.room, req.requester);
    if (room.owner.id !== req.requester.id) throw new CommandError('not_owner', 'only the owner can do this');
    return this.newInvite(room);
  }

  async cmd_close(req) {
    const room = this.room(req.room, req.requester);
    if (room.owner.id !== req.requester.id) throw new CommandError('not_owner', 'only the owner can close the room');
    await this.deleteRoom(room, 'owner');
    return {};
  }

  async deleteRoom(room, reason) {
    room.state = 'deleting';
    clearTimeout(this.closers.get(room.id));
    await this.simJson('DELETE', `/_sim/channels/${room.id}`).catch(() => {});
    await this.publish(room, 'room.deleted', { reason });
    this.rooms.delete(room.id);
    await this.kv.delete(room.id).catch(() => {});
  }

  /** Test control: the idle scan's warning — delete `room` in `ms` unless someone joins voice. */
  async startClosing(roomId, ms) {
    const room = this.rooms.get(String(roomId));
    await this.publish(room, 'room.closing', { deadline: now() + ms, reason: 'idle' });
    this.closers.set(room.id, setTimeout(() => this.deleteRoom(room, 'idle').catch(() => {}), ms));
  }

  async cancelClosing(room, by) {
    clearTimeout(this.closers.get(room.id));
    this.closers.delete(room.id);
    await this.publish(room, 'room.closing_cancelled', { by });
  }
}

/**
 * A bot on the simulator's gateway that turns VOICE_STATE_UPDATE into voice.joined / voice.left /
 * voice.updated events on the ROOMS stream, as gateway-listener does (no resume, no sharding).
 * Needs a global WebSocket (node --experimental-websocket on Node 20).
 */
export class GatewayStandIn {
  constructor({ nc, sim }) {
    this.js = nc.jetstream();
    this.sim = sim;
    this.voice = new Map(); // user id → {channel, flags}
    this.users = new Map(); // user id → UserRef
    this.seq = null;
  }

  async start() {
    const { url } = await (await fetch(`${this.sim}/api/v10/gateway`)).json();
    this.ws = new WebSocket(`${url}/?v=10&encoding=json`);
    let ready;
    const readyP = new Promise((r) => (ready = r));
    this.ws.onmessage = (m) => {
      const p = JSON.parse(m.data);
      if (p.s) this.seq = p.s;
      if (p.op === 10) {
        this.hb = setInterval(() => this.ws.send(JSON.stringify({ op: 1, d: this.seq })), p.d.heartbeat_interval);
        this.ws.send(JSON.stringify({ op: 2, d: { token: 'sim-bot-token', intents: 1 | (1 << 7), properties: { os: 'linux', browser: 'standin', device: 'standin' } } }));
      } else if (p.op === 0 && p.t === 'GUILD_CREATE') {
        for (const m of p.d.members || []) this.users.set(m.user.id, userRef(m.user));
        for (const v of p.d.voice_states || []) this.voice.set(v.user_id, { channel: v.channel_id, flags: flagsOf(v) });
        ready();
      } else if (p.op === 0 && p.t === 'VOICE_STATE_UPDATE') {
        this.onVoiceState(p.d).catch((e) => console.error('stand-in gateway', e));
      }
    };
    await readyP;
  }

  stop() {
    clearInterval(this.hb);
    if (this.ws) this.ws.close(1000);
  }

  async emit(guild, room, kind, data) {
    const event = { v: 1, guild, room, received_at: now(), published_at: now(), id: `gw-standin:${randomBytes(8).toString('hex')}`, kind, data };
    const h = natsHeaders();
    h.set('Nats-Msg-Id', event.id);
    await this.js.publish(`rooms.${guild}.${room}.${kind}`, enc(event), { headers: h });
  }

  async onVoiceState(d) {
    const user = d.member && d.member.user ? userRef(d.member.user) : this.users.get(d.user_id) || { id: d.user_id, username: 'unknown' };
    const before = this.voice.get(d.user_id);
    const flags = flagsOf(d);
    const to = d.channel_id || null;
    const from = before ? before.channel : null;
    if (to) this.voice.set(d.user_id, { channel: to, flags });
    else this.voice.delete(d.user_id);
    if (from && to && from === to) {
      const changed = Object.keys(flags).filter((k) => flags[k] !== before.flags[k]);
      if (changed.length) await this.emit(d.guild_id, to, 'voice.updated', { user, flags, changed });
      return;
    }
    if (from) await this.emit(d.guild_id, from, 'voice.left', to ? { user, moved_to: to } : { user });
    if (to) await this.emit(d.guild_id, to, 'voice.joined', from ? { user, flags, moved_from: from } : { user, flags });
  }
}

function flagsOf(v) {
  return {
    mute: !!v.mute, deaf: !!v.deaf, self_mute: !!v.self_mute, self_deaf: !!v.self_deaf,
    self_stream: !!v.self_stream, self_video: !!v.self_video, suppress: !!v.suppress,
  };
}
