"""Configuration: frozen dataclasses for the model, training and sampling, plus named presets.

No torch here, so a config can be read, validated and printed anywhere. A config holds names
("layernorm", "rope"), never classes; the model resolves them when it is built, so the
``config.json`` beside the weights rebuilds the model alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gptkit.errors import GptkitError

T = TypeVar("T")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise GptkitError(msg)


class _JsonMixin:
    """JSON round-trip shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        _check(
            not unknown,
            f"{cls.__name__} got unknown field(s) {unknown}; known fields are {sorted(names)}",
        )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GptkitError(f"cannot read {path}: {e}; it should be a JSON object") from None
        return cls.from_dict(data)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """Every decoder-only family gptkit builds, as switches on one architecture.

    GPT-2 is the default: pre-LayerNorm blocks, learned positions, tanh-GELU MLP, tied head.
    GPT-1 is ``norm_position="post"`` (no final norm). Llama-style models use
    ``norm="rmsnorm"``, ``pos_emb="rope"``, ``mlp="swiglu"``, ``n_kv_head`` < ``n_head``.
    """

    vocab_size: int = 50257
    """tokens in the vocabulary (the embedding and head rows)"""
    block_size: int = 1024
    """the context length, in tokens"""
    n_layer: int = 12
    """transformer blocks"""
    n_head: int = 12
    """query heads per attention layer"""
    n_embd: int = 768
    """width of the residual stream"""
    n_kv_head: int | None = None
    """key/value heads (grouped-query attention); None means n_head"""
    mlp_hidden: int | None = None
    """the MLP's hidden width; None means 4 * n_embd"""
    dropout: float = 0.0
    """dropout on embeddings, attention weights and residual branches"""
    bias: bool = True
    """biases in linear layers and norms"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """layernorm (GPT) or rmsnorm (Llama)"""
    norm_eps: float = 1e-5
    """the norm's epsilon"""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: norm before each sublayer (GPT-2); post: after the residual add (GPT-1)"""
    pos_emb: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    """positions: learned (GPT), sinusoidal (Transformer), rope (Llama) or none"""
    rope_theta: float = 10000.0
    """rotary embeddings' base"""
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    """gelu (GPT-1), gelu_tanh (GPT-2) or swiglu (Llama)"""
    tie_embeddings: bool = True
    """the output head shares the token embedding matrix"""
    init_std: float = 0.02
    """standard deviation of the initial weights"""
    # GPT-3: "alternating dense and locally banded sparse attention patterns": odd layers
    # attend only to the last attention_window positions.
    attention_pattern: Literal["dense", "alternating"] = "dense"
    """dense, or alternating dense and locally banded layers (GPT-3)"""
    attention_window: int = 256
    """banded layers attend to this many last positions"""
    # A classification head (GPT-1's fine-tuning): one logit per label name, read from the
    # final token's hidden state. Empty: no head.
    labels: tuple[str, ...] = ()
    """a classification head's label names (GPT-1 fine-tuning); empty: no head"""
    # GPT-1's input transformations (Radford et al. 2018, Fig. 1): how the head's examples
    # were encoded, with start/delimiter/extract tokens (gptkit.data.tasks); None: the texts
    # closed by the end-of-sequence token, no added tokens.
    task_format: Literal["single", "pair", "similarity", "choice"] | None = None
    """the classification head's input format: single, pair, similarity or choice"""
    # Structured pruning (gptkit.compress.prune) drops whole heads and keeps their width, so
    # a pruned model's heads may no longer be n_embd / n_head wide.
    head_dim: int | None = None
    """the width of each attention head; None means n_embd / n_head"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check(getattr(self, name) > 0, f"ModelConfig.{name} must be positive")
        _check(
            self.head_dim is not None or self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        _check(
            self.head_dim is None or self.head_dim > 0,
            f"head_dim must be positive, got {self.head_dim}",
        )
        _check(
            self.n_head % self.kv_heads == 0,
            f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.attention_window > 0, "attention_window must be positive")
        _check(
            len(set(self.labels)) == len(self.labels) and all(self.labels),
            f"labels must be distinct, non-empty names, got {list(self.labels)}",
        )
        _check(
            self.task_format in (None, "single", "pair", "similarity", "choice"),
            f"task_format must be single, pair, similarity or choice, got {self.task_format!r}",
        )
        _check(
            self.task_format is None or bool(self.labels),
            "task_format describes a classification head's input; the model has no head",
        )
        _check(
            self.pos_emb != "rope" or self.head_size % 2 == 0,
            f"rope needs an even head size, got {self.head_size}",
        )
        for name, allowed in (
            ("norm", ("layernorm", "rmsnorm")),
            ("norm_position", ("pre", "post")),
            ("pos_emb", ("learned", "sinusoidal", "rope", "none")),
            ("mlp", ("gelu", "gelu_tanh", "swiglu")),
            ("attention_pattern", ("dense", "alternating")),
        ):
            _check(getattr(self, name) in allowed, f"ModelConfig.{name} must be one of {allowed}")

    def is_local_layer(self, layer: int) -> bool:
        """Whether ``layer`` uses banded (local) attention."""
        return self.attention_pattern == "alternating" and layer % 2 == 1

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count computed from the config alone (no tensors are allocated)."""
        C, hs, H = self.n_embd, self.head_size, self.hidden_size
        qkv = C * (self.n_head + 2 * self.kv_heads) * hs
        attn = (
            qkv
            + self.n_head * hs * C
            + (((self.n_head + 2 * self.kv_heads) * hs + C) if self.bias else 0)
        )
        mlp = (3 if self.mlp == "swiglu" else 2) * C * H
        if self.bias:
            mlp += H * (2 if self.mlp == "swiglu" else 1) + C
        norm = C * (2 if self.bias and self.norm == "layernorm" else 1)
        block = attn + mlp + 2 * norm
        n = self.n_layer * block + (norm if self.norm_position == "pre" else 0)
        n += (C + 1) * len(self.labels)  # the classification head
        if embeddings:
            n += self.vocab_size * C
            if self.pos_emb == "learned":
                n += self.block_size * C
            if not self.tie_embeddings:
                n += self.vocab_size * C
        return n


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """How to train: optimisation, schedule, evaluation, checkpoints."""

    # Under torchrun each of the N processes takes batch_size sequences, so one optimizer step
    # sees batch_size × N × grad_accum sequences (the global batch).
    batch_size: int = 12
    """sequences per micro-batch per process (global: × processes × grad_accum)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_steps: int = 2000
    """optimizer steps to train for"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon (Muon on hidden matrices, AdamW on the rest)"""
    lr: float = 1e-3
    """AdamW's peak learning rate (with muon: of embeddings, norms and biases)"""
    muon_lr: float = 0.02
    """muon: the learning rate of the hidden matrices"""
    muon_momentum: float = 0.95
    """muon: Nesterov momentum of the hidden matrices"""
    min_lr: float = 1e-4
    """the schedule ends here (muon_lr decays in proportion)"""
    warmup_steps: int = 100
    """steps of linear learning-rate warm-up"""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """cosine, or wsd (warm-up, stable, then linear decay)"""
    decay_steps: int | None = None
    """cosine decay length; None means max_steps"""
    cooldown: float = 0.4
    """wsd: the fraction of max_steps spent decaying to min_lr"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW's first-moment decay"""
    beta2: float = 0.99
    """AdamW's second-moment decay"""
    grad_clip: float = 1.0
    """clip the gradient norm to this; 0 turns clipping off"""
    eval_every: int = 250
    """steps between validation evaluations (0: only at the end)"""
    eval_batches: int = 20
    """batches per validation evaluation"""
    save_every: int = 500
    """steps between checkpoints (0: only at the end)"""
    log_every: int = 10
    """steps between log lines"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto (bf16 where the device has it), bf16, fp16 or fp32"""
    compile: bool = False
    """train through torch.compile"""
    device: str = "auto"
    """auto, cpu, cuda or mps"""
    seed: int = 1337
    """seed of weights, data order and dropout"""
    fsdp: bool = False
    """under torchrun, shard weights, gradients and optimizer state (FSDP2)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward"""
    format: Literal["single", "pair", "similarity", "choice"] | None = None
    """classify: GPT-1's input format (start/delimiter/extract tokens added and trained):
    single text, pair (premise $ hypothesis), similarity (both orders, added) or choice
    (context $ answer, softmax over answers); None: texts closed by the end-of-sequence token"""
    target_loss: float | None = None
    """stop once the validation loss is at or below this"""
    seq_len: int | None = None
    """tokens per training window; None means the model's context (block_size)"""
    quantize: str | None = None
    """with LoRA: keep the frozen base quantized, int8 or int4 (QLoRA); None: as loaded"""
    # Distillation (Hinton et al. 2015): the student learns alpha · T² · KL(teacher_T ‖
    # student_T) + (1 - alpha) · the LM loss; the teacher is any source gptkit.load takes.
    teacher: str | None = None
    """distill from this model (same tokenizer); None: no distillation"""
    distill_temperature: float = 2.0
    """distillation: the softmax temperature T of teacher and student"""
    distill_alpha: float = 0.5
    """distillation: the weight of the KL term (1 - alpha weighs the LM loss)"""
    distill_top_k: int = 0
    """distillation: match the teacher's k most likely tokens only; 0: the whole vocabulary"""
    tensorboard: str | None = None
    """write TensorBoard scalars and histograms to this directory (pip install tensorboard)"""
    histogram_every: int = 100
    """with tensorboard: steps between weight and gradient histograms (0: none)"""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_batches", "log_every", "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"TrainConfig.{name} must be positive")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            _check(getattr(self, name) >= 0, f"TrainConfig.{name} must not be negative")
        _check(self.lr > 0 and self.min_lr >= 0, "lr must be positive and min_lr not negative")
        _check(
            self.min_lr <= self.lr,
            f"min_lr ({self.min_lr}) is above lr ({self.lr}); lower --min-lr",
        )
        _check(
            self.precision in ("auto", "bf16", "fp16", "fp32"),
            f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}",
        )
        _check(
            self.optimizer in ("adamw", "muon"),
            f"optimizer must be adamw or muon, got {self.optimizer!r}",
        )
        _check(
            self.schedule in ("cosine", "wsd"),
            f"schedule must be cosine or wsd, got {self.schedule!r}",
        )
        _check(0.0 < self.cooldown <= 1.0, f"cooldown must be in (0, 1], got {self.cooldown}")
        _check(self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}")
        _check(
            0.0 <= self.muon_momentum < 1.0,
            f"muon_momentum must be in [0, 1), got {self.muon_momentum}",
        )
        _check(
            not (self.fsdp and self.optimizer == "muon"),
            "Muon orthogonalizes whole matrices, which FSDP splits across ranks; drop --fsdp "
            "(DDP runs Muon) or use --optimizer adamw",
        )
        _check(
            self.seq_len is None or self.seq_len > 1,
            f"seq_len must be at least 2, got {self.seq_len}",
        )
        _check(
            self.quantize in (None, "int8", "int4"),
            f"quantize must be int8 or int4 (or None), got {self.quantize!r}",
        )
        _check(
            self.distill_temperature > 0,
            f"distill_temperature must be positive, got {self.distill_temperature}",
        )
        _check(
            0.0 <= self.distill_alpha <= 1.0,
            f"distill_alpha must be in [0, 1], got {self.distill_alpha}",
        )
        _check(self.distill_top_k >= 0, "distill_top_k must not be negative")
        _check(self.histogram_every >= 0, "histogram_every must not be negative")

    @property
    def lr_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.max_steps


