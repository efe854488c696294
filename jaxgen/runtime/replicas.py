"""Model replicas on devices, and the pool that hands them to jobs.

A list of devices without tensor parallelism gives one replica per device (its own weights and
its own static-prompt cache). With tensor parallelism there is one replica whose weights are
sharded over a Mesh with a "model" axis (jit + NamedSharding; XLA inserts the collectives):

- query heads, their q / o projections and q-norm: split over the devices (num_heads % n == 0);
- key/value heads and their KV cache: split when num_kv_heads divides by n, else each KV head is
  copied to the devices whose query heads read it (`ModelConfig.kv_head_copies`);
- activations between layers (the residual stream): replicated (the decoder pins them with
  `with_sharding_constraint` on `ModelConfig.mesh`), so each layer costs two all-reduces;
- MLP: gate/up columns and down rows split, the width zero-padded to a multiple of n; experts
  likewise, each expert's width split (every device holds a slice of every expert);
- embedding and untied vocabulary projection: split on the hidden axis;
- norms, biases of row-split layers, learned positions: replicated.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Dict, List

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.model.checkpoint import KV_HEADS, MLP, Q_HEADS, TABLE, ParamDecl, layer_params, top_params
from jaxgen.model.config import ModelConfig

AXIS = "model"
# Logical axes (jaxgen.model.checkpoint) split over the devices inside layers: attention heads and
# the MLP width (for experts, each expert's width: every device holds a slice of every expert and
# routes every token, so routing needs no communication).
LAYER_SHARDED_AXES = (Q_HEADS, KV_HEADS, MLP)


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


def _copy_kv_heads(a: np.ndarray, axis: int, config: ModelConfig, layer: int) -> np.ndarray:
    """A tensor of layer `layer` with key/value heads on `axis` with each of its KV head blocks
    repeated as the layout needs (`ModelConfig.layer_stored_kv_heads`; copies adjacent). An array
    that already holds the stored heads (a host copy of placed weights) is returned as it is."""
    kv, stored = config.layer_kv_heads(layer), config.layer_stored_kv_heads(layer)
    if a.shape[axis] == stored * config.layer_head_dim(layer):
        return a
    blocks = np.split(a, kv, axis=axis)
    return np.concatenate([b for b in blocks for _ in range(stored // kv)], axis=axis)


def _pad_axis(a: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    """Zero-pads `axis` up to a multiple of `multiple`."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return np.pad(a, widths)


def _decl_axes(decls: Dict[str, Dict[str, ParamDecl]], module: str, kind: str) -> tuple:
    """Logical axes of a tensor: its declaration's, or for an int8 scale its weight's without the
    reduced axis."""
    if kind == "weight_scale":
        decl = decls[module]["weight"]
        return tuple(a for i, a in enumerate(decl.axes) if i != decl.reduce_axis)
    return decls[module][kind].axes


def layout_layer(layer: dict, config: ModelConfig, n: int, index: int) -> dict:
    """Layer `index`'s host arrays in the tensor-parallel layout of `config` over n devices, by
    the logical axes of the parameter table: key/value head axes copied (`_copy_kv_heads`), MLP
    (and expert MLP) width axes zero-padded to a multiple of n (zero gate/up columns and zero down
    rows add exactly nothing to the output)."""
    decls = layer_params(config, index)
    out = {}
    for module, kinds in layer.items():
        out[module] = {}
        for kind, a in kinds.items():
            axes = _decl_axes(decls, module, kind)
            if isinstance(a, list):  # experts: one array each (checkpoint.nest_params)
                out[module][kind] = [_layout_tensor(np.asarray(x), axes[1:], config, n, index) for x in a]
            else:
                out[module][kind] = _layout_tensor(np.asarray(a), axes, config, n, index)
    return out


def _layout_tensor(a: np.ndarray, axes: tuple, config: ModelConfig, n: int, layer: int) -> np.ndarray:
    for axis, name in enumerate(axes):
        if name == KV_HEADS:
            a = _copy_kv_heads(a, axis, config, layer)
        elif name == MLP:
            a = _pad_axis(a, axis, n)
    return a


def _spec(axes: tuple, sharded: tuple) -> P:
    """PartitionSpec splitting the first of `axes` that is in `sharded` over the model axis."""
    for i, name in enumerate(axes):
        if name in sharded:
            return P(*([None] * i + [AXIS]))
    return P()


def _table_axes(config: ModelConfig, n: int) -> tuple:
    """Sharded logical axes outside the layers. The embedding [V, D] and the untied head [D, V]
    split on the hidden ("table") axis when it divides: a vocabulary slice (scoring reads the head
    in blocks) stays local, and each device's partial logits are summed across devices."""
    return (TABLE,) if config.embedding_width % n == 0 else ()


def shard_tensor_parallel(params: dict, config: ModelConfig, devices: List[jax.Device]) -> Replica:
    """Host params -> one replica sharded over a Mesh of `devices` with one "model" axis (see
    `tensor_parallel_layout`, `layout_layer`, LAYER_SHARDED_AXES, `_table_axes`). The Generator must run
    it with `tensor_parallel_layout(config, devices)`."""
    n = len(devices)
    layout = tensor_parallel_layout(config, devices)
    mesh = layout.mesh

    def put(a, spec: P) -> jax.Array:
        # a host array: in a multi-process run each process places its own shards of it (a jax
        # array already on a local device cannot be put on a mesh that spans other processes)
        return jax.device_put(np.asarray(a), NamedSharding(mesh, spec))

    top = top_params(config)
    sharded = {}
    for module, kinds in params.items():
        if module == "layers":
            sharded["layers"] = []
            for index, layer in enumerate(kinds):
                decls = layer_params(layout, index)
                layer_out = {}
                for m, ks in layout_layer(layer, layout, n, index).items():
                    layer_out[m] = {}
                    for k, a in ks.items():
                        axes = _decl_axes(decls, m, k)
                        if isinstance(a, list):  # experts: the spec of one expert's array
                            layer_out[m][k] = [put(x, _spec(axes[1:], LAYER_SHARDED_AXES)) for x in a]
                        else:
                            layer_out[m][k] = put(a, _spec(axes, LAYER_SHARDED_AXES))
                sharded["layers"].append(layer_out)
        else:
            sharded[module] = {k: put(a, _spec(_decl_axes(top, module, k), _table_axes(layout, n)))
                               for k, a in kinds.items()}
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
