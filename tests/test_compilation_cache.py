"""JAX's persistent compilation cache, on by default for every Generator (jaxgen.runtime.compilation_cache).

Each case runs in a fresh Python process (the cache directory is process-wide JAX state) with its
own temporary JAXGEN_HOME, on the tiny CLI model of conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

_SCRIPT = r"""
import json, sys
import jax
import jaxgen
generator = jaxgen.Generator(sys.argv[1])
seen = {"dir": jax.config.jax_compilation_cache_dir,
        "min_time": jax.config.jax_persistent_cache_min_compile_time_secs}
if sys.argv[2] == "generate":
    generator.generate_batch([["<bos>", "\u2581the"]], max_length=4)
print(json.dumps(seen))
"""


def _run(model_dir: str, home: str, generate: bool = True, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXGEN_COMPILATION_CACHE",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(JAXGEN_HOME=home, JAX_PLATFORMS="cpu", **env_extra)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, model_dir, "generate" if generate else "-"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generator_uses_cache_in_jaxgen_home(cli_tiny_model, tmp_path):
    home = tmp_path / "home"
    # threshold 0: the tiny model compiles faster than jaxgen's default 0.5 s threshold
    seen = _run(cli_tiny_model, str(home), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert seen["dir"] == str(home / "xla")
    assert seen["min_time"] == 0  # a threshold the user chose is kept
    assert os.listdir(home / "xla"), "no compiled program was written"


def test_default_min_compile_time(cli_tiny_model, tmp_path):
    seen = _run(cli_tiny_model, str(tmp_path / "home"), generate=False)
    assert seen["dir"] == str(tmp_path / "home" / "xla")
    assert seen["min_time"] == 0.5


def test_opt_out(cli_tiny_model, tmp_path):
    home = tmp_path / "home"
    seen = _run(cli_tiny_model, str(home), JAXGEN_COMPILATION_CACHE="0",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert seen["dir"] is None
    assert not (home / "xla").exists()


def test_users_own_cache_dir_is_kept(cli_tiny_model, tmp_path):
    home, own = tmp_path / "home", tmp_path / "own-cache"
    seen = _run(cli_tiny_model, str(home), generate=False, JAX_COMPILATION_CACHE_DIR=str(own))
    assert seen["dir"] == str(own)


def test_enable_is_idempotent_and_thread_safe():
    import jax

    from jaxgen.runtime.compilation_cache import enable_compilation_cache

    results = []
    threads = [threading.Thread(target=lambda: results.append(enable_compilation_cache())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert results[0] == (jax.config.jax_compilation_cache_dir or None)
    assert enable_compilation_cache() == results[0]


def test_test_session_does_not_use_the_users_home():
    # conftest.py points JAXGEN_HOME at the repository's .jaxgen_home/ unless it is set
    assert os.environ.get("JAXGEN_HOME")
