// hearth.js: the browser SDK of hearth. A plain ES module: no build step, no dependencies.
//
// It keeps one WebSocket to /ws alive (reconnecting with full-jitter backoff and the
// server's hints), re-authenticates, re-subscribes, recovers every room from the last seq
// it saw, drops duplicates, tracks the state of each publish and keeps unsent publishes in
// localStorage so a reload loses nothing. Where WebSocket is blocked (a proxy refusing the
// Upgrade) it falls back to Server-Sent Events down and HTTP POST up (SseSocket), the same
// protocol behind the same interface. docs/protocol.rst is the wire contract.

/**
 * @typedef {'connecting'|'authenticating'|'ready'|'reconnecting'|'closed'} ConnectionState
 *
 * @typedef {'websocket'|'sse'} Transport
 *   websocket: one WebSocket to /ws; sse: the fallback, an EventSource on /sse for what the
 *   server sends and a POST to /api/v1/rpc for each request.
 *
 * @typedef {'pending'|'sent'|'queued'|'failed'} MessageState
 *   pending: not acknowledged yet (offline, or waiting for the reply); sent: stored (200);
 *   queued: spooled by the server (202), stored later; failed: refused (4xx) or 5xx
 *   retries exhausted.
 *
 * @typedef {object} ChatMessage
 * @property {string|null} id        server message id (null until acknowledged)
 * @property {string} room           room name
 * @property {number|null} seq       position in the room (null while pending or spooled)
 * @property {string} from           sender's username
 * @property {string|null} content   the text (null when it could not be decrypted)
 * @property {string} ts             ISO-8601 time
 * @property {string|null} client_msg_id  the sender's idempotency key
 * @property {string[]} flags
 * @property {MessageState} state
 * @property {boolean} mine          sent by this user
 * @property {{code: string, text: string, trace_id?: string}|null} error  why it failed
 *
 * @typedef {object} StatusUpdate
 * @property {string} source
 * @property {any} value
 * @property {boolean} is_stale
 * @property {string|null} cached_at
 * @property {{code: string, message: string, severity: string}|undefined} error
 *
 * @typedef {object} BackoffOptions
 * @property {number} [initialMs=1000]  first ceiling
 * @property {number} [factor=1.5]      growth per attempt
 * @property {number} [maxMs=30000]     largest ceiling
 *
 * @typedef {object} StorageLike
 * @property {(key: string) => string|null} getItem
 * @property {(key: string, value: string) => void} setItem
 * @property {(key: string) => void} removeItem
 *
 * @typedef {object} ClientOptions
 * @property {string} token            login token (see {@link login})
 * @property {string} username         the token's user; keys the offline queue
 * @property {string} [url]            WebSocket URL; default ws(s)://<this host>/ws
 * @property {string} [baseUrl]        HTTP base of the fallback's /sse and /api/v1 calls;
 *   default the origin (and path) of *url*
 * @property {number} [wsOpenTimeoutMs=4000]  a WebSocket not open by then counts as blocked
 * @property {BackoffOptions} [backoff]
 * @property {() => number} [random]   source of jitter in [0, 1); default Math.random
 * @property {StorageLike|null} [storage]  where unsent publishes live; default localStorage
 * @property {number} [requestTimeoutMs=10000]  a request without a reply by then fails
 * @property {number} [silenceTimeoutMs=35000]  no frame for this long: the link is dead
 * @property {number} [historyLimit=50]  messages loaded when a room is first joined
 */

/** Reconnect backoff defaults: 1 s, ×1.5 per attempt, at most 30 s. */
export const BACKOFF = Object.freeze({ initialMs: 1000, factor: 1.5, maxMs: 30000 });

/** Retries of a publish answered 5xx (or not at all) before it is marked failed. */
export const PUBLISH_RETRIES = 3;

/**
 * The backoff ceiling of reconnect *attempt* (1 for the first): initial × factor^(n-1),
 * capped at max.
 * @param {number} attempt
 * @param {BackoffOptions} [options]
 * @returns {number} milliseconds
 */
export function backoffCeiling(attempt, options = {}) {
  const { initialMs, factor, maxMs } = { ...BACKOFF, ...options };
  const n = Math.max(1, Math.floor(attempt));
  return Math.min(maxMs, initialMs * factor ** (n - 1));
}

/**
 * The delay before reconnect *attempt*: full jitter (uniform in [0, ceiling)), never less
 * than *floorMs* (a server hint such as retry_after or reconnect_after_ms).
 * @param {number} attempt
 * @param {BackoffOptions & {random?: () => number, floorMs?: number}} [options]
 * @returns {number} milliseconds, an integer
 */
export function backoffDelay(attempt, options = {}) {
  const random = options.random ?? Math.random;
  const jittered = Math.floor(random() * backoffCeiling(attempt, options));
  return Math.max(jittered, Math.ceil(options.floorMs ?? 0));
}

/**
 * A fresh trace id (16 hex characters) for one request.
 * @returns {string}
 */
export function newTraceId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** A fresh client_msg_id: unique per user, printable ASCII. */
function newClientMsgId() {
  return `m-${Date.now().toString(36)}-${newTraceId()}`;
}

/** An error from hearth: `code` is the protocol's error code, `status` the ctrl code. */
export class HearthError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{status?: number, traceId?: string, retryAfter?: number}} [details]
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'HearthError';
    /** @type {string} */
    this.code = code;
    /** @type {number|undefined} */
    this.status = details.status;
    /** @type {string|undefined} */
    this.traceId = details.traceId;
    /** @type {number|undefined} seconds */
    this.retryAfter = details.retryAfter;
  }
}

