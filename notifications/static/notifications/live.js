/*
 * live.js: the live page (/) on top of RealtimeClient.
 *
 * Everything that comes from a message or a server frame is written with textContent, never
 * as markup: a payload holding <script> or <img onerror> must show as text and run nothing.
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("realtime-config").textContent);
  const TOPIC = /^[A-Za-z0-9_.:/@-]{1,200}$/;
  const MAX_ACTIVITY = 60;
  const SESSION_CHECK_EVERY = 3; // failed attempts between checks that we are still signed in
  const STATE_LABELS = {
    idle: "Starting",
    connecting: "Connecting…",
    open: "Connected",
    reconnecting: "Reconnecting",
    closed: "Closed",
    signedout: "Signed out",
  };
  const CLOSE_REASONS = {
    1000: "closed normally",
    1001: "the instance is draining",
    1006: "connection lost or refused",
    1011: "server error",
    1013: "too slow to keep up; backing off",
    4000: "no answer to pings",
    4001: "the instance is draining",
    4013: "too slow to keep up; backing off",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    state: $("rt-state"),
    detail: $("rt-detail"),
    instance: $("rt-instance"),
    connection: $("rt-connection"),
    queued: $("rt-queued"),
    topicForm: $("subscribe-form"),
    topicInput: $("topic-input"),
    topicList: $("topic-list"),
    topicEmpty: $("topic-empty"),
    sendForm: $("send-form"),
    sendEvent: $("send-event"),
    echoPayload: $("echo-payload"),
    chatRoom: $("chat-room"),
    chatText: $("chat-text"),
    sendFeedback: $("send-feedback"),
    activity: $("activity"),
    messages: $("messages"),
    messagesEmpty: $("messages-empty"),
    missed: $("messages-missed"),
    presence: $("presence-list"),
    presenceEmpty: $("presence-empty"),
    messageCount: $("message-count"),
    clear: $("clear-messages"),
    template: $("message-template"),
  };

  // --- topics remembered per user across page loads --------------------------------------

  const storageKey = "realtime.topics." + config.user;

  function loadTopics() {
    try {
      const stored = JSON.parse(window.localStorage.getItem(storageKey) || "[]");
      return Array.isArray(stored) ? stored.filter((t) => typeof t === "string" && TOPIC.test(t)) : [];
    } catch (error) {
      return [];
    }
  }

  function saveTopics() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify(Array.from(client.topics)));
    } catch (error) {
      // Storage may be disabled (private mode): topics then last as long as the page.
    }
  }

  const client = new RealtimeClient({ path: config.path, topics: loadTopics(), autoConnect: false });
  // The page shows who is on each of its topics: it follows every topic's presence.
  for (const topic of client.topics) client.presenceTopics.add(topic);
  window.realtime = client; // handy from the browser console
  const confirmed = new Set(); // topics the current connection has confirmed
  let received = 0;
  let sessionGone = false;

  // --- small helpers ---------------------------------------------------------------------

  function text(tag, value, className) {
    const node = document.createElement(tag);
    node.textContent = value;
    if (className) node.className = className;
    return node;
  }

  function clock(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function describe(value) {
    if (value === undefined) return "";
    try {
      return JSON.stringify(value, null, 2);
    } catch (error) {
      return String(value);
    }
  }

  function activity(kind, message) {
    const item = document.createElement("li");
    item.className = "activity-" + kind;
    item.append(text("time", clock(new Date())), text("span", message));
    el.activity.prepend(item);
    while (el.activity.children.length > MAX_ACTIVITY) el.activity.lastElementChild.remove();
  }

  // --- connection state ------------------------------------------------------------------

  function showState(state, detail) {
    el.state.dataset.state = state;
    el.state.textContent = STATE_LABELS[state] || state;
    el.detail.textContent = detail || "";
    document.body.dataset.rtState = state;
  }

  client.on("state", (info) => {
    if (sessionGone) return;
    if (info.state !== "open") {
      confirmed.clear();
      renderTopics();
    }
    if (info.state === "open") {
      showState("open", "Connected at " + clock(new Date()) + ".");
      activity("state", "connected");
    } else if (info.state === "connecting") {
      showState("connecting", info.attempt ? "Attempt " + (info.attempt + 1) + "." : "");
    } else if (info.state === "reconnecting") {
      const why = CLOSE_REASONS[info.code] || (info.code ? "closed with " + info.code : "closed");
      const seconds = (info.delay / 1000).toFixed(1);
      showState("reconnecting", "Socket " + why + "; retrying in " + seconds + " s.");
      if (info.previous === "open") activity("state", "disconnected (" + why + ")");
      el.instance.textContent = "—";
      el.connection.textContent = "—";
      if (info.attempt && info.attempt % SESSION_CHECK_EVERY === 0) checkSession();
    } else {
      showState(info.state, "");
    }
  });

  client.on("welcome", (frame) => {
    el.instance.textContent = frame.instance || "?";
    el.connection.textContent = frame.connection || "?";
    activity("state", "welcome from " + frame.instance + " as " + frame.user);
  });

  client.on("queue", (info) => {
    el.queued.textContent = String(info.size);
    if (info.dropped) activity("error", "queue full: dropped the oldest unsent frame");
  });

  /** A refused handshake looks like any lost connection; ask the page itself whether we are signed out. */
  function checkSession() {
    fetch(window.location.pathname, { redirect: "manual", credentials: "same-origin", cache: "no-store" })
      .then((response) => {
        if (response.type !== "opaqueredirect") return;
        sessionGone = true;
        client.close(1000, "signed out");
        showState("signedout", "Your session has ended. ");
        const link = text("a", "Sign in again");
        link.href = "/accounts/login/?next=" + encodeURIComponent(window.location.pathname);
        el.detail.append(link);
      })
      .catch(() => {}); // the instance is down too: keep retrying the socket
  }

  // --- messages --------------------------------------------------------------------------

  function renderMessage(frame) {
    const item = el.template.content.firstElementChild.cloneNode(true);
    const published = frame.published_at ? new Date(frame.published_at) : new Date();
    const time = item.querySelector(".message-time");
    time.textContent = clock(published);
    time.dateTime = frame.published_at || published.toISOString();
    time.title = published.toString();
    item.querySelector(".message-event").textContent = frame.event || "(no event)";
    const topic = item.querySelector(".message-topic");
    if (frame.topic) {
      topic.textContent = frame.topic;
    } else {
      topic.textContent = "to you or everyone";
      topic.classList.add("muted");
    }
    item.querySelector(".message-id").textContent = String(frame.id);
    item.querySelector(".message-payload").textContent = describe(frame.payload);
    item.dataset.id = String(frame.id);
    return item;
  }

  client.on("message", (frame) => {
    const item = renderMessage(frame);
    el.messages.prepend(item);
    while (el.messages.children.length > config.maxMessages) el.messages.lastElementChild.remove();
    received += 1;
    el.messageCount.textContent = String(received);
    el.messagesEmpty.hidden = true;
    // Shown, so acknowledged: the delivery log then records acked_at for this connection.
    if (client.ack(frame.id)) item.dataset.acked = "true";
  });

  // After a reconnect the client recovers what each stream missed; when it cannot (too many
  // missed, too old), the page says so: messages of that stream are missing from the list.
  client.on("recovered", (info) => activity("ok", "recovered what " + info.stream + " missed while disconnected"));
  client.on("reset", (info) => {
    activity("error", "missed messages of " + info.stream + " that could not be recovered");
    el.missed.hidden = false;
    el.missed.textContent =
      "Some messages of " + info.stream + " were missed while disconnected and could not be recovered.";
  });

  el.clear.addEventListener("click", () => {
    el.messages.replaceChildren();
    el.messagesEmpty.hidden = false;
  });

  // --- topics ----------------------------------------------------------------------------

  function renderTopics() {
    const chips = Array.from(client.topics)
      .sort()
      .map((topic) => {
        const chip = document.createElement("li");
        chip.className = "chip";
        chip.dataset.topic = topic;
        chip.dataset.confirmed = confirmed.has(topic) ? "true" : "false";
        chip.title = confirmed.has(topic) ? "Subscribed" : "Waiting for the server";
        const remove = text("button", "×", "chip-remove");
        remove.type = "button";
        remove.setAttribute("aria-label", "Unsubscribe from " + topic);
        remove.addEventListener("click", () => {
          client.unsubscribe(topic);
          confirmed.delete(topic);
          saveTopics();
          renderTopics();
          renderPresence(); // now, not at the server's answer: none comes while disconnected
        });
        chip.append(text("span", topic), remove);
        return chip;
      });
    el.topicList.replaceChildren(...chips);
    el.topicEmpty.hidden = chips.length > 0;
  }

  el.topicForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = el.topicInput.value.trim();
    if (!TOPIC.test(topic)) {
      el.topicInput.setCustomValidity("1-200 characters of letters, digits and _ . : / @ -");
      el.topicInput.reportValidity();
      return;
    }
    el.topicInput.setCustomValidity("");
    client.subscribe(topic, { presence: true });
    saveTopics();
    renderTopics();
    el.topicInput.value = "";
  });
  el.topicInput.addEventListener("input", () => el.topicInput.setCustomValidity(""));

  client.on("subscribed", (frame) => {
    confirmed.add(frame.topic);
    renderTopics();
    activity("ok", "subscribed to " + frame.topic);
  });
  client.on("unsubscribed", (frame) => {
    activity("ok", "unsubscribed from " + frame.topic);
    renderPresence();
  });

  // --- who is on each topic (presence) ---------------------------------------------------

  function renderPresence() {
    const rows = Array.from(client.members.keys())
      .filter((topic) => client.topics.has(topic))
      .sort()
      .map((topic) => {
        const row = document.createElement("li");
        row.dataset.topic = topic;
        const users = Array.from(client.members.get(topic)).sort();
        row.append(text("strong", topic), text("span", users.length ? users.join(", ") : "nobody", "muted"));
        return row;
      });
    el.presence.replaceChildren(...rows);
    el.presenceEmpty.hidden = rows.length > 0;
  }

  client.on("members", renderPresence);
  client.on("join", (frame) => activity("ok", frame.user + " joined " + frame.topic));
  client.on("leave", (frame) => activity("ok", frame.user + " left " + frame.topic));
  client.on("subscriptionerror", (info) => {
    saveTopics();
    renderTopics();
    activity("error", "could not subscribe to " + info.topic + ": " + info.detail);
  });

  // --- sending frames --------------------------------------------------------------------

  function showFieldsFor(eventName) {
    for (const field of el.sendForm.querySelectorAll("[data-for-event]")) {
      field.hidden = field.dataset.forEvent !== eventName;
    }
  }
  el.sendEvent.addEventListener("change", () => showFieldsFor(el.sendEvent.value));
  showFieldsFor(el.sendEvent.value);

  function payloadFor(eventName) {
    if (eventName === "chat.message") {
      const room = el.chatRoom.value.trim();
      const words = el.chatText.value;
      if (!TOPIC.test("chat." + room)) throw new Error("A room is letters, digits and _ . : / @ -");
      if (!words.trim()) throw new Error("Write some text first.");
      return { room: room, text: words };
    }
    const raw = el.echoPayload.value;
    try {
      return JSON.parse(raw);
    } catch (error) {
      return raw; // not JSON: send it as a string
    }
  }

  el.sendForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const eventName = el.sendEvent.value;
    let payload;
    try {
      payload = payloadFor(eventName);
    } catch (error) {
      el.sendFeedback.textContent = error.message;
      return;
    }
    const wasConnected = client.connected;
    if (eventName === "chat.message") {
      const topic = "chat." + payload.room;
      if (!client.topics.has(topic)) {
        // You want to see your own room: subscribe to it before the first line you send (the
        // server takes a socket's frames in order, so the line cannot overtake the subscribe).
        client.subscribe(topic, { presence: true });
        saveTopics();
        renderTopics();
      }
    }
    const ref = client.sendEvent(eventName, payload);
    el.sendFeedback.textContent = wasConnected
      ? "Sent " + eventName + " (" + ref + "), waiting for its receipt."
      : "Queued " + eventName + " (" + ref + "): it goes out when the socket is back.";
    if (eventName === "chat.message") el.chatText.value = "";
  });

  client.on("receipt", (frame) => {
    activity("ok", "receipt for " + frame.ref + ": inbound " + frame.id);
    el.sendFeedback.textContent = "Queued for the workers as inbound " + frame.id + ".";
  });

  client.on("servererror", (frame) => {
    const ref = frame.ref ? " (" + frame.ref + ")" : "";
    activity("error", frame.code + ref + ": " + frame.detail);
    if (frame.ref && String(frame.ref).startsWith("r")) {
      el.sendFeedback.textContent = "Refused: " + frame.detail;
    }
  });

  // --- go --------------------------------------------------------------------------------

  renderTopics();
  showState("idle", "");
  client.connect();
})();
