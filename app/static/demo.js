// The demo chat page of hearth: login, rooms, messages, presence and live status, on hearth.js.

import { HearthClient, getJson, login } from './hearth.js';

/** The login of this tab (sessionStorage: survives a reload, not shared with other tabs). */
const SESSION_KEY = 'hearth.session.v1';
/** The room this tab last looked at. */
const ROOM_KEY = 'hearth.room.v1';

const $ = (id) => document.getElementById(id);

/** @type {HearthClient|null} */
let client = null;
let session = null;
let currentRoom = null;
let countdown = null;
let renderQueued = false;

function loadSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? 'null');
    if (saved && saved.token && Date.parse(saved.expires_at) > Date.now()) return saved;
  } catch {
    /* unreadable: log in again */
  }
  return null;
}

function showLogin(message = '') {
  $('chat-view').hidden = true;
  $('logout').hidden = true;
  $('whoami').hidden = true;
  $('login-view').hidden = false;
  $('login-error').textContent = message;
  $('username').focus();
}

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const button = event.target.querySelector('button');
  button.disabled = true;
  $('login-error').textContent = '';
  try {
    const answer = await login($('username').value.trim(), $('password').value);
    session = { token: answer.token, username: answer.user.username, expires_at: answer.expires_at };
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    $('password').value = '';
    startChat();
  } catch (err) {
    $('login-error').textContent = err.code === 'RATE_LIMIT_EXCEEDED'
      ? `Too many attempts; try again in ${err.retryAfter ?? 60} s.`
      : err.code === 'AUTH_FAILED' ? 'Wrong username or password.' : `Login failed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
});

$('logout').addEventListener('click', async () => {
  const token = session?.token;
  endChat();
  sessionStorage.removeItem(SESSION_KEY);
  showLogin();
  if (token) {
    await fetch('/api/v1/auth/logout', { method: 'POST', headers: { Authorization: `Bearer ${token}` } })
      .catch(() => {});
  }
});

function endChat() {
  client?.close();
  client = null;
  session = null;
  clearInterval(countdown);
}

function startChat() {
  $('login-view').hidden = true;
  $('chat-view').hidden = false;
  $('whoami').hidden = false;
  $('whoami').textContent = session.username;
  $('logout').hidden = false;
  client = new HearthClient({ token: session.token, username: session.username });
  client.on('stateChange', showConnection);
  client.on('transport', () => showConnection({ state: client.state, retryAt: client.retryAt }));
  client.on('message', ({ room }) => room === currentRoom && queueRender());
  client.on('presence', ({ room }) => room === currentRoom && renderPresence());
  client.on('status', renderStatus);
  client.on('degraded', renderDegraded);
  client.on('error', onError);
  client.on('reconnect', () => {
    $('error-banner').hidden = true;
  });
  // Every time the connection is ready (the first time too): a list that could not load
  // before (the database away, the token not yet vouched for) loads now.
  client.on('stateChange', ({ state }) => state === 'ready' && loadRooms());
  client.on('disconnect', markStatusStale);
  for (const feed of document.querySelectorAll('[data-feed]')) {
    client.subscribeStatus(feed.dataset.feed);
  }
  client.connect();
  const wanted = localStorage.getItem(ROOM_KEY) || 'lobby';
  selectRoom(wanted);
}

async function loadRooms() {
  if (!session) return;
  let rooms;
  try {
    rooms = (await getJson('/api/v1/rooms', session.token)).rooms;
  } catch (err) {
    if (err.code === 'AUTH_FAILED' || err.code === 'AUTH_REQUIRED') {
      sessionExpired();
    }
    return; // offline or the database is away: keep the list shown
  }
  const list = $('room-list');
  list.replaceChildren(...rooms.map((room) => {
    const item = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = room.private ? `# ${room.name} (private)` : `# ${room.name}`;
    button.dataset.room = room.name;
    button.addEventListener('click', () => selectRoom(room.name));
    item.append(button);
    return item;
  }));
  markCurrentRoom();
}

function markCurrentRoom() {
  for (const button of document.querySelectorAll('#room-list [data-room]')) {
    button.classList.toggle('current', button.dataset.room === currentRoom);
  }
}

async function selectRoom(name) {
  if (!client) return;
  if (currentRoom && currentRoom !== name) client.leave(currentRoom);
  currentRoom = name;
  localStorage.setItem(ROOM_KEY, name);
  $('room-title').textContent = `# ${name}`;
  $('presence-room').textContent = `in #${name}`;
  $('message-input').disabled = false;
  $('send').disabled = false;
  markCurrentRoom();
  queueRender();
  renderPresence();
  try {
    await client.join(name);
  } catch (err) {
    if (err.code !== 'DISCONNECTED') showError(`Cannot join #${name}: ${err.message}`);
  }
}

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('join-name').value.trim();
  if (name) selectRoom(name);
  $('join-name').value = '';
});

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = $('message-input');
  const content = input.value;
  if (!client || !currentRoom || !content.trim()) return;
  client.publish(currentRoom, content);
  input.value = '';
  input.focus();
});

const MARKS = {
  pending: (ready) => (ready ? 'sending…' : 'waiting for connection'),
  queued: () => 'queued on the server',
  failed: () => 'failed',
  sent: () => '✓',
};

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderMessages();
  });
}

