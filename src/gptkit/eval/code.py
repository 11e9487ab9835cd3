"""HumanEval: write a Python function, scored by running the data set's unit tests on it.

HumanEval (Chen et al., 2021, "Evaluating Large Language Models Trained on Code") gives a
function signature and docstring; the model writes the body, and a problem counts as solved
when the program passes the problem's ``check(candidate)``. With ``n`` samples per problem of
which ``c`` pass, pass@k is estimated without bias by ``1 - C(n-c, k) / C(n, k)``
(:func:`pass_at_k`); we decode greedily, one answer per problem, so pass@1 is the fraction
of problems solved.

Scoring runs code that a model wrote, so nothing runs unless asked (``execute=True``,
``gptkit eval --execute``). Each program runs in its own ``python -I`` process in a fresh
temporary directory, with a minimal environment, no stdin, a wall-clock timeout that kills
its whole process group and, on POSIX, limits on address space, CPU time and file size. On
Linux it is also sandboxed as bubblewrap and nsjail do it, with util-linux ``unshare``: its
own user, mount, network and PID namespaces; every file system read-only but its temporary
directory (locked by a second user namespace, so the program cannot remount it); no network
at all; ``RLIMIT_NPROC`` (which the kernel does not apply to root); and everything it
started dies with it, ``setsid`` or not. It can still read what this user can read (and
print it into the report), and use CPU and memory up to the limits. Where no sandbox is
available (not Linux, no ``unshare``, user namespaces disabled) a warning says so and only
the limits apply: then run evaluation in a container or VM without secrets.

A pass is judged by the parent: the runner reads a random token from an inherited pipe
before the program runs and writes it to a second pipe only after the tests have returned,
so an early ``exit(0)``, or a program printing what ``/proc`` shows, does not pass. (Code
written to cheat can still find the token in its own interpreter's memory; the sandbox
bounds the harm such code can do, not the score it can claim.)

Program assembly, by how the model was prompted:

- plain continuation (base models): the prompt, then the continuation cut at the first
  top-level ``def``/``class``/``if __name__``/``print(``/``#`` line. The generation layer
  strips the continuation, so its first line has lost its indentation; it is re-indented to
  the function body's (see :func:`extract_program`).
- chat: the first fenced code block of the reply (a ``python`` one first). If it defines the
  entry point it replaces the prompt's stub; otherwise it is taken as the body.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from gptkit.errors import GptkitError
from gptkit.eval.examples import (
    Example,
    check_limit,
    limit_reached,
    read_jsonl,
    render,
    row_field,
)

#: where a plain continuation ends: the next top-level statement after the function's body
#: (the HumanEval paper's stop sequences, spelled a little more narrowly)
HUMANEVAL_STOP: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

MEMORY_LIMIT_MB = 2048  # address space of one program: far above what a HumanEval test needs
FILE_LIMIT_MB = 16  # largest file (stdout and stderr included) a program may write
_REASON_CHARS = 300  # the longest failure reason kept in a report

EXECUTE_WARNING = (
    "task humaneval scores a model by running the Python code it writes (and the data set's "
    "tests) on this machine; pass --execute (execute=True) to allow it, ideally inside a "
    "sandbox such as a container or VM without network access or secrets"
)


def require_execute(execute: bool) -> None:
    """Refuse to score HumanEval unless running model-written code was asked for."""
    if not execute:
        raise GptkitError(EXECUTE_WARNING)


# -- reading -------------------------------------------------------------------------------


def read_humaneval(path: str | Path, limit: int | None = None) -> list[Example]:
    """HumanEval JSON Lines (gzip-compressed when the name ends in .gz): ``task_id``,
    ``prompt``, ``canonical_solution``, ``test``, ``entry_point``.

    The plain ``prompt`` is the problem's own (signature and docstring), for a base model to
    continue; the reference is a dict of the fields the tests need.
    """
    check_limit(limit)
    examples: list[Example] = []
    for where, row in read_jsonl(Path(path)):
        fields = {
            name: row_field(where, row, name, str)
            for name in ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        }
        entry = fields["entry_point"]
        if not entry.isidentifier():
            raise GptkitError(f"{where}: entry_point {entry!r} is not a Python name")
        if not re.search(rf"^def {entry}\(", fields["prompt"], re.M):
            raise GptkitError(f"{where}: the prompt does not define {entry}()")
        if not re.search(r"^def check\(", fields["test"], re.M):
            raise GptkitError(f"{where}: the test does not define check(candidate)")
        plain, messages = render("humaneval", prompt=fields["prompt"])
        examples.append(dict(id=where, prompt=plain, messages=messages, reference=fields))
        if limit_reached(examples, limit):
            break
    return examples


# -- from the model's answer to a program --------------------------------------------------

# A fenced block: the opening fence with an optional language, then everything up to a
# closing fence at the start of a line, or to the end of a reply cut short.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON = {"python", "python3", "py"}


def cut_at_stop(text: str, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
    """``text`` up to the first of the ``stop`` strings."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def code_block(reply: str) -> str:
    """The code of a chat reply: its first ``python`` fenced block, else its first fenced
    block, else the whole reply. Blank lines around it are dropped, indentation kept."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(reply)]
    code = next((c for lang, c in blocks if lang in _PYTHON), blocks[0][1] if blocks else reply)
    return re.sub(r"\A(?:[ \t]*\n)+", "", code).rstrip()


def _compiles(source: str) -> bool:
    try:
        compile(source, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _join_body(prompt: str, body: str) -> str:
    """``prompt`` followed by ``body`` as the last function's body, re-indented if needed.

    The body's first line may have lost its indentation (generation strips the output), or
    a chat model may have written the whole body flush left. Candidates are tried in order
    and the first that compiles wins; if none does, the first is kept and fails when run.
    """
    body = re.sub(r"\A(?:[ \t]*\n)+", "", body).rstrip()
    if not body:
        return prompt  # the stub alone: its function returns None and fails the tests
    if not prompt.endswith("\n"):
        return prompt + body + "\n"  # mid-line prompt: the continuation goes on that line
    prompt_lines = [line for line in prompt.splitlines() if line.strip()]
    indent = _indent_of(prompt_lines[-1]) if prompt_lines else ""
    first, *rest = body.split("\n")
    candidates = []
    if _indent_of(first):
        candidates.append(body)  # it kept its indentation
    candidates.append(indent + body)  # the usual case: first line at the body's indent
    later = next((_indent_of(line) for line in rest if line.strip()), "")
    if later and later != indent:
        candidates.append(later + body)  # first line at the indent of the lines after it
    candidates.append(textwrap.indent(body, indent))  # a body written flush left
    candidates.append(body)
    for candidate in candidates:
        if _compiles(prompt + candidate + "\n"):
            return prompt + candidate + "\n"
    return prompt + candidates[0] + "\n"


def _defines(code: str, name: str) -> bool:
    """Whether ``code`` defines function ``name`` at top level."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


