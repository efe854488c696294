"""Validation of `generate_batch` options, done before any work starts (CTranslate2 §2.1, §7)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

from jaxgen.decoding.custom import as_processors
from jaxgen.runtime.stops import check_stop_strings
from jaxgen.vocabulary import Vocabulary


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:  # CTranslate2's unsigned (size_t) parameters reject negative values as a wrong type
        raise TypeError(f"{name} must be a non-negative int, got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    """CTranslate2's bool parameters accept numbers and None (pybind11 conversion), not e.g. strings."""
    if value is not None and not isinstance(value, numbers.Number):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def max_candidates(beam_size: int, patience: float) -> int:
    """Finished hypotheses that end a beam search: CTranslate2's std::round(float(beam_size) *
    patience), i.e. computed in float32 and rounded half away from zero (Python's round() would
    round 0.5 and 4.5 down to even)."""
    import numpy as np

    return int(math.floor(float(np.float32(beam_size) * np.float32(patience)) + 0.5))


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    beam_size: int = 1
    patience: float = 1.0
    num_hypotheses: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    disable_unk: bool = False
    suppress_sequences: Optional[Sequence[Sequence[str]]] = None
    end_token: object = None
    return_end_token: bool = False
    max_length: int = 512
    min_length: int = 0
    static_prompt: Optional[Sequence[str]] = None
    cache_static_prompt: bool = True
    include_prompt_in_result: bool = True
    return_scores: bool = False
    return_logits_vocab: bool = False
    return_alternatives: bool = False
    min_alternative_expansion_prob: float = 0.0
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    callback: Optional[Callable] = None
    random_seed: Optional[int] = None
    logits_processors: Optional[Sequence[Callable]] = None  # jaxgen.decoding.custom
    prompt_lookup_tokens: int = 0  # draft tokens per step of prompt-lookup decoding (0: off)
    stop_strings: object = None  # str or list of str (jaxgen.runtime.stops)

    @property
    def is_sampling(self) -> bool:
        return self.sampling_topk != 1 and self.sampling_temperature != 0


@dataclasses.dataclass(frozen=True)
class ResolvedOptions:
    """Options with token strings resolved to ids."""

    options: GenerationOptions
    end_ids: List[int]
    suppress_ids: List[List[int]]
    unk_id: int  # -1 when disable_unk is off
    static_prompt_ids: List[int]
    stop_strings: Tuple[str, ...] = ()
    # (table [S, P, V], lengths [S]) of the stop strings (jaxgen.runtime.stops.StopTables), set by
    # the Generator; None: no stop strings.
    stop_tables: Optional[tuple] = dataclasses.field(default=None, compare=False)


