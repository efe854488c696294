"""pytest hooks for tests/run_suite.py (conftest.py imports them; so does a conftest of another suite).

In the pytest-xdist controller (or the only process) they write node ids to files in
$JAXGEN_TEST_SUITE_DIR: `crashed` (tests a worker died in), `failed`, `done` (tests that ran to
their call phase or stopped at setup). With $JAXGEN_TEST_DONE set (a `done` file of an earlier
run), collection deselects those tests, so a second try runs only the crashed ones and those the
first run never reached (a conftest calls `deselect_done` from its pytest_collection_modifyitems).
"""

from __future__ import annotations

import os

import pytest


def _suite_log(name: str, line: str) -> None:
    folder = os.environ.get("JAXGEN_TEST_SUITE_DIR")
    if folder and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(os.path.join(folder, name), "a") as f:
            f.write(line + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist: the test a worker died in."""
    _suite_log("crashed", crashitem)


def pytest_runtest_logreport(report):
    if report.failed:
        _suite_log("failed", report.nodeid)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _suite_log("done", report.nodeid)


def deselect_done(config, items):
    """JAXGEN_TEST_DONE names a file of node ids that ran already: they are deselected (run_suite's
    second try runs the crashed test and those its worker never reached)."""
    path = os.environ.get("JAXGEN_TEST_DONE")
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        done = {line.strip() for line in f if line.strip()}
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
    items[:] = [item for item in items if item.nodeid not in done]
