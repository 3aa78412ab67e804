// The players' page: start (log in, create a room), invite links, and the live room view.
// Plain ES module over the client module /js/voicerooms.js; no framework, no build step.
// Every user-supplied string goes into the DOM as text (never as HTML).
//
// Routes (all served by the edge as this same page):
//   /                  start: log in, create a room, my rooms, messages (e.g. "room closed")
//   /invite/<token>    join by invite (log in first, then back here), then the room
//   /rooms/<id>        the room: live members, placement, dropout dialog, closing banner

import {
  ApiClient,
  STATE,
  VoiceroomsClient,
  avatarUrl,
  displayName,
  loginUrl,
} from '/js/voicerooms.js';

const main = document.getElementById('main');
const connEl = document.getElementById('conn');
const whoEl = document.getElementById('who');
const api = new ApiClient();

// ---- small DOM helpers -------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

/** Moves focus to the first heading of the new view, so keyboard and reader users follow. */
function focusHeading() {
  const h1 = main.querySelector('h1');
  if (h1) {
    h1.setAttribute('tabindex', '-1');
    h1.focus();
  }
}

function avatar(user) {
  const name = displayName(user);
  let hue = 0;
  for (const ch of user.id) hue = (hue * 31 + ch.charCodeAt(0)) % 360;
  hue = (hue * 137) % 360; // spread ids that differ only in their last digit
  const el = h('span', { class: 'avatar', style: `background: hsl(${hue} 45% 38%)`, 'aria-hidden': 'true' }, name.slice(0, 1).toUpperCase());
  const url = avatarUrl(user);
  if (url) {
    const img = h('img', { src: url, alt: '', loading: 'lazy', referrerpolicy: 'no-referrer' });
    img.addEventListener('error', () => img.remove());
    el.append(img);
  }
  return el;
}

const flashKey = 'vr.flash';
function setFlash(text) {
  sessionStorage.setItem(flashKey, text);
}
function takeFlash() {
  const text = sessionStorage.getItem(flashKey);
  sessionStorage.removeItem(flashKey);
  return text;
}

const inviteKey = (room) => `vr.invite.${room}`;
const placementKey = (room) => `vr.placement.${room}`;

function seconds(ms) {
  return Math.max(0, Math.ceil(ms / 1000));
}

// ---- session -----------------------------------------------------------------------------

let me = null;

async function loadMe() {
  try {
    const answer = await api.me();
    me = answer.user;
  } catch (e) {
    if (e.code !== 'unauthorized') throw e;
    me = null;
  }
  whoEl.replaceChildren();
  if (me) {
    whoEl.append(avatar(me), h('span', { 'data-testid': 'me' }, displayName(me)),
      h('button', { type: 'button', onclick: logout }, 'Log out'));
  }
  return me;
}

async function logout() {
  try {
    await api.logout();
  } finally {
    location.assign('/');
  }
}

function here() {
  return location.pathname + location.search;
}

function loginPanel(text) {
  return h('section', { class: 'panel' },
    h('p', {}, text),
    h('a', { class: 'button primary', href: loginUrl(here()), 'data-testid': 'login' }, 'Log in with Discord'));
}

// ---- start page --------------------------------------------------------------------------

async function startPage() {
  const flash = takeFlash();
  const nodes = [h('h1', {}, 'Game rooms with live Discord voice')];
  if (flash) nodes.push(h('div', { class: 'flash', role: 'status', 'data-testid': 'flash' }, flash));
  if (!me) {
    nodes.push(loginPanel('Log in with Discord to create a room or join one.'));
    show(...nodes);
    focusHeading();
    return;
  }
  const input = h('input', { type: 'text', id: 'room-name', name: 'name', required: true, maxlength: '100', autocomplete: 'off', placeholder: 'Friday raid' });
  const status = h('p', { role: 'status', 'aria-live': 'polite', class: 'muted' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create room');
  const form = h('form', { class: 'panel', 'aria-labelledby': 'create-title' },
    h('h2', { id: 'create-title' }, 'Create a room'),
    h('label', { for: 'room-name' }, 'Room name'), input,
    h('div', { class: 'row' }, submit), status);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const name = input.value.trim();
    if (!name) {
      status.textContent = 'Give the room a name.';
      input.focus();
      return;
    }
    submit.disabled = true;
    status.textContent = 'Creating the room and its voice channel…';
    try {
      const created = await api.createRoom(name, crypto.randomUUID());
      sessionStorage.setItem(inviteKey(created.room.id), created.invite.token);
      sessionStorage.setItem(placementKey(created.room.id), JSON.stringify(created.placement));
      navigate(`/rooms/${created.room.id}`);
    } catch (e) {
      status.textContent = errorText(e);
      submit.disabled = false;
    }
  });
  nodes.push(form);
  const list = h('div', { class: 'panel rooms', 'aria-labelledby': 'mine-title' }, h('h2', { id: 'mine-title' }, 'Your rooms'));
  nodes.push(list);
  show(...nodes);
  focusHeading();
  try {
    const { rooms } = await api.listRooms();
    if (!rooms.length) list.append(h('p', { class: 'empty' }, 'No rooms yet.'));
    for (const r of rooms) list.append(h('a', { href: `/rooms/${r.id}` }, r.name));
  } catch (e) {
    list.append(h('p', { class: 'muted' }, `Your rooms could not be listed: ${errorText(e)}`));
  }
}

