"""Static sub-batches, as CTranslate2 runs them: one job per sub-batch, spread over the replicas,
run by a thread pool; results (or per-example futures) in input order. Also the generation job
of one sub-batch (`generate_group`), for the calls that do not run on the slot scheduler."""

from __future__ import annotations

import concurrent.futures
from typing import Callable, List, Optional

import jax

from jaxgen.runtime.alternatives import generate_alternatives
from jaxgen.runtime.batching import BATCH_TYPES
from jaxgen.runtime.generation import assemble_results, plan_rows, run_beam, run_lookup_rows, run_rows


def check_batch_options(max_batch_size, batch_type) -> None:
    """TypeError/ValueError for a bad max_batch_size or batch_type (types as CTranslate2 checks them)."""
    # Wrong types (and negative sizes, unsigned in CTranslate2) are TypeErrors, as in CTranslate2.
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise TypeError(f"max_batch_size must be an int >= 0, got {max_batch_size!r}")
    if not isinstance(batch_type, str):
        raise TypeError(f"batch_type must be a str, got {type(batch_type).__name__}")
    if batch_type not in BATCH_TYPES:
        raise ValueError(f"Invalid batch type: {batch_type}")


class StaticBatches:
    """Runs sub-batch jobs on a `ReplicaPool` through an executor."""

    def __init__(self, pool, executor: concurrent.futures.Executor):
        self.pool = pool
        self.executor = executor

    def spread(self, groups: List[List[int]]) -> List[List[int]]:
        """With several replicas and fewer sub-batches than replicas, splits the sub-batches so
        that every replica gets work (data parallelism)."""
        n = len(self.pool.replicas)
        if n == 1 or len(groups) >= n:
            return groups
        out: List[List[int]] = []
        for g in groups:
            parts = min(n // len(groups), len(g)) or 1
            out.extend(g[i::parts] for i in range(parts))
        return out

    def run(self, groups: List[List[int]], job: Callable, n: int, asynchronous: bool):
        """Runs job(replica, group_index, group) per sub-batch; returns per-example results (or
        futures) in input order."""
        futures = []
        for gi, g in enumerate(groups):
            self.pool.submitted()
            futures.append(self.executor.submit(self.pool.run, job, gi, g))
        index = {}
        for gi, g in enumerate(groups):
            for j, i in enumerate(g):
                index[i] = (gi, j)
        if asynchronous:
            return [ExampleFuture(futures[index[i][0]], index[i][1]) for i in range(n)]
        outputs = [f.result() for f in futures]
        return [outputs[index[i][0]][index[i][1]] for i in range(n)]


class ExampleFuture:
    """One example's result inside a sub-batch job (CTranslate2's AsyncGenerationResult)."""

    def __init__(self, future: concurrent.futures.Future, position: int):
        self._future = future
        self._position = position

    def result(self):
        return self._future.result()[self._position]

    def done(self) -> bool:
        return self._future.done()


def generate_group(replica, config, plan, vocabulary, bos_id, static_prompts, prompts: List[List[int]],
                   batch_ids: List[int], resolved, seed: int, group_index: int, min_prompt_len: int,
                   constraints: Optional[list] = None):
    """Generation results of one static sub-batch on `replica` (greedy/sampling, prompt lookup,
    beam search, alternatives). static_prompts: `jaxgen.runtime.prefix_cache.StaticPrompts`;
    constraints: the prompts' compiled constraints (None entries: free rows; None: every row free)."""
    prefix, prefix_len = static_prompts(replica, resolved)
    share = static_prompts.sharing(replica, resolved, prefix)
    runs = iter(range(1 << 30))

    def run(rows, res):
        if res.options.beam_size > 1:
            # One key per sub-batch and run (a fresh buffer: the loop state donates it).
            run_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), group_index), next(runs))
            return run_beam(replica.params, config, rows, res, prefix, prefix_len, run_key, plan, share)
        if res.options.prompt_lookup_tokens:
            decoded = run_lookup_rows(replica.params, config, rows, res, prefix, prefix_len, plan, share)
        else:
            decoded = run_rows(replica.params, config, rows, res, prefix, prefix_len, seed, vocabulary,
                               res.options.callback, plan, share)
        return [[d] for d in decoded]

    if resolved.options.return_alternatives:
        return generate_alternatives(prompts, batch_ids, resolved, min_prompt_len, prefix_len, run, vocabulary,
                                     bos_id)
    rows = plan_rows(prompts, batch_ids, resolved, min_prompt_len, constraints)
    return assemble_results(rows, run(rows, resolved), resolved, vocabulary, bos_id, batch_ids)
