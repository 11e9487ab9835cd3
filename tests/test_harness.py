"""gptkit inside lm-evaluation-harness: the three requests on tasks fed from local files
(tests/assets/harness), each checked against gptkit's own scoring, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, REPO, shared_path, tiny_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import gptkit  # noqa: E402
from gptkit.checkpoint.hf import save_hf  # noqa: E402
from gptkit.eval.harness import GptkitLM  # noqa: E402
from gptkit.eval.multiple_choice import (  # noqa: E402
    multiple_choice_eval,
    read_hellaswag,
    read_piqa,
)
from gptkit.tokenizer import BPETokenizer  # noqa: E402

ASSETS = REPO / "tests" / "assets" / "harness"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer: BPETokenizer) -> GptkitLM:
    model = tiny_model(bpe_tokenizer.vocab_size, init_std=0.3, block_size=256, **FAMILIES["llama"])
    return GptkitLM.from_model(model, bpe_tokenizer, batch_size=3)


def _evaluate(lm: GptkitLM, task: str, include: Path = ASSETS) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(include)),
        log_samples=True,
        bootstrap_iters=0,
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _piqa_examples(rows: list[dict]) -> list[dict]:
    return [
        {
            "prompt": f"Question: {r['goal']}\nAnswer:",
            "choices": [r["sol1"], r["sol2"]],
            "label": r["label"],
        }
        for r in rows
    ]


def test_multiple_choice_through_the_harness_equals_ours(
    tiny: GptkitLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ASSETS)  # the YAML names its data file relative to here
    out = _evaluate(tiny, "gptkit_choice")
    examples = _piqa_examples(_rows(ASSETS / "choice.jsonl"))
    ours = multiple_choice_eval(tiny.model, tiny.tokenizer, examples, progress=False)
    theirs = out["results"]["gptkit_choice"]
    assert theirs["acc,none"] == ours["metrics"]["acc"]
    assert theirs["acc_norm,none"] == ours["metrics"]["acc_norm"]
    for sample in out["samples"]["gptkit_choice"]:
        lls = [ll for ll, _ in (r[0] for r in sample["resps"])]
        mine = ours["predictions"][sample["doc_id"]]["loglikelihoods"]
        assert lls == pytest.approx(mine, abs=1e-5)


def test_generation_through_the_harness_equals_greedy_decoding(
    tiny: GptkitLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ASSETS)
    out = _evaluate(tiny, "gptkit_generate")
    for sample in out["samples"]["gptkit_generate"]:
        prompt = f"Q: {sample['doc']['question']}\nA:"
        want = gptkit.generate(
            tiny.model, tiny.tokenizer, prompt, max_new_tokens=8, temperature=0, stop="\n"
        )
        assert sample["resps"][0][0] == want
    assert "exact_match,none" in out["results"]["gptkit_generate"]


def test_rolling_loglikelihood_equals_a_plain_forward(
    tiny: GptkitLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ASSETS)
    out = _evaluate(tiny, "gptkit_rolling")
    tok, model = tiny.tokenizer, tiny.model
    for sample in out["samples"]["gptkit_rolling"]:
        ids = [tok.eos_id, *tok.encode(sample["doc"]["text"], allow_special=False)]
        assert len(ids) <= model.config.block_size  # one window: a plain forward is the truth
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
        want = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert sample["resps"][0][0] == pytest.approx(want, abs=1e-3)
    assert out["results"]["gptkit_rolling"]["bits_per_byte,none"] > 0


def test_a_long_text_is_scored_in_windows_once_each(bpe_tokenizer: BPETokenizer) -> None:
    """Past the model's context the rolling score is a sum over disjoint windows, each token
    predicted from up to a whole context of earlier tokens (the harness's rolling windows)."""
    model = tiny_model(bpe_tokenizer.vocab_size, seed=3, block_size=16)
    lm = GptkitLM.from_model(model, bpe_tokenizer)
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    ids = [bpe_tokenizer.eos_id, *bpe_tokenizer.encode(text, allow_special=False)]
    assert len(ids) > 2 * 16
    total = 0.0
    with torch.no_grad():
        for a in range(1, len(ids), 16):  # targets a..b, from the 16 ids before b
            b = min(a + 15, len(ids) - 1)
            begin = max(0, b - 16)
            logp = F.log_softmax(model(torch.tensor([ids[begin:b]]))[0].float(), -1)
            total += sum(logp[t - 1 - begin, ids[t]].item() for t in range(a, b + 1))

    class Request:
        args = (text,)

    (got,) = lm.loglikelihood_rolling([Request()])
    assert got == pytest.approx(total, abs=1e-3)


def _local_task(tmp_path: Path, name: str, rows: list[dict], fields: dict[str, str]) -> Path:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        **fields,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return tmp_path


@pytest.mark.slow
def test_smollm2_on_hellaswag_and_piqa_through_the_harness_equals_ours(tmp_path: Path) -> None:
    """The first items of the shared HellaSwag and PIQA, worded as the harness's own tasks,
    scored by SmolLM2 through the adapter and by ``multiple_choice_eval``."""
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent (make models)")
    hellaswag = read_hellaswag(shared_path("hellaswag"), limit=6)
    piqa = read_piqa(shared_path("piqa"), limit=6)
    lm = GptkitLM(str(SMOLLM2), progress=False)
    rows = [{"query": e["prompt"], "choices": e["choices"], "gold": e["label"]} for e in hellaswag]
    fields = {"doc_to_text": "{{query}}", "doc_to_choice": "choices", "doc_to_target": "gold"}
    _local_task(tmp_path, "hellaswag_local", rows, fields)
    rows = [
        {"goal": e["messages"][0]["content"], "sol1": e["choices"][0], "sol2": e["choices"][1]}
        | {"label": e["label"]}
        for e in piqa
    ]
    fields = {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "doc_to_target": "label",
    }
    _local_task(tmp_path, "piqa_local", rows, fields)
    for task, examples in (("hellaswag_local", hellaswag), ("piqa_local", piqa)):
        theirs = _evaluate(lm, task, tmp_path)["results"][task]
        ours = multiple_choice_eval(lm.model, lm.tokenizer, examples, progress=False)["metrics"]
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])


def test_the_command_line_registers_gptkit(bpe_tokenizer: BPETokenizer, tmp_path: Path) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, init_std=0.3, block_size=64, **FAMILIES["llama"])
    source = save_hf(model, bpe_tokenizer, tmp_path / "tiny")
    args = ["--model", "gptkit", "--model_args", f"source={source},progress=False"]
    args += ["--tasks", "gptkit_choice", "--include_path", str(ASSETS), "--batch_size", "2"]
    args += ["--output_path", str(tmp_path / "out")]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "gptkit.eval.harness", *args],
        cwd=ASSETS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gptkit_choice" in run.stdout and "acc_norm" in run.stdout
    (result,) = (tmp_path / "out").rglob("results_*.json")
    assert 0 <= json.loads(result.read_text())["results"]["gptkit_choice"]["acc,none"] <= 1