/**
 * Log in over HTTP: `POST /api/v1/auth/login`.
 * @param {string} username
 * @param {string} password
 * @param {{baseUrl?: string}} [options]
 * @returns {Promise<{token: string, expires_at: string, user: {id: string, username: string, is_admin: boolean}}>}
 * @throws {HearthError} AUTH_FAILED, RATE_LIMIT_EXCEEDED, …
 */
export async function login(username, password, options = {}) {
  const traceId = newTraceId();
  const response = await fetch(`${options.baseUrl ?? ''}/api/v1/auth/login`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-Trace-ID': traceId },
    body: JSON.stringify({ username, password }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw httpError(response, body, traceId);
  }
  return body;
}

/**
 * GET a JSON resource of hearth with the bearer *token* (e.g. `/api/v1/rooms`).
 * @param {string} path
 * @param {string} token
 * @param {{baseUrl?: string}} [options]
 * @returns {Promise<any>}
 */
export async function getJson(path, token, options = {}) {
  const traceId = newTraceId();
  const response = await fetch(`${options.baseUrl ?? ''}${path}`, {
    headers: { Authorization: `Bearer ${token}`, 'X-Trace-ID': traceId },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw httpError(response, body, traceId);
  }
  return body;
}

function httpError(response, body, traceId) {
  const error = body && typeof body.error === 'object' ? body.error : body || {};
  const code = typeof error.code === 'string' ? error.code : (error.error ?? `HTTP_${response.status}`);
  const retryAfter = Number(response.headers.get('Retry-After')) || undefined;
  return new HearthError(code, error.message ?? error.text ?? response.statusText, {
    status: response.status,
    traceId: error.trace_id ?? traceId,
    retryAfter,
  });
}

function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? memoryStorage();
  } catch {
    return memoryStorage(); // storage disabled by the browser's settings
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Close codes SseSocket reports for a server's farewell frame, as the WebSocket would close. */
const FAREWELL_CLOSE_CODES = Object.freeze({ SERVER_SHUTDOWN: 1001, SLOW_CLIENT: 1013 });

/**
 * The fallback transport, shaped like a WebSocket for HearthClient: `onopen`, `onmessage`,
 * `onclose`, `onerror`, `send(text)`, `close()` and `readyState`.
 *
 * Opening POSTs the token for a one-time ticket (`/api/v1/sse/ticket`; the long-lived
 * token never goes in a URL), opens `EventSource('/sse?ticket=…')` and is open once the
 * stream's `hello` names its session. Every other stream event is one frame, passed to
 * `onmessage` as the WebSocket would. `send` POSTs one request frame to `/api/v1/rpc` and
 * passes the ctrl of the response to `onmessage` as if it had come down the stream; the
 * `auth` that HearthClient sends first is answered here with the hello's user, since the
 * stream is authenticated already. A POST that gets no answer passes nothing: the
 * request's own timeout handles it (and a publish is resent with the same client_msg_id).
 *
 * A dropped stream is resumed by the browser itself (EventSource reconnects with
 * `Last-Event-ID`, and the server replays what was missed); a `hello` of the same session
 * with `resumed: true` is transparent. When the server refuses the resume (the EventSource
 * ends CLOSED), or a hello names another session, or the server said goodbye
 * (SERVER_SHUTDOWN, SLOW_CLIENT) before the stream ended, it closes, and HearthClient's
 * usual reconnect runs: a new ticket, re-subscribe with since.
 */
export class SseSocket {
  /**
   * @param {string} baseUrl  HTTP base of hearth, e.g. `https://chat.example.com`
   * @param {string} token    login token
   */
  constructor(baseUrl, token) {
    this.baseUrl = baseUrl;
    this.token = token;
    /** 0 connecting, 1 open, 3 closed: WebSocket's numbers. */
    this.readyState = SseSocket.CONNECTING;
    /** @type {((event: object) => void)|null} */
    this.onopen = null;
    /** @type {((event: {data: string}) => void)|null} */
    this.onmessage = null;
    /** @type {((event: {code: number, reason: string, wasClean: boolean, retryAfterMs?: number}) => void)|null} */
    this.onclose = null;
    /** @type {((event: object) => void)|null} */
    this.onerror = null;
    /** @type {string|null} the stream's session id (from its hello) */
    this.session = null;
    /** @type {{id: string, username: string}|null} the stream's user (from its hello) */
    this.user = null;
    /** Times the browser resumed the stream of this session after a drop. */
    this.resumes = 0;
    /** @type {EventSource|null} */
    this._source = null;
    /** The close code once the stream ends: 1006 unless the server said goodbye first. */
    this._endCode = 1006;
    this._start();
  }

  async _start() {
    let response;
    let body;
    try {
      response = await fetch(`${this.baseUrl}/api/v1/sse/ticket`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${this.token}`, 'X-Trace-ID': newTraceId() },
      });
      body = await response.json().catch(() => ({}));
    } catch {
      this._end(1006, 'no ticket: the server is unreachable');
      return;
    }
    if (this.readyState === SseSocket.CLOSED) return;
    if (!response.ok || typeof body?.ticket !== 'string') {
      const retryAfterMs = (Number(response.headers.get('Retry-After')) || 0) * 1000;
      // 401: the token is no good, as a WebSocket closes with 1008 (policy).
      const code = response.status === 401 ? 1008 : response.status === 429 || response.status === 503 ? 1013 : 1011;
      this._end(code, `ticket refused (${response.status})`, retryAfterMs);
      return;
    }
    const source = new EventSource(`${this.baseUrl}/sse?ticket=${encodeURIComponent(body.ticket)}`);
    this._source = source;
    source.addEventListener('hello', (event) => this._onHello(event.data));
    source.onmessage = (event) => this._onStreamFrame(event.data);
    source.onerror = () => this._onStreamError();
  }

  _onHello(text) {
    let hello;
    try {
      hello = JSON.parse(text);
    } catch {
      return;
    }
    if (this.session === null) {
      this.session = hello.session;
      this.user = hello.user ?? null;
      this.readyState = SseSocket.OPEN;
      this.onopen?.({ type: 'open' });
    } else if (hello.session === this.session && hello.resumed) {
      this.resumes += 1; // the server replays what the drop cost: nothing to do here
      this._endCode = 1006;
    } else {
      // The server no longer has our session, nor what it had subscribed: start over.
      this._end(1006, 'the stream came back as another session');
    }
  }

  _onStreamFrame(text) {
    if (this.readyState !== SseSocket.OPEN) return;
    if (text.includes('"error"')) {
      try {
        const event = JSON.parse(text).event;
        const code = event?.type === 'error' ? FAREWELL_CLOSE_CODES[event.data?.code] : undefined;
        if (code !== undefined) this._endCode = code;
      } catch {
        /* not JSON: HearthClient ignores it too */
      }
    }
    this.onmessage?.({ data: text });
  }

  _onStreamError() {
    if (this.readyState === SseSocket.CLOSED) return;
    if (this._source.readyState === EventSource.CLOSED) {
      // Refused (401: ticket expired, resume window passed, another instance): no resume.
      this._end(1006, 'the stream was refused');
    } else if (this._endCode !== 1006) {
      // The server dropped us on purpose and said why: do what a WebSocket client does.
      this._end(this._endCode, 'the server ended the stream');
    }
    // Otherwise the browser is reconnecting with Last-Event-ID by itself.
  }

  _end(code, reason, retryAfterMs = 0) {
    if (this.readyState === SseSocket.CLOSED) return;
    this.readyState = SseSocket.CLOSED;
    this._source?.close();
    this.onclose?.({ code, reason, wasClean: false, retryAfterMs });
  }

  /**
   * Send one request frame (JSON *text*) as a POST to `/api/v1/rpc`.
   * @param {string} text
   */
  send(text) {
    if (this.readyState !== SseSocket.OPEN) return;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.op === 'auth') {
      const ctrl = { id: frame.id, code: 200, text: 'ok', params: { user: this.user } };
      setTimeout(() => this._deliver({ ctrl }));
      return;
    }
    this._post(frame, text);
  }

  async _post(frame, text) {
    let response;
    let body;
    try {
      response = await fetch(`${this.baseUrl}/api/v1/rpc`, {
        method: 'POST',
        headers: {
          Authorization: `Bearer ${this.token}`,
          'X-Hearth-Session': this.session,
          'X-Trace-ID': frame.trace_id ?? newTraceId(),
          'Content-Type': 'application/json',
        },
        body: text,
      });
      body = await response.json().catch(() => null);
    } catch {
      return; // no answer: the request times out, as one lost on a WebSocket would
    }
    const ctrl = body?.ctrl;
    if (ctrl && ctrl.id === frame.id) {
      this._deliver({ ctrl });
    } else if (response.status === 401) {
      this._end(1008, 'the token was refused');
    } else if (response.status === 403 || response.status === 404) {
      // Not this request's answer but the session's: gone from the server (or not ours).
      this._end(1006, `the stream session is gone (${response.status})`);
    } else if (ctrl) {
      this._deliver({ ctrl: { ...ctrl, id: frame.id } }); // e.g. 503 in maintenance
    } else if (response.status >= 500 || response.status === 429) {
      // A proxy's own error page (no server to send it to): retried as a 5xx from hearth is.
      const retryAfter = Number(response.headers.get('Retry-After')) || undefined;
      this._deliver({ ctrl: { id: frame.id, code: response.status, text: response.statusText || 'proxy error',
        params: { error: `HTTP_${response.status}`, ...(retryAfter ? { retry_after: retryAfter } : {}) } } });
    }
  }

  _deliver(frame) {
    if (this.readyState === SseSocket.OPEN) this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /** Close the stream; HearthClient detaches its handlers first, as with a WebSocket. */
  close(code = 1000, reason = '') {
    if (this.readyState === SseSocket.CLOSED) return;
    this.readyState = SseSocket.CLOSED;
    this._source?.close();
    const onclose = this.onclose;
    if (onclose) setTimeout(() => onclose({ code, reason, wasClean: true, retryAfterMs: 0 }));
  }
}
SseSocket.CONNECTING = 0;
SseSocket.OPEN = 1;
SseSocket.CLOSING = 2;
SseSocket.CLOSED = 3;

/** Per-room bookkeeping. */
class Room {
  /** @param {string} name */
  constructor(name) {
    this.name = name;
    this.topic = `room:${name}`;
    /** Whether the application joined it (and so it is re-subscribed on reconnect). */
    this.joined = false;
    /** Whether the current connection is subscribed. */
    this.subscribed = false;
    /** @type {number|null} highest seq seen; recovery asks for everything after it */
    this.lastSeq = null;
    /** @type {Map<string, ChatMessage>} by server id, or `local:<client_msg_id>` */
    this.messages = new Map();
    /** @type {Map<string, string>} own client_msg_id -> key in messages */
    this.ownKeys = new Map();
    /** @type {Set<string>} */
    this.presence = new Set();
    /** Insertion counter, orders messages that have no seq yet. */
    this.arrivals = 0;
  }
}

/**
 * A connection to hearth. Events (subscribe with {@link HearthClient#on}):
 *
 * - `stateChange` {state, previous, retryAt, retryInMs}
 * - `open` {} — the WebSocket (or the fallback's stream) opened
 * - `transport` {transport, previous, reason} — `client.transport` changed
 * - `disconnect` {code, reason, wasClean}
 * - `reconnect` {attempts, downtimeMs} — ready again after a drop
 * - `message` {room, message, update} — a new message or a change of one (state, seq)
 * - `messageFailed` {room, message, error}
 * - `status` StatusUpdate
 * - `presence` {room, users, joined?, left?}
 * - `degraded` {component, state, components}
 * - `error` {code, message, severity, recoverable, trace_id?, source?, …}
 */
export class HearthClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || !options.token || !options.username) {
      throw new TypeError('HearthClient needs a token and a username');
    }
    this.token = options.token;
    this.username = options.username;
    this.url = options.url ?? defaultUrl();
    this.baseUrl = options.baseUrl ?? httpBase(this.url);
    this.wsOpenTimeoutMs = options.wsOpenTimeoutMs ?? 4000;
    this.backoff = { ...BACKOFF, ...(options.backoff ?? {}) };
    this.random = options.random ?? Math.random;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage ?? memoryStorage();
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.silenceTimeoutMs = options.silenceTimeoutMs ?? 35000;
    this.historyLimit = options.historyLimit ?? 50;

    /** @type {ConnectionState} */
    this.state = 'closed';
    /** @type {number|null} epoch ms of the next reconnect attempt */
    this.retryAt = null;
    /** Reconnect attempts since the last ready. */
    this.attempts = 0;
    /** @type {{id: string, username: string}|null} */
    this.user = null;
    /** @type {Record<string, string>} component -> state as the server last reported */
    this.degraded = {};
    /**
     * @type {Transport} what the next connection uses: WebSocket first; the fallback for the
     * rest of this client's life once a WebSocket was refused and the fallback got through.
     * A new page (a new client) tries WebSocket again.
     */
    this.transport = 'websocket';

    /** @type {Map<string, Room>} */
    this.rooms = new Map();
    /** @type {Map<string, StatusUpdate|null>} status source -> latest update */
    this.statusFeeds = new Map();
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();

    this._socket = null;
    /** Whether the current socket opened (a WebSocket refused before open means blocked). */
    this._socketOpened = false;
    this._openDeadline = null;
    /** @type {Record<Transport, boolean>} whether a socket of each transport ever opened */
    this._everOpened = { websocket: false, sse: false };
    this._pending = new Map();
    this._requestIds = 0;
    this._timer = null;
    this._watchdog = null;
    this._lastFrameAt = 0;
    this._wasReady = false;
    this._downSince = null;
    this._hintMs = 0;
    this._pumping = false;
    this._stopped = true;
    this._outboxKey = `hearth.outbox.v1.${this.username}`;
    /** @type {{client_msg_id: string, room: string, content: string, ts: string, retries: number}[]} */
    this._outbox = this._loadOutbox();
    for (const item of this._outbox) {
      this._addLocal(item);
    }
    this._onOnline = () => {
      if (this.state === 'reconnecting') this._open();
    };
    this._onOffline = () => {
      // The network is gone: say so now rather than after the silence timeout.
      if (this._socket) this._lost(this._socket, 1006, 'browser offline');
    };
  }

  // -- events ---------------------------------------------------------------------------

  /**
   * Call *listener* with the detail of each *event*. Returns a function that unsubscribes.
   * @param {string} event
   * @param {(detail: any) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  /**
   * Stop calling *listener* for *event*.
   * @param {string} event
   * @param {(detail: any) => void} listener
   */
  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }

  _emit(event, detail) {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        listener(detail);
      } catch (err) {
        // A listener's bug must not break the connection; surface it asynchronously.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  _setState(state) {
    const previous = this.state;
    if (previous === state && state !== 'reconnecting') return;
    this.state = state;
    const retryInMs = this.retryAt === null ? null : Math.max(0, this.retryAt - Date.now());
    this._emit('stateChange', { state, previous, retryAt: this.retryAt, retryInMs });
  }

  // -- lifecycle ------------------------------------------------------------------------

  /** Open the connection; reconnects by itself until {@link HearthClient#close}. */
  connect() {
    if (!this._stopped && this.state !== 'closed') return;
    this._stopped = false;
    this.attempts = 0;
    if (typeof window !== 'undefined') {
      window.addEventListener('online', this._onOnline);
      window.addEventListener('offline', this._onOffline);
    }
    this._open();
  }

  /** Close for good (until connect()); unsent publishes stay queued. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    this.retryAt = null;
    if (typeof window !== 'undefined') {
      window.removeEventListener('online', this._onOnline);
      window.removeEventListener('offline', this._onOffline);
    }
    const socket = this._socket;
    if (socket) {
      this._detach(socket);
      socket.close(1000, 'client closed');
      this._afterDrop({ code: 1000, reason: 'client closed', wasClean: true });
    }
    this._setState('closed');
  }

  /**
   * Use a new *token* (after a 1008 close or AUTH_FAILED) and connect again.
   * @param {string} token
   */
  setToken(token) {
    this.token = token;
    if (this.state === 'closed') this.connect();
  }

  _open() {
    clearTimeout(this._timer);
    this.retryAt = null;
    if (this._stopped) return;
    if (typeof navigator !== 'undefined' && navigator.onLine === false) {
      // Wait for the browser's 'online' event instead of failing attempts.
      this._setState('reconnecting');
      return;
    }
    this._setState(this._wasReady ? 'reconnecting' : 'connecting');
    let socket;
    try {
      socket = this.transport === 'sse' ? new SseSocket(this.baseUrl, this.token) : new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(0);
      return;
    }
    this._socket = socket;
    this._socketOpened = false;
    this._hintMs = 0;
    socket.onopen = () => {
      clearTimeout(this._openDeadline);
      this._socketOpened = true;
      this._everOpened[this.transport] = true;
      this._onOpen(socket);
    };
    socket.onmessage = (event) => this._onFrame(socket, event.data);
    socket.onclose = (event) => {
      if (event.retryAfterMs) this._hintMs = Math.max(this._hintMs, event.retryAfterMs);
      this._lost(socket, event.code, event.reason, event.wasClean);
    };
    socket.onerror = () => {}; // the close event that follows tells what happened
    // A proxy may also swallow the Upgrade and never answer: not open in time counts as refused.
    clearTimeout(this._openDeadline);
    const deadlineMs = this.transport === 'sse' ? this.requestTimeoutMs : this.wsOpenTimeoutMs;
    this._openDeadline = setTimeout(() => {
      if (socket === this._socket && !this._socketOpened) {
        this._lost(socket, 4002, `not open within ${deadlineMs} ms`);
      }
    }, deadlineMs);
  }

  _useTransport(transport, reason) {
    const previous = this.transport;
    if (previous === transport) return;
    this.transport = transport;
    this._emit('transport', { transport, previous, reason });
  }

  /**
   * After a socket that never opened: the transport to try next, and whether right away.
   * A WebSocket refused before open (close 1006: how a proxy's 400/403/405 to the Upgrade
   * shows in a browser) or not open in time (4002), when no WebSocket ever opened here,
   * means blocked: the fallback, at once. A fallback that never opened either means the
   * server itself is unreachable: WebSocket again, after backoff. A WebSocket that opened
   * once and dropped reconnects on WebSocket.
   */
  _fallBack(code, reason) {
    if (this._socketOpened || (typeof navigator !== 'undefined' && navigator.onLine === false)) {
      return false;
    }
    if (this.transport === 'websocket' && !this._everOpened.websocket && (code === 1006 || code === 4002)) {
      this._useTransport('sse', `WebSocket refused: ${reason}`);
      return true;
    }
    if (this.transport === 'sse' && !this._everOpened.sse) {
      this._useTransport('websocket', `fallback refused too: ${reason}`);
    }
    return false;
  }

  async _onOpen(socket) {
    this._lastFrameAt = Date.now();
    this._startWatchdog(socket);
    this._emit('open', {});
    this._setState('authenticating');
    let ctrl;
    try {
      ctrl = await this._request('auth', { token: this.token });
    } catch {
      // Closed (then _lost already scheduled the reconnect) or no reply: start over.
      this._lost(socket, 4000, 'auth got no reply');
      return;
    }
    if (socket !== this._socket) return;
    if (ctrl.code === 200) {
      this.user = ctrl.params?.user ?? { id: '', username: this.username };
      await this._becomeReady(socket);
    } else if (ctrl.code === 401) {
      this._authLost(ctrl.params?.error ?? 'AUTH_FAILED', 'authentication failed; log in again');
    } else {
      this._hintMs = retryAfterMs(ctrl);
      this._lost(socket, 4000, `auth answered ${ctrl.code}`);
    }
  }

  async _becomeReady(socket) {
    const attempts = this.attempts;
    const downtimeMs = this._downSince === null ? 0 : Date.now() - this._downSince;
    this.attempts = 0;
    this._downSince = null;
    this._setState('ready');
    if (this._wasReady) this._emit('reconnect', { attempts, downtimeMs });
    this._wasReady = true;
    const rooms = [...this.rooms.values()].filter((room) => room.joined);
    const feeds = [...this.statusFeeds.keys()];
    await Promise.all([
      ...rooms.map((room) => this._subscribeRoom(room)),
      ...feeds.map((source) => this._subscribeStatus(source)),
    ]);
    if (socket === this._socket) this._pump();
  }

  _authLost(code, message) {
    // The token is no good: retrying with it would be refused again. Wait for setToken().
    this._emit('error', { code, message, severity: 'error', recoverable: false });
    this._stopped = true;
    const socket = this._socket;
    if (socket) {
      this._detach(socket);
      socket.close(1000, 'auth failed');
      this._afterDrop({ code: 1008, reason: code, wasClean: true });
    }
    this.retryAt = null;
    this._setState('closed');
  }

  _detach(socket) {
    clearTimeout(this._openDeadline);
    socket.onopen = socket.onmessage = socket.onclose = null;
    if (this._socket === socket) this._socket = null;
  }

  _afterDrop(detail) {
    clearInterval(this._watchdog);
    for (const room of this.rooms.values()) room.subscribed = false;
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) {
      clearTimeout(entry.timer);
      entry.reject(new HearthError('DISCONNECTED', 'the connection closed'));
    }
    if (this._downSince === null) this._downSince = Date.now();
    this._emit('disconnect', detail);
  }

  /** The socket is gone (closed by the server, the network, or found silent). */
  _lost(socket, code, reason = '', wasClean = false) {
    if (socket !== this._socket) return;
    this._detach(socket);
    try {
      socket.close();
    } catch {
      /* already closing */
    }
    this._afterDrop({ code, reason, wasClean });
    if (this._stopped) return;
    if (code === 1008) {
      this._authLost('AUTH_REQUIRED', 'the server closed the connection (1008); log in again');
      return;
    }
    if (this._fallBack(code, reason || `closed ${code}`)) {
      this._open(); // another route, not a retry: no backoff
      return;
    }
    let floorMs = this._hintMs;
    if (code === 1001) floorMs = Math.max(floorMs, this.backoff.initialMs);
    if (code === 1013) {
      // Dropped as too slow: give the server (and this tab) room before coming back.
      floorMs = Math.max(floorMs, backoffCeiling(this.attempts + 2, this.backoff) / 2);
    }
    this._scheduleReconnect(floorMs);
  }

  _scheduleReconnect(floorMs) {
    this.attempts += 1;
    const delay = backoffDelay(this.attempts, { ...this.backoff, random: this.random, floorMs });
    this.retryAt = Date.now() + delay;
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), delay);
    this._setState('reconnecting');
  }

  _startWatchdog(socket) {
    clearInterval(this._watchdog);
    const every = Math.max(250, Math.min(5000, this.silenceTimeoutMs / 4));
    this._watchdog = setInterval(() => {
      if (Date.now() - this._lastFrameAt > this.silenceTimeoutMs) {
        this._lost(socket, 4001, 'no frame within the silence timeout');
      }
    }, every);
  }

  // -- requests -------------------------------------------------------------------------

  /**
   * Send request *op* with *fields*; resolves with its ctrl (any code), rejects with
   * DISCONNECTED or REQUEST_TIMEOUT. Every request carries a fresh trace id.
   * @param {string} op
   * @param {Record<string, any>} [fields]
   * @returns {Promise<{id: string, code: number, text: string, params?: any}>}
   */
  request(op, fields = {}) {
    if (this.state !== 'ready' && op !== 'auth') {
      return Promise.reject(new HearthError('DISCONNECTED', 'not connected'));
    }
    return this._request(op, fields);
  }

  _request(op, fields) {
    const socket = this._socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new HearthError('DISCONNECTED', 'not connected'));
    }
    const id = `r${++this._requestIds}`;
    const traceId = newTraceId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new HearthError('REQUEST_TIMEOUT', `${op} got no reply`, { traceId }));
      }, this.requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer });
      socket.send(JSON.stringify({ op, id, trace_id: traceId, ...fields }));
    });
  }

  // -- inbound frames -------------------------------------------------------------------

  _onFrame(socket, text) {
    if (socket !== this._socket) return;
    this._lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.ctrl) {
      const entry = this._pending.get(frame.ctrl.id);
      if (entry) {
        this._pending.delete(frame.ctrl.id);
        clearTimeout(entry.timer);
        entry.resolve(frame.ctrl);
      }
    } else if (frame.data) {
      this._onData(frame.data);
    } else if (frame.event) {
      this._onEvent(frame.event);
    }
  }

  _onEvent(event) {
    const data = event.data ?? {};
    switch (event.type) {
      case 'heartbeat':
        return;
      case 'degraded':
        this.degraded = { ...this.degraded, [data.component]: data.state };
        this._emit('degraded', { ...data, components: this.degraded });
        return;
      case 'presence':
        this._onPresence(data);
        return;
      case 'resync':
        for (const topic of data.topics ?? []) {
          const room = this.rooms.get(topic.replace(/^room:/, ''));
          if (room?.joined) this._subscribeRoom(room);
        }
        return;
      case 'error':
        if (data.code === 'SERVER_SHUTDOWN' && data.reconnect_after_ms) {
          this._hintMs = data.reconnect_after_ms;
        } else if (data.code === 'SLOW_CLIENT') {
          this._hintMs = Math.max(this._hintMs, this.backoff.initialMs);
        }
        this._emit('error', data);
        return;
      default:
        if (this.statusFeeds.has(event.type) && data.source === event.type) {
          /** @type {StatusUpdate} */
          const update = {
            source: data.source,
            value: data.value,
            is_stale: Boolean(data.is_stale),
            cached_at: data.cached_at ?? null,
            error: data.error,
          };
          this.statusFeeds.set(event.type, update);
          this._emit('status', update);
        }
    }
  }

  _onPresence(data) {
    const room = this.rooms.get(String(data.topic ?? '').replace(/^room:/, ''));
    if (!room) return;
    if (data.joined) room.presence.add(data.joined);
    if (data.left) room.presence.delete(data.left);
    this._emit('presence', {
      room: room.name,
      users: [...room.presence].sort(),
      joined: data.joined,
      left: data.left,
    });
  }

  _onData(data) {
    const room = this.rooms.get(String(data.topic ?? '').replace(/^room:/, ''));
    if (!room) return;
    const state = data.seq === null || data.seq === undefined ? 'queued' : 'sent';
    const known = room.messages.get(data.id);
    if (known) {
      // A duplicate (replay overlapping live delivery), or a spooled message now stored.
      if (known.seq === null && data.seq !== null && data.seq !== undefined) {
        known.seq = data.seq;
        known.state = 'sent';
        this._noteSeq(room, data.seq);
        this._emit('message', { room: room.name, message: known, update: true });
      }
      return;
    }
    const ownKey = data.from === this.username && data.client_msg_id
      ? room.ownKeys.get(data.client_msg_id)
      : undefined;
    if (ownKey !== undefined) {
      const mine = room.messages.get(ownKey);
      room.messages.delete(ownKey);
      Object.assign(mine, {
        id: data.id, seq: data.seq ?? null, ts: data.ts, content: data.content,
        flags: data.flags ?? [], state, error: null,
      });
      room.messages.set(data.id, mine);
      room.ownKeys.set(data.client_msg_id, data.id);
      if (mine.seq !== null) this._noteSeq(room, mine.seq);
      this._emit('message', { room: room.name, message: mine, update: true });
      return;
    }
    /** @type {ChatMessage} */
    const message = {
      id: data.id, room: room.name, seq: data.seq ?? null, from: data.from,
      content: data.content ?? null, ts: data.ts, client_msg_id: data.client_msg_id ?? null,
      flags: data.flags ?? [], state, mine: data.from === this.username, error: null,
    };
    message._order = ++room.arrivals;
    room.messages.set(data.id, message);
    if (message.seq !== null) this._noteSeq(room, message.seq);
    this._emit('message', { room: room.name, message, update: false });
  }

  _noteSeq(room, seq) {
    if (room.lastSeq !== null && seq > room.lastSeq + 1 && room.subscribed) {
      // The server promises no gaps on a connection; if one shows anyway, read it.
      this._fillGap(room, room.lastSeq, seq);
    }
    if (room.lastSeq === null || seq > room.lastSeq) room.lastSeq = seq;
  }

  async _fillGap(room, after, until) {
    let since = after;
    while (since < until - 1 && this.state === 'ready') {
      let ctrl;
      try {
        ctrl = await this._request('history', { topic: room.topic, since, limit: 100 });
      } catch {
        return; // disconnected: the re-subscribe with since recovers it
      }
      const count = ctrl.params?.count ?? 0;
      if (ctrl.code !== 200 || count === 0) return;
      since += count;
    }
  }

  // -- rooms ----------------------------------------------------------------------------

  _room(name) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(name);
      this.rooms.set(name, room);
    }
    return room;
  }

  /**
   * Join room *name*: subscribe (again after every reconnect), load recent history and
   * presence. Resolves once subscribed; rejects with a HearthError (e.g. NOT_FOUND).
   * While offline the join is remembered and happens on connect.
   * @param {string} name
   * @returns {Promise<void>}
   */
  async join(name) {
    const room = this._room(name);
    room.joined = true;
    if (this.state === 'ready' && !room.subscribed) {
      await this._subscribeRoom(room, { throwOnError: true });
    }
  }

  /**
   * Leave room *name*: no more messages or presence from it.
   * @param {string} name
   */
  async leave(name) {
    const room = this.rooms.get(name);
    if (!room) return;
    room.joined = false;
    if (room.subscribed && this.state === 'ready') {
      room.subscribed = false;
      await this._request('unsub', { topic: room.topic }).catch(() => {});
    }
  }

  async _subscribeRoom(room, { throwOnError = false } = {}) {
    const fields = { topic: room.topic };
    const fresh = room.lastSeq === null;
    if (!fresh) fields.since = room.lastSeq;
    let ctrl;
    try {
      ctrl = await this._request('sub', fields);
    } catch (err) {
      if (throwOnError) throw err;
      return;
    }
    if (ctrl.code !== 200) {
      const error = ctrlError(ctrl);
      this._emit('error', { code: error.code, message: error.message, severity: 'warning',
        recoverable: ctrl.code >= 500, trace_id: error.traceId, topic: room.topic });
      if (ctrl.code >= 500 && this.state === 'ready') {
        // e.g. the database could not read `since` now: try again after its hint.
        setTimeout(() => {
          if (room.joined && !room.subscribed && this.state === 'ready') this._subscribeRoom(room);
        }, Math.max(retryAfterMs(ctrl), backoffDelay(2, { ...this.backoff, random: this.random })));
      } else {
        room.joined = false;
      }
      if (throwOnError) throw error;
      return;
    }
    room.subscribed = true;
    const head = ctrl.params?.seq ?? 0;
    if (fresh) {
      // On the fallback a live message may come down the stream before this POST's answer.
      room.lastSeq = Math.max(room.lastSeq ?? 0, head);
      if (head > 0) {
        await this._request('history', { topic: room.topic, before: head + 1,
          limit: this.historyLimit }).catch(() => {});
      }
    }
    await this.refreshPresence(room.name);
  }

  /**
   * Ask the server who is in room *name*; resolves with the sorted usernames.
   * @param {string} name
   * @returns {Promise<string[]>}
   */
  async refreshPresence(name) {
    const room = this._room(name);
    try {
      const ctrl = await this._request('presence', { topic: room.topic });
      if (ctrl.code === 200) room.presence = new Set(ctrl.params?.users ?? []);
    } catch {
      /* disconnected: refreshed again after the reconnect */
    }
    const users = [...room.presence].sort();
    this._emit('presence', { room: room.name, users });
    return users;
  }

  /**
   * The messages of room *name* in order: by seq, then those without one (pending or
   * spooled) in the order they appeared.
   * @param {string} name
   * @returns {ChatMessage[]}
   */
  messages(name) {
    const room = this.rooms.get(name);
    if (!room) return [];
    return [...room.messages.values()].sort((a, b) => {
      if (a.seq !== null && b.seq !== null) return a.seq - b.seq;
      if (a.seq !== null) return -1;
      if (b.seq !== null) return 1;
      return a._order - b._order;
    });
  }

  /**
   * The users present in room *name*, sorted.
   * @param {string} name
   * @returns {string[]}
   */
  presence(name) {
    return [...(this.rooms.get(name)?.presence ?? [])].sort();
  }

  // -- status feeds ---------------------------------------------------------------------

  /**
   * Follow status feed *source* (e.g. `system_status`); its value arrives as `status`
   * events, now and after every reconnect.
   * @param {string} source
   */
  async subscribeStatus(source) {
    if (!this.statusFeeds.has(source)) this.statusFeeds.set(source, null);
    if (this.state === 'ready') await this._subscribeStatus(source);
  }

  async _subscribeStatus(source) {
    try {
      const ctrl = await this._request('sub', { topic: `status:${source}` });
      if (ctrl.code !== 200) {
        const error = ctrlError(ctrl);
        this._emit('error', { code: error.code, message: error.message, severity: 'warning',
          recoverable: false, trace_id: error.traceId, source });
      }
    } catch {
      /* disconnected: subscribed again after the reconnect */
    }
  }

  // -- publishing -----------------------------------------------------------------------

  /**
   * Publish *content* to room *name*. The message shows at once as `pending`; it is sent
   * now or, while offline, on the next connection (kept in storage across reloads). Its
   * state changes arrive as `message` events; a refusal also as `messageFailed`.
   * @param {string} name
   * @param {string} content
   * @returns {ChatMessage}
   */
  publish(name, content) {
    const item = {
      client_msg_id: newClientMsgId(),
      room: name,
      content,
      ts: new Date().toISOString(),
      retries: 0,
    };
    this._outbox.push(item);
    this._store((items) => [...items, item]);
    const message = this._addLocal(item);
    this._emit('message', { room: name, message, update: false });
    this._pump();
    return message;
  }

  /**
   * The publishes not acknowledged yet, oldest first.
   * @returns {{client_msg_id: string, room: string, content: string, ts: string}[]}
   */
  outbox() {
    return this._outbox.map(({ client_msg_id, room, content, ts }) => ({ client_msg_id, room, content, ts }));
  }

  _addLocal(item) {
    const room = this._room(item.room);
    const key = `local:${item.client_msg_id}`;
    /** @type {ChatMessage} */
    const message = {
      id: null, room: item.room, seq: null, from: this.username, content: item.content,
      ts: item.ts, client_msg_id: item.client_msg_id, flags: [], state: 'pending', mine: true,
      error: null,
    };
    message._order = ++room.arrivals;
    room.messages.set(key, message);
    room.ownKeys.set(item.client_msg_id, key);
    return message;
  }

  _ownMessage(item) {
    const room = this._room(item.room);
    const key = room.ownKeys.get(item.client_msg_id);
    return { room, message: key === undefined ? null : room.messages.get(key) };
  }

  _settle(item, state, error = null) {
    this._outbox = this._outbox.filter((other) => other !== item);
    this._store((items) => items.filter((other) => other.client_msg_id !== item.client_msg_id));
    const { room, message } = this._ownMessage(item);
    if (!message) return;
    if (state === 'failed' || message.state === 'pending') message.state = state;
    message.error = error;
    this._emit('message', { room: room.name, message, update: true });
    if (state === 'failed') this._emit('messageFailed', { room: room.name, message, error });
  }

  async _pump() {
    if (this._pumping) return;
    this._pumping = true;
    try {
      while (this.state === 'ready' && this._outbox.length > 0) {
        const item = this._outbox[0];
        let ctrl = null;
        try {
          ctrl = await this._request('pub', {
            topic: `room:${item.room}`, content: item.content, client_msg_id: item.client_msg_id,
          });
        } catch (err) {
          if (err.code === 'DISCONNECTED') break; // resent, same id, after the reconnect
        }
        if (ctrl && (ctrl.code === 200 || ctrl.code === 202)) {
          this._adopt(item, ctrl);
          this._settle(item, ctrl.code === 200 ? 'sent' : 'queued');
        } else if (ctrl && ctrl.code === 429) {
          await sleep(Math.max(retryAfterMs(ctrl), 100));
        } else if (ctrl && ctrl.params?.error === 'SERVER_SHUTDOWN') {
          break; // the server is leaving: resend after reconnecting
        } else if (ctrl && ctrl.code >= 400 && ctrl.code < 500) {
          const error = ctrlError(ctrl);
          this._settle(item, 'failed', { code: error.code, text: error.message, trace_id: error.traceId });
        } else {
          // 5xx or no reply: retried with the same client_msg_id, so never stored twice.
          item.retries += 1;
          this._store((items) => items.map((other) => (
            other.client_msg_id === item.client_msg_id ? item : other)));
          if (item.retries > PUBLISH_RETRIES) {
            const error = ctrl ? ctrlError(ctrl) : new HearthError('REQUEST_TIMEOUT', 'no reply');
            this._settle(item, 'failed', { code: error.code, text: error.message, trace_id: error.traceId });
          } else {
            const floorMs = ctrl ? retryAfterMs(ctrl) : 0;
            await sleep(backoffDelay(item.retries, { ...this.backoff, random: this.random, floorMs }));
          }
        }
      }
    } finally {
      this._pumping = false;
    }
  }

  _adopt(item, ctrl) {
    // The reply may come before or after the data frame of the same message.
    const { room, message } = this._ownMessage(item);
    const id = ctrl.params?.id;
    if (!message || !id || message.id === id) return;
    const echoed = room.messages.get(id);
    const key = room.ownKeys.get(item.client_msg_id);
    if (echoed && echoed !== message) {
      room.messages.delete(key);
      room.ownKeys.set(item.client_msg_id, id);
      return;
    }
    room.messages.delete(key);
    message.id = id;
    if (ctrl.params?.seq !== undefined && ctrl.params.seq !== null) {
      message.seq = ctrl.params.seq;
    }
    room.messages.set(id, message);
    room.ownKeys.set(item.client_msg_id, id);
  }

  _loadOutbox() {
    try {
      const items = JSON.parse(this.storage.getItem(this._outboxKey) ?? '[]');
      return Array.isArray(items) ? items.filter((item) => item && item.client_msg_id) : [];
    } catch {
      return [];
    }
  }

  _store(change) {
    // Read, change, write: other tabs of the same user share the key, and each only adds
    // or removes its own items. A message two tabs both send is one message (same id).
    try {
      const items = change(this._loadOutbox());
      if (items.length === 0) this.storage.removeItem(this._outboxKey);
      else this.storage.setItem(this._outboxKey, JSON.stringify(items));
    } catch {
      /* storage full or disabled: the queue lives in memory only */
    }
  }
}

function defaultUrl() {
  const { protocol, host } = globalThis.location;
  return `${protocol === 'https:' ? 'wss:' : 'ws:'}//${host}/ws`;
}

/** The HTTP base beside WebSocket URL *url*: `wss://h/p/ws` -> `https://h/p`. */
function httpBase(url) {
  const parsed = new URL(url, globalThis.location?.href);
  const protocol = parsed.protocol === 'wss:' ? 'https:' : parsed.protocol === 'ws:' ? 'http:' : parsed.protocol;
  return `${protocol}//${parsed.host}${parsed.pathname.replace(/\/ws$/, '')}`.replace(/\/$/, '');
}

function retryAfterMs(ctrl) {
  const seconds = Number(ctrl?.params?.retry_after);
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 0;
}

function ctrlError(ctrl) {
  return new HearthError(ctrl.params?.error ?? `STATUS_${ctrl.code}`, ctrl.text ?? 'error', {
    status: ctrl.code,
    traceId: ctrl.params?.trace_id,
    retryAfter: ctrl.params?.retry_after,
  });
}
