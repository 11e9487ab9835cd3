"""The ``gptkit`` command line: one verb per typed Python function.

Typer derives each verb's flags from the function's signature: kebab-case names
(``--max-steps``), ``--x/--no-x`` pairs for booleans, repeatable flags for lists, and
positional arguments for required lists (prompts, inputs). Each flag's help is its
parameter's entry in the function's ``Args:`` docstring section, read by docstring-parser.
``train`` and ``finetune`` add one flag per ModelConfig and TrainConfig field (default: the
preset's value), documented by the dataclass's attribute docs. Parsing gives the function
and its keyword arguments, so :func:`main` runs the verb outside the parser and maps errors
to exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, get_args, get_origin

import docstring_parser
import typer

from gptkit.config import PRESETS, ModelConfig, TrainConfig
from gptkit.errors import GptkitError

if typing.TYPE_CHECKING:  # the verbs import their layers when they run: a fast start
    from gptkit.generate.logprobs import Generation

NO_MODEL = (
    "no --model given: pass a checkpoint or run directory, a .gguf file, a Hugging Face "
    "directory or a hub id (`make models` puts SmolLM2 in models/)"
)

# -- commands that live at the CLI layer ---------------------------------------------------


def generate_cmd(
    prompt: list[str],
    model: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    stop_at_eos: bool = True,
    context_policy: Literal["slide", "error"] = "slide",
    stream: bool = True,
    device: str = "cpu",
    quantize: Literal["auto", "none", "bf16", "int8", "int4"] = "auto",
    compile: bool | None = None,
    show_logprobs: int | None = None,
    json_schema: str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: Literal["false", "true", "never"] = "false",
    num_return_sequences: int = 1,
    no_repeat_ngram_size: int = 0,
    draft: str | None = None,
    draft_tokens: int = 4,
) -> None:
    r"""Generate text from a prompt (several prompts are batched together).

    Args:
        prompt: one or more prompts ("-" reads one from standard input).
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf,
            hub id).
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 is greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches p.
        min_p: sample only tokens at least min_p times as likely as the most likely one.
        repetition_penalty: > 1 discourages tokens already present (CTRL-style).
        presence_penalty: > 0 discourages tokens already generated, once (OpenAI's).
        frequency_penalty: > 0 discourages tokens already generated, per occurrence.
        seed: makes sampling reproducible.
        stop: stop when this text appears (repeatable; \n and \t are understood); it is
            not printed.
        stop_at_eos: stop at the end-of-text token.
        context_policy: "slide" keeps the last tokens when the context fills; "error" refuses.
        stream: print tokens as they come (one prompt only).
        device: cpu, cuda, mps.
        quantize: quantize the weights on load (see `gptkit quantize`); auto keeps a
            quantized GGUF quantized (Q4_* as int4, Q8_0 as int8), none loads it as fp32.
        compile: decode through torch.compile (one prompt; pays a compilation first);
            default: once it pays (see gptkit.generate).
        show_logprobs: after the text, print each generated token with its log-probability
            and the K most likely alternatives (0 to 20; the model's raw distribution).
        json_schema: a JSON Schema file; the output is JSON valid under it.
        regex: the output fully matches this regular expression.
        choice: the output is one of these strings (repeatable).
        num_beams: > 1 decodes by beam search (deterministic: the sampling flags do not
            apply; nothing streams).
        length_penalty: beam search scores a beam sum(log p) / length**length_penalty.
        early_stopping: beam search stops a prompt once it has num_beams finished beams
            (true), when no running beam can beat them (false), or never before that is
            certain (never); as transformers.
        num_return_sequences: print the best this many beams of each prompt.
        no_repeat_ngram_size: > 0: no n-gram of this size occurs twice in a beam.
        draft: speculative decoding, the same text faster: a smaller model with the same
            tokenizer (any source gptkit loads), int4 (the model quantized to int4 drafts
            for itself; load it as bf16 or fp32), or lookup (n-gram matches in the text).
        draft_tokens: tokens the draft proposes per forward of the model.
    """
    from gptkit.checkpoint import load
    from gptkit.generate import generate
    from gptkit.generate import stream as stream_fn

    prompts = [sys.stdin.read() if p == "-" else p for p in prompt]
    stop = [unescape(s) for s in stop] if stop else None
    net, tok = load(model, device=device, quantize=quantize)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; generation needs one")
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        stop=stop,
        stop_at_eos=stop_at_eos,
        context_policy=context_policy,
        compile="auto" if compile is None else compile,
        json_schema=read_json(json_schema, "--json-schema") if json_schema else None,
        regex=regex,
        choices=choice,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    if num_beams > 1 or num_return_sequences > 1:
        beams = dict(
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping={"true": True, "false": False}.get(early_stopping, early_stopping),
            num_return_sequences=num_return_sequences,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        outs = generate(net, tok, prompts, logprobs=show_logprobs, **beams, **kwargs)
        for i, (p, texts) in enumerate(zip(prompts, outs, strict=True)):
            for k, text in enumerate(texts if num_return_sequences > 1 else [texts]):
                if len(prompts) > 1 or num_return_sequences > 1:
                    print(f"--- sample {i + 1}, beam {k + 1} ---")
                print(p + text)
        return
    if stream and len(prompts) == 1 and show_logprobs is None:
        sys.stdout.write(prompts[0])
        for piece in stream_fn(net, tok, prompts[0], **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    outs = generate(net, tok, prompts, logprobs=show_logprobs, details=True, **kwargs)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1} ---")
        print(p + o.text)
        if show_logprobs is not None:
            print(logprob_table(o))


def read_json(path: str, flag: str) -> Any:
    """The JSON in the file ``path`` given to ``flag``; a clear error when it is not."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GptkitError(f"{flag} {path}: cannot read a JSON file ({e})") from None


def logprob_table(gen: Generation) -> str:
    """A generation's tokens as a table: position, token, log-probability, probability,
    and the top alternatives as ``token logprob`` pairs (tokens shown with ``repr``, so
    spaces and newlines are visible)."""
    lines = [f"{'#':>4}  {'token':<16} {'logprob':>8} {'prob':>6}  top alternatives"]
    for j, (token, lp, top) in enumerate(
        zip(gen.tokens, gen.logprobs, gen.top_logprobs, strict=True)
    ):
        alts = "  ".join(f"{t!r} {v:.3f}" for t, v in top.items())
        lines.append(f"{j:>4}  {token!r:<16} {lp:>8.3f} {math.exp(lp):>6.3f}  {alts}")
    return "\n".join(lines)


def chat_cmd(
    model: str,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = 0.9,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    device: str = "cpu",
) -> None:
    """Chat with a model in the terminal, using the model's own chat template.

    Type a message and press Enter; the reply streams back. ``/reset`` forgets the
    conversation, ``/exit`` (or Ctrl-D) leaves.

    Args:
        model: a checkpoint or run directory, a Hugging Face directory, or a .gguf file.
        system: a system message to start the conversation with.
        max_new_tokens: the longest reply, in tokens.
        temperature: 0 is greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches p.
        repetition_penalty: > 1 discourages tokens already present (CTRL-style).
        seed: makes the replies reproducible.
        device: cpu, cuda, mps.
    """
    from gptkit.checkpoint import load
    from gptkit.generate.chat import ChatSession

    net, tok = load(model, device=device)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; chat needs one")
    session = ChatSession(
        net,
        tok,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    _converse(session)


def _converse(session: Any) -> None:
    """The terminal loop of ``gptkit chat``: read a line, stream the reply."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset forgets the conversation, /exit leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if interactive:
            sys.stdout.write("assistant> ")
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def export_cmd(
    model: str,
    out: str,
    format: Literal["hf", "gguf"] = "hf",
    dtype: Literal["f32", "f16", "q8_0"] = "f32",
) -> None:
    """Export a model for other tools: a Hugging Face directory or a GGUF file.

    Args:
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf).
        out: the directory (hf) or file (gguf) to write.
        format: hf (transformers' from_pretrained loads it) or gguf (llama.cpp's format).
        dtype: for gguf, the weight type: f32, f16 or q8_0.
    """
    from gptkit.checkpoint import load

    net, tok = load(model, quantize=None)  # the file's values, as fp32
    if net.config.labels:
        print(
            f"note: the classification head ({', '.join(net.config.labels)}) is not exported; "
            "the file holds the language model it was fine-tuned from",
            file=sys.stderr,
        )
    if format == "hf":
        from gptkit.checkpoint.hf import save_hf

        if dtype != "f32":
            raise GptkitError("--dtype applies to --format gguf; hf exports keep fp32 weights")
        save_hf(net, tok, out)
    else:
        from gptkit.checkpoint.gguf import save_gguf

        if tok is None:
            raise GptkitError(f"{model} has no tokenizer; a GGUF file must carry one")
        save_gguf(net, tok, out, dtype=dtype)
    print(f"wrote {out}")


def quantize_cmd(
    model: str,
    out: str,
    mode: Literal["bf16", "int8", "int4"] = "int4",
    group_size: int = 32,
    lm_head: Literal["auto", "bf16", "int8", "int8-dynamic", "int4", "none"] = "auto",
) -> None:
    """Quantize a model's weights and save it; `gptkit.load(out)` gives it back quantized.

    Args:
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf).
        out: the checkpoint directory to write.
        mode: bf16, int8 (per-channel, weight-only) or int4 (group-wise) for the blocks.
        group_size: int4 only: inputs per scale and zero (32 keeps a Q4_1 GGUF's own grid).
        lm_head: the output head: auto (bf16 under bf16, else int8-dynamic), a mode, or
            none to keep it as it is.
    """
    from pathlib import Path

    from gptkit.checkpoint import load, save_quantized
    from gptkit.compress import quantize

    net, tok = load(model, quantize=None)  # fp32, to quantize as asked
    quantize(net, mode, group_size=group_size, lm_head=lm_head)
    save_quantized(out, net, tok)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote {out} ({mode}, {size / 2**20:.0f} MiB)")


def classify_cmd(
    model: str,
    text: list[str] | None = None,
    pair: list[str] | None = None,
    file: str | None = None,
    out: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> None:
    """Predict labels, with probabilities, using a fine-tuned classification head.

    Args:
        model: a model trained with `gptkit finetune classify`.
        text: a text to classify (repeatable).
        pair: the second text of a text pair, one per --text (repeatable).
        file: classify every row of this file (.tsv label<TAB>text[<TAB>text_b], or .jsonl
            with "text"[, "text_b"]); labels in it are ignored here (use `gptkit eval`).
        out: write the predictions as JSON Lines to this file instead of printing them.
        batch_size: texts per forward pass.
        device: cpu, cuda, mps.
    """
    from gptkit.checkpoint import load
    from gptkit.data.tasks import read_labelled
    from gptkit.files import atomic_write_text
    from gptkit.generate import classify

    if bool(text) == bool(file):
        raise GptkitError("give texts with --text, or a file with --file (one of the two)")
    if file:
        rows = [texts for _, texts, _ in read_labelled(file)]
        texts = [r[0] for r in rows]
        pairs = [r[1] for r in rows] if rows and all(len(r) == 2 for r in rows) else None
    else:
        texts, pairs = list(text or []), pair
    net, tok = load(model, device=device)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; classification needs one")
    preds = classify(net, tok, texts, pairs, batch_size=batch_size, progress=bool(file))
    if out:
        lines = [
            json.dumps({"text": t} | p, ensure_ascii=False)
            for t, p in zip(texts, preds, strict=True)
        ]
        atomic_write_text(out, "\n".join(lines) + "\n")
        print(f"wrote {len(preds)} predictions to {out}")
        return
    for t, p in zip(texts, preds, strict=True):
        probs = " ".join(f"{k}={v:.3f}" for k, v in p["probs"].items())
        print(f"{p['label']}\t{probs}\t{t}")


def sft_data_cmd(
    task: Literal["gsm8k", "multi30k", "tatoeba", "scitldr", "self_instruct", "python"],
    out: str,
    data: str | None = None,
    skip: int = 0,
    limit: int | None = None,
    chat: bool = True,
    calculator: bool = False,
) -> None:
    """Write a shipped data set as SFT rows, worded exactly as `gptkit eval` prompts it.

    Args:
        task: the data set's reader (see `gptkit eval --help`), or python: functions with
            docstrings from a corpus of Python files (JSON Lines with "content", such as
            thealgorithms_python/), as HumanEval-style prompt/completion rows.
        out: the .jsonl file to write ("messages" rows, or prompt/completion with --no-chat).
        data: the file (or directory) to read; default the task's eval file, so pass the
            training split here (gsm8k/train.jsonl, scitldr/train.jsonl, ...).
        skip: leave out the first N examples (held out for evaluation).
        limit: write at most N examples (after --skip).
        chat: chat rows for a model with a chat template; plain prompt/completion otherwise.
        calculator: gsm8k: keep the calculator annotations (``<<48/2=24>>``) in the answers,
            for a model evaluated with ``gptkit eval --calculator``.
    """
    from gptkit.eval.tasks import to_sft_rows
    from gptkit.files import atomic_write_text

    if task == "python":
        from gptkit.eval.code import read_python_functions

        if data is None:
            raise GptkitError("--task python needs --data, a JSON Lines file of Python files")
        rows = read_python_functions(data, None if limit is None else skip + limit)[skip:]
    else:
        rows = to_sft_rows(task, data, skip, limit, chat, calculator)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {out}")


def unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` typed in a shell argument become the characters."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def presets_cmd() -> None:
    """List the named presets: sizes, parameter counts and where they come from."""
    head = ("name", "layers", "width", "heads", "context", "params")
    print("{:<16} {:>6} {:>6} {:>5} {:>7} {:>10}  source".format(*head))
    for name, p in PRESETS.items():
        if not p.model:
            print(f"{name:<16} {'(training fields only)':>42}  {p.source}")
            continue
        cfg = ModelConfig(**({"vocab_size": 50257} | p.model))
        n = cfg.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        print(
            f"{name:<16} {cfg.n_layer:>6} {cfg.n_embd:>6} {cfg.n_head:>5} {cfg.block_size:>7} "
            f"{size:>10}  {p.source}"
        )
    print("(parameter counts with the preset's vocabulary, or GPT-2's 50,257 tokens)")


# -- from signatures to Typer commands -----------------------------------------------------


def _parse_number(kind: type) -> Callable[[str], Any]:
    """int or float, refusing a bad value in argparse's words ("invalid int value: 'many'"),
    which scripts and tests written against the earlier argparse CLI match."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except (TypeError, ValueError):
            raise ValueError(f"invalid {kind.__name__} value: {text!r}") from None

    return parse


def _parse_choice(choices: tuple) -> Callable[[str], Any]:
    """A Literal's values, refusing others in argparse's words ("invalid choice: 'x'")."""

    def parse(text: str) -> Any:
        if text in choices:
            return text
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"invalid choice: {text!r} (choose from {allowed})")

    return parse


def _one_type(hint: Any) -> Any:
    """The type Typer parses a flag as: a union of several types (``str | Path``) as text,
    which each verb accepts (Typer takes one type per flag, optionally None)."""
    if get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in get_args(hint) if a is not type(None)]
    if len(args) == 1:
        return hint
    return str | None if len(args) < len(get_args(hint)) else str


