"""JAX's persistent compilation cache, on by default in `<jaxgen cache dir>/xla`.

XLA compiles every new shape of the decoding functions; with the persistent cache a later
process (a second `jaxgen generate`, a restarted server) loads the compiled programs from disk
instead of compiling them again. `Generator()` and the `jaxgen` command call
`enable_compilation_cache()`, which points `jax_compilation_cache_dir` at
`<cache dir>/xla` (the cache dir is `$JAXGEN_HOME`, else `$XDG_CACHE_HOME/jaxgen`, else
`~/.cache/jaxgen`; see `jaxgen.default_model.cache_dir`).

Opting out, or choosing another place:

- `JAXGEN_COMPILATION_CACHE=0` in the environment: jaxgen leaves JAX's cache settings alone.
- Setting JAX's own cache directory first (`JAX_COMPILATION_CACHE_DIR=...`, or
  `jax.config.update("jax_compilation_cache_dir", ...)` before the first `Generator`): jaxgen
  keeps it.

Programs that compile faster than 0.5 s are not written, unless the user chose the threshold
(`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, or a value other than JAX's default). (Loading
them would be cheaper, but a process that has loaded an executable cannot write correct ones
for `jaxgen.executables`, which keeps the main decoding functions' executables in
`<cache dir>/executables` and so skips their tracing and lowering too.)
"""

from __future__ import annotations

import os
import threading
from typing import Optional

ENV_SWITCH = "JAXGEN_COMPILATION_CACHE"
MIN_COMPILE_TIME_SECS = 0.5
_JAX_DEFAULT_MIN_COMPILE_TIME_SECS = 1.0
_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"

_lock = threading.Lock()
_enabled_dir: Optional[str] = None  # the directory this module set, once set


def compilation_cache_disabled() -> bool:
    """True when the environment turns jaxgen's compilation cache off (JAXGEN_COMPILATION_CACHE=0,
    also "false", "no", "off")."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def enable_compilation_cache() -> Optional[str]:
    """Points JAX's persistent compilation cache at `<jaxgen cache dir>/xla`.

    Returns the directory JAX now uses (jaxgen's, or the user's own), or None when the cache is
    off because of JAXGEN_COMPILATION_CACHE=0. Idempotent and thread-safe: only the first call
    that finds no cache directory sets one, and a directory the user set is never replaced.
    The directory is created by JAX when it first writes a program.
    """
    global _enabled_dir
    import jax

    with _lock:
        current = jax.config.jax_compilation_cache_dir
        if _enabled_dir is not None or current:
            return current or None
        if compilation_cache_disabled():
            return None
        from jaxgen.default_model import cache_dir

        path = os.path.join(cache_dir(), "xla")
        jax.config.update("jax_compilation_cache_dir", path)
        if (_MIN_TIME_ENV not in os.environ and
                jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_TIME_SECS):
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
        _enabled_dir = path
        return path
