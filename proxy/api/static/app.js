// llama-proxy's chat page: plain ES2020, no build step. Served under a strict CSP (script-src
// 'self', style-src 'self'): no inline code or styles, state shown with classes and the `hidden`
// attribute. The user's text is only ever set with textContent; the model's answers are rendered
// as Markdown by markdown.js (raw HTML off, safe links), everything else is textContent.
"use strict";

(() => {
  const STORE_CREDENTIAL = "llama-proxy.credential";
  const STORE_MODEL = "llama-proxy.model";

  const $ = (id) => document.getElementById(id);
  const ui = {
    signin: $("signin"), signinForm: $("signin-form"), credential: $("credential"),
    signinError: $("signin-error"), app: $("app"), model: $("model"),
    drawer: $("drawer"), drawerToggle: $("drawer-toggle"), backdrop: $("backdrop"),
    newChat: $("new-chat"), newChatTop: $("new-chat-top"), signout: $("signout"),
    conversations: $("conversations"), conversationsEmpty: $("conversations-empty"),
    messages: $("messages"), empty: $("empty"), notice: $("notice"), status: $("status"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  };

  const state = {
    credential: null,
    conversationId: null,
    controller: null, // the AbortController of the answer being streamed, if any
    stopped: false,
    noticeTimer: null,
  };

  // ---------------------------------------------------------------- storage

  function readStored(key) {
    try { return localStorage.getItem(key); } catch { return null; }
  }
  function writeStored(key, value) {
    try {
      if (value === null) localStorage.removeItem(key); else localStorage.setItem(key, value);
    } catch { /* private mode: kept for this page only */ }
  }

  // A sign-in link carries the credential in the fragment (#token=...), which browsers never
  // send to a server. Take it, keep it, and take it out of the address bar and history.
  function credentialFromFragment() {
    const hash = location.hash.replace(/^#/, "");
    if (!hash) return null;
    const params = new URLSearchParams(hash);
    const value = params.get("token") || params.get("key");
    if (value === null) return null;
    history.replaceState(history.state, "", location.pathname + location.search);
    return value.trim() || null;
  }

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, message, code, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  function headers(json) {
    const h = {
      "Authorization": "Bearer " + state.credential,
      "ngrok-skip-browser-warning": "1",
      "Accept": "application/json",
    };
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  // Seconds to wait, from Retry-After (delta-seconds or an HTTP date); null if absent.
  function retryAfterSeconds(response) {
    const value = response.headers.get("Retry-After");
    if (!value) return null;
    if (/^\s*\d+\s*$/.test(value)) return parseInt(value, 10);
    const when = Date.parse(value);
    return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
  }

  async function errorFrom(response) {
    let message = "", code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = String(body.error.message || "");
        code = body.error.code || body.error.type || null;
      }
    } catch { /* not JSON: a tunnel's or proxy's own page */ }
    return new ApiError(response.status, message || response.statusText || "Request failed",
                        code, retryAfterSeconds(response));
  }

  async function api(method, path, body, signal) {
    let response;
    try {
      response = await fetch(path, {
        method, headers: headers(body !== undefined), signal, cache: "no-store",
        credentials: "omit", referrerPolicy: "no-referrer",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError(0, "network", "network_error", null);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async function apiJson(method, path, body) {
    const response = await api(method, path, body);
    return response.json();
  }

  // ---------------------------------------------------------------- messages to the user

  function explain(err) {
    if (!(err instanceof ApiError)) return "Something went wrong: " + String(err && err.message || err);
    const wait = err.retryAfter;
    const inSeconds = (n) => (n === 1 ? "1 second" : n + " seconds");
    switch (err.status) {
      case 0:
        return "Cannot reach the appliance (network error). Check your connection and try again.";
      case 401:
        return "Your key or token was not accepted (wrong, expired or revoked). Please sign in again.";
      case 403:
        return "Not allowed: " + err.message;
      case 404:
        return "Not found: " + err.message;
      case 413:
        return "That message is too long for the appliance. Shorten it and try again.";
      case 429:
        return "Too many requests. " +
          (wait !== null ? "Try again in " + inSeconds(wait) + "." : "Wait a moment and try again.");
      case 503:
        return "The model is busy or still loading. " +
          (wait !== null ? "Retry in " + inSeconds(wait) + "." : "Retry shortly.");
      default:
        return "Error " + err.status + ": " + err.message;
    }
  }

  function showNotice(text, kind) {
    clearTimeout(state.noticeTimer);
    ui.notice.textContent = text;
    ui.notice.className = "notice " + (kind || "error");
    ui.notice.hidden = false;
  }
  function hideNotice() {
    clearTimeout(state.noticeTimer);
    ui.notice.hidden = true;
    ui.notice.textContent = "";
  }
  function announce(text) { ui.status.textContent = text; }

  // A 401 anywhere: the stored credential is useless; back to the sign-in form.
  function handleError(err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut(explain(err));
      return;
    }
    showNotice(explain(err));
  }

  // ---------------------------------------------------------------- sign-in

  function showSignin(message) {
    ui.app.hidden = true;
    ui.signin.hidden = false;
    ui.signinError.hidden = !message;
    ui.signinError.textContent = message || "";
    ui.credential.value = "";
    ui.credential.focus();
  }

  async function enter() {
    ui.signin.hidden = true;
    ui.app.hidden = false;
    hideNotice();
    const ok = await loadModels();
    if (ok) {
      loadConversations();
      ui.prompt.focus();
    }
  }

  function signOut(message) {
    if (state.controller) state.controller.abort();
    state.credential = null;
    writeStored(STORE_CREDENTIAL, null);
    resetConversation();
    ui.conversations.replaceChildren();
    ui.model.replaceChildren();
    closeDrawer();
    showSignin(message);
  }

  ui.signinForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = ui.credential.value.trim();
    if (!value) {
      showSignin("Paste an API key or a token first.");
      return;
    }
    state.credential = value;
    writeStored(STORE_CREDENTIAL, value);
    ui.credential.value = "";
    await enter();
  });

  ui.signout.addEventListener("click", () => signOut(""));

  // Another tab signed in or out.
  window.addEventListener("storage", (event) => {
    if (event.key !== STORE_CREDENTIAL) return;
    if (!event.newValue && state.credential) signOut("Signed out in another tab.");
  });

  // ---------------------------------------------------------------- models

  async function loadModels() {
    let body;
    try {
      body = await apiJson("GET", "v1/models");
    } catch (err) {
      handleError(err);
      return !(err instanceof ApiError && err.status === 401);
    }
    const ids = (body.data || []).map((m) => String(m.id));
    const wanted = readStored(STORE_MODEL);
    ui.model.replaceChildren(...ids.map((id) => {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      return option;
    }));
    if (wanted && ids.includes(wanted)) ui.model.value = wanted;
    ui.model.disabled = ids.length === 0;
    if (ids.length === 0) showNotice("The appliance lists no models yet. Retry shortly.", "info");
    return true;
  }

  ui.model.addEventListener("change", () => writeStored(STORE_MODEL, ui.model.value));

  // ---------------------------------------------------------------- conversations

  function when(seconds) {
    if (!seconds) return "";
    const date = new Date(seconds * 1000);
    const today = new Date();
    return date.toDateString() === today.toDateString()
      ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : date.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  async function loadConversations() {
    let body;
    try {
      body = await apiJson("GET", "api/conversations");
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return; // an appliance without /api/chat
      handleError(err);
      return;
    }
    const items = (body.data || []).map(conversationItem);
    ui.conversations.replaceChildren(...items);
    ui.conversationsEmpty.hidden = items.length > 0;
  }

  function conversationItem(c) {
    const li = document.createElement("li");
    li.className = "conversation";
    li.dataset.id = c.id;
    if (c.id === state.conversationId) li.classList.add("current");

    const open = document.createElement("button");
    open.type = "button";
    open.className = "conversation-open";
    const title = document.createElement("span");
    title.className = "conversation-title";
    title.textContent = c.title || "Untitled";
    const meta = document.createElement("span");
    meta.className = "conversation-meta";
    meta.textContent = [when(c.updated_at), c.messages ? c.messages + " messages" : ""]
      .filter(Boolean).join(" · ");
    open.append(title, meta);
    if (c.id === state.conversationId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => openConversation(c.id));

    // Deleting takes two clicks: the first arms the button for a few seconds.
    const del = document.createElement("button");
    del.type = "button";
    del.className = "conversation-delete";
    del.setAttribute("aria-label", "Delete conversation: " + (c.title || "Untitled"));
    del.title = "Delete";
    del.textContent = "\u2715";
    let armed = null;
    del.addEventListener("click", async () => {
      if (!armed) {
        del.classList.add("armed");
        del.textContent = "Delete?";
        del.setAttribute("aria-label", "Confirm: delete conversation " + (c.title || "Untitled"));
        armed = setTimeout(() => {
          armed = null;
          del.classList.remove("armed");
          del.textContent = "\u2715";
          del.setAttribute("aria-label", "Delete conversation: " + (c.title || "Untitled"));
        }, 4000);
        return;
      }
      clearTimeout(armed);
      await deleteConversation(c.id);
    });

    li.append(open, del);
    return li;
  }

  async function openConversation(id) {
    if (state.controller) return;
    let body;
    try {
      body = await apiJson("GET", "api/conversations/" + encodeURIComponent(id));
    } catch (err) {
      handleError(err);
      if (err instanceof ApiError && err.status === 404) loadConversations();
      return;
    }
    hideNotice();
    state.conversationId = body.id;
    clearMessages();
    for (const m of body.messages || []) addMessage(m.role, m.content);
    if (body.model && [...ui.model.options].some((o) => o.value === body.model)) {
      ui.model.value = body.model;
    }
    markCurrent();
    closeDrawer();
    scrollToEnd(true);
    announce("Opened conversation " + (body.title || ""));
    ui.prompt.focus();
  }

  async function deleteConversation(id) {
    try {
      await api("DELETE", "api/conversations/" + encodeURIComponent(id));
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) {
        handleError(err);
        return;
      }
    }
    if (id === state.conversationId) resetConversation();
    announce("Conversation deleted");
    await loadConversations();
  }

  function markCurrent() {
    for (const li of ui.conversations.children) {
      const current = li.dataset.id === state.conversationId;
      li.classList.toggle("current", current);
      const open = li.querySelector(".conversation-open");
      if (current) open.setAttribute("aria-current", "true"); else open.removeAttribute("aria-current");
    }
  }

  function resetConversation() {
    state.conversationId = null;
    clearMessages();
    markCurrent();
  }

  function newConversation() {
    if (state.controller) state.controller.abort();
    hideNotice();
    resetConversation();
    closeDrawer();
    announce("New conversation");
    ui.prompt.focus();
  }
  ui.newChat.addEventListener("click", newConversation);
  ui.newChatTop.addEventListener("click", newConversation);

  // ---------------------------------------------------------------- the drawer (phones)

  function openDrawer() {
    loadConversations();
    ui.drawer.classList.add("open");
    ui.backdrop.hidden = false;
    ui.drawerToggle.setAttribute("aria-expanded", "true");
    ui.newChat.focus();
  }
  function closeDrawer() {
    if (!ui.drawer.classList.contains("open")) return;
    ui.drawer.classList.remove("open");
    ui.backdrop.hidden = true;
    ui.drawerToggle.setAttribute("aria-expanded", "false");
  }
  ui.drawerToggle.addEventListener("click", () => {
    if (ui.drawer.classList.contains("open")) closeDrawer(); else openDrawer();
  });
  ui.backdrop.addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ui.drawer.classList.contains("open")) {
      closeDrawer();
      ui.drawerToggle.focus();
    }
  });

  // ---------------------------------------------------------------- the message list

  function clearMessages() {
    ui.messages.replaceChildren(ui.empty);
    ui.empty.hidden = false;
  }

  function addMessage(role, text) {
    ui.empty.hidden = true;
    const mine = role === "user";
    const article = document.createElement("article");
    article.className = "message " + (mine ? "user" : "assistant");
    const who = document.createElement("h3");
    who.className = "visually-hidden";
    who.textContent = mine ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "message-text" + (mine ? "" : " markdown");
    if (mine) body.textContent = text || "";
    else if (text) window.answerMarkdown.render(body, text);
    article.append(who, body);
    ui.messages.append(article);
    return { article, body };
  }

  function addMeta(article, text, kind) {
    const meta = document.createElement("p");
    meta.className = "message-meta" + (kind ? " " + kind : "");
    meta.textContent = text;
    article.append(meta);
    return meta;
  }

  function nearEnd() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }
  function scrollToEnd(force) {
    if (force || nearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // ---------------------------------------------------------------- server-sent events

  // Parse an SSE byte stream (fetch + ReadableStream: EventSource can neither POST nor send
  // headers). Calls onEvent(name, data) per event; comments (": ping") are skipped.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const dispatch = (block) => {
      let name = "message";
      const data = [];
      for (const line of block.split(/\r\n|\r|\n/)) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) onEvent(name, data.join("\n"));
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let boundary;
      while ((boundary = buffer.search(/\r\n\r\n|\n\n|\r\r/)) !== -1) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
        dispatch(block);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) dispatch(buffer);
  }

  // ---------------------------------------------------------------- sending

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.model.disabled = busy || ui.model.options.length === 0;
    ui.composer.classList.toggle("busy", busy);
  }

  async function send() {
    const text = ui.prompt.value.trim();
    if (!text || state.controller) return;
    hideNotice();
    ui.prompt.value = "";
    autosize();

    const mine = addMessage("user", text);
    const answer = addMessage("assistant", "");
    const shown = window.answerMarkdown.stream(answer.body, (draw) => {
      const follow = nearEnd();
      draw();
      if (follow) scrollToEnd(true);
    });
    answer.article.classList.add("streaming");
    answer.article.setAttribute("aria-busy", "true");
    scrollToEnd(true);

    const controller = new AbortController();
    state.controller = controller;
    state.stopped = false;
    setBusy(true);
    announce("Generating an answer");

    const request = { message: text, stream: true };
    if (state.conversationId) request.conversation_id = state.conversationId;
    if (ui.model.value) request.model = ui.model.value;

    let started = false, finished = false, failed = null, usage = null;
    try {
      const response = await api("POST", "api/chat", request, controller.signal);
      await readEvents(response, (name, data) => {
        let payload;
        try { payload = JSON.parse(data); } catch { return; }
        if (name === "start") {
          started = true;
          if (payload.conversation_id) state.conversationId = payload.conversation_id;
        } else if (name === "delta") {
          started = true;
          if (typeof payload.content === "string" && payload.content) {
            shown.append(payload.content);
          }
        } else if (name === "done") {
          finished = true;
          if (payload.conversation_id) state.conversationId = payload.conversation_id;
          if (typeof payload.response === "string" && payload.response) {
            shown.set(payload.response);
          }
          usage = payload.usage || null;
        } else if (name === "error") {
          const e = payload.error || {};
          failed = String(e.message || "The answer failed.");
          if (Number.isInteger(payload.retry_after)) {
            failed += " Try again in " + payload.retry_after + " s.";
          }
        }
      });
    } catch (err) {
      if (err && err.name === "AbortError") {
        // Stopped by the user (or by starting something else).
      } else if (!started) {
        // Refused before anything was generated: give the text back to retry it.
        mine.article.remove();
        answer.article.remove();
        if (!ui.messages.querySelector(".message")) ui.empty.hidden = false;
        ui.prompt.value = text;
        autosize();
        if (err instanceof ApiError && err.status === 404 && request.conversation_id) {
          state.conversationId = null;
          markCurrent();
          showNotice("That conversation no longer exists; this message will start a new one.");
          loadConversations();
        } else {
          handleError(err);
        }
        finish(controller);
        return;
      } else {
        failed = err instanceof ApiError ? explain(err)
          : "The connection was lost while the answer was streaming.";
      }
    }

    if (shown.text) shown.flush();  // what the last frame had not drawn yet
    answer.article.classList.remove("streaming");
    answer.article.removeAttribute("aria-busy");
    if (state.stopped || controller.signal.aborted) {
      answer.article.classList.add("stopped");
      addMeta(answer.article, "Stopped", "stopped-note");
      announce("Stopped");
    } else if (failed) {
      answer.article.classList.add("failed");
      addMeta(answer.article, failed, "error");
      announce("The answer failed");
    } else if (!finished) {
      answer.article.classList.add("failed");
      addMeta(answer.article, "The answer ended early (the connection closed).", "error");
      announce("The answer ended early");
    } else {
      if (usage && usage.completion_tokens) {
        addMeta(answer.article, usage.completion_tokens + " tokens");
      }
      announce("Answer complete");
    }
    if (!answer.body.textContent && !answer.article.classList.contains("failed")) {
      answer.body.textContent = state.stopped ? "" : "(no answer)";
    }
    finish(controller);
    loadConversations();
    // A stopped answer is kept by the server just after the connection closes.
    if (state.stopped) setTimeout(loadConversations, 1000);
  }

  function finish(controller) {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    markCurrent();
    if (!ui.drawer.classList.contains("open")) ui.prompt.focus();
  }

  function stop() {
    if (!state.controller) return;
    state.stopped = true;
    state.controller.abort();
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.stop.addEventListener("click", stop);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  // The message box grows with its text, up to a few lines (rows, not inline styles).
  function autosize() {
    const lines = ui.prompt.value.split("\n").length;
    ui.prompt.rows = Math.min(Math.max(lines, 1), 6);
  }
  ui.prompt.addEventListener("input", autosize);

  // ---------------------------------------------------------------- start

  // A link must not switch a signed-in user to someone else's account unasked: whoever made
  // it could then read what they write next.
  function acceptLinked(linked) {
    const current = readStored(STORE_CREDENTIAL);
    if (!current || current === linked) return true;
    return window.confirm("This link signs in with a different key or token, replacing " +
                          "yours on this device. Sign in with it?");
  }

  // A sign-in link opened in a tab that already shows the page changes only the fragment.
  window.addEventListener("hashchange", () => {
    const linked = credentialFromFragment();
    if (!linked || !acceptLinked(linked)) return;
    if (state.controller) state.controller.abort();
    writeStored(STORE_CREDENTIAL, linked);
    state.credential = linked;
    resetConversation();
    enter();
  });

  const fromLink = credentialFromFragment();
  if (fromLink && acceptLinked(fromLink)) writeStored(STORE_CREDENTIAL, fromLink);
  state.credential = fromLink || readStored(STORE_CREDENTIAL);
  if (state.credential) enter(); else showSignin("");
})();
