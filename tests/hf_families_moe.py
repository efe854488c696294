"""Tiny random HF checkpoints of Mixtral, Qwen2-MoE, Qwen3-MoE (mixtures of experts) and OLMo 2, Granite, SmolLM3.

Each builder returns (model class, config) like those of hf_models.py, small enough (hidden 64,
2-3 layers, a few hundred tokens) to run in a second, with every option of the family that the
converter maps set to a value that matters on 12-token sequences.
"""

from __future__ import annotations

from typing import Callable, Dict

BUILDERS: Dict[str, Callable] = {}
EXPECTED_CONFIG: Dict[str, dict] = {}
