"""Runs the test suite the way `make test` does, and makes sure a run always ends.

    python tests/run_suite.py [PYTEST ARGS...]

pytest runs in parallel worker processes (pytest-xdist, one per core, a test file per worker).
This wrapper adds two things a plain `pytest` call lacks:

- **Nothing outlives the run.** Every process the suite starts (workers, CLI subprocesses,
  notebook kernels, device workers) carries JAXGEN_TEST_RUN=<id> in its environment; when
  pytest exits, whatever still carries it is killed: a process left behind (a kernel of a
  crashed worker, say) would keep CI's output pipe open, and CI would wait on it until its time
  limit.
- **A crashed worker gets one more try.** XLA:CPU (jaxlib 0.10.2) has died inside its compiler
  (SIGSEGV, SIGABRT) in full runs, lately always compiling test_prompt_lookup.py's
  `lookup_decode`, never when that file ran alone (see conftest.py and the README's
  known issues). pytest-xdist's replacement of a crashed worker hung the whole run under
  `--dist loadfile` (both workers idle, the controller waiting), so `make test` runs with
  `--max-worker-restart 0`: a crash ends the run (the other worker finishes its file). When every
  failure of that run is a test its worker died in, a second run takes the crashed tests and every
  test the first did not reach, and the result is the second run's; the crash stays in the output.
  A run with any other failure is not repeated.

The exit status is pytest's (of the second try where there was one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Sequence

from suite_plugin import CRASHED, DONE, FAILED, FINISHED, SUITE_DIR, read_ids  # this folder, sys.path[0]

MARKER = "JAXGEN_TEST_RUN"


def _processes_with_marker(run_id: str) -> List[int]:
    """PIDs (not this one) whose environment holds MARKER=run_id (Linux /proc; elsewhere none)."""
    needle = f"{MARKER}={run_id}".encode()
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def _kill_leftovers(run_id: str, group: int) -> None:
    """SIGTERM, then SIGKILL after 5 s, to the pytest process group and every marked process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
        pids = _processes_with_marker(run_id)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            return
        if sig == signal.SIGTERM:
            time.sleep(5)
    leftover = _processes_with_marker(run_id)
    if leftover:
        print(f"run_suite: processes {leftover} outlived the run", file=sys.stderr)


def run_pytest(args: Sequence[str], folder: str, env_extra: Optional[Dict[str, str]] = None) -> int:
    """One pytest run in its own process group, its bookkeeping (suite_plugin.py) in `folder`; returns
    its exit status once nothing of it is left."""
    run_id = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: run_id, SUITE_DIR: folder}, **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: pytest prints what it has, then everything goes
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        raise
    finally:
        _kill_leftovers(run_id, proc.pid)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM (a CI timeout): leave through run_pytest's cleanup


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    signal.signal(signal.SIGTERM, _terminated)
    with tempfile.TemporaryDirectory(prefix="jaxgen-suite-") as first, \
            tempfile.TemporaryDirectory(prefix="jaxgen-suite-") as second:
        rc = run_pytest(args, first)
        crashed, failed = read_ids(os.path.join(first, CRASHED)), read_ids(os.path.join(first, FAILED))
        if rc == 0 or not crashed or not failed <= crashed:
            return rc  # passed, or failures that are not crashes: no second try
        print(f"\nrun_suite: a test worker crashed in {', '.join(sorted(crashed))}; running "
              f"{'it' if len(crashed) == 1 else 'them'} and the tests not run yet once more\n", flush=True)
        return run_pytest(args, second, {DONE: os.path.join(first, FINISHED)})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
