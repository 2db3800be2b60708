"""The python-grader sandbox against hostile graders, through real unshare'd processes.

Each attack (a socket to a live server, reading the server's database file, a fork bomb, 10 GB of
memory, an endless loop, garbage on every descriptor, a crash, a CPU burn, a huge file, undoing the
mounts) scores 0 with a reason, quickly, and a good grader scores right after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from posttrain.domain.graders import parse_grader
from posttrain.trainer.grading import SandboxLimits, score_batch
from posttrain.trainer.grading.sandbox import _interpreter_paths, run_python_grader

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")

LIMITS = SandboxLimits(per_sample_seconds=5.0, cpu_seconds=20, memory_bytes=1 << 30, max_processes=32)
GOOD = """
import numpy

def grade(sample, item):
    return float(numpy.float64(sample["output_text"] == item["label"]))
"""


def _grade(source: str, limits: SandboxLimits = LIMITS, n: int = 1) -> list:
    pairs = [{"sample": {"output_text": f"s{k}"}, "item": {"label": f"s{k}"}} for k in range(n)]
    return run_python_grader(textwrap.dedent(source), pairs, limits)


def _grader(body: str) -> str:
    return "def grade(sample, item):\n" + textwrap.indent(textwrap.dedent(body), "    ")


@pytest.fixture
def data_folder():
    """A stand-in for the server's data folder, somewhere nobody may read (not /tmp: the sandbox replaces
    /tmp, /var/tmp and /dev/shm anyway), holding a database file anyone could read."""
    for parent in ("/var/lib", "/srv", str(Path(__file__).resolve().parents[2])):
        if os.access(parent, os.W_OK):
            break
    folder = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-test-", dir=parent))
    folder.chmod(0o755)
    database = folder / "posttrain.db"
    database.write_text("tenant secrets")
    database.chmod(0o644)
    yield folder
    shutil.rmtree(folder)


def _assert_good_grader_still_scores(limits: SandboxLimits = LIMITS) -> None:
    results = score_batch(parse_grader({"type": "python", "name": "good", "source": GOOD}),
                          [{"output_text": "a"}, {"output_text": "b"}], [{"label": "a"}, {"label": "a"}], limits)
    assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, None)]


def test_a_good_grader_scores_a_batch_in_one_quick_sandbox():
    started = time.monotonic()
    outcomes = _grade(GOOD, n=50)
    assert [o.score for o in outcomes] == [1.0] * 50 and all(o.error is None for o in outcomes)
    assert time.monotonic() - started < 15


def test_a_multi_grader_combines_a_string_check_and_a_python_grader():
    grader = parse_grader({"type": "multi", "name": "both", "calculate_output": "0.5 * colour + 0.5 * short",
                           "graders": {"colour": {"type": "string_check", "name": "colour", "operation": "ilike",
                                                  "input": "{{sample.output_text}}", "reference": "{{item.colour}}"},
                                       "short": {"type": "python", "name": "short", "source": _grader(
                                           "return 1.0 if len(sample['output_text']) < 12 else 0.0")}}})
    texts = ["Blue", "I think it is blue", "red", "a very long answer: red"]
    results = score_batch(grader, [{"output_text": t} for t in texts], [{"colour": "blue"}] * 4, LIMITS)
    assert [r.score for r in results] == [1.0, 0.5, 0.5, 0.0]
    assert results[1].per_grader == {"colour": 1.0, "short": 0.0} and all(r.error is None for r in results)


def test_no_network_even_to_a_server_on_loopback():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        [outcome] = _grade(_grader(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            return 1.0
        """))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection waits in the backlog either
            listener.accept()
    finally:
        listener.close()
    assert outcome.score == 0.0 and "Network is unreachable" in (outcome.error or "")
    _assert_good_grader_still_scores()


def test_unix_sockets_in_the_temp_and_run_folders_are_out_of_reach():
    # A network namespace does not cut a socket reached by its path (a database's, docker's): the fresh
    # tmpfs on /tmp and /run do. Each listener is open to all, so only the sandbox stands in the way.
    folders = [folder for folder in ("/tmp", "/run") if os.access(folder, os.W_OK)]
    listeners, paths = [], []
    for folder in folders:
        path = f"{folder}/posttrain-sandbox-{uuid.uuid4().hex}.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        os.chmod(path, 0o777)  # noqa: S103 - open to all, so that only the sandbox keeps the grader out
        listener.listen()
        listeners.append(listener)
        paths.append(path)
    try:
        outcomes = [_grade(_grader(f"""
            import socket
            socket.socket(socket.AF_UNIX).connect("{path}")
            return 1.0
        """))[0] for path in paths]
    finally:
        for listener, path in zip(listeners, paths, strict=True):
            listener.close()
            os.unlink(path)
    assert paths and [(o.score, "FileNotFoundError" in (o.error or "")) for o in outcomes] == [(0.0, True)] * len(paths)