def _parser(hint: Any) -> Callable[[str], Any] | None:
    """How a flag's (or a list flag's item's) text becomes a value, where argparse's
    wording of the error is kept; None leaves it to Typer (str, bool)."""
    base = hint
    if get_origin(base) in (typing.Union, types.UnionType):  # X | None: X
        (base,) = (a for a in get_args(base) if a is not type(None))
    if get_origin(base) is list:
        (base,) = get_args(base)
    if get_origin(base) is Literal:
        return _parse_choice(get_args(base))
    if base in (int, float):
        return _parse_number(base)
    return None


def _docs(obj: Any) -> dict[str, str]:
    """Parameter (or dataclass attribute) name -> its docstring description."""
    params = docstring_parser.parse_from_object(obj).params
    return {p.arg_name: p.description or "" for p in params}


def _flag(name: str, hint: Any, default: Any, help_text: str) -> inspect.Parameter:
    """One parameter as Typer reads it: a required list is positional, the rest are flags
    (a required non-list value is a required flag, as ``--out`` is)."""
    hint = _one_type(hint)
    info: typer.models.ParameterInfo
    if default is inspect.Parameter.empty and get_origin(hint) is list:
        info = typer.Argument(help=help_text, show_default=False)
    else:
        info = typer.Option(help=help_text, parser=_parser(hint))
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=default, annotation=Annotated[hint, info])


