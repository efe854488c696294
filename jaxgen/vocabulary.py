"""Token strings <-> ids, and validation of the token lists users pass in."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


class Vocabulary:
    """Token list of a model (index = id). Lookups map a token to its first id."""

    def __init__(self, tokens: List[str], unk_token: Optional[str]):
        self.tokens = list(tokens)
        # Built from the last id down, so that a repeated token keeps its first id (C-speed for 262K tokens).
        self._ids: Dict[str, int] = dict(zip(reversed(self.tokens), range(len(self.tokens) - 1, -1, -1)))
        self.unk_id = self._ids.get(unk_token) if unk_token is not None else None

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id_of(self, token: str) -> int:
        """Strict lookup: ValueError for a token outside the vocabulary."""
        if token not in self._ids:
            raise ValueError(f"Token {token} is not in the vocabulary")
        return self._ids[token]

    def lenient_ids(self, tokens: Sequence[str]) -> List[int]:
        """Unknown tokens map to the unk id (or raise if the model has none)."""
        out = []
        for token in tokens:
            i = self._ids.get(token, self.unk_id)
            if i is None:
                raise ValueError(f"Token {token!r} is not in the vocabulary and the model has no unk_token")
            out.append(i)
        return out

    def to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.tokens[i] for i in ids]


def as_id_batch(batch, vocabulary: Vocabulary, what: str, allow_ids: bool) -> List[List[int]]:
    """Validates a batch of token sequences (lists of str, or of int when `allow_ids`) -> ids.

    Raises TypeError for a wrong container or element type, ValueError for ids out of range.
    Empty sequences are returned as empty lists (the caller decides whether they are allowed).
    """
    if isinstance(batch, (str, bytes)) or not isinstance(batch, (list, tuple)):
        raise TypeError(f"{what} must be a list of token lists, got {type(batch).__name__}")
    return [as_ids(seq, vocabulary, f"{what}[{index}]", allow_ids) for index, seq in enumerate(batch)]


def as_ids(seq, vocabulary: Vocabulary, what: str, allow_ids: bool) -> List[int]:
    """One token sequence (list of str, or of int when `allow_ids`) -> ids; errors name `what`."""
    if isinstance(seq, np.ndarray):
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)):
        raise TypeError(f"{what} must be a list of tokens, got {type(seq).__name__}")
    if all(isinstance(t, str) for t in seq):
        return vocabulary.lenient_ids(seq)
    if allow_ids and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in seq):
        ids = [int(t) for t in seq]
        bad = [i for i in ids if not 0 <= i < len(vocabulary)]
        if bad:
            raise ValueError(f"{what} has token id {bad[0]} out of range [0, {len(vocabulary)})")
        return ids
    kinds = sorted({type(t).__name__ for t in seq})
    expected = "all str or all int" if allow_ids else "all str"
    raise TypeError(f"{what} must contain tokens that are {expected}, got {kinds}")
