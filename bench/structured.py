"""Structured output: the per-token cost of a grammar mask on SmolLM2's 49k vocabulary.

Three grammar engines on PyPI compute the mask of the ids allowed next: llguidance (MIT;
gptkit's choice, through :mod:`gptkit.generate.constrain`), xgrammar (Apache-2.0) and
outlines-core (Apache-2.0). Each gets the same vocabulary (the bytes of every id of
``models/SmolLM2-135M-Instruct.Q4_1.gguf``'s tokenizer, loaded with ``gptkit.checkpoint.load``),
the same JSON Schema with the same separators, and replays the same token ids (a JSON text
under the schema, as the tokenizer encodes it). Measured:

- vocabulary: the one-off work per tokenizer (importing its vocabulary);
- schema: the work per schema (per request);
- mask ms/token: the engine computing the int32 bitmask of the next ids, and advancing on
  the token; then with the bitmask applied to a (1, V) row of logits (gptkit's unpack and
  fill, the same for every engine).

Then gptkit's own decode, greedy, with and without ``json_schema`` (ms per generated token):
the overhead a user sees. An engine that is not installed is left out of the table::

    python bench/structured.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
TEXT = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "tags": ["mathematics", "engines", "poetry"],
        "active": True,
    }
)


def apply_bitmask(bitmask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The logits with every id whose bit is 0 set to -inf (as gptkit does it, the same for
    every engine)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
    allowed = torch.from_numpy(bits.view(np.bool_)[: logits.shape[-1]])
    return logits.masked_fill(~allowed, float("-inf"))


class Engine:
    """One grammar engine: built once per vocabulary, ``compile()`` once per schema, then
    ``matcher()`` per row, returning ``(fill(bitmask), accept(token))``."""

    name = ""

    def compile(self) -> None:
        raise NotImplementedError

    def matcher(self) -> tuple[Callable[[torch.Tensor], None], Callable[[int], Any]]:
        raise NotImplementedError


class LLGuidance(Engine):
    """Through gptkit's bridge: the tokenizer goes over as its ``tokenizer.json``."""

    name = "llguidance"

    def __init__(self, tok: Any, vocab: list[bytes], eos: int):
        import llguidance

        from gptkit.generate.constrain import ll_tokenizer

        self.ll, self.tok = llguidance, tok
        self.tokenizer = ll_tokenizer(tok)

    def compile(self) -> None:
        from gptkit.generate.constrain import Grammar, grammar_text

        self.grammar = grammar_text(Grammar("json_schema", json.dumps(SCHEMA)), self.tok)

    def matcher(self) -> tuple[Callable[[torch.Tensor], None], Callable[[int], Any]]:
        m = self.ll.LLMatcher(self.tokenizer, self.grammar)
        return lambda b: m.unsafe_compute_mask_ptr(b.data_ptr(), b.numel() * 4), m.consume_token


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: list[bytes], eos: int):
        import xgrammar as xgr

        info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos]
        )
        self.xgr, self.compiler = xgr, xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self) -> None:
        self.compiled = self.compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )

    def matcher(self) -> tuple[Callable[[torch.Tensor], None], Callable[[int], Any]]:
        m = self.xgr.GrammarMatcher(self.compiled)
        return lambda b: m.fill_next_token_bitmask(b[None]), m.accept_token


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tok: Any, vocab: list[bytes], eos: int):
        import outlines_core as oc

        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i != eos:
                ids.setdefault(b, []).append(i)
        self.oc, self.vocab = oc, oc.Vocabulary(eos, ids)

    def compile(self) -> None:
        # outlines-core turns the schema into a regex and indexes the whole vocabulary
        # against its automaton, per schema
        regex = self.oc.json_schema.build_regex_from_schema(
            json.dumps(SCHEMA), whitespace_pattern=" ?"
        )
        self.index = self.oc.Index(regex, self.vocab)

    def matcher(self) -> tuple[Callable[[torch.Tensor], None], Callable[[int], Any]]:
        g = self.oc.Guide(self.index)
        return lambda b: g.write_mask_into(b.data_ptr(), b.numel(), 4), g.advance


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mask_ms(engine: Engine, ids: list[int], vocab_size: int) -> tuple[float, float]:
    """Mean ms per token over ``ids``: the engine's part (fill the bitmask, advance on the
    token), and applying the bitmask to the logits (the same for every engine)."""
    fill, accept = engine.matcher()
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    logits = torch.randn(1, vocab_size)
    engine_s = apply_s = 0.0
    for t in ids:
        t0 = time.perf_counter()
        fill(bitmask)
        t1 = time.perf_counter()
        masked = apply_bitmask(bitmask, logits)
        t2 = time.perf_counter()
        assert masked[0, t] > float("-inf"), f"{engine.name} refused token {t}"
        accept(t)
        engine_s += t1 - t0 + time.perf_counter() - t2
        apply_s += t2 - t1
    return engine_s * 1000 / len(ids), apply_s * 1000 / len(ids)