def extract_program(prediction: str, reference: Mapping[str, Any], chat: bool) -> str:
    """The program a model's answer stands for (without the tests).

    Args:
        prediction: the generated text, as generation returns it (stripped).
        reference: the problem (``prompt``, ``entry_point``; see :func:`read_humaneval`).
        chat: the answer is a chat reply rather than a continuation of the prompt.

    A continuation is cut at :data:`HUMANEVAL_STOP` and appended to the prompt, its first
    line re-indented to the function body. A chat reply's code block that defines the entry
    point is appended after the whole prompt, so its definition replaces the stub while the
    prompt's imports and helper functions (HumanEval/10 calls ``is_palindrome``, /38
    ``encode_cyclic``) stay defined; a block that does not is taken as the body.
    """
    prompt, entry = reference["prompt"], reference["entry_point"]
    if not chat:
        return _join_body(prompt, cut_at_stop(prediction))
    code = code_block(prediction)
    if _defines(code, entry):
        return prompt.rstrip("\n") + "\n\n\n" + code + "\n"
    return _join_body(prompt, cut_at_stop(code))


# -- running a program ---------------------------------------------------------------------

# Runs in the child before the program. It reads a token the program cannot know from an
# inherited pipe (the token is never on a command line, which /proc/self/cmdline shows),
# on Linux confines itself when asked (below), sets the limits, runs the program under a
# name other than __main__ (so a reply's `if __name__ == "__main__":` demo does not run, as
# when the code is exec'd), and writes the token to a second pipe once the program, tests
# included, has returned: the parent counts a pass only when that pipe holds the token and
# the exit status is 0, so a program that calls sys.exit(0) or os._exit(0) before its tests
# fails. The limits are set here rather than in Popen's preexec_fn, which Python documents
# as unsafe when the parent has threads (the scorer runs programs from a thread pool).
#
# Confinement (after `unshare --user --map-root-user --mount --net --pid --fork`, so this
# is pid 1 of its own PID namespace, "root" of its own user namespace, with no network):
# every mount is made read-only (mount_setattr, recursively) except a bind mount of the
# working directory; then a second user and mount namespace is entered, in which the
# kernel locks those read-only flags, so the program cannot undo them. setuid programs
# gain nothing (no_new_privs), and RLIMIT_NPROC bounds its processes.
_RUNNER = """\
import os, runpy, sys
program, token_fd, result_fd, confine = sys.argv[1], *map(int, sys.argv[2:5])
memory, cpu, fsize, nproc = map(int, sys.argv[5:9])
token = os.read(token_fd, 64)
os.close(token_fd)

def confine_linux(work):
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)

    def ok(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), "sandbox: " + what)

    def setattr_(path, flags, set_, clear):  # mount_setattr(2), Linux >= 5.12
        attr = struct.pack("QQQQ", set_, clear, 0, 0)
        ok(libc.syscall(442, -100, path.encode(), flags, attr, len(attr)), "mount_setattr " + path)

    ok(libc.mount(work.encode(), work.encode(), None, 4096 | 16384, None), "bind " + work)
    setattr_("/", 0x8000, 1, 0)  # AT_RECURSIVE, MOUNT_ATTR_RDONLY on
    setattr_(work, 0, 0, 1)  # the working directory writable again
    os.chdir(work)  # the old working directory is the read-only one under the bind mount
    # No id map is written in the new user namespace (/proc is read-only by now): the
    # program's ids show as "nobody" there, while its files are still created as this user.
    ok(libc.unshare(0x10000000 | 0x00020000), "unshare")  # CLONE_NEWUSER | CLONE_NEWNS
    ok(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS

if confine:
    confine_linux(os.path.dirname(program))
try:
    import resource
except ImportError:
    resource = None  # not POSIX: only the parent's wall-clock timeout applies
if resource is not None:
    limits = [
        ("RLIMIT_AS", memory, memory),
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_FSIZE", fsize, fsize),
        ("RLIMIT_CORE", 0, 0),
    ] + ([("RLIMIT_NPROC", nproc, nproc)] if confine else [])
    for name, soft, hard in limits:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            pass  # unsupported here (macOS refuses RLIMIT_AS), or already lower
sys.argv[:] = [program]
runpy.run_path(program, run_name="__humaneval__")
sys.stdout.flush()
os.write(result_fd, token)
"""

