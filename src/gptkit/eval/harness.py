"""gptkit as a model of EleutherAI's lm-evaluation-harness (``pip install 'gptkit[harness]'``).

The harness (Gao et al., "A framework for few-shot language model evaluation",
``lm_eval/api/model.py``) asks a model three things, and :class:`GptkitLM` answers each with
the one gptkit function that does it:

- ``loglikelihood``: log p(continuation | context) and whether it is the greedy
  continuation, by :func:`gptkit.eval.multiple_choice.loglikelihoods` (one prefill per
  context, shared by its continuations);
- ``loglikelihood_rolling``: log p(text), every token scored once after the start token, in
  windows of the model's context, by :func:`gptkit.eval.run.perplexity`;
- ``generate_until``: greedy (or sampled) text cut at the first stop string, by
  :func:`gptkit.generate.generate`, prompts with the same settings batched.

The harness finds models in its registry, filled by importing the module that holds them;
its ``lm_eval`` command imports only its own. So this module registers ``gptkit`` when it is
imported, and run as a program it is the harness's command line with gptkit registered::

    python -m gptkit.eval.harness --model gptkit \\
        --model_args source=models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks piqa

From Python, ``lm_eval.simple_evaluate(model=GptkitLM(source), tasks=[...])`` needs no
registry at all.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra: say how to get it
    from gptkit.errors import GptkitError

    raise GptkitError(
        "the lm-evaluation-harness adapter needs lm-eval: pip install 'gptkit[harness]'"
    ) from e

from gptkit.errors import GptkitError
from gptkit.eval.multiple_choice import loglikelihoods
from gptkit.eval.run import perplexity
from gptkit.generate import generate
from gptkit.tokenizer.chat import apply_chat_template


def _batch_size(value: Any) -> int:
    # the harness passes its --batch_size through: an int, a digit string, or "auto"
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise GptkitError(f"batch_size must be a whole number or 'auto', got {value!r}") from None
    if size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {size}")
    return size


@register_model("gptkit")
class GptkitLM(LM):
    """Any model ``gptkit.load`` takes, as the harness's ``--model gptkit``.

    Args:
        source: a checkpoint or Hugging Face directory, a .gguf file, a hub id or known name.
        device: cpu, cuda, mps.
        quantize: as ``gptkit.load``'s ("auto" keeps a quantized GGUF quantized; "none").
        batch_size: contexts (log-likelihood) or prompts (generation) per forward pass.
        max_gen_toks: the longest generation when a task names none.
        progress: show gptkit's progress bars.
    """

    def __init__(
        self,
        source: str,
        device: str | None = None,
        quantize: str = "auto",
        batch_size: int | str | None = 8,
        max_gen_toks: int = 256,
        progress: bool = True,
        **_: Any,  # the harness's max_batch_size and the like: not ours to use
    ):
        super().__init__()
        from gptkit.checkpoint import load

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # the harness's command line asks for cuda unless told otherwise; so does its own
            # Hugging Face model, which falls back to the CPU in the same way
            warnings.warn(
                f"device {device!r} is not available here; running on the CPU", stacklevel=2
            )
            device = "cpu"
        self.model, tok = load(source, device=device, quantize=quantize)
        if tok is None:
            raise GptkitError(f"{source} has no tokenizer; the harness needs one")
        self.tokenizer, self.source = tok, str(source)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks, self.progress = int(max_gen_toks), bool(progress)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 8) -> GptkitLM:
        """An adapter over a model already in memory (tests, or a model just trained)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self.model, self.tokenizer, self.source = model, tokenizer, "<in memory>"
        self.batch_size, self.max_gen_toks, self.progress = batch_size, 256, False
        return self

    # -- the three requests ----------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        return loglikelihoods(self.model, self.tokenizer, pairs, self.batch_size, self.progress)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        out = []
        for r in requests:
            (text,) = r.args[:1]
            if not text:
                out.append(0.0)
                continue
            block = self.model.config.block_size
            # stride = the whole context: windows that do not overlap, as the harness's rolling
            # windows, each token scored once
            s = perplexity(self.model, self.tokenizer, [text], block, block, 1, progress=False)
            out.append(-s["loss"] * s["tokens"])
        return out

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        # requests with the same settings are decoded together, answers put back in order
        groups: dict[str, list[int]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            key = repr(sorted(kwargs.items()))
            groups.setdefault(key, []).append(i)
            settings[key] = kwargs
        out = [""] * len(requests)
        for key, idx in groups.items():
            kw = settings[key]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            for b in range(0, len(idx), self.batch_size):
                rows = idx[b : b + self.batch_size]
                texts = generate(
                    self.model,
                    self.tokenizer,
                    [str(requests[i].args[0]) for i in rows],
                    max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)),
                    temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                    top_p=kw.get("top_p") if sample else None,
                    top_k=kw.get("top_k") if sample else None,
                    stop=until or None,
                )
                for i, text in zip(rows, texts, strict=True):
                    out[i] = text
        return out

    # -- what the harness asks besides -----------------------------------------------------

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's own chat template (``--apply_chat_template``)."""
        return apply_chat_template(self.tokenizer, chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return f"gptkit-{self.tokenizer.hash}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


def main(argv: list[str] | None = None) -> None:
    """The harness's command line, with ``--model gptkit`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
