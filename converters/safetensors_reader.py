"""Reads tensors of safetensors files as numpy arrays, without a framework.

Parses the safetensors header itself (8-byte little-endian length, JSON header, raw data) and
memory-maps the data, so that bfloat16 stays bfloat16 (ml_dtypes) and nothing is copied until a
tensor is used.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict, List, Tuple

import ml_dtypes
import numpy as np

from jaxgen.model.config import read_json_file


_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class SafetensorsReader:
    """Reads tensors of one or several safetensors files as numpy arrays (bfloat16 included).

    Parses the safetensors header itself (8-byte little-endian length, JSON header, raw data) and
    memory-maps the data, so that no framework is needed and bf16 stays bf16 (ml_dtypes).
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = read_json_file(index_path).get("weight_map", {})
            files = sorted({os.path.join(directory, f) for f in weight_map.values()})
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            bins = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.pt"))
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if bins else ""
            raise ValueError(f"{directory} has no *.safetensors weights{hint}")
        self._entries: Dict[str, Tuple[np.memmap, dict, int]] = {}
        self._maps: List[np.memmap] = []
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"safetensors file {path} (named in the index) does not exist")
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError(f"{path} is not a safetensors file")
                (length,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ValueError(f"{path} is not a safetensors file (bad header)") from None
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps.append(mm)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._entries[name] = (mm, info, 8 + length)

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        return self._dtype_of(self._entries[name][1]["dtype"], name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    @staticmethod
    def _dtype_of(code: str, name: str) -> np.dtype:
        if code not in _ST_DTYPES:
            raise ValueError(f"tensor {name} has unsupported safetensors dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        mm, info, base = self._entries[name]
        dtype = self._dtype_of(info["dtype"], name)
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name} has {end - begin} bytes for shape {shape} and dtype {dtype}")
        return mm[base + begin: base + end].view(dtype).reshape(shape)

    def close(self) -> None:
        self._maps.clear()
        self._entries.clear()
