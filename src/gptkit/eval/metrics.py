"""Task metrics as plain functions of predictions and references.

Scales follow the libraries that define the metrics: accuracy, macro-F1, exact match and
ROUGE are fractions in [0, 1]; BLEU and chrF are sacrebleu's 0-100.

- Classification: accuracy, macro-F1 (the unweighted mean of per-class F1 over every label
  seen in references or predictions; a class never predicted has F1 0, as scikit-learn
  counts it) and the confusion matrix (rows: reference label, columns: predicted label).
- Translation: corpus BLEU (Papineni et al., 2002) and chrF (Popović, 2015) through
  ``sacrebleu`` (Post, 2018), so scores are comparable with published ones; Chinese uses
  sacrebleu's ``zh`` tokenizer.
- Summarization: ROUGE-1/2/L F-measure (Lin, 2004) through Google's ``rouge-score`` with the
  Porter stemmer, averaged over examples; with several references an example scores its best.
- QA: exact match after SQuAD-style normalisation; GSM8K (Cobbe et al., 2021) compares the
  final numbers.

A reference is a string or, where the task has several per example, a list of strings.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from gptkit.errors import GptkitError
from gptkit.eval.tools import tool_call_scores

Reference = str | Sequence[str]


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise GptkitError(
            f"got {len(predictions)} predictions for {len(references)} references; "
            "give one prediction per reference"
        )


def _ref_list(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


# -- classification ------------------------------------------------------------------------


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference label (0.0 for no examples)."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _labels(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None,
) -> list[Hashable]:
    if labels is not None:
        return list(labels)
    seen = set(references) | set(predictions)
    try:
        return sorted(seen)  # type: ignore[type-var]
    except TypeError:  # labels of mixed types: keep first appearance
        return list(dict.fromkeys([*references, *predictions]))


def confusion_matrix(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> tuple[list[Hashable], list[list[int]]]:
    """``(labels, matrix)``: ``matrix[i][j]`` counts examples whose reference is
    ``labels[i]`` and prediction ``labels[j]``. Labels default to the sorted union of both
    sides; examples with a label outside ``labels`` are not counted."""
    _check_lengths(predictions, references)
    names = _labels(predictions, references, labels)
    index = {name: i for i, name in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for p, r in zip(predictions, references, strict=True):
        if p in index and r in index:
            matrix[index[r]][index[p]] += 1
    return names, matrix


def macro_f1(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Unweighted mean over labels of F1 = 2 tp / (2 tp + fp + fn); a label with no true or
    predicted examples scores 0."""
    names, matrix = confusion_matrix(predictions, references, labels)
    if not names:
        return 0.0
    scores = []
    for i in range(len(names)):
        tp = matrix[i][i]
        fn = sum(matrix[i]) - tp
        fp = sum(row[i] for row in matrix) - tp
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def classification_scores(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix in one JSON-able dict."""
    names, matrix = confusion_matrix(predictions, references, labels)
    return {
        "accuracy": accuracy(predictions, references),
        "macro_f1": macro_f1(predictions, references, names),
        "labels": names,
        "confusion_matrix": matrix,
    }


# -- translation ---------------------------------------------------------------------------


def _reference_streams(references: Sequence[Reference]) -> list[list[str | None]]:
    """Per-example references -> sacrebleu's reference streams, padded with None where an
    example has fewer references than the most."""
    refs = [_ref_list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise GptkitError(f"example {i} has no reference; give at least one")
    width = max((len(r) for r in refs), default=1)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(
    predictions: Sequence[str], references: Sequence[Reference], tokenize: str = "13a"
) -> float:
    """Corpus BLEU (0-100) as sacrebleu computes it.

    Args:
        predictions: one hypothesis per example.
        references: per example a reference string or a list of them.
        tokenize: sacrebleu's tokenizer: "13a" (its default, for European languages),
            "zh" for Chinese, "char", "intl", ...
    """
    import sacrebleu

    _check_lengths(predictions, references)
    streams = _reference_streams(references)
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus chrF (0-100; character 6-grams, beta 2) as sacrebleu computes it."""
    import sacrebleu

    _check_lengths(predictions, references)
    streams = _reference_streams(references)
    return float(sacrebleu.corpus_chrf(list(predictions), streams).score)


# -- summarization -------------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=4)
def _rouge_scorer(types: tuple[str, ...]) -> Any:
    from rouge_score import rouge_scorer  # imports nltk: ~2 s, so only when needed

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge(
    predictions: Sequence[str],
    references: Sequence[Reference],
    types: Sequence[str] = ROUGE_TYPES,
) -> dict[str, float]:
    """ROUGE F-measures in [0, 1], with stemming, averaged over examples.

    With several references an example takes, per ROUGE type, its best F-measure (as
    ``rouge-score``'s ``score_multi`` and SciTLDR's reporting do). rouge-score keeps only
    ASCII letters and digits, so it is for English text.
    """
    _check_lengths(predictions, references)
    types = tuple(types)
    scorer = _rouge_scorer(types)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        refs = _ref_list(ref)
        if not refs:
            raise GptkitError("an example has no reference; give at least one")
        scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(1, len(predictions))
    return {t: totals[t] / n for t in types}


# -- question answering --------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (NFKC first): lower case, no punctuation, no English articles,
    single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if c not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Fraction of predictions equal to a reference after :func:`normalize_answer`."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        p = normalize_answer(pred)
        hits += any(p == normalize_answer(r) for r in _ref_list(ref))
    return hits / len(predictions)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:  # SQuAD v1.1's rule: no common token (two empty answers included) is 0
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """SQuAD's token F1 (Rajpurkar et al., 2016): the harmonic mean of the precision and
    recall of a prediction's words (a bag, after :func:`normalize_answer`) against each
    reference's, the best reference per example, averaged over examples."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    total = sum(
        max((_f1(pred, r) for r in _ref_list(ref)), default=0.0)
        for pred, ref in zip(predictions, references, strict=True)
    )
    return total / len(predictions)


# A number: digits with optional thousands groups ("1,234,567") or plain digits, an optional
# decimal part, and a minus sign unless it follows a word ("5-3" is 5 and 3). "1,2,3" is
# three numbers, not 123.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def canonical_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``, ``"-0"`` -> ``"0"``; None
    if ``text`` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def _first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return canonical_number(m.group()) if m else None


def gsm8k_reference_answer(answer: str) -> str | None:
    """The final number of a GSM8K reference solution: the number after ``####``."""
    _, sep, tail = answer.rpartition("####")
    return _first_number(tail) if sep else None


def gsm8k_extract(output: str) -> str | None:
    """The answer a model gave: the number after the first ``####`` that has one (the
    GSM8K answer format), else the last number in the text; commas dropped, None if there
    is no number."""
    for m in re.finditer("####", output):
        number = _first_number(output[m.end() :])
        if number is not None:
            return number
    numbers = _NUMBER.findall(output)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of model outputs whose extracted number equals the reference's final one."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        want = gsm8k_reference_answer(ref)
        if want is None:
            raise GptkitError(f"GSM8K reference has no '#### <number>' line: {ref[-80:]!r}")
        hits += gsm8k_extract(pred) == want
    return hits / len(predictions)


# -- by name, for generation tasks ---------------------------------------------------------


def _sgd(predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    def replies(p: list[str], r: list[str]) -> dict[str, float]:
        return {"bleu": bleu(p, r), "rougeL": rouge(p, r, types=("rougeL",))["rougeL"]}

    return tool_call_scores(predictions, references, replies)


MetricFn = Callable[[Sequence[str], Sequence[Any]], dict[str, float]]

#: metric name -> function of (predictions, references) returning named scores
GENERATION_METRICS: Mapping[str, MetricFn] = {
    "exact_match": lambda p, r: {"exact_match": exact_match(p, r)},
    "f1": lambda p, r: {"f1": token_f1(p, r)},
    "gsm8k": lambda p, r: {"exact_match": gsm8k_accuracy(p, r)},
    "bleu": lambda p, r: {"bleu": bleu(p, r)},
    "bleu_zh": lambda p, r: {"bleu": bleu(p, r, tokenize="zh")},
    "chrf": lambda p, r: {"chrf": chrf(p, r)},
    "rouge": lambda p, r: rouge(p, r),
    "rougeL": lambda p, r: rouge(p, r, types=("rougeL",)),
    "sgd": _sgd,
}
