/*
 * realtime.js: a small browser client for the /ws/ protocol (CONTRACT §4).
 *
 * No build step and no dependencies: load it with a plain <script> tag and use
 * `new RealtimeClient(options)`. The client
 *   - reconnects with exponential backoff and jitter (each wait is random in the upper half of
 *     its ceiling), so a fleet of browsers does not come back in lockstep after an outage;
 *   - answers close code 1001 (instance draining) with a quick reconnect and 1013 (slow reader)
 *     with a backed-off one; 4001 and 4013 are taken to mean the same (Daphne's WebSocket
 *     library only lets an application send 1000 or 3000-4999), and any other close reconnects
 *     with the normal backoff;
 *   - remembers its topics and subscribes them again on every new connection;
 *   - remembers the last `seq` and `epoch` of every stream it reads (its topics, its user's
 *     stream, the broadcasts) and, after every reconnect, resumes them (`resume`, `subscribe`
 *     with `since`), so what was published meanwhile arrives once and in order; a copy it has
 *     already seen is dropped; on every connection it resumes `user` and `broadcast` (on the
 *     first, with an epoch that matches none, only to learn where they stand);
 *   - queues frames sent while disconnected and flushes them, paced under the server's rate
 *     limit, once connected again;
 *   - sends pings and treats a silent socket as dead (half-open TCP connections never close);
 *   - reports everything as DOM events: it is an EventTarget, and `on(type, fn)` is a shorthand.
 *
 * Events (each a CustomEvent; the data is in `event.detail`):
 *   state        {state, previous, attempt, delay, code, reason}; state is one of
 *                "idle", "connecting" (an attempt in flight), "open", "reconnecting"
 *                (waiting `delay` ms before the next attempt), "closed" (by close())
 *   welcome      the welcome frame {connection, instance, user}
 *   message      a message frame {id, stream, seq, epoch, topic, event, payload, published_at}
 *   recovered    {stream, seq}: after a reconnect, what the stream missed was recovered
 *   reset        {stream, seq, epoch}: messages of the stream were missed and could not be
 *                recovered (too many, too old, or its numbering restarted): reload its state,
 *                e.g. from GET /api/v1/history/
 *   subscribed / unsubscribed / receipt / pong   the server's frame of that type
 *   join / leave {topic, user}: presence changes of a topic subscribed with {presence: true}
 *   members      {topic, users: [user, ...]}: the member list of such a topic, kept up to date
 *                from a snapshot after every (re)subscribe and the joins and leaves since
 *   servererror  an error frame {code, detail, ref} (the socket stays open)
 *   subscriptionerror  {topic, code, detail}: a subscribe was refused; the topic is forgotten
 *   frame        every frame the server sends, before the specific event
 *   queue        {size, dropped} after the outgoing queue changes; `dropped` counts frames
 *                discarded because the queue was full (the oldest go first)
 */
