"""jaxgen.executables.cached_jit: executables written to <cache dir>/executables and loaded by a
later process (simulated by clearing the in-memory table) without tracing again, with the same
results, donation kept, and plain jax.jit where no sound disk key exists."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import executables
from jaxgen.executables import cached_jit

TRACES = []


@cached_jit(static_argnames=("scale",), donate_argnums=(0,))
def _axpy(x, y, *, scale: int):
    TRACES.append(scale)
    return x * scale + y["b"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_HOME", str(tmp_path))
    monkeypatch.delenv("JAXGEN_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("JAXGEN_EXECUTABLE_CACHE", "1")  # opt-in (experimental); conftest turns it off otherwise
    monkeypatch.setattr(executables, "_loaded_any", False)  # as in a fresh process
    TRACES.clear()
    _axpy._compiled.clear()
    return tmp_path


def _files(home):
    folder = home / "executables"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_written_then_loaded_without_tracing(home):
    y = {"b": jnp.arange(4, dtype=jnp.float32)}
    first = _axpy(jnp.ones(4), y, scale=3)
    assert TRACES == [3] and len(_files(home)) == 1
    _axpy._compiled.clear()  # a new process: only the file is left
    again = _axpy(jnp.ones(4), y, scale=3)
    assert TRACES == [3]  # loaded, not traced
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(first), [3, 4, 5, 6])


def test_a_process_that_loaded_one_writes_none(home):
    """XLA:CPU: what a process compiles after loading a serialized executable does not serialize
    whole, so it runs through jax.jit and no file is written."""
    _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=2)
    _axpy._compiled.clear()
    _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=2)  # loaded
    assert executables._loaded_any
    out = _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=9)
    np.testing.assert_array_equal(np.asarray(out), [9] * 4)
    assert len(_files(home)) == 1


_SCRIPT = """
import sys
import jax.numpy as jnp
from jaxgen.executables import cached_jit
traced = []
@cached_jit(static_argnames=("n",), donate_argnums=(0,))
def f(x, y, n):
    traced.append(n)
    return jnp.cumsum(x * n + y), jnp.broadcast_to(y[:1], (3, 4))
a, b = f(jnp.arange(4.0), jnp.ones(4), n=3)
print(len(traced), a.tolist(), b.tolist())
"""


def test_a_later_process_runs_the_file(home):
    """Written by one process, loaded and run by the next without tracing (the real case)."""
    import subprocess
    import sys

    env = dict(os.environ, JAXGEN_HOME=str(home))
    runs = [subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    expected = "[1.0, 5.0, 12.0, 22.0] " + str([[1.0] * 4] * 3)
    assert runs[0].stdout.split(" ", 1) == ["1", expected + "\n"]
    assert runs[1].stdout.split(" ", 1) == ["0", expected + "\n"]  # loaded: not traced
    assert len(_files(home)) == 1


def test_keys_follow_static_values_and_shapes(home):
    y = {"b": jnp.zeros(4)}
    _axpy(jnp.ones(4), y, scale=2)
    _axpy(jnp.ones(4), y, scale=5)
    _axpy(jnp.ones(8), {"b": jnp.zeros(8)}, scale=2)
    _axpy(jnp.ones(4, jnp.int32), {"b": jnp.zeros(4, jnp.int32)}, scale=2)
    assert len(_files(home)) == 4
    out = _axpy(np.ones(4, np.float32), {"b": np.zeros(4, np.float32)}, scale=5)  # numpy inputs: their own key
    np.testing.assert_array_equal(np.asarray(out), [5] * 4)


def test_donation_is_kept(home):
    x = jnp.ones(4)
    _axpy(x, {"b": jnp.zeros(4)}, scale=2)
    assert x.is_deleted()


def test_damaged_file_is_compiled_again(home):
    _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=7)
    (name,) = _files(home)
    (home / "executables" / name).write_bytes(b"not an executable")
    _axpy._compiled.clear()
    out = _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=7)
    np.testing.assert_array_equal(np.asarray(out), [7] * 4)
    assert (home / "executables" / name).read_bytes() != b"not an executable"  # replaced


def test_off_by_default(home, monkeypatch):
    monkeypatch.delenv("JAXGEN_EXECUTABLE_CACHE")
    _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=2)
    assert _files(home) == []


@pytest.mark.parametrize("switch", ["JAXGEN_COMPILATION_CACHE", "JAXGEN_EXECUTABLE_CACHE"])
def test_switched_off(home, monkeypatch, switch):
    monkeypatch.setenv(switch, "0")
    _axpy(jnp.ones(4), {"b": jnp.zeros(4)}, scale=2)
    assert _files(home) == []


def test_tracers_and_unstable_static_values_use_jax_jit(home):
    @cached_jit(static_argnames=("fn",))
    def apply(x, fn):
        return fn(x)

    assert float(apply(jnp.float32(2), fn=jnp.square)) == 4.0  # repr names an address: no file
    assert float(jax.jit(lambda v: _axpy(v, {"b": v}, scale=2))(jnp.ones(4))[0]) == 3.0  # inside jit
    assert _files(home) == []
