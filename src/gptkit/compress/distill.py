"""Knowledge distillation: train a small student on a large teacher's softened distributions.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network": the student
minimises ``alpha · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 - alpha) · CE(s, y)``
(DistilBERT, Sanh et al. 2019, and MiniLLM's baselines train GPT students the same way).

This is the one training loop (:mod:`gptkit.train.loop`) with a teacher in its config
(``TrainConfig.teacher`` and the ``distill_*`` fields): the teacher, frozen and in inference
mode, scores every LM batch as it is drawn (:class:`gptkit.train.objectives.TeacherSampler`),
and :func:`gptkit.train.objectives.distill_loss` mixes the two losses. So distillation
resumes exactly, runs under DDP, and draws the same progress bar and loss curve as any run;
the teacher's name and settings are saved with each checkpoint's training state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.config import PRESETS
from gptkit.errors import GptkitError
from gptkit.train import train


def distill(
    teacher: str,
    student: str,
    data: str | Path,
    out: str | Path,
    temperature: float | None = None,
    alpha: float | None = None,
    top_k: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on the token shards in ``data``.

    Args:
        teacher: any source ``gptkit.load`` takes (checkpoint, HF directory, .gguf, name);
            it must use the data's tokenizer.
        student: a preset name (a fresh model of that preset, with the data's vocabulary)
            or any source ``gptkit.load`` takes (e.g. a pruned copy of the teacher).
        data: a directory written by ``gptkit prepare`` with the teacher's tokenizer.
        out: the run directory (checkpoints/, metrics.jsonl, loss.png).
        temperature: T, softening both distributions (default 2; on resume, the run's).
        alpha: the weight of the KL term; 1 - alpha weighs the plain LM loss (default
            0.5; on resume, the run's).
        top_k: match the teacher's k most likely tokens only (default 0: the whole
            vocabulary; on resume, the run's).
        resume: continue the run in ``out`` (teacher and settings from its checkpoint).
        progress: show a progress bar.
        overrides: any other option of :func:`gptkit.train.train` (``max_steps``, ``lr``,
            ``batch_size``, ``seq_len``, ``lora_rank``, ...).

    Returns the training summary.
    """
    if "init_from" in overrides or "preset" in overrides:
        raise GptkitError(
            "distill takes the student as student=PRESET|SOURCE, not init_from/preset"
        )
    if student in PRESETS and not Path(student).exists():
        start: dict[str, Any] = {"preset": student}
    else:
        start = {"init_from": student}
    settings = {
        "distill_temperature": temperature,
        "distill_alpha": alpha,
        "distill_top_k": top_k,
    }  # None: TrainConfig's default, or on resume the checkpoint's
    settings = {k: v for k, v in settings.items() if v is not None}
    return train(
        data,
        out,
        resume=resume,
        progress=progress,
        objective="lm",
        teacher=str(teacher),
        **start,
        **settings,
        **overrides,
    )


__all__ = ["distill"]
