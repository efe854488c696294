"""`jaxgen.default_model`: cache location, reuse, and concurrent first use.

The conversion itself is replaced by writing the tiny CLI model (cli_models.py), so these tests are
fast; the real conversion runs in the slow tests (test_cli.py, test_notebooks.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import jaxgen
from jaxgen import default_model


def test_exported():
    assert jaxgen.default_model_path is default_model.default_model_path


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == str(tmp_path / "home")
    monkeypatch.delenv("JAXGEN_HOME")
    assert default_model.cache_dir() == str(tmp_path / "xdg" / "jaxgen")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_model.cache_dir() == str(tmp_path / "user" / ".cache" / "jaxgen")
    assert default_model.default_model_dir().startswith(default_model.cache_dir() + os.sep)


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replaces the GGUF conversion by writing the tiny model (after `delay` seconds)."""
    import cli_models

    calls = []

    def convert(workdir, progress, delay=0.0):
        calls.append(workdir)
        time.sleep(delay)
        return cli_models.build_cli_tiny_model(os.path.join(workdir, "model"))

    monkeypatch.setenv("JAXGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(default_model, "_convert", convert)
    return calls


def test_converts_once_then_reuses(fake_convert):
    path = default_model.default_model_path()
    assert path == default_model.default_model_dir()
    assert default_model.is_valid_model_dir(path)
    assert default_model.default_model_path() == path
    assert len(fake_convert) == 1
    parent = os.path.dirname(path)
    assert sorted(os.listdir(parent)) == sorted([os.path.basename(path), ".gemma-3-270m-float32.lock"])
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_replaces_an_invalid_directory_and_old_temporaries(fake_convert):
    target = default_model.default_model_dir()
    os.makedirs(target)
    with open(os.path.join(target, "config.json"), "w") as f:
        f.write("{broken")
    leftover = os.path.join(os.path.dirname(target), ".gemma-3-270m-float32-tmp-killed")
    os.makedirs(os.path.join(leftover, "model"))
    assert default_model.default_model_path() == target
    assert default_model.is_valid_model_dir(target)
    assert not os.path.exists(leftover)
    assert len(fake_convert) == 1


def test_older_conversion_revision_is_converted_again(fake_convert):
    """A valid directory from an older converter (no stamp, or another revision) is replaced."""
    import json

    import cli_models

    target = default_model.default_model_dir()
    cli_models.build_cli_tiny_model(target)  # valid, but never stamped: an old jaxgen's conversion
    assert default_model.is_valid_model_dir(target) and not default_model.is_current_model_dir(target)
    assert default_model.default_model_path() == target
    assert len(fake_convert) == 1
    assert default_model.conversion_revision(target) == default_model.CONVERSION_REVISION
    assert default_model.default_model_path() == target and len(fake_convert) == 1  # now reused
    with open(os.path.join(target, "jaxgen_default_model.json"), "w") as f:
        json.dump({"conversion_revision": default_model.CONVERSION_REVISION - 1}, f)
    assert default_model.default_model_path() == target
    assert len(fake_convert) == 2


def test_lost_rename_race_uses_the_winner(fake_convert, monkeypatch):
    """Without the lock (as on a file system where it does not work), two converters race: the
    loser's rename fails and it uses the winner's complete model."""
    import contextlib

    @contextlib.contextmanager
    def no_lock(path):
        yield False

    monkeypatch.setattr(default_model, "_file_lock", no_lock)
    original = default_model._convert
    monkeypatch.setattr(default_model, "_convert", lambda workdir, progress: original(workdir, progress, delay=1.0))
    results, errors = [], []

    def run():
        try:
            results.append(default_model.default_model_path())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [default_model.default_model_dir()] * 2
    assert len(fake_convert) == 2  # both converted; one rename won
    parent = os.path.dirname(results[0])
    assert [n for n in os.listdir(parent) if "-tmp-" in n] == []


def test_conversion_failure_is_a_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXGEN_HOME", str(tmp_path / "home"))

    def broken(workdir, progress):
        os.makedirs(os.path.join(workdir, "model"))
        raise ValueError("corrupt GGUF")

    monkeypatch.setattr(default_model, "_convert", broken)
    with pytest.raises(RuntimeError, match="corrupt GGUF"):
        default_model.default_model_path()
    parent = os.path.dirname(default_model.default_model_dir())
    assert os.listdir(parent) == [".gemma-3-270m-float32.lock"]  # nothing half-written left


def test_two_processes_convert_once(tmp_path):
    """Two processes asking at once: the lock makes the second wait and reuse the first's model."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {tests_dir!r})
        import cli_models
        from jaxgen import default_model

        def convert(workdir, progress):
            print("converting", flush=True)
            time.sleep(1.0)
            return cli_models.build_cli_tiny_model(os.path.join(workdir, "model"))

        default_model._convert = convert
        print(default_model.default_model_path(), flush=True)
    """)
    env = dict(os.environ, JAXGEN_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert stdout.count("converting") == 1
    target = os.path.join(str(tmp_path / "home"), "models", "gemma-3-270m-float32")
    assert stdout.count(target) == 2
