"""HumanEval: pass@k equals a brute-force count; programs run isolated, limited and timed out;
answers become programs in both continuation and chat form; the canonical solutions pass;
evaluation refuses to run code unless asked, and runs end to end on a tiny model."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_path, tiny_model

from gptkit.checkpoint import save_checkpoint
from gptkit.errors import GptkitError
from gptkit.eval import evaluate_model
from gptkit.eval.code import (
    HumanEvalScorer,
    extract_program,
    pass_at_k,
    read_humaneval,
    run_program,
)

POSIX = sys.platform != "win32"


def humaneval(limit: int | None = None) -> list[dict]:
    return read_humaneval(shared_path("humaneval", "HumanEval.jsonl.gz"), limit=limit)


# A small problem in HumanEval's shape, for tests that need no data.
PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
PROBLEM = {
    "task_id": "Test/0",
    "prompt": PROMPT,
    "canonical_solution": "    return sum(xs)\n",
    "test": (
        "def check(candidate):\n"
        "    assert candidate([1, 2, 3]) == 6\n"
        "    assert candidate([]) == 0\n"
    ),
    "entry_point": "total",
}


# -- pass@k --------------------------------------------------------------------------------


def test_pass_at_k_equals_a_brute_force_count() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # samples 0..c-1 pass; the share of k-subsets holding at least one of them
                draws = list(itertools.combinations(range(n), k))
                hit = sum(any(i < c for i in draw) for draw in draws)
                assert pass_at_k(n, c, k) == pytest.approx(hit / len(draws), abs=1e-12)
    # large n: the product form agrees with exact binomials (Python ints, exact division)
    n, c, k = 200, 13, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(GptkitError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(5, 6, 1)
    with pytest.raises(GptkitError, match="got n=5 c=1 k=6"):
        pass_at_k(5, 1, 6)


# -- running programs ----------------------------------------------------------------------


def test_canonical_solutions_pass() -> None:
    problems = [e["reference"] for e in humaneval(limit=10)]
    scorer = HumanEvalScorer(chat=False, execute=True, workers=2)
    # as generation returns a continuation: stripped, so the first line lost its indent
    assert scorer([p["canonical_solution"].strip() for p in problems], problems) == {"pass@1": 1.0}
    assert all(r["reason"] == "passed" for r in scorer.results)
    assert scorer.results[0]["program"].startswith(problems[0]["prompt"])


def test_run_program_reports_failures() -> None:
    assert run_program(PROMPT + "    return sum(xs)\n", reference=PROBLEM) == (True, "passed")
    ok, why = run_program(PROMPT + "    return 6\n", reference=PROBLEM)
    assert not ok and why == "failed: AssertionError"
    ok, why = run_program(PROMPT + "    return sum(xs\n", reference=PROBLEM)
    assert not ok and why.startswith("failed: SyntaxError")
    # exiting cleanly before the tests ran is not a pass
    ok, why = run_program(PROMPT + "    return 0\nimport sys\nsys.exit(0)\n", reference=PROBLEM)
    assert not ok and why == "failed: exited before its tests finished"
    ok, why = run_program("import os\nos._exit(0)\n")
    assert not ok
    with pytest.raises(GptkitError, match="'test' and 'entry_point'"):
        run_program("x = 1", reference={"prompt": PROMPT})


def test_run_program_times_out_an_endless_loop() -> None:
    t0 = time.perf_counter()
    ok, why = run_program("while True:\n    pass\n", timeout=1.5)
    assert not ok and why == "timed out after 1.5s"
    assert time.perf_counter() - t0 < 5


def test_run_program_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTKIT_TEST_SECRET", "do not pass on")
    program = (
        "import os, sys\n"
        "assert 'GPTKIT_TEST_SECRET' not in os.environ\n"
        "assert os.path.samefile(os.environ['HOME'], '.')\n"
        "assert sys.stdin is None or sys.stdin.read() == ''\n"
        "open('left_behind.txt', 'w').write('x')\n"
        "raise SystemExit(os.getcwd())\n"  # report where it ran, as the failure reason
    )
    ok, why = run_program(program)
    assert not ok and why.startswith("failed: ")
    where = Path(why.removeprefix("failed: "))
    assert where != tmp_path and not where.exists()  # a temporary directory, now removed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not POSIX or sys.platform == "darwin", reason="RLIMIT_AS is Linux-only")
def test_run_program_limits_memory() -> None:
    ok, why = run_program("b = bytearray(1 << 30)\n", memory_mb=256)
    assert not ok and why == "failed: MemoryError"
    assert run_program("b = bytearray(1 << 20)\n", memory_mb=256) == (True, "passed")


# -- from answers to programs --------------------------------------------------------------


def test_extract_program_from_a_continuation() -> None:
    # generation strips the output: the first line comes without its indentation
    assert extract_program("return sum(xs)", PROBLEM, chat=False) == PROMPT + "    return sum(xs)\n"
    loop = "s = 0\n    for x in xs:\n        s += x\n    return s"
    assert extract_program(loop, PROBLEM, chat=False) == PROMPT + "    " + loop + "\n"
    # a first line that opens a block, followed by deeper lines
    branch = "if not xs:\n        return 0\n    return sum(xs)"
    assert extract_program(branch, PROBLEM, chat=False) == PROMPT + "    " + branch + "\n"
    # cut at the first top-level statement after the body
    for tail in ("\n\n\ndef helper():\n    pass", "\nprint(total([1]))", "\n# tests\nx = 1"):
        got = extract_program("return sum(xs)" + tail, PROBLEM, chat=False)
        assert got == PROMPT + "    return sum(xs)\n"
    # a comment inside the body is indented, so it does not cut
    assert "# add up" in extract_program("# add up\n    return sum(xs)", PROBLEM, chat=False)
    # nothing generated: the stub alone, which fails its tests
    assert extract_program("", PROBLEM, chat=False) == PROMPT


def test_extract_program_from_a_chat_reply() -> None:
    function = "def total(xs):\n    return sum(xs)"
    reply = f"Here you go:\n\n```python\n{function}\n```\n\nIt adds the numbers.\n```\nx\n```"
    program = extract_program(reply, PROBLEM, chat=True)
    # the reply's function after the whole prompt (its imports and helpers stay defined)
    assert program == PROMPT.rstrip("\n") + "\n\n\n" + function + "\n"
    assert run_program(program, reference=PROBLEM) == (True, "passed")
    # a python block wins over an earlier block of another language
    other = f"```text\nnot code\n```\n```py\n{function}\n```"
    assert extract_program(other, PROBLEM, chat=True).endswith(function + "\n")
    # a reply cut short inside its block, and a reply that is bare code
    assert extract_program(f"```python\n{function}", PROBLEM, chat=True).endswith(function + "\n")
    assert extract_program(function, PROBLEM, chat=True).endswith(function + "\n")
    # a block with the body only: indented, or written flush left
    body = "```python\n    return sum(xs)\n```"
    assert extract_program(body, PROBLEM, chat=True) == PROMPT + "    return sum(xs)\n"
    flush = "```python\ns = 0\nfor x in xs:\n    s += x\nreturn s\n```"
    program = extract_program(flush, PROBLEM, chat=True)
    assert program.startswith(PROMPT + "    s = 0\n    for x in xs:\n        s += x\n")
    assert run_program(program, reference=PROBLEM) == (True, "passed")


def test_chat_replies_of_real_problems_pass() -> None:
    problems = [e["reference"] for e in humaneval(limit=10)]
    replies = [
        f"Sure.\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in problems
    ]
    scorer = HumanEvalScorer(chat=True, execute=True, workers=2)
    assert scorer(replies, problems) == {"pass@1": 1.0}


# -- reading -------------------------------------------------------------------------------


def test_read_humaneval() -> None:
    examples = humaneval()
    assert len(examples) == 164
    first = examples[0]
    assert first["id"].endswith("HumanEval.jsonl.gz:1")
    ref = first["reference"]
    assert ref["task_id"] == "HumanEval/0" and ref["entry_point"] == "has_close_elements"
    assert first["prompt"] == ref["prompt"] and ref["prompt"].endswith('"""\n')
    assert set(ref) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    request = first["messages"][0]["content"]
    assert "```python" in request and ref["prompt"] in request
    assert len(humaneval(limit=3)) == 3


