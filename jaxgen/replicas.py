"""Model replicas on devices, and the pool that hands them to jobs.

A list of devices without tensor parallelism gives one replica per device (its own weights and
its own static-prompt cache). With tensor parallelism there is one replica whose weights are
sharded over a Mesh with a "model" axis (jit + NamedSharding; XLA inserts the collectives).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import List

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.model.config import ModelConfig

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # split on the output axis
ROW_PARALLEL = ("o", "down")  # split on the input axis


@dataclasses.dataclass
class Replica:
    name: str  # key of its static-prompt cache entries
    params: dict


def replicate(params: dict, devices: List[jax.Device]) -> List[Replica]:
    return [Replica(f"{d.platform}:{d.id}", jax.device_put(params, d)) for d in devices]


def check_tensor_parallel(config: ModelConfig, n: int) -> None:
    for name, value in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % n:
            raise ValueError(f"tensor_parallel over {n} devices needs {name} ({value}) divisible by {n}")


def _layer_spec(module: str, kind: str) -> P:
    """PartitionSpec of a layer tensor (weights are [in, out])."""
    if module in COLUMN_PARALLEL:
        return P(None, "model") if kind == "weight" else P("model")
    if module in ROW_PARALLEL and kind == "weight":
        return P("model", None)
    return P()


def shard_tensor_parallel(params: dict, config: ModelConfig, devices: List[jax.Device]) -> Replica:
    check_tensor_parallel(config, len(devices))
    mesh = Mesh(np.array(devices), ("model",))
    sharded = {}
    for module, kinds in params.items():
        if module == "layers":
            sharded["layers"] = [{m: {k: jax.device_put(a, NamedSharding(mesh, _layer_spec(m, k)))
                                      for k, a in ks.items()} for m, ks in layer.items()} for layer in kinds]
        else:
            sharded[module] = {k: jax.device_put(a, NamedSharding(mesh, P())) for k, a in kinds.items()}
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
