"""pytest hooks for tests/run_suite.py (conftest.py imports them; so does a conftest of another suite).

In the pytest-xdist controller (or the only process) they write node ids to files in
$JAXGEN_TEST_SUITE_DIR: `crashed` (tests a worker died in), `failed`, `done` (tests that ran to
their call phase or stopped at setup). With $JAXGEN_TEST_DONE set (a `done` file of an earlier
run), collection deselects those tests, so a second try runs only the crashed ones and those the
first run never reached (a conftest calls `deselect_done` from its pytest_collection_modifyitems).
"""

from __future__ import annotations

import os

from typing import Set

import pytest

SUITE_DIR = "JAXGEN_TEST_SUITE_DIR"  # the folder of the files below
DONE = "JAXGEN_TEST_DONE"  # a `done` file of an earlier run: its node ids are deselected
CRASHED, FAILED, FINISHED = "crashed", "failed", "done"  # files of node ids in SUITE_DIR


def read_ids(path: str) -> Set[str]:
    """The node ids of one of these files (none where it does not exist)."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def _suite_log(name: str, line: str) -> None:
    folder = os.environ.get(SUITE_DIR)
    if folder and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(os.path.join(folder, name), "a") as f:
            f.write(line + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist: the test a worker died in."""
    _suite_log(CRASHED, crashitem)


def pytest_runtest_logreport(report):
    if report.failed:
        _suite_log(FAILED, report.nodeid)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _suite_log(FINISHED, report.nodeid)


def deselect_done(config, items):
    """JAXGEN_TEST_DONE names a file of node ids that ran already: they are deselected (run_suite's
    second try runs the crashed test and those its worker never reached)."""
    path = os.environ.get(DONE)
    if not path:
        return
    done = read_ids(path)
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
    items[:] = [item for item in items if item.nodeid not in done]
