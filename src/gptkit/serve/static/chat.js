// gptkit chat: the web page's client for the OpenAI-compatible API of `gptkit serve`.
//
// It POSTs the conversation to v1/chat/completions with "stream": true and parses the
// Server-Sent Events from the response body itself (EventSource cannot POST). Stop aborts
// the fetch, which closes the connection; the server then cancels the generation.
// Nothing leaves this page: the conversation and the API key live in variables and form
// fields only (no cookies, no localStorage), and text is inserted as text, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const input = $("input");
  const sendButton = $("send");
  const stopButton = $("stop");
  const status = $("status");

  const history = []; // the conversation: {role, content}, without the system message
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
      const context = card.max_model_len ? ` · context ${card.max_model_len} tokens` : "";
      const maxTokens = $("max-tokens");
      if (card.max_model_len && Number(maxTokens.value) >= card.max_model_len) {
        maxTokens.value = ""; // a small model: let the server fit the reply to its context
      }
      $("model").textContent = card.id + context;
      return modelId;
    } catch (e) {
      $("model").textContent = "the server is unreachable";
      return null;
    }
  }

  function bubble(kind, text) {
    const hint = $("hint");
    if (hint) hint.remove();
    const el = document.createElement("p");
    el.className = "message " + kind;
    el.textContent = text;
    log.appendChild(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  function note(el, text) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = text;
    el.appendChild(span);
  }

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

  function busy(on) {
    sendButton.disabled = on;
    stopButton.disabled = !on;
  }

  async function send(text) {
    if (!modelId && !(await loadModel())) {
      bubble("error", "Cannot reach the model: " + $("model").textContent);
      return;
    }
    history.push({ role: "user", content: text });
    bubble("user", text);
    const reply = bubble("assistant streaming", "");
    reply.dataset.chunks = "0";

    const system = $("system").value.trim();
    const request = { model: modelId, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) request.temperature = temperature;
    const topP = parseFloat($("top-p").value);
    if (!Number.isNaN(topP)) request.top_p = topP;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) request.max_tokens = maxTokens;

    controller = new AbortController();
    busy(true);
    status.textContent = "generating…";
    let content = "";
    let finish = null;
    let usage = null;
    let dropped = 0;
    try {
      let response;
      for (;;) {
        request.messages = (system ? [{ role: "system", content: system }] : []).concat(history);
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
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            content += piece;
            reply.textContent = content;
            reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
            reply.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      history.push({ role: "assistant", content });
      const tokens = usage ? `${usage.completion_tokens} tokens` : "";
      const why = finish === "length" ? "stopped at the token limit" : "done";
      const fit = dropped ? `the ${dropped} oldest messages were dropped to fit the context` : "";
      status.textContent = [tokens, why, fit].filter(Boolean).join(" · ");
    } catch (e) {
      if (e.name === "AbortError") {
        history.push({ role: "assistant", content }); // keep what was shown
        note(reply, "(stopped)");
        status.textContent = "stopped";
      } else {
        history.pop(); // the turn failed: forget it, and give the text back for a retry
        if (!content) reply.remove();
        bubble("error", e.message);
        if (!input.value) input.value = text;
        status.textContent = "error";
        if (/API key/i.test(e.message)) {
          $("settings").open = true;
          $("api-key").focus();
        }
      }
    } finally {
      reply.classList.remove("streaming");
      reply.dataset.done = "true";
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

  $("reset").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    log.replaceChildren();
    status.textContent = "new conversation";
    input.focus();
  });

  $("api-key").addEventListener("change", () => {
    modelId = null;
    loadModel();
  });

  loadModel();
  input.focus();
})();
