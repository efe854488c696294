"""Result types, with CTranslate2's attribute names."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    sequences: List[List[str]]
    sequences_ids: List[List[int]]
    scores: List[float] = dataclasses.field(default_factory=list)
    logits: List[List[Any]] = dataclasses.field(default_factory=list)
    # An extension: with a `constraint` (jaxgen.constraints), one flag per hypothesis: True when its
    # text completes the constraint, False when it was cut before (max_length, a stop string, a
    # callback's stop). Empty for a prompt without a constraint.
    constraint_complete: List[bool] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class GenerationStepResult:
    step: int
    batch_id: int
    token_id: int
    hypothesis_id: int
    token: str
    log_prob: Optional[float]
    is_last: bool
    logits: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class ScoringResult:
    tokens: List[str]
    log_probs: List[float]
    greedy: List[bool] = dataclasses.field(default_factory=list)  # with score_batch(return_greedy=True)
