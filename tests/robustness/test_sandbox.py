"""Generated code in the sandbox: escapes fail, forged passes fail, a correct answer passes.

Each hostile program is one a model could write into a HumanEval answer: it writes and
deletes outside its temporary directory, opens a TCP connection to this machine, forges the
success token from /proc and its file descriptors, and leaves a `setsid` grandchild behind.
The sandbox (Linux user + mount + network + PID namespaces through util-linux `unshare`)
must stop each; where it is unavailable the tests skip, and the fallback's warning is
checked instead.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from gptkit.eval import code
from gptkit.eval.code import run_program, sandbox

needs_sandbox = pytest.mark.skipif(
    not sandbox(), reason="no sandbox here (needs Linux, util-linux unshare, user namespaces)"
)

PROBLEM = {
    "prompt": "def total(xs):\n",
    "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n",
    "entry_point": "total",
}


def solution(extra: str = "") -> str:
    """A wrong answer to PROBLEM, preceded by ``extra`` at module level."""
    return f"{extra}\n\ndef total(xs):\n    return 0\n"


@needs_sandbox
def test_a_correct_answer_passes_and_may_use_its_directory() -> None:
    program = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('ok')\n"  # the working directory is writable
        "tempfile.mkstemp()\n"
        "def total(xs):\n    return sum(xs)\n"
    )
    assert run_program(program, reference=PROBLEM) == (True, "passed")
    assert run_program(solution(), reference=PROBLEM)[0] is False  # a wrong one fails


@needs_sandbox
def test_writing_and_deleting_outside_fail(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("precious")
    target = tmp_path / "written.txt"
    for attack in (
        f"open({str(target)!r}, 'w').write('pwned')",
        f"import shutil; shutil.rmtree({str(keep)!r})",
        f"import os; os.system('rm -rf {keep}; touch {target}')",
        "import os; os.makedirs('/tmp/gptkit-escape-' + str(os.getpid()))",
    ):
        passed, reason = run_program(attack)
        assert (keep / "data.txt").read_text() == "precious", attack
        assert not target.exists(), attack
        if "os.system" not in attack:  # the shell's failure is not the program's
            assert not passed and "Read-only file system" in reason, (attack, reason)


@needs_sandbox
def test_network_fails() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        attack = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)"
        passed, reason = run_program(attack)
        assert not passed and "unreachable" in reason, reason
        with pytest.raises(TimeoutError):
            server.accept()  # nothing came through


FORGERIES = {
    "cmdline": (
        "import os, sys\n"
        "for pid in ['self'] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    for name in ('cmdline', 'environ'):\n"
        "        try:\n"
        "            data = open(f'/proc/{pid}/{name}', 'rb').read()\n"
        "        except OSError:\n"
        "            continue\n"
        "        for part in data.split(b'\\0'):\n"
        "            for fd in range(1, 20):\n"
        "                try:\n"
        "                    os.write(fd, part)\n"
        "                except OSError:\n"
        "                    pass\n"
        "os._exit(0)\n"
    ),
    "argv": "import os, sys\nfor a in sys.orig_argv:\n    print(a, end='')\nos._exit(0)\n",
    "read-fds": (
        "import os\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        data = os.read(fd, 64)\n"
        "    except OSError:\n"
        "        continue\n"
        "    for out in range(1, 20):\n"
        "        try:\n"
        "            os.write(out, data)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    ),
    "early-exit": "import sys\nsys.exit(0)\n",
}


@needs_sandbox
@pytest.mark.parametrize("attack", list(FORGERIES), ids=list(FORGERIES))
def test_forged_pass_fails(attack: str) -> None:
    passed, reason = run_program(solution(FORGERIES[attack]), reference=PROBLEM)
    assert not passed, reason


def processes_with(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(entry.name)
        except OSError:
            continue
    return found


@needs_sandbox
def test_setsid_grandchild_does_not_outlive_the_run() -> None:
    marker = f"gptkit-grandchild-{uuid.uuid4().hex}"
    attack = (
        "import subprocess, sys, time\n"
        f"cmd = [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}]\n"
        "subprocess.Popen(cmd, start_new_session=True)\n"  # a new session: out of our group
        "subprocess.Popen(['setsid', '--fork', *cmd])\n"
        "time.sleep(0.5)\n"
    )
    assert run_program(attack) == (True, "passed")
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


@needs_sandbox
@pytest.mark.skipif(os.geteuid() == 0, reason="the kernel does not apply RLIMIT_NPROC to root")
def test_processes_are_limited() -> None:
    attack = "import subprocess\nprocs = [subprocess.Popen(['sleep', '5']) for _ in range(100)]\n"
    passed, reason = run_program(attack)
    assert not passed and "Resource temporarily unavailable" in reason, reason


def test_without_a_sandbox_a_warning_and_the_old_limits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(code.shutil, "which", lambda name: None)
    code.sandbox.cache_clear()
    try:
        assert run_program("print(1)") == (True, "passed")
        assert run_program("import sys; sys.exit(0)")[0] is False
        err = capsys.readouterr().err
        assert "no sandbox for generated code" in err and "unshare is not installed" in err
    finally:
        code.sandbox.cache_clear()
