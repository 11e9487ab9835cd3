"""Evaluation: perplexity and bits per byte over text, task metrics over generated answers.

``evaluate_model(model, task)`` is the whole thing (load, read the task's data, generate,
score, report); :mod:`gptkit.eval.metrics` holds the metric functions, and
:mod:`gptkit.eval.tasks` the data readers, :mod:`gptkit.eval.examples` the prompt wording
and where the data sets are found.
"""

from gptkit.eval.examples import PROMPTS
from gptkit.eval.metrics import (
    accuracy,
    bleu,
    chrf,
    classification_scores,
    confusion_matrix,
    exact_match,
    gsm8k_accuracy,
    gsm8k_extract,
    macro_f1,
    rouge,
)
from gptkit.eval.run import evaluate_model, generation_eval, perplexity, sliding_windows
from gptkit.eval.tasks import (
    TASKS,
    read_gsm8k,
    read_multi30k,
    read_scitldr,
    read_self_instruct,
    read_tatoeba,
)

__all__ = [
    "PROMPTS",
    "TASKS",
    "accuracy",
    "bleu",
    "chrf",
    "classification_scores",
    "confusion_matrix",
    "evaluate_model",
    "exact_match",
    "generation_eval",
    "gsm8k_accuracy",
    "gsm8k_extract",
    "macro_f1",
    "perplexity",
    "read_gsm8k",
    "read_multi30k",
    "read_scitldr",
    "read_self_instruct",
    "read_tatoeba",
    "rouge",
    "sliding_windows",
]