function renderMessages() {
  const list = $('messages');
  if (!client || !currentRoom) {
    list.replaceChildren();
    return;
  }
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const ready = client.state === 'ready';
  list.replaceChildren(...client.messages(currentRoom).map((message) => {
    const item = document.createElement('li');
    item.className = `message ${message.mine ? 'mine' : ''}`;
    item.dataset.state = message.state;
    item.dataset.id = message.id ?? '';
    item.dataset.seq = message.seq ?? '';
    item.dataset.clientMsgId = message.client_msg_id ?? '';
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = message.from;
    const content = document.createElement('span');
    content.className = 'content';
    content.textContent = message.content ?? 'message could not be decrypted';
    const mark = document.createElement('span');
    mark.className = 'mark';
    mark.textContent = MARKS[message.state](ready);
    if (message.error) mark.title = `${message.error.code}: ${message.error.text}`;
    if (message.state === 'failed' && message.error) mark.textContent = `failed: ${message.error.text}`;
    const time = document.createElement('time');
    time.dateTime = message.ts;
    time.textContent = new Date(message.ts).toLocaleTimeString();
    item.append(from, time, mark, content);
    return item;
  }));
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function renderPresence() {
  const users = client && currentRoom ? client.presence(currentRoom) : [];
  $('presence-list').replaceChildren(...users.map((user) => {
    const item = document.createElement('li');
    item.textContent = user;
    return item;
  }));
}

function showConnection({ state, retryAt }) {
  const indicator = $('connection');
  indicator.dataset.state = state;
  // On the fallback (WebSocket blocked on the way, e.g. by a proxy) the page works the same.
  const fallback = client?.transport === 'sse';
  indicator.dataset.transport = client?.transport ?? '';
  indicator.title = fallback
    ? 'WebSocket is blocked on the way to the server; using Server-Sent Events and HTTP instead'
    : '';
  clearInterval(countdown);
  const texts = {
    connecting: 'connecting…', authenticating: 'signing in…',
    ready: fallback ? 'connected (fallback)' : 'connected', closed: 'offline',
  };
  const update = () => {
    if (state !== 'reconnecting') {
      $('connection-text').textContent = texts[state];
    } else if (retryAt === null || !navigator.onLine) {
      $('connection-text').textContent = 'offline; reconnecting when the network is back';
    } else {
      const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      $('connection-text').textContent = seconds > 0 ? `reconnecting in ${seconds} s` : 'reconnecting…';
    }
  };
  update();
  if (state === 'reconnecting') countdown = setInterval(update, 250);
  queueRender(); // pending marks say whether a connection is there
}

function renderDegraded({ components }) {
  const troubled = Object.entries(components).filter(([, state]) => state !== 'connected');
  const banner = $('degraded-banner');
  banner.hidden = troubled.length === 0;
  const meaning = { database: 'messages are kept and stored once it is back',
    redis: 'only users on this server are reached' };
  banner.textContent = troubled
    .map(([component, state]) => `Server degraded: ${component} ${state}; ${meaning[component] ?? 'some features are limited'}.`)
    .join(' ');
}

function sessionExpired() {
  endChat();
  sessionStorage.removeItem(SESSION_KEY);
  showLogin('Your session ended; please log in again.');
}

function onError(error) {
  if (error.code === 'AUTH_FAILED' || error.code === 'AUTH_REQUIRED') {
    sessionExpired();
  } else if (error.code === 'SERVER_SHUTDOWN') {
    showError('The server is restarting; reconnecting shortly.');
  } else if (error.code === 'SLOW_CLIENT') {
    showError('This tab is falling behind; it will catch up.');
  } else if (!error.source && error.severity !== 'info') {
    showError(`${error.message}${error.trace_id ? ` (trace ${error.trace_id})` : ''}`);
  }
}

let errorTimer = null;

function showError(text) {
  const banner = $('error-banner');
  banner.textContent = text;
  banner.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { banner.hidden = true; }, 8000);
}

function renderStatus(update) {
  const card = document.querySelector(`[data-feed="${CSS.escape(update.source)}"]`);
  if (!card) return;
  card.dataset.stale = String(update.is_stale);
  card.querySelector('.badge.stale').hidden = !update.is_stale;
  card.querySelector('.badge.fresh').hidden = update.is_stale;
  const when = update.cached_at ? new Date(update.cached_at).toLocaleTimeString() : 'never';
  card.querySelector('.feed-meta').textContent = update.is_stale
    ? `${update.error?.message ?? 'upstream unavailable'}; data from ${when}`
    : `updated ${when}`;
  const rows = [];
  flatten(update.value, '', rows);
  card.querySelector('.feed-value').replaceChildren(...rows.flatMap(([key, value]) => {
    const term = document.createElement('dt');
    term.textContent = key;
    const detail = document.createElement('dd');
    detail.textContent = value;
    return [term, detail];
  }));
}

function markStatusStale() {
  // What the panel shows now is only what this tab had cached: say so until fresh data.
  for (const card of document.querySelectorAll('[data-feed][data-stale=false]')) {
    card.dataset.stale = 'true';
    card.querySelector('.badge.stale').hidden = false;
    card.querySelector('.badge.fresh').hidden = true;
    card.querySelector('.feed-meta').textContent = 'connection lost; showing the last data received';
  }
}

function flatten(value, prefix, rows) {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, rows);
  } else if (prefix) {
    rows.push([prefix, Array.isArray(value) ? value.map((v) => JSON.stringify(v)).join(', ') : String(value)]);
  }
}

session = loadSession();
if (session) startChat();
else showLogin();
