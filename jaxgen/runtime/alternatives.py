"""`return_alternatives` (spec §5.11): the most likely tokens at the first unconstrained position,
each completed independently with the configured search.

Two runs of the ordinary machinery: one step (end tokens forbidden) to read the processed
logits after each prompt, then one completion row per kept alternative.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List

import numpy as np

from jaxgen.results import GenerationResult
from jaxgen.runtime.generation import Row, assemble_results
from jaxgen.runtime.options import ResolvedOptions


def generate_alternatives(prompts: List[List[int]], batch_ids: List[int], resolved: ResolvedOptions,
                          min_prompt_len: int, prefix_len: int, run: Callable, vocabulary, bos_id
                          ) -> List[GenerationResult]:
    """run(rows, resolved) -> per row a list of hypotheses ({"ids", "score" or "log_probs"})."""
    opts = resolved.options
    prefilled = 0 if opts.include_prompt_in_result else max(min_prompt_len - 1, 0)
    heads = []
    for prompt, batch_id in zip(prompts, batch_ids):
        remaining = prompt[prefilled:][:opts.max_length + 1]
        heads.append((batch_id, prompt[:prefilled] + remaining, remaining))

    # One step after each prompt, end tokens forbidden, to read the processed logits.
    first_opts = dataclasses.replace(opts, beam_size=1, num_hypotheses=1, sampling_topk=1,
                                     return_logits_vocab=True, callback=None)
    first = dataclasses.replace(resolved, options=first_opts)
    probe_rows = [Row(bid, 0, full, [], rem[1:], 0, 1 if len(rem) - 1 < opts.max_length else 0, 1, 0)
                  for bid, full, rem in heads]
    probes = run(probe_rows, first)

    completion_opts = dataclasses.replace(opts, num_hypotheses=1, return_logits_vocab=False,
                                          return_alternatives=False)
    completion = dataclasses.replace(resolved, options=completion_opts)
    rows: List[Row] = []
    extra: List[float] = []
    for (bid, full, rem), probe in zip(heads, probes):
        row_probe = probe[0]
        if not row_probe["ids"]:  # the prompt already fills max_length: returned as is, once per hypothesis
            for h in range(opts.num_hypotheses):
                rows.append(Row(bid, h, full, rem[1:], rem[1:], 0, 0, 0, 0))
                extra.append(0.0)
            continue
        logits = np.asarray(row_probe["logits"][0], dtype=np.float64)
        log_probs = logits - np.logaddexp.reduce(logits)
        order = np.argsort(-log_probs, kind="stable")[:opts.num_hypotheses]
        start = prefix_len + prefilled + len(rem)  # absolute position after the alternative token
        for token in order.tolist():
            if np.exp(log_probs[token]) < opts.min_alternative_expansion_prob:
                break
            rows.append(Row(bid, len(extra), full + [token], rem[1:] + [token], rem[1:] + [token], 0,
                            max(opts.max_length - start, 0), max(opts.min_length - start, 0), 0))
            extra.append(float(log_probs[token]))
    hyps = run(rows, completion)
    for row_hyps, bonus, row in zip(hyps, extra, rows):
        for h in row_hyps:
            if "score" not in h:
                n = len(h["ids"])
                h["score"] = float(np.sum(h["log_probs"])) / (n ** opts.length_penalty if n else 1.0)
            h["score"] += bonus
    return assemble_results(rows, hyps, resolved, vocabulary, bos_id, batch_ids, sort=False)