def test_read_humaneval_names_the_bad_row(tmp_path: Path) -> None:
    def write(rows: list[object]) -> Path:
        path = tmp_path / "he.jsonl.gz"
        lines = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
        path.write_bytes(gzip.compress(lines.encode()))
        return path

    good = PROBLEM
    with pytest.raises(GptkitError, match=r"he\.jsonl\.gz:2: field 'test' should be a str"):
        read_humaneval(write([good, {k: v for k, v in good.items() if k != "test"}]))
    with pytest.raises(GptkitError, match=r"he\.jsonl\.gz:2: not valid JSON"):
        read_humaneval(write([good, "{"]))
    with pytest.raises(GptkitError, match=r":1: the prompt does not define total\(\)"):
        read_humaneval(write([good | {"prompt": "def other():\n    pass\n"}]))
    with pytest.raises(GptkitError, match=r":1: entry_point 'a b' is not a Python name"):
        read_humaneval(write([good | {"entry_point": "a b"}]))
    with pytest.raises(GptkitError, match=r":1: the test does not define check"):
        read_humaneval(write([good | {"test": "assert True\n"}]))


# -- evaluate_model ------------------------------------------------------------------------


def test_humaneval_runs_no_code_unless_asked() -> None:
    # refused before the model or the data is even looked at
    with pytest.raises(GptkitError, match=r"running the Python code it writes.*pass --execute"):
        evaluate_model("no/such/model", "humaneval")
    with pytest.raises(GptkitError, match="sandbox"):
        HumanEvalScorer(chat=False)