_SIGNALS = {
    "SIGXCPU": "CPU time limit",
    "SIGKILL": "CPU time limit or killed",
    "SIGXFSZ": "file size limit",
    "SIGSEGV": "crashed, possibly out of memory",
}
PROCESS_LIMIT = 32  # processes (and threads) of one sandboxed program (RLIMIT_NPROC)
#: the namespaces a sandboxed program runs in (util-linux unshare): its own user (mapped
#: to this user), mount, network (nothing but a down loopback) and PID namespace, whose
#: every process dies with its first one (--kill-child: when unshare is killed)
UNSHARE = (
    "--user",
    "--map-root-user",
    "--mount",
    "--net",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
)
NO_SANDBOX_WARNING = (
    "warning: no sandbox for generated code here ({why}); programs run as this user with "
    "only resource limits: they can read and write this user's files and use the network. "
    "Run evaluation in a container or VM without secrets"
)


def check_script(program: str, reference: Mapping[str, Any]) -> str:
    """``program`` followed by the problem's tests and the call that runs them."""
    try:
        test, entry = reference["test"], reference["entry_point"]
    except (KeyError, TypeError):
        raise GptkitError(
            "a HumanEval reference must be a dict with 'test' and 'entry_point' "
            "(read the data with read_humaneval)"
        ) from None
    return f"{program.rstrip()}\n\n\n{test.strip()}\n\n\ncheck({entry})\n"


def _child_env(home: str) -> dict[str, str]:
    env = {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "TEMP": home, "TMP": home}
    if sys.platform == "win32" and "SYSTEMROOT" in os.environ:
        env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]  # Windows Python cannot start without
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process and whatever it started (its session is its own process group;
    in the sandbox, the PID namespace dies with its first process as well)."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()


