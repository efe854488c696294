"""score_batch's work on one device: per-token log-likelihoods of sequences, with shared prefixes
computed once.

Without sharing, the rows run one full chunked pass (`jaxgen.decoding.scoring.target_log_probs`).
With prefix passes (`jaxgen.runtime.prefix_passes`), each row with a shared or cached prefix of
E tokens of its inputs (the sequence less its last token) starts from that prefix's state and
runs from position E - 1 on (that token is fed again, so that the log-probability of token E is
computed with the row's own next token); rows without one run the unshared pass. A prefix state
holds the log-probabilities of its own tokens when some row needs them (a row's `offset` below
E - 1); otherwise it is a plain prefill, without the vocabulary head. Results equal the unshared
pass's within float rounding.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from jaxgen.decoding.scoring import score_width, target_log_probs
from jaxgen.model.decoder import PassPlan
from jaxgen.runtime.devices import on_device
from jaxgen.runtime.batching import bucket
from jaxgen.runtime.prefix_passes import PrefixPasses


def truncate_for_scoring(ids: List[int], max_input_length: int, eos_ids: Sequence[int]) -> List[int]:
    """CTranslate2's truncation: keep the first ids, but keep a final EOS as the last element."""
    if max_input_length <= 0 or len(ids) <= max_input_length or len(ids) < 2:
        return ids
    out = ids[:max_input_length]
    if ids[-1] in eos_ids:
        out[-1] = ids[-1]
    return out


def pad_rows(seqs: List[List[int]], lens: List[int], t: int, b: int) -> Tuple[jax.Array, jax.Array]:
    """Right-padded int32 [b, t] rows and their lengths [b] (padding rows: one dummy token)."""
    arr = np.zeros((b, t), np.int32)
    for i, s in enumerate(seqs):
        arr[i, :len(s)] = s
    lengths = np.zeros((b,), np.int32)
    lengths[:len(lens)] = lens
    lengths[len(lens):] = 1
    return on_device(arr), on_device(lengths)


class Scorer:
    """Scores rows on one replica (see the module docstring). passes: the Generator's prefix
    passes (None: every row runs the unshared pass)."""

    def __init__(self, config, plan: PassPlan, dtype, passes: Optional[PrefixPasses]):
        self.config = config
        self.plan = plan
        self.dtype = dtype
        self.passes = passes

    # ------------------------------------------------------------------ entry point
    def score(self, replica, seqs: List[List[int]], greedy: bool = False,
              offsets: Optional[List[int]] = None) -> List[Tuple[list, list]]:
        """Per sequence (>= 2 tokens): (log-probs of its tokens but the first, and with `greedy`
        whether each is the most likely token there, else []). offsets[i]: the first offsets[i]
        values are not used by the caller (they may be NaN when a prefix state lacks them)."""
        offsets = [0] * len(seqs) if offsets is None else offsets
        if self.passes is None:
            return self._plain(replica, seqs, greedy)
        inputs = [s[:-1] for s in seqs]
        chosen, needed = self.passes.choose(replica.name, inputs, offsets)
        made = self.passes.make(replica, list(needed.values()))
        rows = [i for i, c in enumerate(chosen) if c is not None]
        out: List[Optional[Tuple[list, list]]] = [None] * len(seqs)
        plain = [i for i, c in enumerate(chosen) if c is None]
        if plain:
            for i, r in zip(plain, self._plain(replica, [seqs[i] for i in plain], greedy)):
                out[i] = r
        if rows:
            entries = [chosen[i][1] or made[tuple(inputs[i][:chosen[i][0]])] for i in rows]
            starts = [e.length - 1 for e in entries]
            tokens = [inputs[i][s:] for i, s in zip(rows, starts)]
            targets = [seqs[i][s + 1:] for i, s in zip(rows, starts)]
            # The head runs only where the row's offset asks for log-probs.
            score_from = [min(max(offsets[i] - s, 0), len(x) - 1) for i, s, x in zip(rows, starts, tokens)]
            log_probs, flags, _ = self.passes.extend(replica, entries, starts, tokens, targets, greedy, True,
                                                     score_from=score_from)
            for j, (i, e) in enumerate(zip(rows, entries)):
                n = len(tokens[j])
                head = (e.log_probs[:e.length - 1] if e.has_scores
                        else np.full((e.length - 1,), np.nan, np.float32))
                lp = np.concatenate([head, log_probs[j, :n]]).astype(np.float32).tolist()
                if greedy:
                    head_flags = e.greedy[:e.length - 1] if e.has_scores else np.zeros((e.length - 1,), bool)
                    fl = np.concatenate([head_flags, flags[j, :n]]).tolist()
                else:
                    fl = []
                out[i] = (lp, fl)
        return out

    def _plain(self, replica, seqs: List[List[int]], greedy: bool) -> List[Tuple[list, list]]:
        """The unshared pass over whole sequences."""
        inputs = [s[:-1] for s in seqs]
        targets = [s[1:] for s in seqs]
        lens = [len(s) for s in inputs]
        t = score_width(max(lens), self.plan.chunk)
        b = bucket(len(seqs), minimum=1)
        inp, lengths = pad_rows(inputs, lens, t, b)
        tgt, _ = pad_rows(targets, lens, t, b)
        out = target_log_probs(replica.params, inp, tgt, lengths, config=self.config, dtype=self.dtype,
                               chunk=self.plan.chunk, impl=self.plan.impl, **({"greedy": True} if greedy else {}))
        out, flags = (np.asarray(out[0]), np.asarray(out[1])) if greedy else (np.asarray(out), None)
        return [(out[i, :n].astype(np.float32).tolist(), flags[i, :n].tolist() if greedy else [])
                for i, n in enumerate(lens)]