def test_execute_and_timeout_are_cli_flags() -> None:
    from gptkit.cli import build_parser

    parser = build_parser()
    argv = ["eval", "--model", "m", "--task", "humaneval"]
    args = vars(parser.parse_args([*argv, "--execute", "--timeout", "3"]))
    assert args["execute"] is True and args["timeout"] == 3.0
    assert vars(parser.parse_args(argv))["execute"] is False


@pytest.mark.parametrize("chat", [False, True])
def test_evaluate_model_on_humaneval(chat: bool, tmp_path: Path, bpe_tokenizer) -> None:
    data = shared_path("humaneval", "HumanEval.jsonl.gz")
    model = tiny_model(bpe_tokenizer.vocab_size)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, bpe_tokenizer)
    report = tmp_path / "humaneval.json"
    with pytest.warns(UserWarning, match="2 of 2 prompts were longer than the model's context"):
        result = evaluate_model(
            str(ckpt),
            "humaneval",
            data=str(data),
            limit=2,
            max_new_tokens=8,
            chat=chat,
            report=str(report),
            progress=False,
            execute=True,
            timeout=5.0,
        )
    assert result["n"] == 2 and 0 <= result["metrics"]["pass@1"] <= 1
    assert result["settings"]["timeout"] == 5.0 and result["settings"]["chat"] is chat
    for row in result["predictions"]:
        assert row["program"].startswith(row["reference"]["prompt"].rstrip("\n"))
        assert row["reason"] == "passed" or row["reason"].startswith(("failed: ", "timed out"))
        assert row["passed"] is (row["reason"] == "passed")
    assert json.loads(report.read_text()) == result


def test_python_functions_become_humaneval_style_rows(tmp_path: Path) -> None:
    from gptkit.eval.code import read_python_functions

    source = (
        "import math\n\n\n"
        "def area(r: float) -> float:\n"
        '    """Area of a circle.\n\n    >>> round(area(1), 2)\n    3.14\n    """\n'
        "    return math.pi * r * r\n\n\n"
        "def undocumented(x):\n    return x\n"
    )
    corpus = tmp_path / "files.jsonl"
    rows = [{"path": "a.py", "content": source}, {"path": "b.py", "content": "def broken(:\n"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = read_python_functions(corpus)
    assert row["prompt"].startswith("import math\n") and row["prompt"].endswith('"""\n')
    assert row["completion"] == "    return math.pi * r * r\n"
    namespace: dict = {}
    exec(row["prompt"] + row["completion"], namespace)  # the pair is the whole function
    assert round(namespace["area"](1), 2) == 3.14
