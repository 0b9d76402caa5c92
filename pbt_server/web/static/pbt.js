/* pbt.js: page background tasks in the browser (pbt-server). Plain ES2020, no dependencies.
 *
 *   const session = await pbt.connect();                  // this tab's one session: <mount>/ws
 *   const page = await session.openPage("Customer Card", "Customer: 10000");
 *   page.onCompleted = (taskId, results) => ...;
 *   const taskId = await page.enqueueBackgroundTask(50100, {Wait: "1000"}, {timeout: 10000});
 *
 * <span data-pbt-cue="50101" data-pbt-result="BlockedCustomers">-</span> shows "-" until its
 * task's result arrives. The wire format is documented in pbt_server/web/messages.py.
 */
(() => {
  "use strict";
  const SCRIPT = document.currentScript;
  const BASE = new URL(".", (SCRIPT && SCRIPT.src) || location.href);
  const LEVELS = ["Ignore", "Warning", "Error"];
  const MAX_TEXT = 4096;
  const ACK_EVERY = 32;

  class PbtError extends Error {
    constructor(code, text) {
      super(text ? `${code}: ${text}` : code);
      this.name = "PbtError";
      this.code = code;
      this.text = text || "";
    }
  }
  const invalid = (text) => new PbtError("InvalidParameters", text);
  const closedError = () => new PbtError("ClientClosed", "this session was closed");

  function checkText(name, value) {
    if (typeof value !== "string") throw new TypeError(`${name} must be a string, not ${typeof value}`);
    if (value.length > MAX_TEXT) throw new RangeError(`${name} is longer than ${MAX_TEXT} characters`);
    return value;
  }

  let shared = null; // the tab's session (a promise): one WebSocket per tab
  let sharedSession = null;

  /** This tab's session; connects on the first call. Rejects with a PbtError (.code). */
  function connect(options = {}) {
    if (!shared) {
      shared = Session._open(options).then(
        (session) => (sharedSession = session),
        (err) => {
          shared = null;
          throw err;
        },
      );
    }
    return shared;
  }

  class Session {
    constructor(url) {
      this.onNotification = null; // ({severity, code, text, callStack, taskId, pageName}) => ...
      this.onClose = null; // (error or null) once the session has ended
      this.id = 0;
      this.closed = false;
      this._url = url;
      this._closeUrl = new URL("close", url.replace(/^ws/, "http")).href;
      this._ws = null;
      this._ready = false; // welcomed on this._ws: requests go out at once
      this._token = null;
      this._grace = 10000;
      this._maxMessage = 65536;
      this._rid = 0;
      this._seq = 0; // last numbered message received
      this._acked = 0;
      this._requests = new Map(); // rid -> {frame, resolve, reject, onReply}
      this._pages = new Map();
      this._tasks = new Map(); // taskId -> {page, recordId, level, cancelled, ready}
      this._events = [];
      this._draining = false;
      this._leave = () => this._goodbye();
    }

    static async _open(options) {
      const url = new URL(options.url || "ws", BASE);
      url.protocol = url.protocol.replace(/^http/, "ws");
      const session = new Session(url.href);
      await session._connect(false);
      addEventListener("pagehide", session._leave);
      return session;
    }

    async openPage(name, recordId = "") {
      const fields = { name: checkText("name", name), record: checkText("recordId", recordId) };
      const reply = await this._request("open_page", fields);
      const page = new Page(this, reply.page, name, recordId);
      this._pages.set(page.id, page);
      return page;
    }

    async ping() {
      await this._request("ping", {});
    }

    /** End the session now: the server cancels its tasks. Idempotent. */
    close() {
      if (this.closed) return;
      const ws = this._ws;
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ op: "close" }));
      this._end(null, closedError());
      if (ws) ws.close(1000);
    }

    _goodbye() {
      // pagehide: a beacon is delivered even while the page goes away; the socket may not be.
      if (this.closed) return;
      if (this._token) navigator.sendBeacon(this._closeUrl, this._token);
      this.close();
    }

    _connect(resume) {
      return new Promise((resolve, reject) => {
        const ws = new WebSocket(this._url);
        let welcomed = false;
        let fatal = null;
        this._ws = ws;
        ws.onopen = () => {
          const hello = { op: "hello", protocol: 1, resume: resume ? this._token : null, seq: resume ? this._seq : 0 };
          ws.send(JSON.stringify(hello));
        };
        ws.onmessage = (event) => {
          const m = JSON.parse(event.data);
          if (m.op === "welcome") {
            welcomed = true;
            this._welcome(m, resume);
            resolve();
          } else if (m.op === "error" && m.rid === null) {
            fatal = new PbtError(m.code, m.text); // the close follows
          } else {
            this._receive(m);
          }
        };
        ws.onclose = (event) => {
          if (this._ws !== ws) return;
          this._ws = null;
          this._ready = false;
          if (!welcomed) {
            reject(fatal || new PbtError("ConnectionLost", `cannot connect to ${this._url} (close code ${event.code})`));
          } else if (!this.closed) {
            this._dropped(fatal, event.code);
          }
        };
      });
    }

    _welcome(m, resume) {
      this.id = m.session;
      this._token = m.token;
      this._grace = m.grace;
      this._maxMessage = m.max_message;
      this._ready = true;
      if (!resume) return;
      for (const [rid, request] of this._requests) {
        if (rid > m.rid) this._ws.send(request.frame); // never reached the server
      }
    }

    async _dropped(fatal, code) {
      if (fatal || code === 1000) {
        this._end(fatal || new PbtError("ConnectionLost", "the server ended the session"));
        return;
      }
      const deadline = Date.now() + this._grace;
      for (let delay = 100; !this.closed; delay = Math.min(delay * 2, 2000)) {
        await new Promise((wake) => setTimeout(wake, Math.min(delay, Math.max(0, deadline - Date.now()))));
        if (this.closed) return;
        try {
          await this._connect(true);
          return;
        } catch (err) {
          if (err.code !== "ConnectionLost") return this._end(err);
          if (Date.now() >= deadline) {
            return this._end(new PbtError("ConnectionLost", `no connection for ${this._grace} ms; the session ended`));
          }
        }
      }
    }

    _end(error, requestError) {
      if (this.closed) return;
      this.closed = true;
      removeEventListener("pagehide", this._leave);
      if (sharedSession === this) shared = sharedSession = null;
      const reason = requestError || error;
      for (const request of this._requests.values()) request.reject(reason);
      this._requests.clear();
      for (const page of this._pages.values()) page.closed = true;
      this._pages.clear();
      this._tasks.clear();
      this._events = [];
      if (this.onClose) this.onClose(error);
      else if (error) console.error(`pbt: session ${this.id} ended: ${error.message}`);
    }

    _request(op, fields, onReply) {
      if (this.closed) return Promise.reject(closedError());
      const rid = ++this._rid;
      this._acked = this._seq;
      const frame = JSON.stringify({ op, rid, ...fields, ack: this._seq });
      const size = new TextEncoder().encode(frame).length;
      if (size > this._maxMessage) {
        return Promise.reject(invalid(`${op} request of ${size} bytes is over the ${this._maxMessage}-byte limit`));
      }
      return new Promise((resolve, reject) => {
        this._requests.set(rid, { frame, resolve, reject, onReply });
        if (this._ready) this._ws.send(frame); // else sent by _welcome after a reconnect
      });
    }

    _receive(m) {
      if (m.seq <= this._seq) return; // sent again after a reconnect: seen already
      this._seq = m.seq;
      if (this._seq - this._acked >= ACK_EVERY && this._ws) {
        this._acked = this._seq;
        this._ws.send(JSON.stringify({ op: "ack", seq: this._seq }));
      }
      if (m.op === "reply" || m.op === "error") {
        const request = this._requests.get(m.rid);
        if (!request) return;
        this._requests.delete(m.rid);
        if (m.op === "error") return request.reject(new PbtError(m.code, m.text));
        if (request.onReply) request.onReply(m);
        request.resolve(m);
      } else {
        this._events.push(m);
        this._schedule();
      }
    }

    _schedule() {
      if (this._draining || !this._events.length) return;
      this._draining = true;
      setTimeout(() => this._drain(), 0);
    }

    async _drain() {
      try {
        while (this._events.length && !this.closed) {
          const m = this._events[0];
          const task = this._tasks.get(m.task);
          // A trigger runs only after the promise that returned its TaskId has resolved.
          if (task && !task.ready) return;
          const page = this._pages.get(m.page);
          if (!task && page && page._enqueuing) return;
          this._events.shift();
          if (task) await this._deliver(m, task);
        }
      } finally {
        this._draining = false;
      }
    }

    async _deliver(m, task) {
      const page = task.page;
      const current = !task.cancelled && !page.closed && page.recordId === task.recordId;
      if (m.op === "progress") {
        if (current && page.onProgress) await this._call(page, m, page.onProgress, m.task, m.progress);
        return;
      }
      this._tasks.delete(m.task);
      if (!current) return; // cancelled, closed, or the page moved to another record
      if (m.op === "completed") {
        if (page.onCompleted) await this._call(page, m, page.onCompleted, m.task, m.results);
        return;
      }
      const handled = page.onError ? await this._call(page, m, page.onError, m.task, m.code, m.text, m.stack) : false;
      if (!handled && task.level !== "Ignore") this._notify(page, m.task, task.level, m.code, m.text, m.stack);
    }

    async _call(page, m, trigger, ...args) {
      try {
        return await trigger.apply(page, args);
      } catch (err) {
        this._notify(page, m.task, "Error", (err && err.name) || "Error", String((err && err.message) || err), String((err && err.stack) || ""));
        return true;
      }
    }

    _notify(page, taskId, severity, code, text, callStack) {
      const note = { severity, code, text, callStack, taskId, pageName: page.name, pageId: page.id };
      try {
        if (this.onNotification) return void this.onNotification(note);
      } catch (err) {
        console.error("pbt: onNotification threw", err);
        return;
      }
      console[severity === "Warning" ? "warn" : "error"](`pbt: ${page.name}: task ${taskId}: ${code}: ${text}`);
    }
  }

  class Page {
    constructor(session, id, name, recordId) {
      this.session = session;
      this.id = id;
      this.name = name;
      this.recordId = recordId;
      this.closed = false;
      this.onCompleted = null; // (taskId, results) => ...
      this.onError = null; // (taskId, code, text, callStack) => isHandled
      this.onProgress = null; // (taskId, progress) => ...: a running task's latest ctx.set_progress value
      this._enqueuing = 0;
    }

    /** Resolves with the TaskId; rejects with a PbtError whose .code is the server's. */
    async enqueueBackgroundTask(codeunitId, parameters = {}, options = {}) {
      const session = this.session;
      if (session.closed) throw closedError();
      if (this.closed) throw new PbtError("PageClosed", `page '${this.name}' is closed`);
      if (!Number.isSafeInteger(codeunitId) || codeunitId < 0) throw invalid(`codeunitId must be a non-negative integer, not ${codeunitId}`);
      if (parameters !== null && (typeof parameters !== "object" || Array.isArray(parameters))) {
        throw invalid(`parameters must be an object of strings, not ${Array.isArray(parameters) ? "an array" : typeof parameters}`);
      }
      const copy = {};
      for (const [key, value] of Object.entries(parameters || {})) {
        if (typeof value !== "string") throw invalid(`parameter '${key}': value is ${typeof value}, not string`);
        copy[key] = value;
      }
      const { timeout = null, errorLevel = "Error" } = options || {};
      if (timeout !== null && !Number.isSafeInteger(timeout)) throw invalid(`timeout must be null or integer milliseconds, not ${timeout}`);
      if (!LEVELS.includes(errorLevel)) throw invalid(`errorLevel must be one of ${LEVELS.join(", ")}, not ${errorLevel}`);
      const task = { page: this, recordId: this.recordId, level: errorLevel, cancelled: false, ready: false };
      const fields = { page: this.id, codeunit: codeunitId, parameters: copy, timeout, level: errorLevel };
      this._enqueuing++;
      try {
        const reply = await session._request("enqueue", fields, (m) => {
          session._tasks.set(m.task, task);
          setTimeout(() => {
            task.ready = true;
            session._schedule();
          }, 0);
        });
        return reply.task;
      } finally {
        this._enqueuing--;
      }
    }

    /** True if the task was waiting or running; false for unknown or finished ids. */
    async cancelBackgroundTask(taskId) {
      const session = this.session;
      if (session.closed) throw closedError();
      const task = session._tasks.get(taskId);
      if (!task || task.page !== this || session._events.some((m) => m.task === taskId && m.op !== "progress")) return false;
      task.cancelled = true;
      const reply = await session._request("cancel", { page: this.id, task: taskId });
      if (!reply.cancelled) task.cancelled = false; // it had finished: its outcome stands
      return reply.cancelled;
    }

    /** Move to another record; tasks enqueued under the old one are cancelled. */
    setRecord(recordId) {
      checkText("recordId", recordId);
      if (this.closed || this.session.closed) return Promise.reject(new PbtError("ClientClosed", `page '${this.name}' was closed`));
      this.recordId = recordId;
      for (const task of this.session._tasks.values()) {
        if (task.page === this && task.recordId !== recordId) task.cancelled = true;
      }
      return this.session._request("set_record", { page: this.id, record: recordId }).then(() => undefined);
    }

    /** Close the page; its tasks are cancelled. Idempotent. */
    close() {
      if (this.closed) return Promise.resolve();
      this.closed = true;
      const session = this.session;
      session._pages.delete(this.id);
      for (const [id, task] of session._tasks) if (task.page === this) session._tasks.delete(id);
      if (session.closed) return Promise.resolve();
      return session._request("close_page", { page: this.id }).then(() => undefined, () => undefined);
    }
  }

  const cuePages = new Map(); // container element -> Promise<Page>

  /** Fill every [data-pbt-cue] under root: "-" until its task's result arrives. */
  async function fillCues(root = document) {
    const cues = [...root.querySelectorAll("[data-pbt-cue]")].filter((el) => !el.dataset.pbtState);
    const groups = new Map(); // container -> Map(task key -> elements)
    for (const el of cues) {
      el.dataset.pbtState = "pending";
      if (!el.textContent.trim()) el.textContent = "-";
      const holder = el.closest("[data-pbt-page]") || document.documentElement;
      const d = el.dataset;
      const key = JSON.stringify([Number(d.pbtCue), d.pbtParams || "{}", d.pbtTimeout || null, d.pbtErrorLevel || "Warning"]);
      if (!groups.has(holder)) groups.set(holder, new Map());
      const tasks = groups.get(holder);
      if (!tasks.has(key)) tasks.set(key, []);
      tasks.get(key).push(el);
    }
    const session = await connect();
    const runs = [];
    for (const [holder, tasks] of groups) {
      if (!cuePages.has(holder)) cuePages.set(holder, cuePage(session, holder));
      const { page, byTask } = await cuePages.get(holder);
      for (const [key, elements] of tasks) {
        const [codeunit, params, timeout, errorLevel] = JSON.parse(key);
        const options = { timeout: timeout === null ? null : Number(timeout), errorLevel };
        runs.push(
          page.enqueueBackgroundTask(codeunit, JSON.parse(params), options).then(
            (taskId) => byTask.set(taskId, elements),
            (err) => {
              for (const el of elements) showError(el, err.code, err.message);
              session._notify(page, 0, "Error", err.code || err.name, err.message, "");
            },
          ),
        );
      }
    }
    await Promise.all(runs);
  }

  async function cuePage(session, holder) {
    const name = holder.dataset.pbtPage || document.title || "Role Center";
    const page = await session.openPage(name, holder.dataset.pbtRecord || "");
    const byTask = new Map();
    page.onCompleted = (taskId, results) => {
      for (const el of byTask.get(taskId) || []) {
        const key = el.dataset.pbtResult;
        el.textContent = key ? results[key] ?? "" : Object.values(results)[0] ?? "";
        el.dataset.pbtState = "done";
      }
      byTask.delete(taskId);
    };
    page.onError = (taskId, code, text) => {
      for (const el of byTask.get(taskId) || []) showError(el, code, text);
      byTask.delete(taskId);
      return false; // shown as a notification of the cue's errorLevel too
    };
    return { page, byTask };
  }

  function showError(el, code, text) {
    el.dataset.pbtState = "error";
    el.title = `${code}: ${text}`;
  }

  window.pbt = { connect, fillCues, PbtError, Session, Page };

  const auto = () => {
    if (document.querySelector("[data-pbt-cue]")) fillCues().catch((err) => console.error("pbt: cues:", err));
  };
  if (SCRIPT && !SCRIPT.hasAttribute("data-pbt-manual")) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", auto);
    else auto();
  }
})();
