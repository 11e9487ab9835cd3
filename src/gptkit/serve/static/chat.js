// gptkit chat: the web page's client for the OpenAI-compatible API of `gptkit serve`.
//
// It POSTs the conversation to v1/chat/completions with "stream": true and parses the
// Server-Sent Events from the response body itself (EventSource cannot POST). Stop aborts
// the fetch, which closes the connection; the server then cancels the generation.
// Nothing leaves this page: the conversation and the API key live in variables and form
// fields only (no cookies, no localStorage).
//
// Answers render as Markdown through marked, and every piece of HTML that reaches the page
// goes through DOMPurify first (both vendored under static/vendor/), so a model that writes
// <script> or onerror= cannot run anything; the user's own text is inserted as text. With
// "token probabilities" on, an answer shows its tokens coloured by probability, the
// alternatives on hover (the API's logprobs / top_logprobs). Each answer shows its tokens
// per second and time to first token, as llama.cpp's web UI does, and a button that asks
// the server (POST v1/attention) for the attention map of the conversation up to it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const input = $("input");
  const sendButton = $("send");
  const stopButton = $("stop");
  const status = $("status");
  const colour = $("colour");
  const TOP_LOGPROBS = 5; // alternatives shown on hover

  const history = []; // the conversation: API messages, without the system message
  const replies = []; // every answer shown: {body, content, tokens, calls}
  let modelId = null;
  let controller = null; // the AbortController of the reply being streamed

  function headers() {
    const result = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) result.Authorization = "Bearer " + key;
    return result;
  }

  // The server's error as an Error, with the API's error code (when it sent one) as .code.
  async function apiError(response) {
    let error = new Error(`HTTP ${response.status} ${response.statusText}`);
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        error = new Error(body.error.message);
        error.code = body.error.code;
      }
    } catch (_) {
      // not JSON: keep the status line
    }
    return error;
  }

  // A model id as people name it: the file name of a path, without ".gguf".
  function displayName(id) {
    const base = String(id).split(/[\\/]/).filter(Boolean).pop() || String(id);
    return base.replace(/\.gguf$/i, "");
  }

  async function loadModel() {
    try {
      const response = await fetch("v1/models", { headers: headers() });
      if (!response.ok) {
        if (response.status === 401) {
          $("settings").open = true;
          $("model").textContent = "this server needs an API key (Settings)";
        } else {
          $("model").textContent = (await apiError(response)).message;
        }
        return null;
      }
      const card = (await response.json()).data[0];
      modelId = card.id;
      const maxTokens = $("max-tokens");
      if (card.max_model_len && Number(maxTokens.value) >= card.max_model_len) {
        maxTokens.value = ""; // a small model: let the server fit the reply to its context
      }
      $("model").textContent = displayName(card.id);
      document.title = displayName(card.id) + " · gptkit chat";
      $("context").textContent = card.max_model_len ? `context ${card.max_model_len} tokens` : "";
      return modelId;
    } catch (e) {
      $("model").textContent = "the server is unreachable";
      return null;
    }
  }

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function bubble(kind, text) {
    const hint = $("hint");
    if (hint) hint.remove();
    const el = element("div", "message " + kind, text);
    log.appendChild(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  function note(el, text) {
    el.appendChild(element("span", "note", text));
  }

  // -- rendering ------------------------------------------------------------------------

  // Markdown as sanitized HTML inside el; without the libraries, plain text (never raw HTML).
  function renderMarkdown(el, text) {
    if (window.marked && window.DOMPurify) {
      const html = window.marked.parse(text, { gfm: true, breaks: true, async: false });
      el.innerHTML = window.DOMPurify.sanitize(html);
    } else {
      el.textContent = text;
    }
    el.classList.remove("tokens");
  }

  function tokenTitle(entry) {
    const lines = [`p ${Math.exp(entry.logprob).toFixed(3)}`];
    for (const alt of entry.top_logprobs || []) {
      lines.push(`${JSON.stringify(alt.token)}  ${Math.exp(alt.logprob).toFixed(3)}`);
    }
    return lines.join("\n");
  }

  // The answer's tokens as spans, each coloured by its probability (class p0: below 0.1 ..
  // p9: 0.9 and above), its probability and the alternatives in its tooltip.
  function renderTokens(el, tokens) {
    el.replaceChildren(
      ...tokens.map((entry) => {
        const p = Math.exp(entry.logprob);
        const span = element("span", "tok p" + Math.min(9, Math.floor(p * 10)), entry.token);
        span.title = tokenTitle(entry);
        return span;
      }),
    );
    el.classList.add("tokens");
  }

  // An assistant's tool calls (OpenAI tool_calls: id, function.name, function.arguments).
  function renderToolCalls(calls) {
    const box = element("div", "tool-calls");
    for (const call of calls) {
      const item = element("div", "tool-call");
      item.appendChild(element("span", "label", "tool call"));
      item.appendChild(element("code", "name", (call.function && call.function.name) || "?"));
      item.appendChild(element("pre", "arguments", (call.function && call.function.arguments) || ""));
      box.appendChild(item);
    }
    return box;
  }

  function paint(reply) {
    if (colour.checked && reply.tokens.length) renderTokens(reply.body, reply.tokens);
    else renderMarkdown(reply.body, reply.content);
    if (reply.calls.length) reply.tools.replaceChildren(renderToolCalls(reply.calls));
  }

  // A message of the API (user, assistant with content and/or tool_calls, tool) as an
  // element of the transcript.
  function renderMessage(message) {
    const content = typeof message.content === "string" ? message.content : "";
    if (message.role === "tool") {
      const el = element("div", "message tool");
      el.appendChild(element("span", "label", "tool result" +
        (message.tool_call_id ? ` (${message.tool_call_id})` : "")));
      el.appendChild(element("pre", "result", content));
      return el;
    }
    if (message.role !== "assistant") return element("div", "message " + message.role, content);
    const el = element("div", "message assistant");
    const reply = { body: element("div", "body"), tools: element("div", ""), content,
                    tokens: [], calls: message.tool_calls || [] };
    el.append(reply.body, reply.tools);
    paint(reply);
    return el;
  }

  // -- streaming --------------------------------------------------------------------------

  // The parsed JSON of each `data:` event of a Server-Sent Events body, until [DONE].
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let blank;
      while ((blank = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, blank);
        buffer = buffer.slice(blank).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a comment or a keep-alive
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  // Streamed tool calls arrive in pieces keyed by index: the name once, the arguments in parts.
  function addCallPieces(calls, pieces) {
    for (const piece of pieces) {
      const i = piece.index ?? calls.length;
      calls[i] = calls[i] || { id: piece.id, type: "function", function: { name: "", arguments: "" } };
      if (piece.id) calls[i].id = piece.id;
      const fn = piece.function || {};
      if (fn.name) calls[i].function.name += fn.name;
      if (fn.arguments) calls[i].function.arguments += fn.arguments;
    }
  }

  function newReply() {
    const el = bubble("assistant streaming", "");
    const reply = { el, body: element("div", "body"), tools: element("div", ""), content: "",
                    tokens: [], calls: [], meta: element("div", "meta") };
    el.append(reply.body, reply.tools, reply.meta);
    el.dataset.chunks = "0";
    replies.push(reply);
    return reply;
  }

  // Tokens per second of decoding (after the first token) and the time to the first token.
  function showSpeed(reply, started, first, ended, tokens) {
    if (first === null || !tokens) return;
    const ttft = first - started;
    const decoding = (ended - first) / 1000;
    const perSecond = tokens > 1 && decoding > 0 ? (tokens - 1) / decoding : tokens / ((ended - started) / 1000);
    const stats = element("span", "stats",
      `${tokens} tokens · ${perSecond.toFixed(1)} tokens/s · first token ${Math.round(ttft)} ms`);
    stats.dataset.tokensPerSecond = perSecond.toFixed(2);
    stats.dataset.ttftMs = String(Math.round(ttft));
    reply.meta.appendChild(stats);
  }

  function attentionButton(reply, messages) {
    const button = element("button", "attention", "attention map");
    button.type = "button";
    button.title = "what each token of this answer attended to (all layers and heads)";
    button.addEventListener("click", () => showAttention(messages));
    reply.meta.appendChild(button);
  }

  async function showAttention(messages) {
    const dialog = $("attention");
    const image = $("attention-image");
    image.removeAttribute("src");
    $("attention-note").textContent = "computing the attention map…";
    if (!dialog.open) dialog.showModal();
    try {
      const response = await fetch("v1/attention", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({ model: modelId, messages }),
      });
      if (!response.ok) throw await apiError(response);
      const map = await response.json();
      image.src = map.image; // a data: URL of a PNG the server drew
      $("attention-title").textContent = `Attention of the answer's ${map.answer_tokens} tokens`;
      $("attention-note").textContent = map.note;
    } catch (e) {
      $("attention-note").textContent = "no attention map: " + e.message;
    }
  }

  function busy(on) {
    sendButton.disabled = on;
    stopButton.disabled = !on;
  }

  function buildRequest() {
    const request = {
      model: modelId,
      stream: true,
      stream_options: { include_usage: true },
      logprobs: true,
      top_logprobs: TOP_LOGPROBS,
    };
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) request.temperature = temperature;
    const topP = parseFloat($("top-p").value);
    if (!Number.isNaN(topP)) request.top_p = topP;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) request.max_tokens = maxTokens;
    return request;
  }

  function conversation() {
    const system = $("system").value.trim();
    return (system ? [{ role: "system", content: system }] : []).concat(history);
  }

  async function send(text) {
    if (!modelId && !(await loadModel())) {
      bubble("error", "Cannot reach the model: " + $("model").textContent);
      return;
    }
    history.push({ role: "user", content: text });
    bubble("user", text);
    const reply = newReply();
    const request = buildRequest();

    controller = new AbortController();
    busy(true);
    status.textContent = "generating…";
    let finish = null;
    let usage = null;
    let dropped = 0;
    const started = performance.now();
    let first = null;
    try {
      let response;
      for (;;) {
        request.messages = conversation();
        response = await fetch("v1/chat/completions", {
          method: "POST",
          headers: headers(),
          body: JSON.stringify(request),
          signal: controller.signal,
        });
        if (response.ok) break;
        const error = await apiError(response);
        // Too long for the context: forget the oldest exchange and ask again, as long as
        // something older than the new message is left.
        if (error.code !== "context_length_exceeded" || history.length < 3) throw error;
        history.splice(0, 2);
        dropped += 2;
      }
      for await (const event of events(response)) {
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const delta = choice.delta || {};
          const logprobs = choice.logprobs && choice.logprobs.content;
          if (logprobs) reply.tokens.push(...logprobs);
          if (delta.tool_calls) addCallPieces(reply.calls, delta.tool_calls);
          if (delta.content || delta.tool_calls) {
            if (first === null) first = performance.now();
            reply.content += delta.content || "";
            paint(reply);
            reply.el.dataset.text = reply.content;
            reply.el.dataset.chunks = String(Number(reply.el.dataset.chunks) + 1);
            reply.el.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      const message = { role: "assistant", content: reply.content };
      if (reply.calls.length) message.tool_calls = reply.calls;
      history.push(message);
      const count = usage ? usage.completion_tokens : reply.tokens.length;
      showSpeed(reply, started, first, performance.now(), count);
      attentionButton(reply, conversation());
      const tokens = usage ? `${usage.completion_tokens} tokens` : "";
      const why = finish === "length" ? "stopped at the token limit" : "done";
      const fit = dropped ? `the ${dropped} oldest messages were dropped to fit the context` : "";
      status.textContent = [tokens, why, fit].filter(Boolean).join(" · ");
    } catch (e) {
      if (e.name === "AbortError") {
        history.push({ role: "assistant", content: reply.content }); // keep what was shown
        note(reply.el, "(stopped)");
        status.textContent = "stopped";
      } else {
        history.pop(); // the turn failed: forget it, and give the text back for a retry
        if (!reply.content) {
          reply.el.remove();
          replies.pop();
        }
        bubble("error", e.message);
        if (!input.value) input.value = text;
        status.textContent = "error";
        if (/API key/i.test(e.message)) {
          $("settings").open = true;
          $("api-key").focus();
        }
      }
    } finally {
      reply.el.classList.remove("streaming");
      reply.el.dataset.text = reply.content;
      reply.el.dataset.done = "true";
      controller = null;
      busy(false);
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text).finally(() => input.focus());
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });

  stopButton.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  colour.addEventListener("change", () => replies.forEach(paint));

  $("attention-close").addEventListener("click", () => $("attention").close());

  $("reset").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    replies.length = 0;
    log.replaceChildren();
    status.textContent = "new conversation";
    input.focus();
  });

  $("api-key").addEventListener("change", () => {
    modelId = null;
    loadModel();
  });

  // For tests and for pages that embed the chat: the renderers the transcript uses.
  window.gptkitChat = { displayName, renderMarkdown, renderMessage };

  loadModel();
  input.focus();
})();
