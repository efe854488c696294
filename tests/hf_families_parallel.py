"""Tiny random HF checkpoints of GPT-NeoX, StableLM, GPT-J, CodeGen, Phi-2, StarCoder2, GPTBigCode (parallel residual blocks, partial and interleaved rotary, fused and multi-query projections).

Each builder returns (model class, config) like those of hf_models.py, small enough (hidden 64,
2-3 layers, a few hundred tokens) to run in a second, with every option of the family that the
converter maps set to a value that matters on 12-token sequences.
"""

from __future__ import annotations

from typing import Callable, Dict

BUILDERS: Dict[str, Callable] = {}
EXPECTED_CONFIG: Dict[str, dict] = {}