def test_the_data_folder_is_hidden_and_stays_hidden(data_folder):
    reader = _grader(f"""
        return 1.0 if open("{data_folder}/posttrain.db").read() == "tenant secrets" else 0.5
    """)
    # Control: without hiding it, nobody can read this file, so the hiding below is what stops the grader.
    assert [o.score for o in _grade(reader)] == [1.0]
    hidden = SandboxLimits(**{**LIMITS.__dict__, "hidden_paths": (str(data_folder),)})
    [outcome] = _grade(reader, hidden)
    assert outcome.score == 0.0 and ("FileNotFoundError" in outcome.error or "PermissionError" in outcome.error)
    [outcome] = _grade(_grader(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(b"{data_folder}", 2)
        libc.umount2(b"/tmp", 2)
        return 1.0 if open("{data_folder}/posttrain.db").read() == "tenant secrets" else 0.5
    """), hidden)
    assert outcome.score == 0.0 and outcome.error
    _assert_good_grader_still_scores(hidden)


def test_the_grader_writes_nowhere_but_its_own_tmpfs(data_folder):
    # A folder open to all for writing (as the server's own files are to a non-root server's grader):
    # only the read-only remount of every mount keeps the grader out.
    open_to_all = data_folder / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    [outcome] = _grade(_grader(f"""
        open("scratch", "w").write("mine")
        open("{open_to_all}/planted.py", "w").write("import os")
    """))
    assert outcome.score == 0.0 and "Read-only file system" in (outcome.error or "")
    assert list(open_to_all.iterdir()) == []


def test_the_environment_and_home_are_clean(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET_FOR_TEST", "server secret")
    # The interpreter stays reachable where it lives: a checkout under /tmp (a CI clone) brings back
    # the folders leading to its venv, and nothing else of the host's /tmp.
    kept = sorted({"work", *(Path(p).relative_to("/tmp").parts[0] for p in _interpreter_paths()
                             if Path(p).is_relative_to("/tmp"))})
    [outcome] = _grade(_grader(f"""
        import os
        assert "POSTTRAIN_SECRET_FOR_TEST" not in os.environ, "leaked"
        assert os.listdir(".") == [] and os.getcwd() == "/tmp/work"
        assert sorted(os.listdir("/tmp")) == {kept!r}, os.listdir("/tmp")
        return 1.0
    """))
    assert (outcome.score, outcome.error) == (1.0, None)


def test_a_fork_bomb_is_stopped():
    started = time.monotonic()
    [outcome] = _grade(_grader("""
        import os
        while True:
            os.fork()
    """))
    assert outcome.score == 0.0 and outcome.error
    assert time.monotonic() - started < LIMITS.per_sample_seconds + 10
    _assert_good_grader_still_scores()


def test_ten_gigabytes_are_refused():
    [outcome] = _grade(_grader("""
        block = bytearray(10 * 1024 ** 3)
        return 1.0
    """))
    assert outcome.score == 0.0 and "MemoryError" in (outcome.error or "")
    _assert_good_grader_still_scores()


def test_an_endless_loop_is_killed_and_the_batch_goes_on():
    started = time.monotonic()
    outcomes = _grade(_grader("""
        while sample["output_text"] == "s1":
            pass
        return 1.0
    """), SandboxLimits(**{**LIMITS.__dict__, "per_sample_seconds": 2.0}), n=3)
    assert [o.score for o in outcomes] == [1.0, 0.0, 1.0]
    assert "timed out after 2s" in (outcomes[1].error or "")
    assert time.monotonic() - started < 12


def test_a_grader_that_hangs_on_every_sample_costs_a_few_timeouts_not_one_each():
    started = time.monotonic()
    outcomes = _grade(_grader("""
        while True:
            pass
    """), SandboxLimits(**{**LIMITS.__dict__, "per_sample_seconds": 1.0, "max_restarts": 2}), n=20)
    assert [o.score for o in outcomes] == [0.0] * 20
    assert [o.error for o in outcomes[:2]] == ["timed out after 1s; the sandbox was killed"] * 2
    assert all("lost on 2 samples in a row" in (o.error or "") for o in outcomes[2:])
    assert time.monotonic() - started < 8


def test_a_cpu_burn_hits_the_cpu_limit():
    [outcome] = _grade(_grader("""
        while True:
            pass
    """), SandboxLimits(**{**LIMITS.__dict__, "cpu_seconds": 1, "per_sample_seconds": 30.0}))
    assert outcome.score == 0.0 and "ended before answering" in (outcome.error or "")


def test_a_huge_file_hits_the_file_size_limit():
    [outcome] = _grade(_grader("""
        with open("big", "wb") as f:
            f.write(b"x" * (32 << 20))
        return 1.0
    """))
    assert outcome.score == 0.0 and "File too large" in (outcome.error or "")


@pytest.mark.parametrize(("body", "words"), [
    ('print("garbage " * 1000)\nreturn "garbage"', "returned str"),
    ("return float('nan')", "not a finite number"),
    ("return True", "returned bool"),
    ("return 1 / 0", "ZeroDivisionError: division by zero (line 2)"),
    ("raise SystemExit(3)", "SystemExit"),
])
def test_bad_results_score_zero_with_the_reason(body, words):
    outcomes = _grade(_grader(body), n=2)
    assert [o.score for o in outcomes] == [0.0, 0.0] and all(words in (o.error or "") for o in outcomes)


def test_garbage_on_the_result_pipe_is_a_reason_not_a_crash():
    [outcome] = _grade(_grader("""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b"garbage\\n")
            except OSError:
                pass
        return 1.0
    """))
    assert outcome.score == 0.0 and "not JSON" in (outcome.error or "")
    _assert_good_grader_still_scores()


def test_a_source_that_fails_to_load_scores_every_sample_zero():
    outcomes = _grade("import no_such_module_here\ndef grade(sample, item):\n    return 1.0\n", n=3)
    assert [o.score for o in outcomes] == [0.0] * 3
    assert all("failed to load: ModuleNotFoundError" in (o.error or "") for o in outcomes)


def test_without_unshare_python_graders_are_refused_not_run_open(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    outcomes = _grade(_grader("return 1.0"), n=2)
    assert [o.score for o in outcomes] == [0.0, 0.0] and all("unshare" in (o.error or "") for o in outcomes)


def test_when_the_namespaces_are_refused_python_graders_are_refused_not_run_open(monkeypatch, tmp_path):
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    outcomes = _grade(_grader("return 1.0"), n=2)
    assert [o.score for o in outcomes] == [0.0, 0.0]
    assert all("could not start" in o.error and "Operation not permitted" in o.error for o in outcomes)


def test_a_source_that_never_finishes_loading_is_killed_at_the_startup_limit():
    started = time.monotonic()
    outcomes = _grade("while True:\n    pass\ndef grade(sample, item):\n    return 1.0\n",
                      SandboxLimits(**{**LIMITS.__dict__, "startup_seconds": 1.0}), n=3)
    assert [o.score for o in outcomes] == [0.0] * 3 and all("did not start in time" in o.error for o in outcomes)
    assert time.monotonic() - started < 6


USER_NAMESPACE_SERVER = """
import json, sys
from posttrain.trainer.grading.sandbox import SandboxLimits, can_become_nobody, run_python_grader

folder, open_to_all = sys.argv[1], sys.argv[2]
source = '''
import ctypes, os

def grade(sample, item):
    libc = ctypes.CDLL(None, use_errno=True)
    if sample["output_text"] == "umount":
        libc.umount2(folder.encode(), 2)
        libc.umount2(b"/", 2)
        return 1.0 if os.path.exists(folder + "/posttrain.db") else 0.5
    if sample["output_text"] == "write":
        open(open_to_all + "/planted.py", "w").write("import os")
    return float(open(folder + "/posttrain.db").read() == "tenant secrets")
'''.replace("open_to_all", repr(open_to_all)).replace("folder", repr(folder))
pairs = [{"sample": {"output_text": t}, "item": {}} for t in ("read", "umount", "write")]
outcomes = run_python_grader(source, pairs, SandboxLimits(hidden_paths=(folder,)))
print(json.dumps({"nobody": can_become_nobody(), "outcomes": [[o.score, o.error] for o in outcomes]}))
"""


def test_a_server_that_cannot_become_nobody_walls_the_grader_in_its_own_user_namespace(data_folder):
    # Root of a user namespace that maps no nobody (a rootless container; the same path a non-root
    # server takes): the grader runs as the server's own user, so the read-only mounts and the nested
    # user namespace are what stop it, not permissions.
    import json
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    open_to_all = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-open-", dir=data_folder.parent))
    open_to_all.chmod(0o777)
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", USER_NAMESPACE_SERVER,
                               str(data_folder), str(open_to_all)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": repo}, check=False)
        planted = list(open_to_all.iterdir())
    finally:
        shutil.rmtree(open_to_all)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"user namespaces are not available here: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    assert report["nobody"] is False
    (read, read_error), (umount, umount_error), (write, write_error) = report["outcomes"]
    assert read == 0.0 and ("FileNotFoundError" in read_error or "PermissionError" in read_error)
    assert umount == 0.5 and umount_error is None
    assert write == 0.0 and "Read-only file system" in write_error
    assert planted == []


def test_an_item_json_cannot_carry_scores_zero_and_starts_nothing():
    pairs = [{"sample": {"output_text": "a"}, "item": {"when": object()}}]
    [outcome] = run_python_grader(_grader("return 1.0"), pairs, LIMITS)
    assert outcome.score == 0.0 and "could not be sent" in (outcome.error or "")
