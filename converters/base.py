"""What every converter shares: output-directory handling, quantization on write, atomic rename."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from jaxgen.model.checkpoint import save_model_dir
from jaxgen.model.config import ModelConfig
from jaxgen.model.quantization import convert_flat

QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8")


@dataclasses.dataclass
class ConvertedModel:
    """What a converter's `load()` returns: float weights under canonical names (see checkpoint.py)."""

    config: ModelConfig  # weight_dtype describes `flat`'s float type
    flat: Dict[str, np.ndarray]
    vocabulary: List[str]
    tokenizer_files: List[Tuple[str, bytes]] = dataclasses.field(default_factory=list)
    extra_json: Dict[str, dict] = dataclasses.field(default_factory=dict)


class Converter:
    """Base class. Subclasses implement `load()`; `convert()` writes the model directory."""

    def load(self) -> ConvertedModel:  # pragma: no cover - abstract
        raise NotImplementedError

    def convert(self, output_dir: str, quantization: Optional[str] = None, force: bool = False) -> str:
        """Converts the checkpoint into `output_dir` and returns it.

        quantization: None keeps the checkpoint's float type; else one of QUANTIZATIONS
        (also accepted: CTranslate2's `int8_float32`, `int8_float16`, `int8_bfloat16` -> int8).
        The directory is written under a temporary name and renamed into place, so a reader never
        sees a half-written model.
        """
        if quantization is not None:
            if not isinstance(quantization, str):
                raise TypeError(f"quantization must be a str or None, got {type(quantization).__name__}")
            if quantization.startswith("int8_"):
                quantization = "int8"
            if quantization not in QUANTIZATIONS:
                raise ValueError(f"unsupported quantization {quantization!r}; expected one of {QUANTIZATIONS}")
        output_dir = os.path.abspath(os.fspath(output_dir))
        if os.path.exists(output_dir) and not force:
            raise RuntimeError(f"output directory {output_dir} already exists, use force=True to override")
        model = self.load()
        target = quantization or model.config.weight_dtype
        flat = convert_flat(model.flat, model.config, target)
        config = model.config.replace(weight_dtype=target)
        parent = os.path.dirname(output_dir) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".jaxgen-convert-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is an ordinary one
        try:
            save_model_dir(tmp, config, flat, model.vocabulary, model.tokenizer_files, model.extra_json)
            if os.path.exists(output_dir):
                shutil.rmtree(output_dir)
            os.rename(tmp, output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return output_dir
