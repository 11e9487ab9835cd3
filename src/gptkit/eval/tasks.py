"""The generation tasks: how each shipped data set is read and how its prompts are worded.

A reader turns a file of a shipped data set (found by
:func:`gptkit.eval.examples.find_data`, or given with ``--data``) into examples, dicts of
``id``, ``prompt``, ``messages`` and ``reference`` (see :mod:`gptkit.eval.examples`, which
also holds the wording of every task's prompts). A row that does not parse is a
:class:`GptkitError` naming ``file:line``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.eval.code import HUMANEVAL_STOP, read_humaneval
from gptkit.eval.examples import (
    Example,
    check_limit,
    find_data,
    limit_reached,
    read_jsonl,
    read_lines,
    render,
    row_field,
    row_strings,
)
from gptkit.eval.metrics import gsm8k_reference_answer
from gptkit.eval.multiple_choice import read_hellaswag, read_piqa
from gptkit.eval.qa import read_nq_open
from gptkit.eval.recommend import read_movielens
from gptkit.eval.tools import read_sgd

# -- the readers ---------------------------------------------------------------------------


def read_gsm8k(path: str | Path, limit: int | None = None) -> list[Example]:
    """GSM8K JSON Lines (``question``, ``answer`` ending in ``#### <number>``).

    The reference is the whole worked answer; the metric compares final numbers.
    """
    check_limit(limit)
    examples: list[Example] = []
    for where, row in read_jsonl(Path(path)):
        question = row_field(where, row, "question", str)
        answer = row_field(where, row, "answer", str)
        if gsm8k_reference_answer(answer) is None:
            raise GptkitError(f"{where}: the answer has no final '#### <number>' line")
        prompt, messages = render("gsm8k", question=question)
        examples.append(dict(id=where, prompt=prompt, messages=messages, reference=answer))
        if limit_reached(examples, limit):
            break
    return examples


def _multi30k_pair(path: Path, src: str, tgt: str) -> tuple[Path, Path]:
    if path.is_dir():
        path = path / f"test_2016_flickr.{src}.gz"
    name = path.name
    suffix = ".gz" if name.endswith(".gz") else ""
    stem = name.removesuffix(suffix)
    if not stem.endswith(f".{src}"):
        raise GptkitError(
            f"{path} is not a Multi30k source file; pass the directory or a file named "
            f"like test_2016_flickr.{src}.gz"
        )
    return path, path.with_name(stem.removesuffix(src) + tgt + suffix)


def read_multi30k(
    path: str | Path, limit: int | None = None, src: str = "en", tgt: str = "de"
) -> list[Example]:
    """Multi30k English -> German: aligned one-caption-per-line files.

    Args:
        path: the multi30k directory (its ``test_2016_flickr`` split) or a source file such as
            ``val.en.gz``; the target file is the one with the ``tgt`` suffix beside it.
        limit: read at most this many pairs.
        src, tgt: language suffixes of the source and target files.
    """
    check_limit(limit)
    src_path, tgt_path = _multi30k_pair(Path(path), src, tgt)
    sources, targets = list(read_lines(src_path)), list(read_lines(tgt_path))
    if len(sources) != len(targets):
        raise GptkitError(
            f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}; the files "
            "must be aligned line by line"
        )
    examples: list[Example] = []
    for (n, source), (_, target) in zip(sources, targets, strict=True):
        if not source.strip() or not target.strip():
            empty = src_path if not source.strip() else tgt_path
            raise GptkitError(f"{empty}:{n}: empty line; the files must hold one caption a line")
        prompt, messages = render("multi30k", source=source.strip())
        examples.append(
            dict(id=f"{src_path}:{n}", prompt=prompt, messages=messages, reference=target.strip())
        )
        if limit_reached(examples, limit):
            break
    return examples


def read_tatoeba(path: str | Path, limit: int | None = None) -> list[Example]:
    """Tatoeba English -> Chinese (``English<TAB>Chinese<TAB>attribution`` per line).

    An English sentence that appears on several lines becomes one example whose reference is
    the list of its translations, in file order. The file is sorted from short to long, so the
    first examples are the shortest.
    """
    check_limit(limit)
    path = Path(path)
    groups: dict[str, Example] = {}
    for n, line in read_lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise GptkitError(
                f"{path}:{n}: expected 'English<TAB>Chinese<TAB>attribution', got {line[:60]!r}"
            )
        english, chinese = parts[0].strip(), parts[1].strip()
        if english in groups:
            groups[english]["reference"].append(chinese)
            continue
        if limit is not None and len(groups) >= limit:
            continue  # later lines may still add translations to the examples we keep
        prompt, messages = render("tatoeba", source=english)
        groups[english] = dict(
            id=f"{path}:{n}", prompt=prompt, messages=messages, reference=[chinese]
        )
    return list(groups.values())


def read_scitldr(path: str | Path, limit: int | None = None) -> list[Example]:
    """SciTLDR JSON Lines: ``source`` (abstract sentences) -> ``target`` (1-4+ TL;DRs)."""
    check_limit(limit)
    examples: list[Example] = []
    for where, row in read_jsonl(Path(path)):
        source = " ".join(s.strip() for s in row_strings(where, row, "source"))
        targets = [t.strip() for t in row_strings(where, row, "target")]
        prompt, messages = render("scitldr", source=source)
        examples.append(dict(id=where, prompt=prompt, messages=messages, reference=targets))
        if limit_reached(examples, limit):
            break
    return examples


def read_self_instruct(path: str | Path, limit: int | None = None) -> list[Example]:
    """Self-Instruct tasks (``instruction`` and ``instances`` of ``input``/``output``), one
    example per instance; the reference is the human-written output."""
    check_limit(limit)
    examples: list[Example] = []
    for where, row in read_jsonl(Path(path)):
        instruction = row_field(where, row, "instruction", str).strip()
        instances = row_field(where, row, "instances", list)
        if not instances:
            raise GptkitError(f"{where}: field 'instances' is empty")
        for k, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise GptkitError(f"{where}: instance {k} should be an object with input, output")
            text = row_field(f"{where} (instance {k})", inst, "input", str).strip()
            output = row_field(f"{where} (instance {k})", inst, "output", str).strip()
            prompt, messages = render(
                "self_instruct",
                instruction=instruction,
                input_block=f"Input: {text}\n" if text else "",
                chat_input=f"\n\n{text}" if text else "",
            )
            examples.append(dict(id=where, prompt=prompt, messages=messages, reference=output))
            if limit_reached(examples, limit):
                return examples
    return examples


# -- the task table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One generation task: its reader, default file, metrics and decoding settings."""

    name: str
    read: Callable[..., list[Example]]
    default_data: str  # under the data directory (GPTKIT_DATA, shared/data)
    metrics: tuple[str, ...]  # names in gptkit.eval.metrics.GENERATION_METRICS
    stop: tuple[str, ...]  # where a plain (base-model) continuation ends
    max_new_tokens: int  # enough for a typical reference


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("gsm8k", read_gsm8k, "gsm8k/test.jsonl", ("gsm8k",), ("\n\n", "Question:"), 256),
        Task("multi30k", read_multi30k, "multi30k", ("bleu", "chrf"), ("\n",), 64),
        Task(
            "tatoeba",
            read_tatoeba,
            "tatoeba_cmn_eng/cmn.txt",
            ("bleu_zh", "chrf"),
            ("\n",),
            64,
        ),
        Task("scitldr", read_scitldr, "scitldr/test.jsonl", ("rouge",), ("\n",), 64),
        Task(
            "self_instruct",
            read_self_instruct,
            "self_instruct/user_oriented_instructions.jsonl",
            ("rougeL",),
            ("\n\n",),
            128,
        ),
        # pass@1 is scored by running the programs (gptkit.eval.code.HumanEvalScorer), which
        # evaluate_model does only when asked to
        Task(
            "humaneval",
            read_humaneval,
            "humaneval/HumanEval.jsonl.gz",
            ("pass@1",),
            HUMANEVAL_STOP,
            384,
        ),
        # a held-out SGD file (gptkit sgd-data --exclude dialogues_010.json trains without it)
        Task("sgd", read_sgd, "customer_support/dialogues_010.json", ("sgd",), ("\n\n",), 80),
        # every user's last rating; ranked by gptkit.eval.recommend.movielens_eval, not decoded
        Task("movielens", read_movielens, "movielens/u.data", ("hr@10", "ndcg@10"), ("\n",), 32),
        # scored on NQ-open.dev.jsonl; fine-tune on the EfficientQA file and dev past --limit
        Task(
            "nq_open", read_nq_open, "nq_open/NQ-open.dev.jsonl", ("exact_match", "f1"), ("\n",), 16
        ),
        # zero-shot multiple choice, scored by log-likelihood in gptkit.eval.multiple_choice
        # (not decoded); as SFT rows the gold choice is the answer
        Task(
            "hellaswag",
            read_hellaswag,
            "hellaswag/hellaswag_val_full.txt",
            ("acc", "acc_norm"),
            (),
            0,
        ),
        Task("piqa", read_piqa, "piqa/valid.jsonl", ("acc", "acc_norm"), (), 0),
    ]
}