def validate_options(opts: GenerationOptions, vocabulary: Vocabulary, default_end_ids: List[int]
                     ) -> ResolvedOptions:
    """Checks every option; raises TypeError/ValueError naming the bad one."""
    for name in ("disable_unk", "return_end_token", "cache_static_prompt", "include_prompt_in_result",
                 "return_scores", "return_logits_vocab", "return_alternatives"):
        _flag(name, getattr(opts, name))
    _int("beam_size", opts.beam_size, 1)
    patience = _float("patience", opts.patience)
    if patience <= 0:
        raise ValueError(f"patience must be > 0, got {patience}")
    _int("num_hypotheses", opts.num_hypotheses, 1)
    _float("length_penalty", opts.length_penalty)
    if _float("repetition_penalty", opts.repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {opts.repetition_penalty}")
    _int("no_repeat_ngram_size", opts.no_repeat_ngram_size, 0)
    _int("max_length", opts.max_length, 1)
    _int("min_length", opts.min_length, 0)
    if opts.min_length > opts.max_length:
        raise ValueError(f"min_length ({opts.min_length}) must be <= max_length ({opts.max_length})")
    topk = _int("sampling_topk", opts.sampling_topk, 0)
    if topk > len(vocabulary):
        raise ValueError(f"sampling_topk option ({topk}) is greater than the vocabulary size ({len(vocabulary)})")
    topp = _float("sampling_topp", opts.sampling_topp)
    if not 0 < topp <= 1:
        raise ValueError(f"sampling_topp must be in (0, 1], got {topp}")
    if _float("sampling_temperature", opts.sampling_temperature) < 0:
        raise ValueError(f"sampling_temperature must be >= 0, got {opts.sampling_temperature}")
    if opts.return_alternatives:
        prob = _float("min_alternative_expansion_prob", opts.min_alternative_expansion_prob)
        if not 0 <= prob <= 1:
            raise ValueError(f"min_alternative_expansion_prob must be in [0, 1], got {prob}")
    max_hyps = max_candidates(opts.beam_size, patience)
    if (opts.num_hypotheses > max_hyps and not opts.return_alternatives
            and not (opts.beam_size == 1 and opts.sampling_topk != 1)):
        raise ValueError("The number of hypotheses cannot be greater than beam_size * patience")
    if opts.callback is not None:
        if not callable(opts.callback):
            raise TypeError(f"callback must be callable, got {type(opts.callback).__name__}")
        if opts.beam_size > 1:
            raise ValueError("The callback function is not compatible with beam_size > 1 or prefix_bias_beta > 0")
    if opts.random_seed is not None:
        _int("random_seed", opts.random_seed, 0)
    as_processors(opts.logits_processors)
    stop_strings = check_stop_strings(opts.stop_strings)
    if _int("prompt_lookup_tokens", opts.prompt_lookup_tokens, 0):
        _check_prompt_lookup(opts)

    end_ids = _resolve_end_token(opts.end_token, vocabulary, default_end_ids)
    suppress_ids = _resolve_suppress(opts.suppress_sequences, vocabulary)
    unk_id = -1
    if opts.disable_unk and vocabulary.unk_id is not None:
        unk_id = vocabulary.unk_id
    static_ids: List[int] = []
    if opts.static_prompt is not None:
        sp = opts.static_prompt
        if isinstance(sp, str) or not isinstance(sp, (list, tuple)) or not all(isinstance(t, str) for t in sp):
            raise TypeError("static_prompt must be a list of token strings")
        static_ids = vocabulary.lenient_ids(sp)
    return ResolvedOptions(opts, end_ids, suppress_ids, unk_id, static_ids, stop_strings)


def _check_prompt_lookup(opts: GenerationOptions) -> None:
    """Prompt-lookup decoding is exact greedy search: the options it cannot serve are errors."""
    unsupported = [(opts.beam_size > 1, "beam search (beam_size > 1)"),
                   (opts.is_sampling, "random sampling (sampling_topk != 1)"),
                   (opts.num_hypotheses > 1, "num_hypotheses > 1"),
                   (opts.return_alternatives, "return_alternatives"),
                   (opts.return_logits_vocab, "return_logits_vocab"),
                   (opts.callback is not None, "a callback (or generate_tokens)"),
                   (bool(opts.logits_processors), "logits_processors")]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"prompt_lookup_tokens (greedy speculative decoding) does not support {what}")


def _resolve_end_token(end_token, vocabulary: Vocabulary, default: List[int]) -> List[int]:
    if end_token is None or end_token == "":
        return list(default)
    if isinstance(end_token, str):
        return [vocabulary.id_of(end_token)]
    if isinstance(end_token, (list, tuple)):
        if all(isinstance(t, str) for t in end_token):
            return [vocabulary.id_of(t) for t in end_token]
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in end_token):
            return [int(t) for t in end_token]
    raise TypeError("end_token must be None, a token string, a list of token strings or a list of token ids")


def _resolve_suppress(seqs, vocabulary: Vocabulary) -> List[List[int]]:
    if seqs is None:
        return []
    if isinstance(seqs, str) or not isinstance(seqs, (list, tuple)):
        raise TypeError("suppress_sequences must be a list of token lists")
    out = []
    for seq in seqs:
        if isinstance(seq, str) or not isinstance(seq, (list, tuple)) or not all(isinstance(t, str) for t in seq):
            raise TypeError("suppress_sequences must be a list of lists of token strings")
        if seq:
            out.append([vocabulary.id_of(t) for t in seq])
    return out



def positions_fed(prompt_length: int, opts: GenerationOptions, static_length: int = 0) -> int:
    """The positions one prompt can feed the model in generation: static prompt + prompt + the steps
    max_length allows, less the last token, which is never fed. As CTranslate2 counts max_length
    (§5.2): with include_prompt_in_result=True it counts the prompt but its first token, so a prompt
    shorter than max_length + 1 is extended to that length."""
    if opts.include_prompt_in_result:
        return static_length + max(prompt_length, opts.max_length + 1) - 1
    return static_length + prompt_length + opts.max_length - 1


def check_context(positions: int, context_length: int, what: str) -> None:
    """Raises ValueError when a call would feed the model `positions` positions, more than
    `context_length` (the model's max_position_embeddings, or the Generator's `context_length`).

    `what` names the input, e.g. "start_tokens[0] (40000 tokens) with max_length=512".
    """
    if positions > context_length:
        raise ValueError(
            f"{what} feeds the model {positions} positions, past its context length of {context_length} "
            f"(max_position_embeddings); shorten the input, or pass Generator(..., context_length=N) "
            f"to run past the trained positions on purpose (e.g. with RoPE scaling)")