GrammarKind = Literal["json_schema", "json_object", "regex", "choices"]


@dataclass(frozen=True)
class Grammar:
    """What a row's text must match, as plain data (hashable, JSON-able).

    Attributes:
        kind: "json_schema" (``source`` is the schema as JSON text), "json_object" (any JSON
            object), "regex" (``source`` is the pattern) or "choices" (``source`` is a JSON
            list of the allowed strings).
        source: the schema, pattern or choices; "" for "json_object".
    """

    kind: GrammarKind
    source: str = ""

    @classmethod
    def of(
        cls,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        choices: list[str] | None = None,
    ) -> Grammar | None:
        """The grammar named by at most one of the three keywords (None when none is)."""
        given = [
            n
            for n, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices))
            if v is not None
        ]
        if len(given) > 1:
            raise GptkitError(
                f"give one of json_schema, regex and choices, not {' and '.join(given)}"
            )
        if json_schema is not None:
            text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
            return cls("json_schema", text)
        if regex is not None:
            return cls("regex", regex)
        if choices is not None:
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GptkitError("choices must be a non-empty list of non-empty strings")
            return cls("choices", json.dumps(list(choices), ensure_ascii=False))
        return None

    @property
    def field(self) -> str:
        """The name the user gave it by (for error messages)."""
        return "json_schema" if self.kind == "json_object" else self.kind


