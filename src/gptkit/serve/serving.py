"""The OpenAI API's semantics over the engine, without HTTP: request → ids and parameters →
engine → response objects.

vLLM's ``entrypoints/openai/serving_*.py`` are the reference layout. A request becomes a
:class:`Job`::

    ChatCompletionRequest ─► chat template ─► ids ─┐
    CompletionRequest ─► prompts ─► ids ───────────┤   n choices per prompt, choice j seeded
                                                   ├─► seed + j ─► Engine.submit ─► Job
    OpenAI sampling fields ─► openai_sampling() ───┘
    Job ─► result(): ChatCompletion | Completion     (usage, finish_reason, logprobs)
    Job ─► chunks(): ChatCompletionChunk | Completion pieces, then an optional usage chunk

A chat request with ``tools`` renders them through the chat template (see
:mod:`gptkit.tokenizer.chat`: the template's own tool format, else the ``<tool_call>``
fallback) and answers in up to two stages, as llama.cpp's lazy grammars do::

    "auto":      free text, with <tool_call> as a stop string ─► stopped there? ─┐
    "required" / a named function ───────────────────────────────────────────────┤
                 prompt + text + "<tool_call>\n" under the call's JSON Schema ◄──┘
                 ({"name": <a tool's name>, "arguments": <its parameters>}) ─► tool_calls

so the arguments always satisfy the tool's schema (the structured-output engine of
:mod:`gptkit.generate.constrain`), while a plain answer is not constrained at all. An answer
makes at most one call (``parallel_tool_calls`` is accepted and has no effect).

Log-probabilities come from the engine's rows (each :class:`Request` is a core ``Row`` that
scores its tokens when its SampleConfig's ``logprobs`` is set; a final eos token is left out,
as it is not part of the text). ``echo`` on completions scores the prompt with one uncached
forward (:func:`~gptkit.generate.logprobs.prompt_logprobs`); with ``max_tokens: 0`` nothing
is generated, which is how evaluation harnesses score a given text.

:func:`openai_sampling` is the one place where the API's field names (``max_tokens``,
``presence_penalty``, ...) become a :class:`~gptkit.config.SampleConfig`. Failures are
raised as :class:`ServingError` kinds; :mod:`gptkit.serve.app` maps each kind to a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from gptkit.config import Grammar, SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.beam import Beam, BeamConfig, generate_beams
from gptkit.generate.constrain import grammar_text
from gptkit.generate.core import check_prompt, prompt_ids
from gptkit.generate.logprobs import TokenLogprob, prompt_logprobs, token_text
from gptkit.serve.engine import (
    Chunk,
    Engine,
    EngineError,
    EngineStopped,
    PromptTooLong,
    QueueFull,
    Request,
)
from gptkit.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from gptkit.tokenizer.chat import TOOL_CALL_OPEN, apply_chat_template

AnyRequest = ChatCompletionRequest | CompletionRequest


# -- errors, by kind (the app gives each its status) -------------------------------------------


class ServingError(GptkitError):
    """A request this server refuses: the client's to fix (400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ModelNotFound(ServingError):
    """The request names a model this server does not serve (404)."""


class ServerBusy(ServingError):
    """The engine's waiting line is full, or it is stopping: retry later (503)."""


class GenerationFailed(ServingError):
    """The engine failed while generating (500)."""


# -- the one mapping of the OpenAI sampling fields ---------------------------------------------


def openai_sampling(
    max_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
) -> SampleConfig:
    """The OpenAI API's sampling fields (and defaults) as a :class:`SampleConfig`.

    ``top_p == 0`` keeps only the most likely token: greedy decoding. Raises
    :class:`EngineError` with the field's name for a value out of range.
    """
    if max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {max_tokens}")
    if top_p == 0:
        temperature, top_p = 0.0, 1.0
    try:
        return SampleConfig(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            stop=stop,  # type: ignore[arg-type]  # SampleConfig makes a tuple
            logprobs=logprobs,
        )
    except GptkitError as e:
        raise EngineError(str(e)) from None


# -- requests in flight -------------------------------------------------------------------------