(function (global) {
  "use strict";

  const DEFAULTS = {
    url: null, // full ws:// or wss:// URL; by default derived from the page's own location
    path: "/ws/",
    topics: [],
    minDelay: 500, // ms, ceiling of the first reconnect wait (doubles per failed attempt)
    maxDelay: 15000, // ms, the cap of the exponential backoff
    factor: 2,
    drainCodes: [1001, 4001], // the instance drains: go elsewhere (or to its successor) now
    drainDelay: 250, // ms, upper bound of the jittered wait after a drain close
    slowReaderCodes: [1013, 4013], // we read too slowly: back off before coming back
    slowReaderDelay: 2000, // ms, lower bound of the wait after a slow-reader close
    pingInterval: 25000, // ms between keep-alive pings; 0 turns them off
    maxQueue: 500, // frames kept while disconnected; the oldest are dropped beyond it
    flushBatch: 40, // frames flushed at once: the server allows bursts of twice its rate (50/s)
    flushPause: 1000, // ms between flush batches
    autoConnect: true,
    WebSocket: null, // injectable for tests
  };

  function defaultUrl(path) {
    const scheme = global.location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + global.location.host + path;
  }

  class RealtimeClient extends EventTarget {
    constructor(options) {
      super();
      this.options = Object.assign({}, DEFAULTS, options || {});
      this.url = this.options.url || defaultUrl(this.options.path);
      this.state = "idle";
      this.attempt = 0; // failed attempts since the last welcome
      this.welcome = null;
      this.topics = new Set(this.options.topics);
      this.positions = new Map(); // stream -> {seq, epoch}: the last message seen of each
      this.presenceTopics = new Set(); // topics whose joins and leaves this client follows
      this.members = new Map(); // topic -> Set of usernames on it now
      this._presenceBacklogs = new Map(); // topic -> joins and leaves heard while its snapshot is awaited
      this._presenceWaiters = new Map(); // ref -> resolve, for presence() answers
      this.queue = [];
      this.ws = null;
      this._refCounter = 0;
      this._pendingSubscribes = new Map(); // ref -> topic, to tell which subscribe an error answers
      this._timer = null;
      this._pingTimer = null;
      this._flushTimer = null;
      this._lastHeard = 0;
      this._stopped = false;
      this._onOnline = () => {
        // The network came back: try now instead of waiting out the backoff.
        if (this.state === "reconnecting") this._connectNow();
      };
      if (global.addEventListener) global.addEventListener("online", this._onOnline);
      if (this.options.autoConnect) this.connect();
    }

    /** Subscribe to an event; returns a function that removes the listener. */
    on(type, listener) {
      const wrapped = (event) => listener(event.detail, event);
      this.addEventListener(type, wrapped);
      return () => this.removeEventListener(type, wrapped);
    }

    get connected() {
      return this.state === "open";
    }

    get queued() {
      return this.queue.length;
    }

    /** Open the socket (again, after close()). */
    connect() {
      this._stopped = false;
      if (this.ws || this._timer) return;
      this._connectNow();
    }

    /** Close for good: no reconnect until connect() is called again. */
    close(code, reason) {
      this._stopped = true;
      this._clearTimers();
      const ws = this.ws;
      this.ws = null;
      if (ws) {
        this._detach(ws);
        ws.close(code || 1000, reason || "client closed");
      }
      this._setState("closed", { code: code || 1000, reason: reason || "client closed" });
    }

    /**
     * Remember the topic and subscribe now if connected (else on the next connection). With
     * {presence: true} the client also follows who is on it (`members`, `join`, `leave`).
     */
    subscribe(topic, options) {
      this.topics.add(topic);
      if (options && options.presence) this.presenceTopics.add(topic);
      if (this.connected) this._subscribeNow(topic);
    }

    /** Who is on a topic now, on every instance: resolves to [{user, connections}, ...]. */
    presence(topic) {
      if (!this.connected) return Promise.reject(new Error("not connected"));
      const ref = this._newRef("p");
      const answer = new Promise((resolve, reject) => {
        this._presenceWaiters.set(ref, { resolve: resolve, reject: reject });
      });
      this._sendNow({ type: "presence", ref: ref, topic: topic });
      return answer;
    }

    unsubscribe(topic) {
      this.topics.delete(topic);
      this.presenceTopics.delete(topic);
      this.members.delete(topic);
      this._presenceBacklogs.delete(topic);
      this.positions.delete("topic:" + topic);
      if (this.connected) this._sendNow({ type: "unsubscribe", topic: topic });
    }

    /**
     * Send an inbound frame for the backend ({type: "send"}); returns its ref, which the
     * server's `receipt` (or `servererror`) carries back. Queued while disconnected.
     */
    sendEvent(event, payload, ref) {
      const frameRef = ref || this._newRef("r");
      this.send({ type: "send", ref: frameRef, event: event, payload: payload });
      return frameRef;
    }

    /** Send any frame; frames sent while disconnected are queued and flushed on reconnect. */
    send(frame) {
      if (this.connected && this.queue.length === 0) {
        this._sendNow(frame);
        return true;
      }
      this.queue.push(frame);
      const dropped = this.queue.length > this.options.maxQueue ? this.queue.splice(0, 1).length : 0;
      this._emit("queue", { size: this.queue.length, dropped: dropped });
      return false;
    }

    /**
     * Acknowledge a message. Acks belong to the connection that received the message, so
     * they are sent now or not at all (never queued for another connection).
     */
    ack(id) {
      if (!this.connected) return false;
      this._sendNow({ type: "ack", id: id });
      return true;
    }

    // --- internals -------------------------------------------------------------------

    _newRef(prefix) {
      return prefix + Date.now().toString(36) + "-" + ++this._refCounter;
    }

    _subscribeNow(topic) {
      const ref = this._newRef("s");
      this._pendingSubscribes.set(ref, topic);
      const frame = { type: "subscribe", topic: topic, ref: ref };
      if (this.presenceTopics.has(topic)) frame.presence = true;
      const since = this.positions.get("topic:" + topic);
      if (since) frame.since = { seq: since.seq, epoch: since.epoch };
      this._sendNow(frame);
    }

    _refreshMembers(topic) {
      // The snapshot after a (re)subscribe; joins and leaves keep it current from there. Those
      // heard before the snapshot's answer are kept and applied on top of it, in order: the
      // snapshot may have been read before some of them happened.
      const backlog = [];
      this._presenceBacklogs.set(topic, backlog);
      this.presence(topic).then(
        (users) => {
          if (this._presenceBacklogs.get(topic) !== backlog) return; // a newer snapshot is coming
          this._presenceBacklogs.delete(topic);
          if (!this.presenceTopics.has(topic)) return;
          const members = new Set(users.map((member) => member.user));
          for (const change of backlog) this._applyPresence(members, change);
          this.members.set(topic, members);
          this._emit("members", { topic: topic, users: Array.from(members).sort() });
        },
        () => {
          if (this._presenceBacklogs.get(topic) === backlog) this._presenceBacklogs.delete(topic);
        }
      );
    }

    _applyPresence(members, change) {
      if (change.type === "join") members.add(change.user);
      else members.delete(change.user);
    }

    _resumeNow() {
      // First thing on a new connection: the server holds these streams until it is told. A
      // stream with no message seen yet is resumed too, from an epoch no stream has (""): the
      // answer (`recovered: false`, nothing replayed) gives its current position, so that the
      // next reconnect recovers what is published meanwhile even if nothing arrived before.
      for (const stream of ["user", "broadcast"]) {
        const since = this.positions.get(stream) || { seq: 0, epoch: "" };
        this._sendNow({ type: "resume", stream: stream, since: { seq: since.seq, epoch: since.epoch } });
      }
    }

    /** A stream's message: false if it is a copy of one already seen (then it is not emitted). */
    _advance(frame) {
      if (typeof frame.stream !== "string" || typeof frame.seq !== "number") return true;
      const seen = this.positions.get(frame.stream);
      if (seen && seen.epoch === frame.epoch && frame.seq <= seen.seq) return false;
      if (seen && seen.epoch !== frame.epoch) this._emit("reset", { stream: frame.stream, seq: frame.seq, epoch: frame.epoch });
      this.positions.set(frame.stream, { seq: frame.seq, epoch: frame.epoch });
      return true;
    }

    /** The answer to a subscribe or resume: where the stream stands, and whether it recovered. */
    _positioned(stream, frame) {
      if (typeof frame.seq !== "number") return;
      if (frame.recovered === true) {
        this._emit("recovered", { stream: stream, seq: frame.seq });
        return; // the missed messages follow, and move the position on
      }
      // Nothing seen of the stream before (the position was asked for): nothing was missed.
      if (frame.recovered === false && this.positions.has(stream)) {
        this._emit("reset", { stream: stream, seq: frame.seq, epoch: frame.epoch });
      }
      this.positions.set(stream, { seq: frame.seq, epoch: frame.epoch });
    }

    _connectNow() {
      this._clearTimers();
      if (this._stopped) return;
      const Impl = this.options.WebSocket || global.WebSocket;
      this._setState("connecting", { attempt: this.attempt });
      let ws;
      try {
        ws = new Impl(this.url);
      } catch (error) {
        this._scheduleReconnect({ code: 0, reason: String(error) });
        return;
      }
      this.ws = ws;
      ws.onopen = () => this._opened(ws);
      ws.onmessage = (event) => this._received(ws, event);
      ws.onclose = (event) => this._closed(ws, event);
      ws.onerror = () => {}; // always followed by close, which decides what to do
    }

    _detach(ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }

    _opened(ws) {
      if (ws !== this.ws) return;
      this._lastHeard = Date.now();
      this._setState("open", { attempt: this.attempt });
      this._pendingSubscribes.clear();
      this._resumeNow();
      for (const topic of this.topics) this._subscribeNow(topic);
      this._flush();
      this._startPings();
    }

    _received(ws, event) {
      if (ws !== this.ws) return;
      this._lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return; // the server only sends JSON; ignore anything else rather than fail
      }
      if (!frame || typeof frame !== "object") return;
      this._emit("frame", frame);
      switch (frame.type) {
        case "welcome":
          this.welcome = frame;
          this.attempt = 0; // a welcome proves the path works: start the backoff afresh
          this._emit("welcome", frame);
          break;
        case "message":
          if (this._advance(frame)) this._emit("message", frame);
          break;
        case "subscribed":
          for (const [ref, topic] of this._pendingSubscribes) {
            if (topic === frame.topic) this._pendingSubscribes.delete(ref);
          }
          this._positioned("topic:" + frame.topic, frame);
          this._emit("subscribed", frame);
          if (this.presenceTopics.has(frame.topic)) this._refreshMembers(frame.topic);
          break;
        case "presence": {
          const waiter = this._presenceWaiters.get(frame.ref);
          this._presenceWaiters.delete(frame.ref);
          if (waiter) waiter.resolve(frame.users);
          this._emit("presence", frame);
          break;
        }
        case "join":
        case "leave": {
          const backlog = this._presenceBacklogs.get(frame.topic);
          const members = this.members.get(frame.topic);
          if (backlog) {
            backlog.push(frame); // applied once the snapshot arrives
          } else if (members) {
            this._applyPresence(members, frame);
            this._emit("members", { topic: frame.topic, users: Array.from(members).sort() });
          }
          this._emit(frame.type, frame);
          break;
        }
        case "resumed":
          this._positioned(frame.stream, frame);
          this._emit("resumed", frame);
          break;
        case "error":
          if (this._presenceWaiters.has(frame.ref)) {
            this._presenceWaiters.get(frame.ref).reject(Object.assign(new Error(frame.detail), frame));
            this._presenceWaiters.delete(frame.ref);
          }
          this._emit("servererror", frame);
          this._subscribeRefused(frame);
          break;
        default:
          if (typeof frame.type === "string") this._emit(frame.type, frame);
      }
    }

    _subscribeRefused(frame) {
      const topic = this._pendingSubscribes.get(frame.ref);
      if (topic === undefined) return;
      this._pendingSubscribes.delete(frame.ref);
      if (frame.code === "rate_limited") {
        // Transient: ask again in a moment, on this connection if it still stands.
        setTimeout(() => {
          if (this.connected && this.topics.has(topic)) this._subscribeNow(topic);
        }, this.options.flushPause);
        return;
      }
      // Refused for good (forbidden, invalid): asking again on every reconnect would not help.
      this.topics.delete(topic);
      this._emit("subscriptionerror", { topic: topic, code: frame.code, detail: frame.detail });
    }

    _closed(ws, event) {
      if (ws !== this.ws) return;
      this._detach(ws);
      for (const waiter of this._presenceWaiters.values()) waiter.reject(new Error("disconnected"));
      this._presenceWaiters.clear();
      this.ws = null;
      this._stopPings();
      this._stopFlush();
      if (this._stopped) {
        this._setState("closed", { code: event.code, reason: event.reason });
        return;
      }
      this._scheduleReconnect({ code: event.code, reason: event.reason });
    }

    _scheduleReconnect(info) {
      const o = this.options;
      let delay;
      if (o.drainCodes.includes(info.code)) {
        // The instance is draining on purpose; another one (or its successor) takes us.
        delay = Math.random() * o.drainDelay;
        this.attempt = Math.max(this.attempt, 1);
      } else {
        this.attempt += 1;
        const ceiling = Math.min(o.maxDelay, o.minDelay * Math.pow(o.factor, this.attempt - 1));
        // Jitter over the upper half of the ceiling: spread out, yet never hammering at ~0 ms.
        delay = ceiling / 2 + Math.random() * (ceiling / 2);
        if (o.slowReaderCodes.includes(info.code)) delay = Math.max(delay, o.slowReaderDelay);
      }
      this._setState("reconnecting", {
        attempt: this.attempt,
        delay: Math.round(delay),
        code: info.code,
        reason: info.reason,
      });
      this._timer = setTimeout(() => {
        this._timer = null;
        this._connectNow();
      }, delay);
    }

    _sendNow(frame) {
      this.ws.send(JSON.stringify(frame));
    }

    _flush() {
      this._stopFlush();
      const batch = this.queue.splice(0, this.options.flushBatch);
      for (const frame of batch) this._sendNow(frame);
      if (batch.length) this._emit("queue", { size: this.queue.length, dropped: 0 });
      if (this.queue.length) {
        this._flushTimer = setTimeout(() => {
          this._flushTimer = null;
          if (this.connected) this._flush();
        }, this.options.flushPause);
      }
    }

    _startPings() {
      const every = this.options.pingInterval;
      if (!every) return;
      this._pingTimer = setInterval(() => {
        if (!this.connected) return;
        if (Date.now() - this._lastHeard > 2 * every) {
          // Nothing heard for two intervals: the connection is dead even if TCP says not.
          const ws = this.ws;
          this._closed(ws, { code: 4000, reason: "no answer to pings" });
          ws.close();
          return;
        }
        this._sendNow({ type: "ping" });
      }, every);
    }

    _stopPings() {
      if (this._pingTimer) clearInterval(this._pingTimer);
      this._pingTimer = null;
    }

    _stopFlush() {
      if (this._flushTimer) clearTimeout(this._flushTimer);
      this._flushTimer = null;
    }

    _clearTimers() {
      if (this._timer) clearTimeout(this._timer);
      this._timer = null;
      this._stopPings();
      this._stopFlush();
    }

    _setState(state, info) {
      const previous = this.state;
      this.state = state;
      this._emit("state", Object.assign({ state: state, previous: previous }, info || {}));
    }

    _emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, { detail: detail }));
    }
  }

  global.RealtimeClient = RealtimeClient;
})(typeof window !== "undefined" ? window : globalThis);
