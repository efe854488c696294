"""Resolving CTranslate2-style device arguments to JAX devices."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import jax
import numpy as np

DEVICE_NAMES = ("cpu", "cuda", "gpu", "tpu", "auto")


def _platform_devices(platform: str) -> List[jax.Device]:
    try:
        return jax.devices(platform)
    except RuntimeError:
        return []


def resolve_devices(device: str, device_index: Union[int, Sequence[int]]) -> Tuple[str, List[jax.Device]]:
    """("cpu"|"cuda"|"gpu"|"tpu"|"auto", int or list of ints) -> (platform name, devices).

    Raises TypeError/ValueError naming the bad argument: an unknown device, an empty index
    list, or an index that does not exist on this machine.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    name = device.lower()
    if name not in DEVICE_NAMES:
        raise ValueError(f"unsupported device {device!r}; expected one of {', '.join(DEVICE_NAMES)}")
    if name == "auto":
        name = next((p for p in ("tpu", "gpu") if _platform_devices(p)), "cpu")
    if name == "cuda":
        name = "gpu"
    available = _platform_devices(name)
    if not available:
        raise ValueError(f"device {device!r} is not available on this machine (JAX sees {jax.devices()[0].platform})")
    if isinstance(device_index, bool) or not isinstance(device_index, (int, list, tuple)):
        raise TypeError(f"device_index must be an int or a list of ints, got {type(device_index).__name__}")
    indices = [device_index] if isinstance(device_index, int) else list(device_index)
    if not indices:
        raise ValueError("device_index must not be empty")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"device_index entries must be ints, got {type(i).__name__}")
        if not 0 <= i < len(available):
            raise ValueError(f"device_index {i} does not exist: {len(available)} {name} device(s) available")
    if len(set(indices)) != len(indices):
        raise ValueError(f"device_index has duplicates: {indices}")
    platform = "cuda" if name == "gpu" else name
    return platform, [available[i] for i in indices]


def on_device(value, dtype=None) -> jax.Array:
    """A host value (numpy array, list, Python or numpy scalar) as a JAX array on the default device.

    A transfer: `jnp.asarray(numpy_array)` and `jnp.int32(5)` outside a trace run a small compiled
    identity program per shape and dtype instead (`lax.stage`), about 0.1 s of XLA compilation each
    in every new process, which a start-up paid a dozen times."""
    return jax.device_put(np.asarray(value, dtype))


def on_device_int32(value) -> jax.Array:
    """`on_device(value, np.int32)`: a strongly typed int32 scalar or array (as `jnp.int32(value)`)."""
    return on_device(value, np.int32)


def on_device_float32(value) -> jax.Array:
    """`on_device(value, np.float32)` (as `jnp.float32(value)`)."""
    return on_device(value, np.float32)


def committed_like(tree, params):
    """`tree`'s arrays committed to the one device `params` live on (unchanged when params span
    several devices: tensor parallelism). A jitted loop's outputs are committed to the params'
    device; inputs made by `on_device` are not, and JAX lowers (and loads or compiles) a program
    per placement, so a loop state that starts uncommitted costs a second program at its second
    call. Arrays already there are not copied."""
    devices = jax.tree_util.tree_leaves(params)[0].sharding.device_set
    if len(devices) != 1:
        return tree
    return jax.device_put(tree, next(iter(devices)))