@dataclass
class Job:
    """One API request in flight: ``n`` engine requests per prompt, in choice order."""

    chat: bool
    requests: list[Request]
    prompt_tokens: int
    include_usage: bool
    id: str
    created: int
    logprobs: int | None = None  # top alternatives per token; None: no logprobs asked for
    echoes: list[Echo] | None = None  # per choice, its prompt given back (completions)
    beams: asyncio.Future[list[Beam]] | None = None  # use_beam_search: the choices to come
    tools: ToolTurn | None = None  # an answer that may call a tool: its second stage

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()
        if self.beams is not None:  # the search itself runs to its end, unread
            self.beams.cancel()


@dataclass
class Echo:
    """A completion choice's prompt as ``echo`` gives it back: its text, ids, and their
    scores (the first None) when ``logprobs`` is asked for."""

    text: str
    ids: list[int]
    scores: list[TokenLogprob | None]


@dataclass
class ToolTurn:
    """What a tool-calling answer needs for its call stage: the rendered prompt, the
    grammar of a call, and the reply's sampling settings."""

    prompt: str
    grammar: Grammar
    params: SampleConfig
    auto: bool  # the model may answer in text; False: the call comes at once


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON Schema of one call: ``{"name": <a tool's name>, "arguments": <its
    parameters>}``, any of the tools (or only ``name``)."""
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"]["parameters"],
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name in (None, t["function"]["name"])
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def finish_reason(chunk: Chunk) -> Literal["stop", "length"]:
    return "length" if chunk.finish_reason == "length" else "stop"


def finite(logprob: float) -> float:
    """JSON has no -inf: an impossible token's logprob is clamped to -9999 (as vLLM does)."""
    return max(logprob, -9999.0)


def scored_tokens(req: Request, start: int, chunk: Chunk) -> list[TokenLogprob]:
    """The scores of ``req``'s tokens from ``start`` up to ``chunk``; an eos that ends the
    request is left out (it is not part of the text)."""
    end = chunk.completion_tokens
    if chunk.finish_reason is not None and req.finish_reason == "eos":
        end -= 1
    return req.scores[start:end]


