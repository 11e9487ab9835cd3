"""The ``gptkit`` command line. Each subcommand is a typed Python function; its flags and help
come from the function's signature and its docstring's ``Args:`` section, and ``train`` adds
one flag per ModelConfig and TrainConfig field (default: the preset's value)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from gptkit.config import PRESETS, ModelConfig, TrainConfig
from gptkit.errors import GptkitError

# -- deriving argparse from signatures -----------------------------------------------------


def _doc_args(fn: Callable) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: name -> description."""
    doc = inspect.getdoc(fn) or ""
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            m = re.match(r"^\s{2,4}(\w[\w, ]*):\s*(.*)$", line)
            if m:
                current = m.group(1)
                for name in current.split(","):
                    out[name.strip()] = m.group(2)
            elif current and line.strip():
                for name in current.split(","):
                    out[name.strip()] += " " + line.strip()
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of dataclass fields, used as flag help."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ")
    out = {}
    for node in ast.walk(ast.parse(src)):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if is_field and node.lineno in comments:
            out[node.target.id] = comments[node.lineno]
    return out


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_argument(
    parser: argparse.ArgumentParser,
    name: str,
    tp: Any,
    default: Any,
    help_text: str,
    positional: bool = False,
    required: bool = False,
) -> None:
    tp = _unwrap_optional(tp)
    flag = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%") or None}
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        return
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (str,)
        if positional:
            parser.add_argument(name, nargs="+", type=item, **kwargs)
        else:
            parser.add_argument(flag, action="append", type=item, default=default, **kwargs)
        return
    if get_origin(tp) is Literal:
        kwargs["choices"] = list(get_args(tp))
        tp = type(kwargs["choices"][0])
    if tp not in (int, float, str):
        tp = str
    if positional:
        parser.add_argument(name, type=tp, **kwargs)
    elif required:
        parser.add_argument(flag, type=tp, required=True, dest=name, **kwargs)
    else:
        parser.add_argument(flag, type=tp, default=default, dest=name, **kwargs)


def add_function(
    sub: argparse._SubParsersAction,
    fn: Callable,
    name: str,
    skip: tuple[str, ...] = (),
    summary: str | None = None,
) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    summary = summary or doc.split("\n\n")[0].replace("\n", " ")
    parser = sub.add_parser(name, help=summary, description=summary)
    hints = typing.get_type_hints(fn)
    helps = _doc_args(fn)
    for pname, p in inspect.signature(fn).parameters.items():
        if pname in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        tp = hints.get(pname, str)
        required = p.default is inspect.Parameter.empty
        # Required lists (inputs, prompts) are positional; other required values are flags.
        positional = required and get_origin(_unwrap_optional(tp)) is list
        default = None if required else p.default
        _add_argument(parser, pname, tp, default, helps.get(pname, ""), positional, required)
    parser.set_defaults(_fn=fn)
    return parser


def add_config_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = comments.get(f.name, "")
        help_text = f"{text} (default: the preset's, else {default})".strip()
        _add_argument(group, f.name, hints[f.name], None, help_text)  # type: ignore[arg-type]


# -- commands that live at the CLI layer ---------------------------------------------------


def generate_cmd(
    prompt: list[str],
    model: str = "gptkit-demo/run",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    stop_at_eos: bool = True,
    context_policy: Literal["slide", "error"] = "slide",
    stream: bool = True,
    device: str = "cpu",
    quantize: Literal["bf16", "int8", "int4"] | None = None,
    compile: bool = False,
) -> None:
    """Generate text from a prompt (several prompts are batched together).

    Args:
        prompt: one or more prompts ("-" reads one from standard input).
        model: a checkpoint directory or a training run directory.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 is greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of tokens whose probability reaches p.
        repetition_penalty: > 1 discourages tokens already present (CTRL-style).
        seed: makes sampling reproducible.
        stop: stop when this text appears (repeatable; \n and \t are understood); it is
            not printed.
        stop_at_eos: stop at the end-of-text token.
        context_policy: "slide" keeps the last tokens when the context fills; "error" refuses.
        stream: print tokens as they come (one prompt only).
        device: cpu, cuda, mps.
        quantize: quantize the weights on load (see `gptkit quantize`).
        compile: decode through torch.compile (one prompt; pays a compilation first).
    """
    from gptkit.compress import load
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
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        stop_at_eos=stop_at_eos,
        context_policy=context_policy,
        compile=compile,
    )
    if stream and len(prompts) == 1:
        sys.stdout.write(prompts[0])
        for piece in stream_fn(net, tok, prompts[0], **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    outs = generate(net, tok, prompts, **kwargs)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1} ---")
        print(p + o)


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
    from gptkit.compress import load
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

    net, tok = load(model)
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

    from gptkit.compress import load, quantize, save_quantized

    net, tok = load(model)
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


# -- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from gptkit import __version__
    from gptkit.data.prepare import prepare
    from gptkit.demo import demo
    from gptkit.eval.run import evaluate_model
    from gptkit.serve.app import serve
    from gptkit.train import train

    parser = argparse.ArgumentParser(
        prog="gptkit", description="gptkit: tokenize, pretrain, fine-tune and run GPT models."
    )
    parser.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_function(sub, demo, "demo")
    add_function(sub, prepare, "prepare")
    train_parser = add_function(sub, train, "train")
    add_config_fields(train_parser, ModelConfig, "model fields", skip=("labels",))
    add_config_fields(train_parser, TrainConfig, "training fields")
    finetune = sub.add_parser(
        "finetune",
        help="Fine-tune a model: classify (GPT-1's head) or sft (instructions, chat, QA).",
        description="Fine-tune a model through the one training loop (see `gptkit train`).",
    )
    tasks = finetune.add_subparsers(dest="objective", required=True, metavar="TASK")
    for task, summary in (
        ("classify", "GPT-1's recipe: a linear head on the final token, plus λ·LM loss."),
        ("sft", "Supervised fine-tuning on prompt/completion or chat JSONL."),
    ):
        p = add_function(tasks, train, task, skip=("objective",), summary=summary)
        p.set_defaults(preset="finetune")
        add_config_fields(p, TrainConfig, "training fields")
        add_config_fields(p, ModelConfig, "model fields", only=("dropout",))
    add_function(sub, classify_cmd, "classify")
    add_function(sub, sft_data_cmd, "sft-data")
    add_function(sub, generate_cmd, "generate")
    add_function(sub, chat_cmd, "chat")
    add_function(sub, export_cmd, "export")
    add_function(sub, quantize_cmd, "quantize")
    add_function(sub, evaluate_model, "eval")
    add_function(sub, serve, "serve")
    add_function(sub, presets_cmd, "presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command", None)
    try:
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
