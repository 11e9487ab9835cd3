"""``gptkit.pipeline(task, model=SOURCE)``: transformers' ``pipeline`` surface over gptkit models.

The calls and return values follow Hugging Face transformers' pipelines (``pipelines/
text_generation.py`` and ``text_classification.py``; the v4 ``summarization``,
``translation`` and ``question_answering`` pipelines for the rest), so code written against
them runs on any model ``gptkit.load`` takes::

    pipe = gptkit.pipeline("text-generation", model="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    pipe("Once upon a time", max_new_tokens=20)   # [{"generated_text": "Once upon a time..."}]

====================  ==========================================  ===========================
task                  one input gives                             how gptkit does it
====================  ==========================================  ===========================
text-generation       ``[{"generated_text": str}]`` (chats: the   the decoding core
                      messages with the reply appended)
text-classification,  ``[{"label": str, "score": float}]``        the model's classification
sentiment-analysis                                                head (``finetune classify``)
summarization         ``[{"summary_text": str}]``                 a prompt, greedy decoding
translation[_xx_to_yy] ``[{"translation_text": str}]``            a prompt, greedy decoding
question-answering    ``{"score", "start", "end", "answer"}``     a prompt, greedy decoding;
                                                                  the answer located in the
                                                                  context, its probability
====================  ==========================================  ===========================

A list of inputs gives a list of the above (text-generation: a list of lists). transformers
runs summarization, translation and extractive question answering on encoder-decoder or
span-head models; a decoder-only model does them by continuing a prompt, worded as
``gptkit eval`` words its tasks (the chat template is used when the tokenizer has one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint import load
from gptkit.errors import GptkitError
from gptkit.generate import classify, generate
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer
from gptkit.tokenizer.chat import apply_chat_template

TASKS = (
    "text-generation",
    "text-classification",
    "sentiment-analysis",
    "summarization",
    "translation",
    "question-answering",
)
#: ISO 639-1 codes of translation_xx_to_yy task names -> the names a prompt uses
LANGUAGES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
}


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


class Pipeline:
    """A loaded model and tokenizer bound to one task; call it like transformers' pipeline."""

    def __init__(self, task: str, model: GPT, tokenizer: Tokenizer, src: str = "", tgt: str = ""):
        self.task, self.model, self.tokenizer = task, model, tokenizer
        self.src_lang, self.tgt_lang = src, tgt

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if self.task == "question-answering":
            return self._question_answering(inputs, **kwargs)
        single = isinstance(inputs, str) or (self.task == "text-generation" and _is_chat(inputs))
        batch = [inputs] if single else list(inputs or [])
        if not batch or not all(isinstance(x, str) or _is_chat(x) for x in batch):
            raise GptkitError(f"{self.task} takes a string or a list of strings")
        run = {
            "text-generation": self._text_generation,
            "text-classification": self._text_classification,
            "sentiment-analysis": self._text_classification,
            "summarization": self._summarization,
            "translation": self._translation,
        }[self.task]
        out = run(batch, **kwargs)  # one entry per input
        if not single:
            return out
        # one input: text-generation gives its list of generations, the other tasks a list of
        # one result (or of every label, for top_k=None), as transformers does
        if self.task == "text-generation" or isinstance(out[0], list):
            return out[0]
        return [out[0]]

    # -- the tasks -------------------------------------------------------------------------

    def _text_generation(
        self,
        batch: list[Any],
        max_new_tokens: int = 256,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_k: int | None = None,
        top_p: float | None = None,
        num_return_sequences: int = 1,
        return_full_text: bool = True,
        seed: int | None = None,
    ) -> list[list[dict[str, Any]]]:
        """The defaults are transformers' for a model without a generation config."""
        prompts = [apply_chat_template(self.tokenizer, x) if _is_chat(x) else x for x in batch]
        out = []
        for x, prompt in zip(batch, prompts, strict=True):
            rows = []
            for k in range(num_return_sequences):
                text = generate(
                    self.model,
                    self.tokenizer,
                    prompt,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature if do_sample else 0.0,
                    top_k=top_k,
                    top_p=top_p,
                    seed=None if seed is None else seed + k,
                )
                if _is_chat(x):
                    full = [*x, {"role": "assistant", "content": text}]
                    rows.append({"generated_text": full if return_full_text else text})
                else:
                    rows.append({"generated_text": prompt + text if return_full_text else text})
            out.append(rows)
        return out

    def _text_classification(
        self, batch: list[str], top_k: int | None = 1
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """``top_k=None`` gives every label, most probable first, as transformers does."""
        results = classify(self.model, self.tokenizer, batch)
        out: list[Any] = []
        for r in results:
            ranked = sorted(r["probs"].items(), key=lambda kv: -kv[1])
            rows = [{"label": name, "score": p} for name, p in ranked[: top_k or len(ranked)]]
            out.append(rows[0] if top_k == 1 else rows)
        return out

    def _chat(self, message: str) -> str:
        return apply_chat_template(self.tokenizer, [{"role": "user", "content": message}])

    def _complete(self, plain: list[str], chat: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to prompts, through the chat template when the tokenizer has one."""
        if self.tokenizer.chat_template:
            prompts, stop = [self._chat(c) for c in chat], None
        else:
            prompts, stop = plain, ["\n"]
        outs = generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop=stop,
        )
        return [o.strip() for o in outs]

    def _summarization(self, batch: list[str], max_new_tokens: int = 64) -> list[dict[str, str]]:
        plain = [f"{t}\n\nTL;DR:" for t in batch]
        chat = [f"Summarize this text in one sentence.\n\n{t}" for t in batch]
        return [{"summary_text": s} for s in self._complete(plain, chat, max_new_tokens)]

    def _translation(
        self,
        batch: list[str],
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        max_new_tokens: int = 64,
    ) -> list[dict[str, str]]:
        src = LANGUAGES.get(src_lang or self.src_lang, src_lang or self.src_lang)
        tgt = LANGUAGES.get(tgt_lang or self.tgt_lang, tgt_lang or self.tgt_lang)
        if not src or not tgt:
            raise GptkitError(
                "translation needs its languages: name the task translation_en_to_de, or pass "
                "src_lang= and tgt_lang="
            )
        plain = [f"{src}: {t}\n{tgt}:" for t in batch]
        chat = [
            f"Translate this {src} sentence into {tgt}. Reply with the translation only.\n\n{t}"
            for t in batch
        ]
        return [{"translation_text": s} for s in self._complete(plain, chat, max_new_tokens)]

    def _question_answering(
        self,
        inputs: Any = None,
        question: str | Sequence[str] | None = None,
        context: str | Sequence[str] | None = None,
        max_new_tokens: int = 32,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``pipe(question=..., context=...)`` or ``pipe({"question": ..., "context": ...})``
        (or lists of either). ``start``/``end`` locate the answer in the context (-1 when the
        model's answer is not a span of it); ``score`` is the answer's probability."""
        if inputs is not None:
            rows = [inputs] if isinstance(inputs, dict) else list(inputs)
            single = isinstance(inputs, dict)
        elif question is not None and context is not None:
            single = isinstance(question, str)
            qs = [question] if isinstance(question, str) else list(question)
            cs = [context] if isinstance(context, str) else list(context)
            if len(cs) == 1 and len(qs) > 1:
                cs = cs * len(qs)
            if len(qs) != len(cs):
                raise GptkitError(f"{len(qs)} questions but {len(cs)} contexts; give one each")
            rows = [{"question": q, "context": c} for q, c in zip(qs, cs, strict=True)]
        else:
            raise GptkitError("question-answering takes question= and context=")
        if not all(isinstance(r, dict) and {"question", "context"} <= r.keys() for r in rows):
            raise GptkitError(
                "each question-answering input needs 'question' and 'context': call it with "
                "question=..., context=... or with dicts of the two"
            )
        plain = [f"{r['context']}\n\nQuestion: {r['question']}\nAnswer:" for r in rows]
        chat = [
            f"{r['context']}\n\nAnswer the question with a short span of the text above, "
            f"and nothing else.\nQuestion: {r['question']}"
            for r in rows
        ]
        answers = self._complete(plain, chat, max_new_tokens)
        # the score: the probability of the answer after the prompt it was decoded from (a
        # plain prompt ends at "Answer:", so the answer's leading space was stripped)
        if self.tokenizer.chat_template:
            scored = [(self._chat(c), a) for c, a in zip(chat, answers, strict=True) if a]
        else:
            scored = [(p, " " + a) for p, a in zip(plain, answers, strict=True) if a]
        from gptkit.eval.multiple_choice import loglikelihoods  # the eval layer, when asked

        lls = iter(loglikelihoods(self.model, self.tokenizer, scored, progress=False))
        out = []
        for r, a in zip(rows, answers, strict=True):
            score = math.exp(next(lls)[0]) if a else 0.0
            start = r["context"].find(a) if a else -1
            end = start + len(a) if start >= 0 else -1
            out.append({"score": score, "start": start, "end": end, "answer": a})
        return out[0] if single else out


def pipeline(
    task: str,
    model: str | Path | GPT | None = None,
    tokenizer: Tokenizer | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = "auto",
) -> Pipeline:
    """A callable for ``task`` over ``model``, as ``transformers.pipeline`` builds one.

    Args:
        task: text-generation, text-classification (or sentiment-analysis), summarization,
            translation (translation_en_to_de names the languages; otherwise pass src_lang=
            and tgt_lang= to the call) or question-answering.
        model: any source ``gptkit.load`` takes (a checkpoint or Hugging Face directory, a
            .gguf file, a hub id or known name), or a loaded GPT with ``tokenizer``.
        tokenizer: the tokenizer of a GPT passed as ``model``.
        device: where the model runs (cpu, cuda, mps).
        quantize: as ``gptkit.load``'s (a quantized GGUF stays quantized by default).
    """
    name, src, tgt = task, "", ""
    if task.startswith("translation_"):
        parts = task.removeprefix("translation_").split("_to_")
        if len(parts) != 2 or not all(parts):
            raise GptkitError(
                f"task {task!r}: write translation_xx_to_yy, e.g. translation_en_to_de"
            )
        name, (src, tgt) = "translation", parts
    if name not in TASKS:
        raise GptkitError(f"unknown pipeline task {task!r}; choose from {', '.join(TASKS)}")
    if model is None:
        raise GptkitError("pass model=: a checkpoint directory, a .gguf file or a loaded GPT")
    if isinstance(model, GPT):
        if tokenizer is None:
            raise GptkitError("a GPT passed as model= needs its tokenizer=")
        net, tok = model, tokenizer
    else:
        net, loaded = load(model, device=device, quantize=quantize)
        tok = tokenizer or loaded
        if tok is None:
            raise GptkitError(f"{model} has no tokenizer; pass tokenizer=")
    if name in ("text-classification", "sentiment-analysis") and net.cls_head is None:
        raise GptkitError(
            f"{task} needs a model with a classification head; train one with "
            "`gptkit finetune classify`"
        )
    return Pipeline(name, net.eval(), tok, src, tgt)
