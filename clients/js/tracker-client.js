// tracker-client.js: reports what a shopping tab saw after an activation to tracker's
// POST /v1/observe, and follows a click's state over GET /v1/clicks/{id}/events.
// One ES module, no dependencies, no build step; runs in pages, extension service workers and
// in-app browsers alike (it uses only fetch, streams, timers and, where there is one, `document`).
//
//   import { TrackerClient } from "./tracker-client.js";
//   const client = new TrackerClient({ baseUrl: "https://t.example.com", token: "<user token>" });
//   client.navigation(clickId, url);
//   const answer = await client.flush();
//   const stop = client.watch(clickId, (change) => { /* {click_id, state, action} */ });
//
// Nothing here ever throws into the page or rejects a promise because tracker is slow or down:
// reports wait in memory and are retried; the page goes on working.

const MAX_BATCH = 100; // the server refuses more events per request
const MAX_QUEUED = 1000; // per client; past it the oldest reports are dropped (with a warning)
const MAX_ATTEMPTS = 8; // a batch that failed this many times in a row is dropped

function warn(...args) {
  if (typeof console !== "undefined") console.warn("[tracker-client]", ...args);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Seconds or an HTTP date, as in `Retry-After`; null when absent or unreadable. */
function retryAfterMs(response) {
  const raw = response && response.headers && response.headers.get("Retry-After");
  if (!raw) return null;
  const seconds = Number(raw);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const date = Date.parse(raw);
  return Number.isFinite(date) ? Math.max(0, date - Date.now()) : null;
}

export class TrackerClient {
  /**
   * @param {object} options
   * @param {string} options.baseUrl   tracker's public base URL, e.g. "https://t.example.com"
   * @param {string} options.token     the shopper's user token (sent as `Authorization: Bearer`)
   * @param {number} [options.batchDelayMs=1000]  how long a report may wait to share a request
   * @param {number} [options.retryBaseMs=1000]   first retry delay (doubling, full jitter)
   * @param {number} [options.retryMaxMs=60000]   the longest retry delay
   * @param {number} [options.heartbeat=15]       seconds between the event stream's heartbeats
   */
  constructor({ baseUrl, token, batchDelayMs = 1000, retryBaseMs = 1000, retryMaxMs = 60000, heartbeat = 15 } = {}) {
    if (!baseUrl || !token) throw new TypeError("TrackerClient needs { baseUrl, token }");
    this._base = String(baseUrl).replace(/\/+$/, "");
    this._token = String(token);
    this._batchDelayMs = batchDelayMs;
    this._retryBaseMs = retryBaseMs;
    this._retryMaxMs = retryMaxMs;
    this._heartbeat = heartbeat;
    this._queue = []; // [{clickId, event, attempts}] in the order they happened
    this._timer = null;
    this._sending = null; // the promise of the send in progress
    this._attempt = 0; // consecutive failures, for the backoff
    this._last = null; // the last /v1/observe answer
    this._notBefore = 0; // after a failure: no request before this time (ms), but for a page leaving
    if (typeof document !== "undefined" && typeof document.addEventListener === "function") {
      // A tab being hidden may be a tab being closed: send now, and let the request outlive the page.
      const leave = () => {
        if (document.visibilityState === "hidden") this._send({ keepalive: true });
      };
      document.addEventListener("visibilitychange", leave);
      if (typeof addEventListener === "function") addEventListener("pagehide", () => this._send({ keepalive: true }));
    }
  }

  /** The tab reached `url` (queued; `at` is this device's clock). */
  navigation(clickId, url) {
    this._push(clickId, { type: "navigation", url: String(url) });
  }

  /** A promo code was entered at checkout. */
  promoCode(clickId, code) {
    this._push(clickId, { type: "promo_code", code: String(code) });
  }

  /** The shopper reached checkout: the device id, the items already in the basket before activation. */
  checkout(clickId, { device, basketItemsBeforeActivation, storeId } = {}) {
    const event = { type: "checkout" };
    if (device !== undefined) event.device = String(device);
    if (basketItemsBeforeActivation !== undefined) event.basket_items_before_activation = basketItemsBeforeActivation;
    if (storeId !== undefined) event.store_id = String(storeId);
    this._push(clickId, event);
  }

  /** Sends what is queued now; resolves with the last /v1/observe answer (null before the first).
   *  Never rejects: what could not be sent stays queued and is retried with backoff. */
  async flush() {
    await this._send({});
    return this._last;
  }

  /** Follows the click's state: `onChange({click_id, state, action})` at once and on every change.
   *  Reconnects (with backoff) whenever the stream ends or stalls. Returns a function that stops it. */
  watch(clickId, onChange) {
    const controller = { stopped: false, abort: null };
    this._follow(clickId, onChange, controller);
    return () => {
      controller.stopped = true;
      if (controller.abort) controller.abort.abort();
    };
  }

  _push(clickId, event) {
    if (!clickId) return;
    event.at = new Date().toISOString();
    this._queue.push({ clickId: String(clickId), event });
    if (this._queue.length > MAX_QUEUED) {
      this._queue.splice(0, this._queue.length - MAX_QUEUED);
      warn(`more than ${MAX_QUEUED} reports waiting; the oldest were dropped`);
    }
    if (this._queue.filter((item) => item.clickId === clickId).length >= MAX_BATCH) this._schedule(0);
    else this._schedule(this._batchDelayMs);
  }

  _schedule(delayMs) {
    delayMs = Math.max(delayMs, this._notBefore - Date.now()); // never before a retry is due
    if (this._timer !== null) {
      if (delayMs > 0) return; // one is due already, soon enough
      clearTimeout(this._timer);
    }
    this._timer = setTimeout(() => {
      this._timer = null;
      this._send({});
    }, delayMs);
  }

  /** One pass over the queue, one request per batch (at most 100 events of one click). */
  _send({ keepalive = false }) {
    if (this._sending) {
      // A send is in flight: chain after it, so that reports leave in order and once.
      if (!keepalive) return this._sending.then(() => (this._queue.length ? this._send({}) : undefined));
    }
    const run = (async () => {
      while (this._queue.length) {
        const clickId = this._queue[0].clickId;
        const batch = [];
        for (let i = 0; i < this._queue.length && batch.length < MAX_BATCH; i++) {
          if (this._queue[i].clickId === clickId) batch.push(this._queue[i]);
        }
        this._queue = this._queue.filter((item) => !batch.includes(item));
        const outcome = await this._post(clickId, batch, keepalive);
        if (outcome !== null) {
          this._queue = batch.concat(this._queue); // back in front, in order
          this._retryLater(outcome);
          return;
        }
      }
    })();
    this._sending = run.finally(() => {
      if (this._sending === guarded) this._sending = null;
    });
    const guarded = this._sending;
    return guarded;
  }

  /** null when the batch is done with (sent, or dropped), else the failed response (or undefined
   *  for a network error) to retry after. */
  async _post(clickId, batch, keepalive) {
    let response;
    try {
      response = await globalThis.fetch(`${this._base}/v1/observe`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${this._token}` },
        body: JSON.stringify({ click_id: clickId, events: batch.map((item) => item.event) }),
        keepalive,
        credentials: "omit",
        mode: "cors",
      });
    } catch (error) {
      return this._failed(batch, undefined, error);
    }
    if (response.ok) {
      this._attempt = 0;
      this._notBefore = 0;
      try {
        this._last = await response.json();
      } catch {
        // an answer we cannot read is still an answer: the events were taken
      }
      return null;
    }
    if (response.status === 429 || response.status >= 500) return this._failed(batch, response);
    let detail = "";
    try {
      detail = (await response.json()).message || "";
    } catch {
      // not JSON: the status says enough
    }
    warn(`tracker refused ${batch.length} report(s) of click ${clickId} (${response.status}); dropped.`, detail);
    return null;
  }

  _failed(batch, response, error) {
    for (const item of batch) item.attempts = (item.attempts || 0) + 1;
    const dead = batch.filter((item) => item.attempts >= MAX_ATTEMPTS);
    if (dead.length) {
      warn(`${dead.length} report(s) could not be sent after ${MAX_ATTEMPTS} attempts; dropped.`, error || "");
      this._queue = this._queue.filter((item) => !dead.includes(item));
      batch = batch.filter((item) => !dead.includes(item));
      if (!batch.length) return null;
    }
    return response;
  }

  _retryLater(response) {
    this._attempt += 1;
    const backoff = Math.min(this._retryMaxMs, this._retryBaseMs * 2 ** (this._attempt - 1));
    const told = retryAfterMs(response);
    // Full jitter, so that many clients that failed together do not come back together; the
    // server's Retry-After is a floor.
    const delay = told !== null ? told + Math.random() * this._retryBaseMs : Math.random() * backoff;
    this._notBefore = Date.now() + delay;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      this._send({});
    }, delay);
  }

  async _follow(clickId, onChange, controller) {
    const url = `${this._base}/v1/clicks/${encodeURIComponent(clickId)}/events?heartbeat=${this._heartbeat}`;
    let failures = 0;
    let last = null;
    while (!controller.stopped) {
      const abort = new AbortController();
      controller.abort = abort;
      let stall = null;
      const alive = () => {
        clearTimeout(stall);
        stall = setTimeout(() => abort.abort(), (this._heartbeat * 2 + 5) * 1000); // a silent stream is dead
      };
      let wait = null;
      try {
        alive();
        const response = await globalThis.fetch(url, {
          headers: { Authorization: `Bearer ${this._token}`, Accept: "text/event-stream" },
          credentials: "omit",
          mode: "cors",
          cache: "no-store",
          signal: abort.signal,
        });
        if (response.status === 401 || response.status === 404) {
          warn(`tracker refused the event stream of click ${clickId} (${response.status}); not following it.`);
          return;
        }
        if (!response.ok || !response.body) {
          wait = retryAfterMs(response);
          throw new Error(`event stream answered ${response.status}`);
        }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          alive();
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart());
            if (!data.length) continue; // a heartbeat
            failures = 0;
            let change;
            try {
              change = JSON.parse(data.join("\n"));
            } catch {
              continue;
            }
            const key = `${change.state}/${change.action}`;
            if (key === last) continue; // after a reconnect the stream repeats the current state
            last = key;
            try {
              onChange(change);
            } catch (error) {
              warn("the watch callback threw", error);
            }
          }
        }
      } catch (error) {
        if (controller.stopped) return;
      } finally {
        clearTimeout(stall);
      }
      if (controller.stopped) return;
      failures += 1;
      const backoff = Math.min(this._retryMaxMs, this._retryBaseMs * 2 ** Math.min(failures - 1, 16));
      await sleep(wait !== null ? wait + Math.random() * this._retryBaseMs : Math.random() * backoff);
    }
  }
}
