"""The HTTP protocol: pydantic schemas of the OpenAI API's requests, responses and errors.

Field names, defaults and bounds follow the OpenAI API reference (Completions, Chat
Completions, Models; https://platform.openai.com/docs/api-reference), as vLLM's
``entrypoints/openai/protocol.py`` does, so the official ``openai`` client talks to gptkit
unchanged. Two liberties, both vLLM's too: ``model`` may be left out (the server has one
model), and ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as extensions.
Log-probabilities follow the API's two schemas: chat's ``logprobs.content`` (token, logprob,
bytes, top_logprobs) and completions' legacy ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset``, where ``echo`` with ``logprobs`` scores the prompt. Parameters that would
change the answer in ways gptkit does not implement (``logit_bias``, ``functions``, ...)
are refused with a 400 rather than silently ignored; harmless ones (``user``, ``store``,
...) are ignored.

Tool calling follows the API's ``tools`` (function specs: name, description, a JSON Schema of
``parameters``), ``tool_choice`` ("none", "auto", "required" or a named function) and the
answer's ``tool_calls`` (``finish_reason`` "tool_calls"); a conversation carries assistant
``tool_calls`` and ``tool`` messages (``tool_call_id``). A request that breaks the rules (a
``tool_choice`` without ``tools``, a named function that is not among them, two tools of one
name, a ``tool`` message answering no earlier call, arguments that are not a JSON object) is
refused with a 400 naming the field.

Numbers are bounded where sampling would break: no NaN or infinity anywhere; temperature and
top_p 0 or at least :data:`MIN_TEMPERATURE`; the repetition penalty within
:data:`REPETITION_PENALTY_RANGE`; at most :data:`MAX_STOPS` stop strings of at most
:data:`MAX_STOP_CHARS` characters (the server also bounds the body's size and nesting).

Beam search is vLLM's former extension: ``use_beam_search: true`` searches ``best_of`` beams
(default ``n``) and returns the best ``n``, with ``length_penalty`` and ``early_stopping``. It
is refused (400) with ``stream`` (the best beams are known only at the end) and with a
sampling field set to anything but its off value (``temperature`` > 0, ``top_p`` < 1, ...:
beams are deterministic).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)

from gptkit.config import MIN_TEMPERATURE, REPETITION_PENALTY_RANGE

# -- errors -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API sends it."""

    error: ErrorDetail


# -- requests -----------------------------------------------------------------------------

#: request fields gptkit does not implement -> the test a value must pass to be accepted
#: (the field's "off" value, which clients often send explicitly)
_UNSUPPORTED: dict[str, Any] = {
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: not v,
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none", "auto"),
}

_SEED_MAX = 2**63 - 1

#: stop strings: at most this many, each at most this long in characters (the text is
#: searched for them after every token, so their size is work per token for every stream)
MAX_STOPS, MAX_STOP_CHARS = 4, 512

#: fields that beam search does not apply -> the test of their off value; a request with
#: ``use_beam_search`` that sets one to anything else is refused
_NOT_WITH_BEAMS: dict[str, Any] = {
    "temperature": lambda v: v == 0,
    "top_p": lambda v: v == 1,
    "top_k": lambda v: v is None,
    "min_p": lambda v: not v,
    "repetition_penalty": lambda v: v == 1,
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or v.type == "text",
}


def _one_of(value: Any, handler: ValidatorFunctionWrapHandler, kinds: str) -> Any:
    """Validate a union field, with one message naming its forms instead of one error per
    member of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {kinds}") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the reply must satisfy, and its name."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: plain text, any JSON object, or JSON under a schema (the
    OpenAI API's structured outputs); gptkit enforces the last two with a grammar."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' response format needs the 'json_schema' field")
        return self


class _SamplingRequest(BaseModel):
    """What completions and chat completions share."""

    # NaN and infinities are refused in every float field (JSON allows neither; Python's
    # parser reads NaN, Infinity and 1e999)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # an extension (vLLM's)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # an extension (vLLM's)
    repetition_penalty: float = Field(  # an extension (vLLM's)
        default=1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=_SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    best_of: int | None = None  # with use_beam_search: the number of beams (default n)
    user: str | None = None
    # Beam search, an extension (vLLM's until v0.6): best_of beams, the best n returned.
    use_beam_search: bool = False
    length_penalty: float = Field(default=1.0, ge=-10.0, le=10.0)
    early_stopping: bool | Literal["never"] = False
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, accepted in _UNSUPPORTED.items():
                if name in data and not accepted(data[name]):
                    raise ValueError(f"'{name}' is not supported by this server; leave it out")
        return data

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        stop = _one_of(value, handler, "a string or a list of strings")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop string may have at most {MAX_STOP_CHARS} characters, got {longest}"
            )
        return stop

    @field_validator("temperature", "top_p")
    @classmethod
    def _zero_or_not_tiny(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"must be 0 (greedy decoding) or at least {MIN_TEMPERATURE:g}, got {value:g}"
            )
        return value

    @model_validator(mode="after")
    def _check_best_of(self) -> _SamplingRequest:
        if self.use_beam_search:
            return self._check_beams()
        if self.best_of not in (None, self.n):
            raise ValueError("'best_of' is not supported by this server; leave it out")
        return self

    def _check_beams(self) -> _SamplingRequest:
        """``use_beam_search``: no streaming (the best beams are known only at the end),
        ``n <= best_of <= 128``, and no sampling field set to anything but its off value."""
        if self.stream:
            raise ValueError(
                "use_beam_search cannot stream: the best beams are known only at the end; "
                "set stream to false"
            )
        if not self.n <= self.beam_width() <= 128:
            raise ValueError(
                f"with use_beam_search, best_of (the number of beams) must be from n "
                f"({self.n}) to 128, got {self.best_of}"
            )
        sampling = [
            name
            for name, off in _NOT_WITH_BEAMS.items()
            if name in self.model_fields_set and not off(getattr(self, name, None))
        ]
        if sampling:
            raise ValueError(
                f"beam search is deterministic and does not apply {', '.join(sampling)}; "
                "leave them out (or at 0 / 1) with use_beam_search"
            )
        return self

    def beam_width(self) -> int:
        """The number of beams of a ``use_beam_search`` request: ``best_of``, else ``n``."""
        return self.best_of or self.n

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or a
    list of token-id lists; each prompt gets ``n`` choices."""

    prompt: str | list[str] | list[int] | list[list[int]]
    # None: 16, the OpenAI API's default; 0 generates nothing (with echo: score the prompt)
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)  # top alternatives per token
    echo: bool = False  # the prompt comes back before the text (and is scored, with logprobs)

    def alternatives(self) -> int | None:
        """How many alternatives each token's logprobs show; None: no logprobs."""
        return self.logprobs

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        kinds = "a string, a list of strings, a list of token ids, or a list of such lists"
        prompt = _one_of(value, handler, kinds)
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per item: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    """A part of a message's content; only text is understood."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


#: a function's name, as the OpenAI API allows it
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionSpec(BaseModel):
    """``tools[i].function``: a name, what it does, and a JSON Schema of its arguments."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("must be a JSON Schema of type 'object' (the arguments)")
        return value


