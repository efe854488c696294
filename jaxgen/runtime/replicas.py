"""Model replicas on devices, and the pool that hands them to jobs.

A list of devices without tensor parallelism gives one replica per device (its own weights and
its own static-prompt cache). With tensor parallelism there is one replica whose weights are
sharded over a Mesh with a "model" axis (jit + NamedSharding; XLA inserts the collectives):

- query heads, their q / o projections and q-norm: split over the devices (num_heads % n == 0);
- key/value heads and their KV cache: split when num_kv_heads divides by n, else each KV head is
  copied to the devices whose query heads read it (`ModelConfig.kv_head_copies`);
- activations between layers (the residual stream): replicated (the decoder pins them with
  `with_sharding_constraint` on `ModelConfig.mesh`), so each layer costs two all-reduces;
- MLP: gate/up columns and down rows split, the width zero-padded to a multiple of n;
- embedding and untied vocabulary projection: split on the hidden axis;
- norms, biases of row-split layers, learned positions: replicated.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import List

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.model.config import ModelConfig

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # split on the output axis
ROW_PARALLEL = ("o", "down")  # split on the input axis
AXIS = "model"


@dataclasses.dataclass
class Replica:
    name: str  # key of its static-prompt cache entries
    params: dict


def replicate(params: dict, devices: List[jax.Device]) -> List[Replica]:
    return [Replica(f"{d.platform}:{d.id}", jax.device_put(params, d)) for d in devices]


def tensor_parallel_layout(config: ModelConfig, devices: List[jax.Device]) -> ModelConfig:
    """The config a model sharded over `devices` runs with: its `mesh` set (one "model" axis),
    which sets `kv_head_copies` so that the stored KV heads, lcm(num_kv_heads, n), divide over the
    n devices.

    Each device takes num_heads / n query heads and the KV heads they read. With num_kv_heads
    divisible by n, each device holds num_kv_heads / n heads of its own (one copy); with fewer KV
    heads than devices, each head is copied to the n / num_kv_heads devices whose query heads share
    it (as vLLM does); in mixed cases (6 KV heads on 4 devices) each head goes to as few devices as
    the grouping needs. Idempotent. Raises ValueError when the query heads do not divide over n
    devices: no layout exists then."""
    n = len(devices)
    if config.num_heads % n:
        raise ValueError(f"tensor_parallel over {n} devices needs num_heads ({config.num_heads}) divisible by "
                         f"{n}: query heads are split over the devices (num_kv_heads, here "
                         f"{config.num_kv_heads}, needs no condition: KV heads are copied where devices share them)")
    return config.replace(mesh=Mesh(np.array(devices), (AXIS,)))


def _copy_kv_heads(a: np.ndarray, config: ModelConfig) -> np.ndarray:
    """A key/value projection's weight, bias or scale (heads on the last axis) with each of the
    `num_kv_heads` head blocks repeated `kv_head_copies` times (copies adjacent). An array that
    already holds the stored heads (a host copy of placed weights) is returned as it is."""
    if a.shape[-1] == config.stored_kv_heads * config.head_dim:
        return a
    blocks = np.split(a, config.num_kv_heads, axis=-1)
    return np.concatenate([b for b in blocks for _ in range(config.kv_head_copies)], axis=-1)


def _pad_axis(a: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    """Zero-pads `axis` up to a multiple of `multiple`."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return np.pad(a, widths)


def layout_layer(layer: dict, config: ModelConfig, n: int) -> dict:
    """One layer's host arrays in the tensor-parallel layout of `config` over n devices: KV heads
    copied (`_copy_kv_heads`), the MLP width zero-padded to a multiple of n (zero gate/up columns
    and zero down rows add exactly nothing to the output)."""
    out = {}
    for module, kinds in layer.items():
        out[module] = {}
        for kind, a in kinds.items():
            a = np.asarray(a)
            if module in ("k", "v"):
                a = _copy_kv_heads(a, config)
            elif module in ("gate", "up"):
                a = _pad_axis(a, a.ndim - 1, n)
            elif module == "down" and kind == "weight":
                a = _pad_axis(a, 0, n)
            out[module][kind] = a
    return out


def _layer_spec(module: str, kind: str) -> P:
    """PartitionSpec of a layer tensor (weights are [in, out])."""
    if module in COLUMN_PARALLEL:
        return P(None, AXIS) if kind == "weight" else P(AXIS)
    if module in ROW_PARALLEL and kind == "weight":
        return P(AXIS, None)
    return P()


def _top_spec(module: str, kind: str, config: ModelConfig, n: int) -> P:
    """PartitionSpec of a tensor outside the layers. The embedding [V, D] and the untied head
    [D, V] split on the hidden axis D (when it divides): a vocabulary slice (scoring reads the head
    in blocks) stays local, and each device's partial logits are summed across devices. Norms,
    positions, biases and scales are replicated."""
    if kind != "weight" or config.hidden_size % n:
        return P()
    if module == "embed":
        return P(None, AXIS)
    if module == "lm_head":
        return P(AXIS, None)
    return P()


def shard_tensor_parallel(params: dict, config: ModelConfig, devices: List[jax.Device]) -> Replica:
    """Host params -> one replica sharded over a Mesh of `devices` with one "model" axis (see
    `tensor_parallel_layout`, `layout_layer`, `_layer_spec`, `_top_spec`). The Generator must run
    it with `tensor_parallel_layout(config, devices)`."""
    n = len(devices)
    layout = tensor_parallel_layout(config, devices)
    mesh = layout.mesh

    def put(a, spec: P) -> jax.Array:
        return jax.device_put(a, NamedSharding(mesh, spec))

    sharded = {}
    for module, kinds in params.items():
        if module == "layers":
            sharded["layers"] = [{m: {k: put(a, _layer_spec(m, k)) for k, a in ks.items()}
                                  for m, ks in layout_layer(layer, layout, n).items()} for layer in kinds]
        else:
            sharded[module] = {k: put(a, _top_spec(module, k, layout, n)) for k, a in kinds.items()}
    return Replica("tp:" + ",".join(str(d.id) for d in devices), sharded)


class ReplicaPool:
    """Hands a free replica to each job (each replica serves `per_replica` jobs at once) and
    counts queued and running jobs."""

    def __init__(self, replicas: List[Replica], per_replica: int):
        self.replicas = replicas
        self._free: "queue.Queue[Replica]" = queue.Queue()
        for _ in range(per_replica):
            for r in replicas:
                self._free.put(r)
        self._lock = threading.Lock()
        self.queued = 0
        self.running = 0

    def submitted(self) -> None:
        with self._lock:
            self.queued += 1

    def run(self, fn, *args):
        replica = self._free.get()
        with self._lock:
            self.queued -= 1
            self.running += 1
        try:
            return fn(replica, *args)
        finally:
            with self._lock:
                self.running -= 1
            self._free.put(replica)