function errorText(e) {
  const texts = {
    network: 'The server could not be reached. Check your connection and try again.',
    unavailable: 'The room service is not available right now. Try again in a moment.',
    timeout: 'The room service took too long to answer. Try again.',
    rate_limited: 'Too many requests: wait a moment and try again.',
    room_limit_reached: 'You already have as many rooms as allowed. Close one first.',
    discord_unavailable: 'Discord is not answering right now. Try again in a moment.',
    validation: e.message,
  };
  return texts[e.code] || e.message || e.code;
}

// ---- invite ------------------------------------------------------------------------------

async function invitePage(token) {
  if (!me) {
    show(h('h1', {}, 'You are invited to a game room'), loginPanel('Log in with Discord to join the room and its voice channel.'));
    focusHeading();
    return;
  }
  show(h('h1', {}, 'Joining the room…'), h('p', { role: 'status', class: 'muted' }, 'Checking the invite and placing you in voice.'));
  try {
    const joined = await api.joinRoom(token);
    sessionStorage.setItem(inviteKey(joined.room.id), token);
    sessionStorage.setItem(placementKey(joined.room.id), JSON.stringify(joined.placement));
    navigate(`/rooms/${joined.room.id}`, { replace: true });
  } catch (e) {
    inviteProblem(e, token);
  }
}

function inviteProblem(e, token) {
  const home = h('a', { class: 'button primary', href: '/' }, 'Create your own room');
  const states = {
    room_full: ['This room is full', 'All four places in this room are taken. Ask the owner to make room, or start your own.'],
    invite_expired: ['This invite has expired', 'Invites last 24 hours. Ask the room owner for a new link.'],
    invite_invalid: ['This invite link is not valid', 'The link may be incomplete or changed. Ask the room owner to send it again.'],
    invite_wrong_room: ['This invite link is not valid', 'The link does not belong to this room. Ask the room owner to send it again.'],
    validation: ['This invite link is not valid', 'The link may be incomplete or changed. Ask the room owner to send it again.'],
    room_not_found: ['This room no longer exists', 'It was closed. Start your own room instead.'],
    room_closing: ['This room is closing', 'It is about to be deleted. Start your own room instead.'],
  };
  const [title, text] = states[e.code] || ['The room could not be joined', errorText(e)];
  const retry = states[e.code] ? null : h('button', { type: 'button', onclick: () => invitePage(token) }, 'Try again');
  show(h('section', { class: 'panel bad', 'data-testid': 'invite-problem', 'data-code': e.code },
    h('h1', {}, title), h('p', {}, text), h('div', { class: 'row' }, home, retry)));
  focusHeading();
}

// ---- room --------------------------------------------------------------------------------

let current = null; // the room view's state, torn down on navigation

function connIndicator(client) {
  let timer = null;
  const draw = () => {
    clearTimeout(timer);
    connEl.hidden = false;
    connEl.dataset.state = client.state;
    connEl.replaceChildren();
    switch (client.state) {
      case STATE.LIVE:
        connEl.append('Connected');
        break;
      case STATE.RECONNECTING: {
        const left = seconds(client.nextAttemptAt - Date.now());
        connEl.append(`Reconnecting in ${left} s (attempt ${client.attempt})`);
        connEl.append(h('button', { type: 'button', onclick: () => client.retryNow() }, 'Retry now'));
        timer = setTimeout(draw, 250);
        break;
      }
      case STATE.LOGIN_REQUIRED:
        connEl.append('Signed out');
        break;
      case STATE.FAILED:
        connEl.append('Not connected');
        break;
      case STATE.CLOSED:
        connEl.hidden = true;
        break;
      default:
        connEl.append('Connecting…');
    }
  };
  client.on('state', draw);
  draw();
  return () => clearTimeout(timer);
}