class Serving:
    """Completions and chat completions over one :class:`Engine`, as response objects.

    Args:
        engine: a started engine; its tokenizer renders and encodes prompts.
        model_name: the model's id; requests naming another raise :class:`ModelNotFound`.
        max_tokens_limit: the most ``max_tokens`` a request may ask for (default: the
            context); also the reply limit of a chat request that names none.
    """

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int | None = None):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.token_limit = max_tokens_limit or engine.context
        self._beam_lock = threading.Lock()  # one beam search at a time

    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=now(), max_model_len=self.engine.context)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFound(
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    # -- request → ids and parameters --------------------------------------------------------

    async def start_chat(self, body: ChatCompletionRequest) -> Job:
        """Render the messages with the model's chat template and submit ``n`` choices."""
        self.check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        tools = body.tool_dicts() if body.calls_tools() else None
        prompt = ""

        def encode() -> list[int]:
            nonlocal prompt
            prompt = apply_chat_template(self.tokenizer, messages, tools=tools)
            return self.tokenizer.encode_prompt(prompt)

        try:  # in a thread: a long prompt must not stall the other streams
            ids = await asyncio.to_thread(encode)
        except GptkitError as e:
            raise ServingError(str(e), param="messages") from None
        if tools:
            return self._tool_job(ids, prompt, tools, body)
        job = self._submit(True, [ids], body, "messages")
        job.logprobs = body.alternatives()
        return job

    async def start_completion(self, body: CompletionRequest) -> Job:
        """Encode every prompt (text or ids) and submit ``n`` choices for each."""
        self.check_model(body.model)

        def encode() -> list[list[int]]:
            # Token ids go as given; text, and an empty prompt, as generate() encodes them.
            return [
                list(p) if p and not isinstance(p, str) else prompt_ids(self.tokenizer, p or "", i)
                for i, p in enumerate(body.prompts())
            ]

        try:
            prompts = await asyncio.to_thread(encode)
            echoes = await self._echoes(body, prompts) if body.echo else None
        except GptkitError as e:
            raise ServingError(str(e), param="prompt") from None
        if body.max_tokens == 0:  # nothing to generate: the echo (if any) is the answer
            echoes = echoes or [Echo("", [], [])] * (len(prompts) * body.n)
            tokens = sum(map(len, prompts))
            job = Job(False, [], tokens, body.include_usage(), new_id("cmpl"), now())
        else:
            job = self._submit(False, prompts, body, "prompt")
        job.logprobs, job.echoes = body.alternatives(), echoes
        return job

    async def _echoes(self, body: CompletionRequest, prompts: list[list[int]]) -> list[Echo]:
        """Each choice's prompt, scored when ``logprobs`` is asked for (one uncached forward
        per prompt, in a thread)."""
        echoes = []
        for i, (ids, given) in enumerate(zip(prompts, body.prompts(), strict=True)):
            check_prompt(i, ids, self.engine.vocab)
            scores: list[TokenLogprob | None] = []
            if body.logprobs is not None:
                model, k, vocab = self.engine.model, body.logprobs, self.engine.vocab
                scores = await asyncio.to_thread(prompt_logprobs, model, ids, k, vocab)
            text = given if isinstance(given, str) else self.tokenizer.decode(ids)
            echoes += [Echo(text, ids, scores)] * body.n
        return echoes

    def sampling(self, body: AnyRequest, choice: int) -> SampleConfig:
        """Choice ``choice``'s parameters. Choice j of n gets seed + j: n seeded choices
        differ, and choice 0 is what the same request with n=1 gives."""
        if isinstance(body, ChatCompletionRequest):
            asked, default = body.token_limit(), self.token_limit
        else:  # the OpenAI API's default for completions is 16 tokens
            asked, default = body.max_tokens, min(16, self.token_limit)
        if asked is not None and asked > self.token_limit:
            raise ServingError(
                f"max_tokens is {asked}, but this server allows at most {self.token_limit} "
                f"(the model's context is {self.engine.context} tokens)",
                param="max_tokens",
            )
        try:
            return openai_sampling(
                asked or default,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                seed=None if body.seed is None else (body.seed + choice) % 2**63,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                stop=body.stop_strings(),
                logprobs=body.alternatives(),
            )
        except GptkitError as e:
            raise ServingError(str(e)) from None

    def grammar(self, body: AnyRequest) -> Grammar | None:
        """The grammar ``response_format`` asks for (None for text), checked here so that a
        bad schema is a 400 naming the field before anything is submitted."""
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            grammar = Grammar("json_object")
        else:
            assert fmt.json_schema is not None  # the protocol requires it
            grammar = Grammar.of(json_schema=fmt.json_schema.schema_)
        assert grammar is not None
        try:
            grammar_text(grammar, self.tokenizer)
        except GptkitError as e:
            raise ServingError(f"response_format: {e}", param="response_format") from None
        return grammar

    def call_grammar(self, tools: list[dict], body: ChatCompletionRequest) -> Grammar:
        """The grammar of a call under ``tool_choice``; each tool's schema is checked
        first, so that a bad one is a 400 naming it."""
        for i, tool in enumerate(tools):
            try:
                grammar_text(Grammar.of(json_schema=tool["function"]["parameters"]), self.tokenizer)  # type: ignore[arg-type]
            except GptkitError as e:
                raise ServingError(
                    f"tools[{i}].function.parameters ({tool['function']['name']}): {e}",
                    param=f"tools[{i}].function.parameters",
                ) from None
        choice = body.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        grammar = Grammar.of(json_schema=call_schema(tools, name))
        assert grammar is not None
        return grammar

    def _tool_job(
        self, ids: list[int], prompt: str, tools: list[dict], body: ChatCompletionRequest
    ) -> Job:
        """An answer that may call a tool (see the module docstring): with "auto", a free
        first stage that stops at the call tag; else the call stage at once."""
        grammar = self.call_grammar(tools, body)
        params = self.sampling(body, 0)
        auto = body.tool_choice in (None, "auto")
        turn = ToolTurn(prompt, grammar, params, auto)
        job = Job(True, [], len(ids), body.include_usage(), new_id("chatcmpl"), now(), tools=turn)
        if auto:
            first = params.replace(stop=(*params.stop, TOOL_CALL_OPEN))
            job.requests.append(self._submit_one(ids, first, "messages"))
        return job

    def _submit_one(self, ids: list[int], params: SampleConfig, param: str) -> Request:
        """One engine request; the engine's refusals as serving errors."""
        try:
            return self.engine.submit(ids, params)
        except PromptTooLong as e:
            raise ServingError(str(e), param=param, code="context_length_exceeded") from None
        except (QueueFull, EngineStopped) as e:
            raise ServerBusy(str(e), code="server_busy") from None
        except GptkitError as e:
            raise ServingError(str(e), param=param) from None

    async def _tool_events(self, job: Job) -> AsyncIterator[tuple[str, str | int | None]]:
        """A tool-calling answer as events: ``("text", piece)`` while it writes, then at
        most one ``("call", '{"name": ..., "arguments": ...}')``, then ``("end", reason)``
        and ``("tokens", completion tokens)``."""
        turn = job.tools
        assert turn is not None
        text, used, reason = "", 0, "stop"
        try:
            if turn.auto:
                first = job.requests[0]
                async for chunk in first:
                    text += chunk.text
                    if chunk.text:
                        yield "text", chunk.text
                    if chunk.finish_reason is not None:
                        used, reason = chunk.completion_tokens, finish_reason(chunk)
                if TOOL_CALL_OPEN not in self.tokenizer.decode(first.generated):
                    yield "end", reason
                    yield "tokens", used
                    return
            left = turn.params.max_new_tokens - used
            if left < 1:
                yield "end", "length"
                yield "tokens", used
                return
            ids = self.tokenizer.encode_prompt(turn.prompt + text + TOOL_CALL_OPEN + "\n")
            params = turn.params.replace(max_new_tokens=left, grammar=turn.grammar, stop=())
            call = self._submit_one(ids, params, "messages")
            job.requests.append(call)
            body, reason = "", "length"
            async for chunk in call:
                body += chunk.text
                if chunk.finish_reason is not None:
                    used += chunk.completion_tokens
                    reason = finish_reason(chunk)
        except EngineError as e:
            raise GenerationFailed(str(e)) from None
        if reason == "stop":  # the grammar completed: a call
            yield "call", body
            reason = "tool_calls"
        yield "end", reason
        yield "tokens", used

    @staticmethod
    def _tool_call(body: str) -> ToolCall:
        call = json.loads(body)
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        fn = FunctionCall(name=call["name"], arguments=arguments)
        return ToolCall(id=new_id("call"), function=fn)

    async def _tool_reply(self, job: Job) -> ChatCompletion:
        """The whole answer of a tool-calling job: its text, and its call if it made one."""
        text, calls, reason, used = "", [], "stop", 0
        async for kind, value in self._tool_events(job):
            if kind == "text":
                text += str(value)
            elif kind == "call":
                calls.append(self._tool_call(str(value)))
            elif kind == "end":
                reason = value
            else:
                used = int(value or 0)
        message = AssistantMessage(
            content=text or (None if calls else ""), tool_calls=calls or None
        )
        choice = ChatChoice(index=0, message=message, finish_reason=reason)  # type: ignore[arg-type]
        return ChatCompletion(
            id=job.id,
            created=job.created,
            model=self.model_name,
            choices=[choice],
            usage=Usage.of(job.prompt_tokens, used),
        )

    async def _tool_chunks(self, job: Job) -> AsyncIterator[BaseModel]:
        """The streamed answer of a tool-calling job: the role, text pieces, the call (its
        id and name, then its arguments), the finish_reason, and the usage if asked for."""
        yield self._chat_chunk(
            job, [ChatChunkChoice(index=0, delta=Delta(role="assistant", content=""))]
        )
        used = 0
        async for kind, value in self._tool_events(job):
            if kind == "text":
                yield self._chat_chunk(
                    job, [ChatChunkChoice(index=0, delta=Delta(content=str(value)))]
                )
            elif kind == "call":
                call = self._tool_call(str(value))
                head = ToolCallDelta(
                    index=0,
                    id=call.id,
                    type="function",
                    function=FunctionCallDelta(name=call.function.name, arguments=""),
                )
                args = ToolCallDelta(
                    index=0, function=FunctionCallDelta(arguments=call.function.arguments)
                )
                for delta in (head, args):
                    yield self._chat_chunk(
                        job, [ChatChunkChoice(index=0, delta=Delta(tool_calls=[delta]))]
                    )
            elif kind == "end":
                end = ChatChunkChoice(index=0, delta=Delta(), finish_reason=value)  # type: ignore[arg-type]
                yield self._chat_chunk(job, [end])
            else:
                used = int(value or 0)
        if job.include_usage:
            yield self._chat_chunk(job, [], Usage.of(job.prompt_tokens, used))

    def _submit(self, chat: bool, prompts: list[list[int]], body: AnyRequest, param: str) -> Job:
        """``n`` engine requests per prompt, in choice order; all or none are submitted."""
        if body.use_beam_search:
            return self._beam_job(chat, prompts, body, param)
        grammar = self.grammar(body)
        params = [self.sampling(body, j).replace(grammar=grammar) for j in range(body.n)]
        most = self.engine.max_batch + self.engine.max_queue
        if len(prompts) * body.n > most:  # never servable: not a "retry later"
            raise ServingError(
                f"{len(prompts)} prompt(s) x n={body.n} make {len(prompts) * body.n} "
                f"generations, more than this server holds at once ({most}); send fewer "
                "prompts or a smaller n per request",
                param="n",
            )
        job = Job(
            chat,
            [],
            sum(len(ids) for ids in prompts),
            body.include_usage(),
            new_id("chatcmpl" if chat else "cmpl"),
            now(),
        )
        try:
            for ids in prompts:
                for p in params:
                    job.requests.append(self.engine.submit(ids, p))
        except Exception as e:
            job.cancel()
            if isinstance(e, PromptTooLong):
                raise ServingError(str(e), param=param, code="context_length_exceeded") from None
            if isinstance(e, QueueFull | EngineStopped):
                raise ServerBusy(str(e), code="server_busy") from None
            if isinstance(e, GptkitError):
                raise ServingError(str(e), param=param) from None
            raise
        return job

    def _beam_job(self, chat: bool, prompts: list[list[int]], body: AnyRequest, param: str) -> Job:
        """``use_beam_search``: each prompt's best ``n`` of ``best_of`` beams (see
        :mod:`gptkit.generate.beam`). The engine's batch grows one token per row and holds
        no beams, so the search runs in a thread of its own beside it, one at a time, on
        the engine's model (its forward keeps no state between calls); the reply length
        is cut to the context as the engine cuts it."""
        limit = self.sampling(body, 0)  # max_tokens and stop strings, checked as for sampling
        configs = [
            self._beam_config(i, ids, body, limit.max_new_tokens, param)
            for i, ids in enumerate(prompts)
        ]

        def search() -> list[Beam]:
            with self._beam_lock:
                model, tok = self.engine.model, self.tokenizer
                return [
                    beam
                    for ids, cfg in zip(prompts, configs, strict=True)
                    for beam in generate_beams(model, tok, [ids], cfg, limit.stop)[0]
                ]

        return Job(
            chat,
            [],
            sum(len(ids) for ids in prompts),
            False,
            new_id("chatcmpl" if chat else "cmpl"),
            now(),
            beams=asyncio.ensure_future(asyncio.to_thread(search)),
        )

    def _beam_config(
        self, i: int, ids: list[int], body: AnyRequest, max_tokens: int, param: str
    ) -> BeamConfig:
        """Prompt ``i``'s beam settings; its reply is cut to the room the context leaves."""
        room = self.engine.context - len(ids)
        if room < 1:
            raise ServingError(
                f"prompt {i} has {len(ids)} tokens but the model's context is "
                f"{self.engine.context} tokens, which must hold the prompt and at least one "
                "new token; shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        try:
            check_prompt(i, ids, self.engine.config.vocab_size)
            return BeamConfig(
                num_beams=body.beam_width(),
                max_new_tokens=min(max_tokens, room),
                length_penalty=body.length_penalty,
                early_stopping=body.early_stopping,
                num_return_sequences=body.n,
            )
        except GptkitError as e:
            raise ServingError(str(e), param=param) from None

    async def _beam_reply(self, job: Job) -> ChatCompletion | Completion:
        """The response of a ``use_beam_search`` job: its beams as choices, best first."""
        assert job.beams is not None
        try:
            beams = await job.beams
        except GptkitError as e:
            raise GenerationFailed(str(e)) from None
        usage = Usage.of(job.prompt_tokens, sum(len(b.tokens) for b in beams))
        reasons = ["length" if b.finish_reason == "length" else "stop" for b in beams]
        if job.chat:
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content=b.text), finish_reason=r)
                for i, (b, r) in enumerate(zip(beams, reasons, strict=True))
            ]
            return ChatCompletion(
                id=job.id, created=job.created, model=self.model_name, choices=choices, usage=usage
            )
        texts = [
            CompletionChoice(index=i, text=b.text, finish_reason=r)
            for i, (b, r) in enumerate(zip(beams, reasons, strict=True))
        ]
        return self._completion(job, texts, usage)

    # -- engine → response objects -------------------------------------------------------------

    async def result(self, job: Job) -> ChatCompletion | Completion:
        """Wait for every choice; the whole response with its usage."""
        if job.beams is not None:
            return await self._beam_reply(job)
        if job.tools is not None:
            return await self._tool_reply(job)
        texts: list[list[str]] = [[] for _ in job.requests]
        last: list[Chunk | None] = [None] * len(job.requests)
        try:
            async with contextlib.aclosing(merged(job.requests)) as chunks:
                async for i, chunk in chunks:
                    texts[i].append(chunk.text)
                    last[i] = chunk
        except EngineError as e:  # its message says what failed
            raise GenerationFailed(str(e)) from None
        ends = [c for c in last if c is not None]
        if len(ends) != len(job.requests):
            raise GenerationFailed("a request ended without a reply")
        usage = Usage.of(job.prompt_tokens, sum(c.completion_tokens for c in ends))
        scores = [scored_tokens(r, 0, c) for r, c in zip(job.requests, ends, strict=True)]
        if job.chat:
            chat_choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content="".join(t)),
                    logprobs=self.chat_logprobs(s) if job.logprobs is not None else None,
                    finish_reason=finish_reason(c),
                )
                for i, (t, c, s) in enumerate(zip(texts, ends, scores, strict=True))
            ]
            return ChatCompletion(
                id=job.id,
                created=job.created,
                model=self.model_name,
                choices=chat_choices,
                usage=usage,
            )
        if not job.requests:  # max_tokens 0: the echoes alone
            return self._completion(job, list(self._echo_choices(job, "length")), usage)
        choices = [
            CompletionChoice(index=i, text="".join(t), finish_reason=finish_reason(c))
            for i, (t, c) in enumerate(zip(texts, ends, strict=True))
        ]
        echoes = job.echoes or [Echo("", [], [])] * len(choices)
        for choice, echo, s in zip(choices, echoes, scores, strict=True):
            choice.text = echo.text + choice.text
            if job.logprobs is not None:
                ids = echo.ids + [x.token for x in s]
                choice.logprobs = self.completion_logprobs(ids, [*echo.scores, *s])
        return self._completion(job, choices, usage)

    def _echo_choices(self, job: Job, reason: FinishReason | None) -> Iterator[CompletionChoice]:
        """Each choice's echoed prompt as a choice of its own (its scores, when asked for)."""
        for i, echo in enumerate(job.echoes or []):
            logprobs = None
            if job.logprobs is not None:
                logprobs = self.completion_logprobs(echo.ids, echo.scores)
            yield CompletionChoice(index=i, text=echo.text, logprobs=logprobs, finish_reason=reason)

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text = token_text(self.tokenizer, token)
        return TopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode()))

    def chat_logprobs(self, scores: Sequence[TokenLogprob]) -> ChatLogprobs:
        """Tokens in the chat schema: ``{token, logprob, bytes, top_logprobs}`` each."""
        content = []
        for s in scores:
            chosen = self._top(s.token, s.logprob)
            top = [self._top(t, lp) for t, lp in s.top]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def completion_logprobs(
        self, ids: Sequence[int], scores: Sequence[TokenLogprob | None], start: int = 0
    ) -> CompletionLogprobs:
        """Tokens in the legacy completions schema (a prompt's first token has no score:
        None); ``text_offset`` counts the tokens' text from ``start``."""
        tok = self.tokenizer
        tokens = [token_text(tok, t) for t in ids]
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for s in scores:
            logprobs.append(None if s is None else finite(s.logprob))
            tops.append(None if s is None else {token_text(tok, t): finite(lp) for t, lp in s.top})
        offsets = list(itertools.accumulate(map(len, tokens), initial=start))[: len(tokens)]
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets
        )

    async def chunks(self, job: Job) -> AsyncIterator[BaseModel]:
        """The streamed response: for chat, each choice's role first, then text pieces and
        one chunk with its finish_reason; for completions, pieces carrying the reason on the
        last; then, when asked for, a chunk with the usage and no choices. With logprobs, a
        chunk carries the scores of the tokens since the last one sent; an echoed prompt
        comes first, one chunk per choice."""
        if job.tools is not None:
            async for chunk in self._tool_chunks(job):
                yield chunk
            return
        if job.chat:
            for i in range(len(job.requests)):
                yield self._chat_chunk(
                    job, [ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))]
                )
        for echo in self._echo_choices(job, None if job.requests else "length"):
            yield self._completion(job, [echo])
        sent = [0] * len(job.requests)  # per choice, the tokens whose scores were sent
        offsets = [len(e.text) for e in job.echoes or []] or sent.copy()  # text_offset so far
        generated = 0
        try:
            async with contextlib.aclosing(merged(job.requests)) as pieces:
                async for i, piece in pieces:
                    reason = finish_reason(piece) if piece.finish_reason is not None else None
                    generated += piece.completion_tokens if reason is not None else 0
                    if not piece.text and reason is None:
                        continue  # the text is held back: its scores go with it
                    scores = scored_tokens(job.requests[i], sent[i], piece)
                    sent[i] = piece.completion_tokens
                    if job.chat:
                        for chunk in self._chat_pieces(job, i, piece.text, reason, scores):
                            yield chunk
                        continue
                    logprobs = None
                    if job.logprobs is not None:
                        ids = [s.token for s in scores]
                        logprobs = self.completion_logprobs(ids, scores, offsets[i])
                        offsets[i] += sum(map(len, logprobs.tokens))
                    choice = CompletionChoice(
                        index=i, text=piece.text, logprobs=logprobs, finish_reason=reason
                    )
                    yield self._completion(job, [choice])
        except EngineError as e:
            raise GenerationFailed(str(e)) from None
        if job.include_usage:
            usage = Usage.of(job.prompt_tokens, generated)
            yield self._chat_chunk(job, [], usage) if job.chat else self._completion(job, [], usage)

    def _chat_pieces(
        self,
        job: Job,
        i: int,
        text: str,
        reason: FinishReason | None,
        scores: list[TokenLogprob],
    ) -> Iterator[ChatCompletionChunk]:
        """Choice ``i``'s chunks for one piece: its text (with the scores of its tokens),
        then the finish_reason (with any scores left) when the choice ends."""
        logprobs = self.chat_logprobs(scores) if job.logprobs is not None else None
        if text:
            delta = Delta(content=text)
            yield self._chat_chunk(job, [ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)])
            logprobs = None
        if reason is not None:
            end = ChatChunkChoice(
                index=i,
                delta=Delta(),
                logprobs=logprobs if logprobs and logprobs.content else None,
                finish_reason=reason,
            )
            yield self._chat_chunk(job, [end])

    def _chat_chunk(
        self, job: Job, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=job.id, created=job.created, model=self.model_name, choices=choices, usage=usage
        )

    def _completion(
        self, job: Job, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> Completion:
        return Completion(
            id=job.id, created=job.created, model=self.model_name, choices=choices, usage=usage
        )


async def merged(requests: list[Request]) -> AsyncIterator[tuple[int, Chunk]]:
    """``(index, chunk)`` from several engine requests as they come; an error in one ends
    the whole iteration with that error."""
    if len(requests) == 1:
        async for chunk in requests[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        try:
            async for chunk in req:
                queue.put_nowait((i, chunk))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(requests)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
