"""Loads a model directory into device arrays with a requested compute type."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import jax.numpy as jnp
import numpy as np

from jaxgen.model.checkpoint import flat_params, load_model_dir, nest_params
from jaxgen.model.config import ModelConfig
from jaxgen.model.quantization import convert_flat

COMPUTE_TYPES = ("default", "auto", "float32", "float", "float16", "bfloat16", "int8", "int8_float32",
                 "int8_float16", "int8_bfloat16")
JNP_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ComputeType:
    """How weights are stored on device and which float type activations use."""

    weights: str  # "float32" | "float16" | "bfloat16" | "int8"
    activations: str  # "float32" | "float16" | "bfloat16"

    @property
    def name(self) -> str:
        if self.weights == "int8":
            return f"int8_{self.activations}"
        return self.activations

    @property
    def dtype(self):
        return JNP_DTYPES[self.activations]


def resolve_compute_type(requested: str, saved: str, platform: str, config=None) -> ComputeType:
    """CTranslate2's compute-type names -> ComputeType, given the saved weight type.

    `default` keeps the saved type (unlike CTranslate2 on CPU, bfloat16/float16 are not promoted
    to float32: XLA runs them). `auto` picks int8 weights with bfloat16 activations on
    accelerators; on CPU int8 weights with float32 activations where this CPU's int8 products beat
    its float32 ones for the model `config` (measured once per CPU: `cpu_kernels.int8_pays`),
    else float32 (without a config: int8).
    """
    if not isinstance(requested, str):
        raise TypeError(f"compute_type must be a str, got {type(requested).__name__}")
    name = requested.lower()
    if name not in COMPUTE_TYPES:
        raise ValueError(f"unsupported compute type {requested!r}; expected one of {', '.join(COMPUTE_TYPES)}")
    saved_float = "float32" if saved == "int8" else saved
    if name == "default":
        return ComputeType(saved, saved_float)
    if name == "auto":
        if platform != "cpu":
            return ComputeType("int8", "bfloat16")
        from jaxgen.model.cpu_kernels import int8_pays

        return ComputeType("int8", "float32") if config is None or int8_pays(config) else ComputeType(
            "float32", "float32")
    if name == "float":
        name = "float32"
    if name == "int8":
        return ComputeType("int8", saved_float)
    if name.startswith("int8_"):
        return ComputeType("int8", name[len("int8_"):])
    return ComputeType(name, name)


def load_params(model_dir: str, compute_type: str = "default", platform: str = "cpu"
                ) -> Tuple[ModelConfig, Dict, List[str], ComputeType]:
    """Reads a model directory -> (config, numpy params pytree, vocabulary, compute type).

    The params are converted to the compute type's weight storage (norms stay float32) and
    stacked per layer; put them on devices with `jax.device_put`.
    """
    config, flat, vocabulary = load_model_dir(model_dir)
    ctype = resolve_compute_type(compute_type, config.weight_dtype, platform, config)
    flat = convert_flat(flat, config, ctype.weights)
    if ctype.weights == "int8" and ctype.activations != "float32":
        # int8 storage keeps float32 non-quantized tensors; cast them to the activation type.
        act = np.dtype(jnp.dtype(ctype.dtype))
        decls = flat_params(config)
        flat = {k: (v.astype(act) if k in decls and v.dtype != np.int8 and not decls[k].keep_float32 else v)
                for k, v in flat.items()}
    config = config.replace(weight_dtype=ctype.weights)
    return config, nest_params(flat, config), vocabulary, ctype