function placementPanel(placement, room) {
  if (!placement) return null;
  const box = h('section', { class: 'panel', 'data-testid': 'placement', 'data-outcome': placement.outcome, 'aria-live': 'polite' });
  switch (placement.outcome) {
    case 'moved':
      box.classList.add('ok');
      box.append(h('p', {}, 'You were moved into the room’s voice channel.'));
      break;
    case 'already_there':
      box.classList.add('ok');
      box.append(h('p', {}, 'You are in the room’s voice channel.'));
      break;
    case 'pending':
      box.classList.add('warn');
      box.append(
        h('p', {}, 'You are not connected to voice in Discord, so we cannot move you yet. Click to connect — or connect to any voice channel of the server and we will move you in automatically.'),
        h('div', { class: 'row' }, h('a', { class: 'button primary', href: safeDiscordUrl(placement.channel_url, room), target: '_blank', rel: 'noopener noreferrer' }, 'Connect to voice in Discord')));
      break;
    case 'failed':
      box.classList.add('bad');
      box.append(
        h('p', {}, `You joined the room, but we could not put you in voice: ${placement.message}`),
        h('div', { class: 'row' }, h('button', { type: 'button', class: 'primary', onclick: () => placeAgain(room, box) }, 'Retry')));
      break;
    default:
      return null;
  }
  return box;
}

function safeDiscordUrl(url, room) {
  if (typeof url === 'string' && /^(https:\/\/|discord:\/\/)/.test(url)) return url;
  return `https://discord.com/channels/${room.guild}/${room.id}`;
}

/** Asks room-manager to place the player again (a repeated join with the room's invite). */
async function placeAgain(room, replace) {
  const token = sessionStorage.getItem(inviteKey(room.id));
  const out = (placement) => {
    const panel = placementPanel(placement, room);
    if (panel && replace && replace.isConnected) replace.replaceWith(panel);
    return placement;
  };
  if (!token) {
    return out({ outcome: 'pending', channel_url: null, expires_at: 0 });
  }
  try {
    const joined = await api.joinRoom(token);
    return out(joined.placement);
  } catch (e) {
    return out({ outcome: 'failed', code: e.code, message: errorText(e) });
  }
}

function memberItem(entry) {
  const badges = [];
  if (entry.inVoice) badges.push(h('span', { class: 'badge voice' }, 'in voice'));
  if (entry.direct) badges.push(h('span', { class: 'badge direct', title: 'Joined the channel directly in Discord' }, 'joined in Discord'));
  if (entry.owner) badges.push(h('span', { class: 'badge' }, 'owner'));
  if (entry.flags && (entry.flags.self_mute || entry.flags.mute)) badges.push(h('span', { class: 'badge' }, 'muted'));
  return h('li', { class: entry.inVoice ? 'in-voice' : '', 'data-user': entry.user.id, 'data-voice': entry.inVoice ? 'yes' : 'no' },
    avatar(entry.user), h('span', { class: 'name' }, displayName(entry.user)), ...badges);
}