def _tail(f: IO[bytes], size: int = 4096) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - size))
    return f.read().decode("utf-8", "replace")


def _failure(code: int, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if lines:
        reason = lines[-1]
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        reason = f"killed by {name}" + (f" ({_SIGNALS[name]})" if name in _SIGNALS else "")
    elif code == 0:
        reason = "exited before its tests finished"
    else:
        reason = f"exit status {code}"
    return "failed: " + reason[:_REASON_CHARS]


def _read_pipe(fd: int, size: int = 4096) -> bytes:
    """What a pipe holds now, without waiting for writers that may still hold it open."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""


def _spawn(
    source: str,
    work: str,
    outputs: tuple[IO[bytes], IO[bytes]],
    limits: tuple[float, int],
    confine: bool,
) -> Run:
    """Start the runner on ``source`` in ``work``, writing to ``outputs`` (stdout, stderr),
    under ``limits`` (timeout, memory in MB); the token goes in through a pipe."""
    timeout, memory_mb = limits
    out, err = outputs
    path = Path(work) / "program.py"
    path.write_text(source, encoding="utf-8")
    token = secrets.token_hex(16).encode()
    token_r, token_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    result_r, result_w = os.pipe()
    mb = 1024 * 1024
    numbers = [token_r, result_w, int(confine)]
    numbers += [memory_mb * mb, int(timeout) + 1, FILE_LIMIT_MB * mb, PROCESS_LIMIT]
    cmd = [sys.executable, "-I", "-X", "utf8", "-c", _RUNNER, str(path)]
    cmd += [str(v) for v in numbers]
    if confine:
        cmd = [shutil.which("unshare") or "unshare", *UNSHARE, "--", *cmd]
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=_child_env(work),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            pass_fds=(token_r, result_w),
            start_new_session=True,  # its own process group, killed as a whole
        )
    except BaseException:
        os.close(result_r)
        raise
    finally:
        os.close(token_r)
        os.close(result_w)
    return Run(proc, token, result_r, err)


class Run:
    """A started program: its process, the token it must give back, and its stderr."""

    def __init__(self, proc: subprocess.Popen, token: bytes, result: int, err: IO[bytes]):
        self.proc, self.token, self.result, self.err = proc, token, result, err

    def judge(self, timeout: float) -> tuple[bool, str]:
        """Wait, kill what is left, and decide: a pass needs exit status 0 and the token."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:g}s"
        finally:
            _kill_group(self.proc)  # on time out, and any child it left running
            self.proc.wait()
        if code == 0 and _read_pipe(self.result) == self.token:
            return True, "passed"
        return False, _failure(code, _tail(self.err))

    def close(self) -> None:
        os.close(self.result)


@functools.cache
def sandbox() -> bool:
    """Whether programs can run confined here (Linux, util-linux ``unshare``, user
    namespaces allowed, mount_setattr): tried once per process on a program that must
    pass; when not, a warning says so once and programs run with resource limits only."""
    why = None
    if not sys.platform.startswith("linux"):
        why = f"namespaces are Linux's, this is {sys.platform}"
    elif shutil.which("unshare") is None:
        why = "util-linux's unshare is not installed"
    else:
        passed, reason = _run("pass", 30.0, MEMORY_LIMIT_MB, confine=True)
        why = None if passed else f"unshare failed: {reason}"
    if why is not None:
        print(NO_SANDBOX_WARNING.format(why=why), file=sys.stderr, flush=True)
    return why is None


def _run(source: str, timeout: float, memory_mb: int, confine: bool) -> tuple[bool, str]:
    with (
        tempfile.TemporaryDirectory(prefix="gptkit-run-", ignore_cleanup_errors=True) as work,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        run = _spawn(source, work, (out, err), (timeout, memory_mb), confine)
        try:
            return run.judge(timeout)
        finally:
            run.close()


def run_program(
    program: str,
    timeout: float = 10.0,
    reference: Mapping[str, Any] | None = None,
    memory_mb: int = MEMORY_LIMIT_MB,
) -> tuple[bool, str]:
    """Run a Python program in a separate, limited, and where possible sandboxed process;
    did it finish without error?

    Args:
        program: Python source.
        timeout: wall-clock seconds before the process and everything it started are
            killed; CPU time is limited to about the same on POSIX.
        reference: a HumanEval problem; when given, its ``test`` and ``check(entry_point)``
            are appended to ``program`` (see :func:`check_script`).
        memory_mb: the process's address-space limit (POSIX).

    Returns:
        ``(passed, reason)`` with reason ``"passed"``, ``"failed: <last line of stderr>"``
        or ``"timed out after <timeout>s"``.
    """
    if timeout <= 0:
        raise GptkitError(f"timeout must be positive, got {timeout}")
    source = program if reference is None else check_script(program, reference)
    return _run(source, timeout, memory_mb, confine=sandbox())


# -- scoring -------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al., 2021, eq. 1):
    the chance that ``k`` samples drawn without replacement include a passing one.

    ``1 - C(n-c, k) / C(n, k)`` is computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, a
    product of ``c`` factors in [0, 1), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise GptkitError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every draw of k includes a passing sample
    missed = 1.0
    for i in range(n - c + 1, n + 1):
        missed *= 1.0 - k / i
    return 1.0 - missed


class HumanEvalScorer:
    """A generation metric: pass@1 of one answer per problem, by running each program.

    Call it with predictions and references (:func:`read_humaneval`'s dicts) as
    :func:`gptkit.eval.run.generation_eval` does; afterwards :attr:`results` holds, per
    problem, the ``program`` that ran, whether it ``passed``, and the ``reason``.

    Args:
        chat: the predictions are chat replies (see :func:`extract_program`).
        execute: must be True: running model-written code is opt-in.
        timeout: wall-clock seconds per program.
        workers: programs run at once (each in its own process); default up to 4.
    """

    def __init__(
        self, chat: bool, execute: bool = False, timeout: float = 10.0, workers: int | None = None
    ):
        require_execute(execute)
        sandbox()  # tried once, before the workers start (a warning now if there is none)
        if timeout <= 0:
            raise GptkitError(f"timeout must be positive, got {timeout}")
        self.chat = chat
        self.timeout = timeout
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.results: list[dict[str, Any]] = []

    def _run(self, program: str, reference: Mapping[str, Any]) -> tuple[bool, str]:
        return run_program(program, self.timeout, reference)

    def __call__(
        self, predictions: Sequence[str], references: Sequence[Mapping[str, Any]]
    ) -> dict[str, float]:
        if len(predictions) != len(references):
            raise GptkitError(
                f"got {len(predictions)} predictions for {len(references)} problems; "
                "give one prediction per problem"
            )
        programs = [
            extract_program(p, r, self.chat) for p, r in zip(predictions, references, strict=True)
        ]
        with ThreadPoolExecutor(self.workers) as pool:
            runs = list(pool.map(self._run, programs, references))
        self.results = [
            {"program": program, "passed": passed, "reason": reason}
            for program, (passed, reason) in zip(programs, runs, strict=True)
        ]
        solved = sum(passed for passed, _ in runs)
        return {"pass@1": solved / len(runs) if runs else 0.0}


def read_python_functions(
    path: str | Path, limit: int | None = None, max_chars: int = 2000
) -> list[dict[str, str]]:
    """HumanEval-style training rows from a corpus of Python files (JSON Lines with
    ``path`` and ``content``, as ``thealgorithms_python/`` ships): for each top-level
    function with a docstring, the prompt is the file's imports, the signature and the
    docstring, and the completion is the body after the docstring. Functions longer than
    ``max_chars`` and files that do not parse are skipped (counted, not fatal)."""
    check_limit(limit)
    rows: list[dict[str, str]] = []
    for _, row in read_jsonl(Path(path)):
        source = row.get("content")
        if not isinstance(source, str):
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        imports = "".join(
            "".join(lines[n.lineno - 1 : n.end_lineno])
            for n in tree.body
            if isinstance(n, ast.Import | ast.ImportFrom)
        )
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None:
                continue
            doc = node.body[0]
            if len(node.body) < 2 or node.end_lineno is None or doc.end_lineno is None:
                continue
            head = "".join(lines[node.lineno - 1 - len(node.decorator_list) : doc.end_lineno])
            body = "".join(lines[doc.end_lineno : node.end_lineno]).rstrip() + "\n"
            if not body.strip() or len(head) + len(body) > max_chars:
                continue
            prompt = (imports + "\n\n" if imports else "") + head
            rows.append({"prompt": prompt, "completion": body})
            if limit is not None and len(rows) >= limit:
                return rows
    return rows