class ToolSpec(BaseModel):
    """``tools[i]``: a function the model may call."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call this one."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text (the API's form)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            args = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"must be a JSON object as text; it does not parse ({e.msg})"
            ) from None
        if not isinstance(args, dict):
            raise ValueError("must be a JSON object as text")
        return value


class ToolCall(BaseModel):
    """One call the assistant makes (in a response, and in the history it is sent back)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        return self

    @field_validator("content", mode="wrap")
    @classmethod
    def _check_content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        kinds = 'a string or a list of text parts ({"type": "text", "text": ...}); only text'
        return _one_of(value, handler, kinds + " is understood")

    def as_template_message(self) -> dict[str, Any]:
        """The ``{"role", "content"}`` dict that chat templates read (with ``tool_calls``,
        arguments as dicts, or ``tool_call_id`` where the message has them, as transformers
        passes them). ``developer`` is the newer name of ``system`` (the OpenAI API
        reference), so templates see ``system``."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json.loads(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; an answer makes at most one call

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _check_tool_choice(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        kinds = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        return _one_of(value, handler, kinds)

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tools: each function needs a name of its own; {twice} repeat")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs 'tools' to choose from; send the tools too")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice names the function '{choice.function.name}', which is not among "
                f"the tools ({', '.join(names)})"
            )
        if self.calls_tools():
            fmt = self.response_format
            refused = [
                name
                for name, on in (
                    ("n > 1", self.n > 1),
                    ("use_beam_search", self.use_beam_search),
                    ("logprobs", self.logprobs),
                    ("response_format", fmt is not None and fmt.type != "text"),
                )
                if on
            ]
            if refused:
                raise ValueError(
                    f"tools are not supported together with {', '.join(refused)}; leave "
                    "them out or set tool_choice to 'none'"
                )
        return self._check_tool_messages()

    def _check_tool_messages(self) -> ChatCompletionRequest:
        called: set[str] = set()
        for i, m in enumerate(self.messages):
            called |= {c.id for c in m.tool_calls or []}
            if m.role == "tool" and m.tool_call_id not in called:
                raise ValueError(
                    f"messages[{i}] answers tool_call_id '{m.tool_call_id}', but no earlier "
                    "assistant message made a call of that id"
                )
        return self

    def calls_tools(self) -> bool:
        """Whether the answer may call a tool (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as the chat template reads them (OpenAI's form, as plain dicts)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def alternatives(self) -> int | None:
        """How many alternatives each token's logprobs show; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``; None: no limit."""
        return self.max_completion_tokens or self.max_tokens


# -- responses ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions schema: per token its text, log-probability (None for a
    prompt's first token), top alternatives as ``{text: logprob}``, and character offset in
    the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A ``text_completion``; streamed chunks have the same shape, with pieces of text."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    """A token of the chat schema: its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """``choices[i].logprobs`` of a chat completion (and of a streamed chunk)."""

    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @field_serializer("tool_calls")
    def _calls(self, calls: list[ToolCall] | None) -> list[dict[str, Any]] | None:
        return None if calls is None else [c.model_dump() for c in calls]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a call: the first carries its id, type and name, the others
    pieces of its arguments (the OpenAI API's chunks)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta")
    def _only_set(self, delta: Delta) -> dict[str, Any]:
        # A delta carries only what changed: the role once, then content pieces.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptkit"
    max_model_len: int  # the context in tokens (vLLM's extension field)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