function roomPage(roomId) {
  if (!me) {
    show(h('h1', {}, 'Log in to see this room'), loginPanel('This room is private: log in with Discord to see it.'));
    focusHeading();
    return;
  }
  const title = h('h1', {}, 'Room');
  const banner = h('div', { class: 'banner', role: 'alert', hidden: true, 'data-testid': 'closing-banner' });
  const notice = h('div', { 'data-testid': 'notice' });
  const voiceList = h('ul', { class: 'members', 'aria-labelledby': 'voice-title', 'data-testid': 'voice-list' });
  const roomList = h('ul', { class: 'members', 'aria-labelledby': 'idle-title', 'data-testid': 'idle-list' });
  const count = h('span', { class: 'muted' });
  const invite = h('section', { class: 'panel', 'aria-labelledby': 'invite-title', hidden: true });
  const owner = h('div', { class: 'row' });
  let placement = null;
  try {
    placement = JSON.parse(sessionStorage.getItem(placementKey(roomId)) || 'null');
  } catch (_) {
    placement = null;
  }
  sessionStorage.removeItem(placementKey(roomId));
  const placementSlot = h('div');
  show(title, banner, notice, placementSlot,
    h('section', { class: 'panel', 'aria-labelledby': 'voice-title' }, h('h2', { id: 'voice-title' }, 'In voice ', count), voiceList),
    h('section', { class: 'panel', 'aria-labelledby': 'idle-title' }, h('h2', { id: 'idle-title' }, 'In the room, not in voice'), roomList),
    invite, owner);
  focusHeading();

  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const client = new VoiceroomsClient({ url: `${proto}//${location.host}/ws`, room: roomId });
  // Test hook and debugging aid: the client holds no secret (the session cookie is HttpOnly).
  window.voiceroomsClient = client;
  const stopIndicator = connIndicator(client);
  let wasInVoice = null;
  let countdown = null;
  let drawnOnce = false;

  const drawBanner = (model) => {
    clearInterval(countdown);
    if (model.state !== 'closing' || !model.closingDeadline) {
      banner.hidden = true;
      return;
    }
    const tick = () => {
      banner.hidden = false;
      banner.textContent = `This room closes in ${seconds(model.closingDeadline - Date.now())} s because nobody is in voice. Join voice to keep it.`;
    };
    tick();
    countdown = setInterval(tick, 1000);
  };

  const drawInvite = (model) => {
    const token = sessionStorage.getItem(inviteKey(roomId));
    const isOwner = model.owner && model.owner.id === me.id;
    if (!token && !isOwner) {
      invite.hidden = true;
      return;
    }
    invite.hidden = false;
    invite.replaceChildren(h('h2', { id: 'invite-title' }, 'Invite link'));
    if (token) {
      const link = `${location.origin}/invite/${encodeURIComponent(token)}`;
      const copied = h('span', { role: 'status', 'aria-live': 'polite', class: 'muted' });
      invite.append(h('code', { class: 'invite', 'data-testid': 'invite-link' }, link),
        h('div', { class: 'row' },
          h('button', { type: 'button', onclick: async () => {
            try {
              await navigator.clipboard.writeText(link);
              copied.textContent = 'Copied.';
            } catch (_) {
              copied.textContent = 'Copy failed: select the link and copy it.';
            }
          } }, 'Copy invite link'), copied));
    }
    if (isOwner) {
      invite.append(h('div', { class: 'row' }, h('button', { type: 'button', onclick: async () => {
        try {
          const fresh = await api.rotateInvite(roomId);
          sessionStorage.setItem(inviteKey(roomId), fresh.token);
          drawInvite(model);
        } catch (e) {
          invite.append(h('p', { class: 'muted' }, errorText(e)));
        }
      } }, token ? 'New link (old ones stop working)' : 'Get an invite link')));
    }
  };

  const drawOwner = (model) => {
    owner.replaceChildren();
    if (!model.owner || model.owner.id !== me.id) return;
    const close = h('button', { type: 'button', class: 'danger', onclick: () => {
      owner.replaceChildren(h('span', {}, 'Close the room for everyone? Its voice channel is deleted.'),
        h('button', { type: 'button', class: 'danger', 'data-testid': 'confirm-close', onclick: async (ev) => {
          ev.target.disabled = true;
          try {
            await api.closeRoom(roomId);
          } catch (e) {
            owner.append(h('p', { class: 'muted' }, errorText(e)));
          }
        } }, 'Yes, close it'),
        h('button', { type: 'button', onclick: () => drawOwner(model) }, 'Cancel'));
      owner.querySelector('[data-testid=confirm-close]').focus();
    } }, 'Close room');
    owner.append(close);
  };

  const draw = (model) => {
    title.textContent = model.name || 'Room';
    document.title = `${model.name} · voicerooms`;
    const list = model.list();
    const inVoice = list.filter((e) => e.inVoice);
    const idle = list.filter((e) => !e.inVoice);
    voiceList.replaceChildren(...(inVoice.length ? inVoice.map(memberItem) : [h('li', { class: 'empty' }, 'Nobody is in voice.')]));
    roomList.replaceChildren(...(idle.length ? idle.map(memberItem) : [h('li', { class: 'empty' }, 'Everyone is in voice.')]));
    count.textContent = `(${inVoice.length}/${model.capacity || 4})`;
    drawBanner(model);
    if (!drawnOnce) {
      drawnOnce = true;
      drawInvite(model);
      drawOwner(model);
      const panel = placementPanel(placement, { id: roomId, guild: model.guild || guildOf(model) });
      if (panel) placementSlot.replaceChildren(panel);
    }
    const nowIn = model.inVoice(me.id);
    if (wasInVoice === true && !nowIn && model.state !== 'deleted') openDropout({ id: roomId, guild: guildOf(model), name: model.name });
    if (nowIn && dropout.open) dropout.close();
    if (nowIn) placementSlot.querySelector('[data-outcome=pending]')?.replaceWith(placementPanel({ outcome: 'already_there' }, {}));
    wasInVoice = nowIn;
  };

  client.on('room', draw);
  client.on('event', (frame) => {
    if (frame.event === 'room.deleted') {
      const why = { owner: 'the owner closed it', idle: 'nobody was in voice for an hour', channel_deleted: 'its voice channel was deleted' }[frame.payload.reason] || 'it was closed';
      setFlash(`The room “${client.model.name}” was closed: ${why}.`);
      navigate('/');
    }
  });
  client.on('error', (err) => {
    if (client.state === STATE.LOGIN_REQUIRED || err.loginUrl) {
      notice.replaceChildren(h('div', { class: 'panel bad', role: 'alert' },
        h('p', {}, { session_expired: 'Your session expired.', session_ended: 'You were signed out (logged out elsewhere).' }[err.code] || 'You are signed out.'),
        h('a', { class: 'button primary', href: err.loginUrl || loginUrl(here()) }, 'Log in again')));
    } else if (['not_member', 'room_not_found', 'room_deleted'].includes(err.code)) {
      const text = {
        not_member: 'You are not a member of this room (any more). Open its invite link to join.',
        room_not_found: 'This room does not exist (any more).',
        room_deleted: 'This room was closed.',
      }[err.code];
      notice.replaceChildren(h('div', { class: 'panel bad', role: 'alert', 'data-testid': 'room-problem', 'data-code': err.code },
        h('p', {}, text),
        h('a', { class: 'button primary', href: '/' }, 'Back to the start page')));
    }
  });
  client.on('state', ({ state }) => {
    if (state === STATE.LIVE) notice.replaceChildren();
  });
  client.start();
  current = {
    stop() {
      clearInterval(countdown);
      stopIndicator();
      client.stop();
      connEl.hidden = true;
    },
  };
}

