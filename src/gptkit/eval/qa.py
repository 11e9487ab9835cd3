"""Closed-book open-domain QA: Natural Questions open (NQ-Open), read and prompted few-shot.

NQ-Open (Lee et al., 2019, "Latent Retrieval for Weakly Supervised Open Domain Question
Answering") keeps the Natural Questions (Kwiatkowski et al., 2019) queries whose short answer
has at most five tokens; closed-book, the model answers from its weights alone (Roberts et
al., 2020, "How Much Knowledge Can You Pack Into the Parameters of a Language Model?").
Scores are the standard ones: exact match after SQuAD normalisation against any of the gold
answers, and SQuAD's token F1 against the best gold answer
(:func:`gptkit.eval.metrics.exact_match`, :func:`gptkit.eval.metrics.token_f1`).

The prompt is few-shot (Brown et al., 2020, as GPT-3 answered NaturalQS closed-book) with
five question/answer pairs written for this module, not taken from any NQ split, so they can
never overlap an evaluation question. A plain prompt lists them as ``Question:``/``Answer:``
lines; a chat prompt as earlier user/assistant turns. Fine-tuning rows
(:func:`gptkit.eval.tasks.to_sft_rows`) are worded exactly the same.
"""

from __future__ import annotations

from pathlib import Path

from gptkit.eval.examples import (
    Example,
    check_limit,
    limit_reached,
    read_jsonl,
    row_field,
    row_strings,
)

#: (question, answer) shots, lower-cased and without a question mark as NQ queries are
SHOTS: tuple[tuple[str, str], ...] = (
    ("who wrote the novel pride and prejudice", "Jane Austen"),
    ("what is the capital city of australia", "Canberra"),
    ("how many players does a soccer team have on the field", "11"),
    ("when did apollo 11 land on the moon", "July 20, 1969"),
    ("what is the largest planet in our solar system", "Jupiter"),
)
INSTRUCTION = (
    "Answer each question with a short answer only: a name, a date, a number or a few words."
)


def nq_prompt(question: str) -> tuple[str, list[dict[str, str]]]:
    """The few-shot plain prompt and chat messages that ask ``question``."""
    plain = [INSTRUCTION, ""]
    messages: list[dict[str, str]] = []
    for n, (q, a) in enumerate(SHOTS):
        plain += [f"Question: {q}?", f"Answer: {a}", ""]
        user = f"{INSTRUCTION}\n\n{q}?" if n == 0 else f"{q}?"
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": a}]
    plain.append(f"Question: {question}?\nAnswer:")
    messages.append({"role": "user", "content": f"{question}?"})
    return "\n".join(plain), messages


def read_nq_open(path: str | Path, limit: int | None = None) -> list[Example]:
    """NQ-Open JSON Lines (``question``, ``answer``: the list of gold answers); the
    reference is that list."""
    check_limit(limit)
    examples: list[Example] = []
    for where, row in read_jsonl(Path(path)):
        question = row_field(where, row, "question", str).strip()
        answers = [a.strip() for a in row_strings(where, row, "answer")]
        prompt, messages = nq_prompt(question)
        examples.append(dict(id=where, prompt=prompt, messages=messages, reference=answers))
        if limit_reached(examples, limit):
            break
    return examples