def default_data(task: str) -> Path:
    """The shipped file (or directory) of ``task`` (see
    :func:`gptkit.eval.examples.find_data`), or an error that says where to point."""
    return find_data(TASKS[task].default_data, task)


def to_sft_rows(
    task: str,
    data: str | Path | None = None,
    skip: int = 0,
    limit: int | None = None,
    chat: bool = True,
    calculator: bool = False,
) -> list[dict[str, Any]]:
    """The examples of a shipped data set as SFT rows (``messages`` with the reference as
    the assistant's answer, or ``prompt``/``completion``), worded exactly as evaluation
    prompts them, so a model is fine-tuned on the requests it will be scored on (GSM8K's
    calculator annotations ``<<48/2=24>>`` are dropped from its answers unless
    ``calculator``, for a model evaluated with the calculator). The first ``skip`` examples
    are left out (hold them out for evaluation with ``--limit``)."""
    if task not in TASKS:
        raise GptkitError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if calculator and task != "gsm8k":
        raise GptkitError(f"--calculator keeps GSM8K's annotations; task {task} has none")
    if skip < 0:
        raise GptkitError(f"--skip must not be negative, got {skip}")
    path = Path(data) if data is not None else default_data(task)
    if not path.exists():
        raise GptkitError(f"{path} does not exist; check --data")
    check_limit(limit)
    examples = TASKS[task].read(path, limit=None if limit is None else skip + limit)[skip:]
    rows = []
    for ex in examples:
        ref = ex["reference"]
        answer = ref[0] if isinstance(ref, list) else ref
        if not isinstance(answer, str):
            raise GptkitError(f"{ex['id']}: task {task} has no text answer to train on")
        if task == "gsm8k" and not calculator:  # annotations "<<48/2=24>>" are not prose
            answer = re.sub(r"<<[^<>]*>>", "", answer)
        if chat:
            rows.append({"messages": [*ex["messages"], {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": ex["prompt"], "completion": " " + answer.strip()})
    if not rows:
        raise GptkitError(f"{path} has no examples after skipping {skip}")
    return rows