function guildOf(model) {
  return model.guild || '';
}

// ---- the dropout dialog -------------------------------------------------------------------

const dropout = document.getElementById('dropout');
const dropoutResult = document.getElementById('dropout-result');
let dropoutRoom = null;
let lastFocus = null;

function openDropout(room) {
  dropoutRoom = room;
  dropoutResult.replaceChildren();
  if (dropout.open) return;
  lastFocus = document.activeElement;
  dropout.showModal();
  document.getElementById('rejoin').focus();
}

document.getElementById('rejoin').addEventListener('click', async () => {
  const btn = document.getElementById('rejoin');
  btn.disabled = true;
  dropoutResult.textContent = 'Putting you back…';
  const placement = await placeAgain(dropoutRoom, null);
  btn.disabled = false;
  dropoutResult.replaceChildren();
  if (placement.outcome === 'moved' || placement.outcome === 'already_there') {
    dropoutResult.textContent = 'You are back in voice.';
  } else if (placement.outcome === 'pending') {
    dropoutResult.append('You are not connected to voice in Discord. ',
      h('a', { href: safeDiscordUrl(placement.channel_url, dropoutRoom), target: '_blank', rel: 'noopener noreferrer', 'data-testid': 'channel-link' }, 'Connect to the channel'),
      ' — we move you in as soon as you connect.');
  } else {
    dropoutResult.textContent = `That did not work: ${placement.message}. Try again.`;
  }
});
document.getElementById('dropout-dismiss').addEventListener('click', () => dropout.close());
dropout.addEventListener('close', () => {
  if (lastFocus && lastFocus.isConnected) lastFocus.focus();
});

// ---- routing -----------------------------------------------------------------------------

function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  route();
}

async function route() {
  if (current) current.stop();
  current = null;
  if (dropout.open) dropout.close();
  const path = location.pathname;
  let m;
  try {
    await loadMe();
  } catch (e) {
    show(h('h1', {}, 'voicerooms is not reachable'), h('p', {}, errorText(e)),
      h('button', { type: 'button', onclick: route }, 'Try again'));
    return;
  }
  if ((m = path.match(/^\/invite\/([^/]+)$/))) return invitePage(decodeURIComponent(m[1]));
  if ((m = path.match(/^\/rooms\/(\d{1,20})$/))) return roomPage(m[1]);
  return startPage();
}

window.addEventListener('popstate', route);
route();