#: the smallest temperature above 0 that sampling takes (the server holds top_p to it too):
#: below it, ``logits / temperature`` overflows float32 (1e-300 is 0 in float32) and sampling
#: meets inf and NaN; 0 is greedy
MIN_TEMPERATURE = 1e-5
#: bounds of the multiplicative repetition penalty (CTRL's 1.2 is typical): near 0 it divides
#: a logit into overflow, as the temperature does
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


@dataclass(frozen=True)
class SampleConfig(_JsonMixin):
    """How one sequence is decoded: THE per-request parameters of ``generate``, ``stream``,
    ``chat`` and the server (which maps the OpenAI API's names onto these fields in
    ``gptkit.serve.serving``). ``temperature == 0`` is greedy decoding.

    The penalties: ``repetition_penalty`` is CTRL's multiplicative one on every token already
    in the sequence, prompt included (Keskar et al. 2019; 1.0 is off);
    ``presence_penalty`` and ``frequency_penalty`` are the OpenAI API's additive ones on the
    tokens generated so far, once and per occurrence (0.0 is off). ``seed``: a random source
    of the sequence's own (None: fresh entropy).

    The filters, applied after the temperature in this order (as Hugging Face's logits
    processors): ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set holding
    probability p (Holtzman et al. 2020), ``min_p`` the tokens at least ``min_p`` times as
    likely as the most likely one (Nguyen et al. 2024, "min-p sampling"). ``logprobs``: record
    each generated token's log-probability and its ``logprobs`` most likely alternatives
    (0 to 20; None: nothing is computed); see :mod:`gptkit.generate.logprobs`. ``grammar``:
    the text must match it (structured output; see :mod:`gptkit.generate.constrain`).
    """

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    context_policy: Literal["slide", "error"] = "slide"
    logprobs: int | None = None
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if isinstance(self.grammar, dict):  # from_dict of to_dict's output
            object.__setattr__(self, "grammar", Grammar(**self.grammar))
        # One stop string may come bare, several as any sequence: always held as a tuple.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        _check(self.max_new_tokens >= 0, "max_new_tokens must not be negative")
        _check(
            self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
            f"{self.temperature}",
        )
        _check(self.top_k is None or self.top_k > 0, f"top_k must be >= 1, got {self.top_k}")
        _check(
            self.top_p is None or 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p}",
        )
        _check(
            self.min_p is None or 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            f"logprobs must be in [0, 20], got {self.logprobs}",
        )
        low, high = REPETITION_PENALTY_RANGE
        _check(
            low <= self.repetition_penalty <= high,
            f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        _check(all(self.stop), "a stop string must not be empty")
        _check(
            self.context_policy in ("slide", "error"),
            f"context_policy must be 'slide' or 'error', got {self.context_policy!r}",
        )


@dataclass(frozen=True)
class Preset:
    """A named starting point: model fields and training fields, plus where they come from."""

    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: str = ""


PRESETS: dict[str, Preset] = {
    # Seconds on a laptop; used by the tests.
    "tiny": Preset(
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
        train=dict(
            batch_size=8,
            max_steps=20,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=2,
            eval_every=10,
            eval_batches=2,
            save_every=10,
            log_every=1,
        ),
        source="gptkit test preset",
    ),
    # nanoGPT README, "I only have a macbook": Shakespeare chars on a CPU.
    "nanogpt-cpu": Preset(
        # nanoGPT's train.py default bias=False applies to both of its Shakespeare configs.
        # nanoGPT's MLP is nn.GELU(), the exact (erf) form; it is also 2x cheaper on a CPU.
        model=dict(
            n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, mlp="gelu"
        ),
        train=dict(
            batch_size=12,
            max_steps=2000,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            beta2=0.99,
            eval_every=250,
            eval_batches=20,
            save_every=500,
            # At this size bf16 autocast costs more than it saves (bench: ~0.7x fp32 speed).
            precision="fp32",
        ),
        source="nanoGPT README (CPU recipe) + config/train_shakespeare_char.py",
    ),
    # The fastest way gptkit knows to a validation loss of 1.88 on Shakespeare characters on 2
    # CPU cores (bench/train_shakespeare_char.py): nanoGPT's CPU model less one layer, 2.7x
    # its batch, Muon, bf16 (where the CPU has it natively; else fp32) and a
    # warm-up-stable-decay schedule, 240 steps instead of 2000.
    "shakespeare-char-fast": Preset(
        model=dict(
            n_layer=3, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, mlp="gelu"
        ),
        train=dict(
            batch_size=32,
            max_steps=240,
            optimizer="muon",
            muon_lr=0.04,
            muon_momentum=0.85,
            lr=1e-2,
            min_lr=0.0,
            warmup_steps=20,
            schedule="wsd",
            cooldown=0.4,
            weight_decay=0.0,
            beta2=0.99,
            eval_every=40,
            eval_batches=20,
            save_every=0,
            precision="auto",
        ),
        source="gptkit: measured on 2 CPU cores, see bench/train_shakespeare_char.py",
    ),
    # The CPU speedrun to nanoGPT's Shakespeare-char validation loss (1.47, reached by its
    # 10.7M model in 5,000 GPU iterations) in 15 minutes on 2 cores (bench/speedrun.py): a
    # 3.2M model at nanoGPT's context, RoPE, RMSNorm, Muon, bf16 (where native), batches of 4
    # (at a fixed number of tokens, smaller batches learned more here) and a warm-up-stable-decay
    # schedule; no dropout (at this budget it cost more than it saved). What each change
    # bought is tabled in bench/README.md.
    "shakespeare-char-speedrun": Preset(
        model=dict(
            n_layer=4,
            n_head=4,
            n_embd=256,
            block_size=256,
            dropout=0.0,
            bias=False,
            mlp="gelu",
            pos_emb="rope",
            norm="rmsnorm",
        ),
        train=dict(
            batch_size=4,
            max_steps=3200,
            optimizer="muon",
            muon_lr=0.04,
            muon_momentum=0.85,
            lr=1e-2,
            min_lr=0.0,
            warmup_steps=100,
            schedule="wsd",
            cooldown=0.4,
            weight_decay=0.0,
            beta2=0.99,
            eval_every=800,
            eval_batches=28,
            save_every=0,
            log_every=10,
            precision="auto",
        ),
        source="gptkit: measured on 2 CPU cores, see bench/speedrun.py",
    ),
    # nanoGPT config/train_shakespeare_char.py, the default Shakespeare-char model.
    "shakespeare-char": Preset(
        model=dict(
            n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False, mlp="gelu"
        ),
        train=dict(
            batch_size=64,
            max_steps=5000,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            beta2=0.99,
            eval_every=250,
            eval_batches=200,
            save_every=500,
        ),
        source="nanoGPT config/train_shakespeare_char.py",
    ),
    # `gptkit demo`: a small BPE model of Python source that trains in a few minutes.
    "demo": Preset(
        model=dict(n_layer=4, n_head=4, n_embd=192, block_size=128, dropout=0.0),
        train=dict(
            batch_size=16,
            max_steps=800,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=50,
            beta2=0.99,
            eval_every=200,
            eval_batches=10,
            save_every=200,
            log_every=10,
        ),
        source="gptkit demo",
    ),
    # GPT-2 sizes (Radford et al. 2019; Hugging Face configs).
    "gpt2": Preset(
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
        train=dict(
            batch_size=12,
            grad_accum=40,
            max_steps=600000,
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=2000,
            beta2=0.95,
            eval_every=1000,
            eval_batches=200,
            save_every=1000,
        ),
        source="GPT-2 paper; nanoGPT config/train_gpt2.py",
    ),
    "gpt2-medium": Preset(
        model=dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
        source="GPT-2 paper",
    ),
    "gpt2-large": Preset(
        model=dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
        source="GPT-2 paper",
    ),
    "gpt2-xl": Preset(
        model=dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
        source="GPT-2 paper",
    ),
    # GPT-1 (Radford et al. 2018): post-LN, 40,478-token BPE, 512 context, GELU in its tanh
    # form (the original code and transformers' OpenAIGPT both use it).
    "gpt1": Preset(
        model=dict(
            n_layer=12,
            n_head=12,
            n_embd=768,
            block_size=512,
            vocab_size=40478,
            norm_position="post",
            mlp="gelu_tanh",
            dropout=0.1,
        ),
        source="Improving Language Understanding by Generative Pre-Training (2018)",
    ),
    # SmolLM2-135M (Hugging Face config.json): Llama-style.
    "smollm2-135m": Preset(
        model=dict(
            n_layer=30,
            n_head=9,
            n_kv_head=3,
            n_embd=576,
            mlp_hidden=1536,
            block_size=8192,
            vocab_size=49152,
            norm="rmsnorm",
            pos_emb="rope",
            rope_theta=100000.0,
            mlp="swiglu",
            bias=False,
            tie_embeddings=True,
        ),
        source="HuggingFaceTB/SmolLM2-135M config.json",
    ),
    # Training settings only, for `gptkit finetune` (the model comes from --init-from):
    # GPT-1 fine-tuned with lr 6.25e-5, batch 32, warm-up over 0.2% of training.
    "finetune": Preset(
        train=dict(
            batch_size=16,
            max_steps=300,
            lr=5e-5,
            min_lr=5e-6,
            warmup_steps=20,
            weight_decay=0.01,
            beta2=0.999,
            eval_every=100,
            save_every=100,
            log_every=5,
        ),
        source="fine-tuning defaults (training fields only)",
    ),
}

# GPT-3 (Brown et al. 2020, Table 2.1): context 2048, GPT-2's tokenizer, alternating dense and
# locally banded attention. The paper does not give the band width; 256 follows GPT-Neo. Two
# rows of the table are not self-consistent (XL: 24 heads of 128 in a 2048-wide model; 13B:
# width 5140 with 40 heads of 128); we keep the head size and width and fix the head count
# (XL: 16) or the width (13B: 5120).
_GPT3 = {
    "gpt3-small": (12, 768, 12),  # 125M
    "gpt3-medium": (24, 1024, 16),  # 350M
    "gpt3-large": (24, 1536, 16),  # 760M
    "gpt3-xl": (24, 2048, 16),  # 1.3B
    "gpt3-2.7b": (32, 2560, 32),
    "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5120, 40),
    "gpt3-175b": (96, 12288, 96),
}
for _name, (_layers, _width, _heads) in _GPT3.items():
    PRESETS[_name] = Preset(
        model=dict(
            n_layer=_layers,
            n_embd=_width,
            n_head=_heads,
            block_size=2048,
            vocab_size=50257,
            attention_pattern="alternating",
            attention_window=256,
        ),
        source="Language Models are Few-Shot Learners (2020), Table 2.1",
    )


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with the list of names in the error."""
    if name not in PRESETS:
        raise GptkitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
