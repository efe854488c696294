"""Weight storage types: int8 weight-only quantization and float casts of flat checkpoints.

Which tensors are quantized, along which axis, and which stay float32 is read from the parameter
table (`jaxgen.model.checkpoint.flat_params`), not from names.
"""

from __future__ import annotations

from typing import Dict, Tuple

import ml_dtypes
import numpy as np

from jaxgen.model.checkpoint import flat_params, scale_name
from jaxgen.model.config import ModelConfig

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def quantize_int8(weight: np.ndarray, reduce_axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: returns (int8 weight, float32 scale).

    A channel is everything but `reduce_axis` (the input axis of a linear weight [in, out] or
    [E, in, out], the hidden axis of the embedding [V, D]); the scale has the weight's shape
    without that axis. Dequantised weight = q * scale. All-zero channels get scale 1.
    """
    w = np.asarray(weight, dtype=np.float32)
    amax = np.abs(w).max(axis=reduce_axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / np.expand_dims(scale, reduce_axis)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, reduce_axis: int) -> np.ndarray:
    return q.astype(np.float32) * np.expand_dims(scale, reduce_axis)


def convert_flat(flat: Dict[str, np.ndarray], config: ModelConfig, target: str) -> Dict[str, np.ndarray]:
    """Converts a flat checkpoint stored as `config.weight_dtype` to the `target` storage type.

    Tensors declared `keep_float32` (norms) stay float32 in every type; other float tensors take
    the target float type (float32 for int8 storage).
    """
    source = config.weight_dtype
    if source == target:
        return dict(flat)
    decls = flat_params(config)
    out: Dict[str, np.ndarray] = {}
    float_target = NUMPY_DTYPES["float32" if target == "int8" else target]
    for name, decl in decls.items():
        array = flat[name]
        if source == "int8" and decl.reduce_axis is not None:
            array = dequantize_int8(array, flat[scale_name(name)], decl.reduce_axis)
        if target == "int8" and decl.reduce_axis is not None:
            out[name], out[scale_name(name)] = quantize_int8(array, decl.reduce_axis)
        elif decl.keep_float32:
            out[name] = np.asarray(array, dtype=np.float32)
        else:
            out[name] = np.asarray(array).astype(float_target)
    return out