def _function_flags(fn: Callable, skip: Iterable[str], defaults: dict) -> list[inspect.Parameter]:
    """The flags of ``fn``'s parameters. ``--model`` is never required by the parser: main
    says what to pass when it is missing."""
    hints, docs = typing.get_type_hints(fn), _docs(fn)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        hint, default = hints[p.name], defaults.get(p.name, p.default)
        if p.name == "model" and default is p.empty:
            hint, default = hint | None, None
        out.append(_flag(p.name, hint, default, docs.get(p.name, "")))
    return out


def _config_flags(cls: type, names: Iterable[str]) -> list[inspect.Parameter]:
    """One flag per dataclass field; unset (None) leaves the preset's value."""
    hints, docs = typing.get_type_hints(cls), _docs(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return [
        _flag(
            name,
            hints[name] | None,
            None,
            f"{docs.get(name, cls.__name__ + '.' + name)} "
            f"(default: the preset's, else {defaults[name]})",
        )
        for name in names
    ]


def _add_verb(
    app: typer.Typer,
    name: str,
    fn: Callable,
    flags: list[inspect.Parameter],
    summary: str | None = None,
    **fixed: Any,
) -> None:
    """Register ``name``: parsing it gives ``fn`` and its keyword arguments (with ``fixed``)."""

    def parsed(**kwargs: Any) -> None:
        raise _Parsed(fn, kwargs | fixed)

    parsed.__signature__ = inspect.Signature(flags)  # type: ignore[attr-defined]
    parsed.__annotations__ = {p.name: p.annotation for p in flags}
    help_text = summary or docstring_parser.parse_from_object(fn).description
    app.command(name, help=help_text)(parsed)


def _train_flags(
    skip: tuple[str, ...], model_fields: Iterable[str], preset: str | None
) -> list[inspect.Parameter]:
    """``train``'s own flags, then one per ModelConfig field named and TrainConfig field."""
    from gptkit.train import train

    defaults = {"preset": preset} if preset else {}
    return [
        *_function_flags(train, skip, defaults),
        *_config_flags(ModelConfig, model_fields),
        *_config_flags(TrainConfig, [f.name for f in dataclasses.fields(TrainConfig)]),
    ]


def _finetune_app() -> typer.Typer:
    from gptkit.train import train

    app = typer.Typer(
        help="Fine-tune a model: classify (GPT-1's head) or sft (instructions, chat, QA), "
        "through the one training loop (see `gptkit train`).",
        no_args_is_help=True,
    )
    flags = _train_flags(("objective",), ("dropout",), "finetune")
    for task, summary in (
        ("classify", "GPT-1's recipe: a linear head on the final token, plus λ·LM loss."),
        ("sft", "Supervised fine-tuning on prompt/completion or chat JSONL."),
    ):
        _add_verb(app, task, train, flags, summary, objective=task)
    return app


def _version(show: bool) -> None:
    if show:
        from gptkit import __version__

        print(f"gptkit {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """gptkit: tokenize, pretrain, fine-tune and run GPT models."""


def build_app() -> typer.Typer:
    """Every verb of the command line."""
    from gptkit.compress.distill import distill
    from gptkit.compress.prune import prune_cmd
    from gptkit.data.dialogue import sgd_data_cmd
    from gptkit.data.prepare import prepare
    from gptkit.demo import demo
    from gptkit.eval.recommend import recommend_cmd, recommend_data_cmd
    from gptkit.eval.run import evaluate_model
    from gptkit.inspect.run import inspect_cmd
    from gptkit.serve.app import serve
    from gptkit.train import train

    app = typer.Typer(
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    model_fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "labels"]
    for name, fn in (("demo", demo), ("prepare", prepare)):
        _add_verb(app, name, fn, _function_flags(fn, (), {}))
    _add_verb(app, "train", train, _train_flags((), model_fields, None))
    app.add_typer(_finetune_app(), name="finetune")
    # distill: its own flags, then train's but for the student's source and the teacher's
    own = ("data", "out", "resume", "progress", "preset", "init_from", "objective", "labels",
           "lm_weight", "pack", "chat", "val_data")  # fmt: skip
    taken = {"teacher", "distill_temperature", "distill_alpha", "distill_top_k"}
    flags = [p for p in _train_flags(own, model_fields, None) if p.name not in taken]
    _add_verb(app, "distill", distill, [*_function_flags(distill, (), {}), *flags])
    for name, fn in (
        ("classify", classify_cmd),
        ("sft-data", sft_data_cmd),
        ("sgd-data", sgd_data_cmd),
        ("generate", generate_cmd),
        ("chat", chat_cmd),
        ("export", export_cmd),
        ("quantize", quantize_cmd),
        ("prune", prune_cmd),
        ("eval", evaluate_model),
        ("recommend", recommend_cmd),
        ("recommend-data", recommend_data_cmd),
        ("inspect", inspect_cmd),
        ("serve", serve),
        ("presets", presets_cmd),
    ):
        _add_verb(app, name, fn, _function_flags(fn, (), {}))
    return app


# -- entry point ---------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised by a verb's Typer callback: the function and its keyword arguments, carried
    out of click's standalone ``main``, which handles bad command lines, --help and
    --version itself (printing, exit status 2 or 0) and exits after a verb returns."""

    def __init__(self, fn: Callable, kwargs: dict[str, Any]) -> None:
        super().__init__(fn.__name__)
        self.fn, self.kwargs = fn, kwargs


@dataclasses.dataclass
class Parser:
    """The command line, parsed without running the verb."""

    app: typer.Typer

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The verb's function (``_fn``) and keyword arguments. A bad command line prints
        the error and exits with 2; ``--help`` and ``--version`` print and exit with 0."""
        try:
            typer.main.get_command(self.app).main(argv, prog_name="gptkit")
        except _Parsed as parsed:
            return argparse.Namespace(_fn=parsed.fn, **parsed.kwargs)
        raise SystemExit(0)  # not reached: click's standalone main exits by itself


def build_parser() -> Parser:
    """The command line's parser: ``build_parser().parse_args(argv)``, as with argparse."""
    return Parser(build_app())


def _tune_process(fn: Callable, kwargs: dict[str, Any]) -> None:
    """Process-wide settings, made here at the entry point and nowhere in the library:
    training on a CPU keeps the memory a step frees for the next one."""
    from gptkit.train import keep_freed_memory, train
    from gptkit.train.setup import pick_device

    if fn is train and pick_device(kwargs.get("device") or "auto").type == "cpu":
        keep_freed_memory()


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit status (2: a gptkit error, 130: interrupted)."""
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    try:
        if "model" in args and args["model"] is None:
            raise GptkitError(NO_MODEL)
        _tune_process(fn, args)
        result = fn(**args)
    except GptkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict) and result.get("interrupted"):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
            print(f"interrupted: checkpoint saved to {result.get('checkpoint')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