def decode_ms(net: Any, tok: Any, schema: dict[str, Any] | None, new: int) -> tuple[float, int]:
    """ms per generated token of gptkit's greedy decode, and how many tokens it made."""
    from gptkit.config import SampleConfig
    from gptkit.generate.constrain import Grammar, constrained
    from gptkit.generate.generator import decode_text

    cfg = SampleConfig(max_new_tokens=new, temperature=0.0, stop_at_eos=schema is not None)
    cfg = constrained(cfg, Grammar.of(json_schema=schema))
    prompt = "Describe Ada Lovelace as a JSON record.\n"
    t0 = time.perf_counter()
    pieces = decode_text(net, tok, [prompt], cfg)
    for _ in pieces:
        pass
    n = len(pieces.decoder.rows[0].generated)
    return (time.perf_counter() - t0) * 1000 / n, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from gptkit.checkpoint import load

    net, tok = load(str(MODEL))
    ids = tok.encode(TEXT)
    print(f"vocabulary {tok.vocab_size} ids; replaying {len(ids)} tokens of {TEXT}")
    # llguidance first: every engine then gets the same bytes per id, read from its import
    # of the tokenizer.json (special tokens: empty, so no engine emits them as text)
    setup, first = timed(lambda: LLGuidance(tok, [], tok.eos_id))
    specials = set(tok.special_tokens.values())
    lt = first.tokenizer
    vocab = [b"" if i in specials else lt.decode_bytes([i]) for i in range(tok.vocab_size)]
    rows = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            if cls is not LLGuidance:
                setup, engine = timed(lambda cls=cls: cls(tok, vocab, tok.eos_id))
            else:
                engine = first
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
            continue
        compile_s, _ = timed(engine.compile)
        runs = [mask_ms(engine, ids, tok.vocab_size) for _ in range(args.reps)]
        own, apply = (statistics.median(r[i] for r in runs) for i in (0, 1))
        rows.append((engine.name, setup, compile_s, own, apply))
    head = f"{'engine':<14} {'vocabulary s':>12} {'schema s':>9} {'mask ms/token':>14}"
    print(f"\n{head} {'+ apply ms':>11}")
    for name, setup, compile_s, own, apply in rows:
        print(f"{name:<14} {setup:>12.2f} {compile_s:>9.3f} {own:>14.3f} {own + apply:>11.3f}")
    print("vocabulary: once per tokenizer; schema: once per request; mask: every token (the")
    print("engine's bitmask and advance; + apply: with the bitmask applied to the logits)")

    plain, n_plain = decode_ms(net, tok, None, 40)
    plain, n_plain = decode_ms(net, tok, None, 40)  # after a warm-up
    json_ms, n_json = decode_ms(net, tok, SCHEMA, 40)
    print(
        f"\ngptkit greedy decode, ms/token: plain {plain:.2f} ({n_plain} tokens), "
        f"json_schema {json_ms:.2f} ({n_json} tokens), overhead {json_ms - plain:+.2f} ms "
        f"({json_ms / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
