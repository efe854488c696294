"""tests/run_suite.py (what `make test` runs) on a small synthetic suite: a worker that dies in a test
ends the run without hanging, the crashed test and the tests not reached get one more run, a real
failure is not retried, and no process the suite started outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS!r})
from suite_plugin import deselect_done, pytest_handlecrashitem, pytest_runtest_logreport  # noqa: F401


def pytest_collection_modifyitems(config, items):
    deselect_done(config, items)
"""

CRASHING = """
import ctypes, os, subprocess, sys

def test_before():
    pass

def test_crashes_once(tmp_path_factory):
    flag = os.path.join({folder!r}, "crashed-once")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join({folder!r}, "children"), "a") as f:
        f.write(f"{{child.pid}}\\n")
    if not os.path.exists(flag):
        open(flag, "w").close()
        ctypes.string_at(0)  # SIGSEGV, as XLA:CPU's compiler does now and then

def test_after():
    pass
"""


def _run_suite(folder, files):
    for name, text in {"conftest.py": CONFTEST, **files}.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(textwrap.dedent(text).format(folder=str(folder)))
    # this test's own worker environment must not leak into the inner run's bookkeeping
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAXGEN_TEST_"))}
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "run_suite.py"), "-q", "-rA", "-n", "2",
                           "--dist", "loadfile", "--max-worker-restart", "0", "-p", "no:cacheprovider"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_crash_gets_a_second_try_and_nothing_is_left(tmp_path):
    rc, out = _run_suite(tmp_path, {"test_crash.py": CRASHING, "test_other.py": "def test_other():\n    pass\n"})
    assert rc == 0, out
    assert "crashed while running 'test_crash.py::test_crashes_once'" in out
    assert "once more" in out
    second = out[out.index("once more"):]
    assert "PASSED test_crash.py::test_crashes_once" in second
    assert "PASSED test_crash.py::test_before" not in second  # ran already: not repeated
    children = [int(x) for x in (tmp_path / "children").read_text().split()]
    assert len(children) == 2 and not any(_alive(pid) for pid in children)


def test_a_real_failure_beside_a_crash_is_not_retried(tmp_path):
    rc, out = _run_suite(tmp_path, {"test_crash.py": CRASHING, "test_bad.py": "def test_bad():\n    assert 0\n"})
    assert rc == 1, out
    assert "crashed while running" in out and "FAILED test_bad.py::test_bad" in out
    if "once more" in out:  # only where test_bad.py had not run when the crash ended the first run
        assert "FAILED test_bad.py::test_bad" in out[out.index("once more"):]
