"""`cached_jit`: `jax.jit` whose compiled executables are also kept on disk, so that a new process
skips tracing and lowering, not only XLA's compilation.

JAX's persistent compilation cache (`jaxgen.runtime.compilation_cache`) is looked up by a hash of
the lowered program, so every process still traces and lowers each function before it can find
the executable: about 4 s for the decode loop of an 18-layer model on two CPU cores, most of a
warm `jaxgen generate`. `cached_jit` looks the executable up by what determines the program
instead, and loads it with `jax.experimental.serialize_executable`:

- the function (module and name) and a hash of jaxgen's own source files;
- the JAX and jaxlib versions, the backend (platform, version, device kinds and count), the
  host CPU's features (XLA compiles for the host's instruction set), `XLA_FLAGS`, and every
  plain-valued JAX configuration option (x64, matmul precision, PRNG implementation, ...);
- the values of the static arguments (their `repr`; a static value whose repr names a memory
  address, such as a function, makes the call use plain `jax.jit`);
- each array argument's shape, dtype, weak type and sharding, and the arguments' tree structure.

Files live in `<jaxgen cache dir>/executables/` and are written atomically; an unreadable or
stale file is compiled again.

XLA:CPU (jaxlib 0.10) caveat, measured: once a process has loaded any serialized executable (from
JAX's persistent cache or from here), the executables it compiles next serialize without some of
their kernels, and a later process fails running them ("NOT_FOUND: Function wrapped_broadcast not
found"). So files are written only by a process that has loaded none (JAX reports its cache hits
through `jax.monitoring`); after a load, a new shape compiles through plain `jax.jit` (and JAX's
cache). A loaded executable that still fails that way is deleted and the call runs through
`jax.jit`, unless it had already consumed donated inputs (then the error is raised; the next
call recompiles).

The cache is experimental and off unless `JAXGEN_EXECUTABLE_CACHE=1` (because of the caveat
above: a failure after donated inputs were consumed reaches the caller); it is also off with the
compilation cache (`JAXGEN_COMPILATION_CACHE=0`), and a call with tracers (inside another `jit`)
uses `jax.jit`.
The key does not see module globals that traced code reads: code that monkeypatches them (block
sizes, kernels; the tests do) must turn this cache off, as `jax.clear_caches()` does not reach it.
Donation is kept: the executable is the one `jax.jit(...).lower(...).compile()` makes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax

_FORMAT = 1
ENV_SWITCH = "JAXGEN_EXECUTABLE_CACHE"
_loaded_any = False  # whether this process has loaded a serialized executable (module docstring)


def _note_cache_hit(event: str, **_) -> None:
    global _loaded_any
    if event == "/jax/compilation_cache/cache_hits":
        _loaded_any = True


jax.monitoring.register_event_listener(_note_cache_hit)
_SKIPPED_CONFIG = ("cache", "log", "debug", "explain", "traceback", "profile", "dump")


def cached_jit(fun: Optional[Callable] = None, *, static_argnames: Union[str, Sequence[str]] = (),
               static_argnums: Union[int, Sequence[int]] = (), donate_argnums: Union[int, Sequence[int]] = ()):
    """`jax.jit(fun, static_argnames=..., static_argnums=..., donate_argnums=...)` with its
    executables cached on disk (module docstring). Usable as `@cached_jit` or `@cached_jit(...)`."""
    if fun is None:
        return functools.partial(cached_jit, static_argnames=static_argnames, static_argnums=static_argnums,
                                 donate_argnums=donate_argnums)
    return _CachedJit(fun, static_argnames, static_argnums, donate_argnums)


class _CachedJit:
    def __init__(self, fun: Callable, static_argnames, static_argnums, donate_argnums):
        names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self._jitted = jax.jit(fun, static_argnames=names or None, static_argnums=nums or None,
                               donate_argnums=donate_argnums)
        params = list(inspect.signature(fun).parameters)
        self._static = frozenset(names) | frozenset(params[i] for i in nums)
        self._signature = inspect.signature(fun)
        self._name = f"{fun.__module__}.{fun.__qualname__}"
        self._compiled: Dict[Tuple, Any] = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fun)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        directory = _cache_directory()
        if directory is None:
            return self._jitted(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        static, dynamic_args, dynamic_kwargs = [], [], {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if name in self._static:
                static.append((name, value))
            elif kind is inspect.Parameter.POSITIONAL_ONLY or (kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                                                               and name not in kwargs):
                dynamic_args.append(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                dynamic_args.extend(value)
            else:
                dynamic_kwargs[name] = value
        leaves, tree = jax.tree_util.tree_flatten((dynamic_args, dynamic_kwargs))
        avals, platform = [], None
        for leaf in leaves:
            if isinstance(leaf, jax.core.Tracer):
                return self._jitted(*args, **kwargs)
            sharding = None
            if isinstance(leaf, jax.Array):
                sharding = repr(leaf.sharding)
                platform = platform or next(iter(leaf.sharding.device_set)).platform
            avals.append((str(jax.typeof(leaf)), sharding))
        static_repr = repr(static)
        if " at 0x" in static_repr:  # a value without a stable repr (a function...): no disk key
            return self._jitted(*args, **kwargs)
        key = (platform, static_repr, str(tree), tuple(avals))
        entry = self._compiled.get(key)
        if entry is None:
            with self._lock:
                entry = self._compiled.get(key)
                if entry is None:
                    entry = self._load_or_compile(directory, key, args, kwargs)
                    self._compiled[key] = entry
        compiled, path = entry
        if compiled is None:
            return self._jitted(*args, **kwargs)
        if path is None:
            return compiled(*dynamic_args, **dynamic_kwargs)
        try:  # the first call of a loaded executable
            out = compiled(*dynamic_args, **dynamic_kwargs)
        except jax.errors.JaxRuntimeError as exc:
            if "NOT_FOUND: Function" not in str(exc):
                raise
            self._compiled[key] = (None, None)
            _remove(path)
            if any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in leaves):
                raise
            return self._jitted(*args, **kwargs)
        self._compiled[key] = (compiled, None)
        return out

    def _load_or_compile(self, directory: str, key: Tuple, args, kwargs) -> Tuple[Any, Optional[str]]:
        """(executable, its file when loaded from one) or (None, None): use `jax.jit`."""
        global _loaded_any
        platform = key[0]
        digest = hashlib.sha256(repr((_FORMAT, _environment_key(platform), self._name, key)).encode()).hexdigest()
        path = os.path.join(directory, f"{self._name.rsplit('.', 1)[-1]}-{digest[:40]}.bin")
        from jax.experimental import serialize_executable

        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            _loaded_any = True
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, backend=platform), path
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 - a stale or damaged file: compile again and replace it
            pass
        if _loaded_any:  # what this process compiles now would not serialize whole
            return None, None
        compiled = _compile_fresh(self._jitted, args, kwargs)
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
            os.makedirs(directory, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except Exception:  # noqa: BLE001 - not serializable here, or a read-only cache: run uncached
            pass
        return compiled, None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _compile_fresh(jitted, args, kwargs):
    """`jitted.lower(...).compile()`, never served by JAX's persistent cache: an XLA:CPU executable
    loaded from that cache serializes without all of its object code (a copy of it fails with
    "NOT_FOUND: Function ... not found"). A random value of an option that only matters when
    dumping HLO (`xla_dump_max_hlo_modules`) gives the compilation a key of its own."""
    import random

    options = {"xla_dump_max_hlo_modules": random.randrange(1 << 30, 1 << 31)}
    return jitted.lower(*args, **kwargs).compile(compiler_options=options)


def _cache_directory() -> Optional[str]:
    """`<jaxgen cache dir>/executables`, or None when jaxgen's compilation cache is off."""
    from jaxgen.runtime.compilation_cache import compilation_cache_disabled

    if compilation_cache_disabled() or os.environ.get(ENV_SWITCH, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    from jaxgen.default_model import cache_dir

    return os.path.join(cache_dir(), "executables")


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """A hash of jaxgen's Python files (the package and its converters): traced code changes it."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return f"{platform.machine()} {platform.processor()}"


def _environment_key(platform: Optional[str]) -> Tuple:
    """What besides the function and its arguments decides the executable (module docstring)."""
    import jax.extend
    import jaxlib

    backend = jax.extend.backend.get_backend(platform)
    config = tuple(sorted((name, value) for name, value in jax.config.values.items()
                          if isinstance(value, (bool, int, float, str, type(None)))
                          and not any(part in name for part in _SKIPPED_CONFIG)))
    devices = tuple(d.device_kind for d in backend.devices())
    return (_source_hash(), jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
            devices, _cpu_features(), os.environ.get("XLA_FLAGS", ""), config)
