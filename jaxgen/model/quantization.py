"""Weight storage types: int8 weight-only quantization and float casts of flat checkpoints."""

from __future__ import annotations

from typing import Dict, Tuple

import ml_dtypes
import numpy as np

from jaxgen.model.checkpoint import is_quantizable

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def quantize_int8(weight: np.ndarray, module: str) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: returns (int8 weight, float32 scale).

    The output channel is the last axis for [in, out] linear weights and the first (vocabulary)
    axis for the embedding. Dequantised weight = q * scale. All-zero channels get scale 1.
    """
    w = np.asarray(weight, dtype=np.float32)
    reduce_axis = 1 if module == "embed" else 0
    amax = np.abs(w).max(axis=reduce_axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    scale_b = scale[:, None] if module == "embed" else scale[None, :]
    q = np.clip(np.rint(w / scale_b), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, module: str) -> np.ndarray:
    scale_b = scale[:, None] if module == "embed" else scale[None, :]
    return q.astype(np.float32) * scale_b


def _module_of(name: str) -> Tuple[str, str]:
    parts = name.split(".")
    return parts[-2], parts[-1]


def convert_flat(flat: Dict[str, np.ndarray], source: str, target: str) -> Dict[str, np.ndarray]:
    """Converts a flat checkpoint between weight storage types.

    Norm weights stay float32 in every type (they are tiny and precision-sensitive); other float
    tensors take the target float type (float32 for int8 storage).
    """
    if source == target:
        return dict(flat)
    out: Dict[str, np.ndarray] = {}
    float_target = NUMPY_DTYPES["float32" if target == "int8" else target]
    for name, array in flat.items():
        module, kind = _module_of(name)
        if kind == "weight_scale":
            continue
        if source == "int8" and is_quantizable(module, kind):
            array = dequantize_int8(array, flat[name + "_scale"], module)
        if target == "int8" and is_quantizable(module, kind):
            out[name], out[name + "_scale"] = quantize_int8(array, module)
        elif module.endswith("norm"):
            out[name] = np.asarray(array, dtype=np.float32)
        else:
            out[name] = np.asarray(array).astype(float_target)
    return out
