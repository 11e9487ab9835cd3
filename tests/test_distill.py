"""Distillation: the loss equals a KL computed by hand, its gradient reaches the student
alone, top-k with k = V is the full loss, a distilled run resumes exactly, a teacher with
another tokenizer is refused naming both, and distillation pulls the student to the teacher."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, run_losses, tiny_model

from gptkit.checkpoint import load, save_checkpoint
from gptkit.compress import distill
from gptkit.data.loader import BatchSampler
from gptkit.data.prepare import prepare
from gptkit.errors import GptkitError
from gptkit.tokenizer import load_tokenizer
from gptkit.train import train
from gptkit.train.objectives import TeacherSampler, batch_loss, distill_loss


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "a.txt")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def teacher(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train(corpus, out, preset="tiny", max_steps=30, progress=False)
    return out


def test_loss_equals_hand_computed_kl() -> None:
    T, alpha = 2.0, 0.25
    s = [[1.0, 2.0, 0.5]]  # student logits, one position
    t = [[0.0, 3.0, 1.0]]  # teacher logits
    y = 1

    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    p = softmax([x / T for x in t[0]])
    q = softmax([x / T for x in s[0]])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    ce = -math.log(softmax(s[0])[y])
    expected = alpha * T * T * kl + (1 - alpha) * ce
    logp = torch.tensor([[p]]).log()
    got = distill_loss(torch.tensor([s]), torch.tensor([[y]]), logp, torch.empty(0), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_top_k_of_the_whole_vocabulary_is_the_full_loss() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    full = distill_loss(s, y, F.log_softmax(t / 3, -1), torch.empty(0), 3.0, 0.7)
    values, idx = t.topk(11, dim=-1)
    top = distill_loss(s, y, F.log_softmax(values / 3, -1), idx, 3.0, 0.7)
    torch.testing.assert_close(top, full)
    same = distill_loss(t, y, F.log_softmax(t / 3, -1), torch.empty(0), 3.0, 1.0)
    assert abs(same.item()) < 1e-6  # a student equal to its teacher: KL 0


def test_gradient_flows_to_the_student_only(corpus: Path) -> None:
    vocab = load_tokenizer(corpus).vocab_size
    teacher, student = tiny_model(vocab, seed=1), tiny_model(vocab, seed=2)
    student.train()
    from gptkit.data.loader import TokenShards

    inner = BatchSampler(TokenShards(corpus).split("train"), 16, 4, seed=0)
    sampler = TeacherSampler(inner, teacher, 2.0, 0.5, 0, torch.device("cpu"), "fp32")
    batch = sampler.next()
    assert len(batch) == 5 and not batch[2].requires_grad
    loss = batch_loss(student, batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with torch.no_grad():  # the loss of this batch, computed here from both models
        x, y = batch[:2]
        want = distill_loss(
            student(x), y, F.log_softmax(teacher(x) / 2, -1), torch.empty(0), 2, 0.5
        )
    torch.testing.assert_close(loss.detach(), want)


def test_distilled_run_resumes_exactly(corpus: Path, teacher: Path, tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(max_steps=8, save_every=4, keep_checkpoints=5, dropout=0.1, progress=False)
    distill(teacher, "tiny", corpus, full, temperature=2.0, alpha=0.7, top_k=5, **kw)
    (resumed / "checkpoints").mkdir(parents=True)
    step4 = full / "checkpoints" / "step-0000004"
    shutil.copytree(step4, resumed / "checkpoints" / step4.name)
    distill(teacher, "tiny", corpus, resumed, resume=True, progress=False)
    a, b = run_losses(full), run_losses(resumed)
    assert sorted(b) == list(range(5, 9))
    assert all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]
    model_a, _ = load(full)
    model_b, _ = load(resumed)
    for (name, p), q in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_distillation_pulls_the_student_towards_the_teacher(
    corpus: Path, teacher: Path, tmp_path: Path
) -> None:
    """alpha = 1: the loss is the KL alone, and it falls as the student trains."""
    summary = distill(
        teacher, "tiny", corpus, tmp_path, temperature=1.0, alpha=1.0, max_steps=30,
        log_every=1, lr=3e-3, progress=False,
    )  # fmt: skip
    losses = run_losses(tmp_path)
    assert losses[30] < 0.6 * losses[1], losses
    assert summary["step"] == 30


def test_teacher_with_another_tokenizer_is_refused(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(tmp_path / "b.txt")], str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=300,
            progress=False)  # fmt: skip
    bpe_tok = load_tokenizer(tmp_path / "bpe")
    save_checkpoint(tmp_path / "bpe_teacher", tiny_model(bpe_tok.vocab_size), bpe_tok)
    with pytest.raises(GptkitError, match=r"share one tokenizer.*CharTokenizer.*BPETokenizer"):
        distill(tmp_path / "bpe_teacher", "tiny", corpus, tmp_path / "run", max_steps=1,
                progress=False)  # fmt: skip
