"""Host side of one generation job (one sub-batch on one device): build the loop inputs from the
prompts and options, run prefill and the jitted loop, assemble CTranslate2-shaped results.

Layout (differs from CTranslate2's force-decoding, same results): every prompt but its last token
is prefilled in one right-padded pass after the static prompt; the loop starts from each prompt's
last token at its own position. Length limits, the end-token ban and the penalty history are set
per row so that they count exactly what CTranslate2 counts (spec §5.1-§5.3).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decoding.beam import BeamConsts, BeamSpec, BeamState, beam_decode, expand_beams
from jaxgen.decoding.custom import as_processors
from jaxgen.decoding.processors import ProcessorOptions, init_history
from jaxgen.decoding.sampling import SamplingOptions, candidate_count, row_keys
from jaxgen.decoding.search import (DecodeConsts, DecodeState, LoopSpec, decode, live_length, prefill, set_done,
                                    start_cache)
from jaxgen.decoding.speculative import LookupSpec, LookupState, lookup_decode, max_draft
from jaxgen.decoding.stops import StopStrings
from jaxgen.executables import cached_jit
from jaxgen.model.decoder import KVCache, PassPlan
from jaxgen.results import GenerationResult, GenerationStepResult
from jaxgen.runtime import matchers
from jaxgen.runtime.batching import bucket, pass_width
from jaxgen.runtime.devices import committed_like, on_device, on_device_float32, on_device_int32
from jaxgen.runtime.options import ResolvedOptions, max_candidates

# Decode steps per dispatch when a callback must see tokens as they come: the first token is handed
# over after one step (time to first token), then chunks stay short so that a callback's stop (and
# a stream's close()) takes effect within STREAM_CHUNKS[-1] steps.
STREAM_CHUNKS = (1, 2)


@dataclasses.dataclass
class Row:
    """One decoded row: a prompt (replicated per sampled hypothesis) and its accounting."""

    batch_id: int  # index into the caller's start_tokens
    hypothesis_id: int
    prompt: List[int]
    forced: List[int]  # tokens returned before the generated ones (CTranslate2's forced prefix)
    history: List[int]  # initial loop history (penalties, n-grams, suppress_sequences)
    offset: int  # CTranslate2 loop step of this row's first free step (P_i)
    max_new: int
    min_new: int
    length_offset: int  # tokens counted in the score's length L before the generated ones
    constraint: Optional[object] = None  # the prompt's compiled constraint (jaxgen.constraints.Compiled)


@cached_jit(static_argnums=(0,))
def _device_zeros(shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


def _pad2(rows: Sequence[Sequence[int]], width: int, fill: int, height: Optional[int] = None) -> np.ndarray:
    out = np.full((height or len(rows), width), fill, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def prefill_sequences(params: dict, config, cache: KVCache, sequences: List[List[int]], start: int, width: int,
                      plan: PassPlan) -> KVCache:
    """Prefills token sequences right-padded to `width` (rows beyond them are padding) at positions
    starting at `start`, in chunks of plan.chunk tokens (width is then a multiple of it), so that
    memory stays bounded whatever the prompt length. The cache must hold start + width positions."""
    rows = cache.batch
    tokens = _pad2(sequences, width, 0, rows)
    positions = np.full((rows, width), -1, np.int32)
    for i, seq in enumerate(sequences):
        positions[i, :len(seq)] = start + np.arange(len(seq))
    chunk = min(width, plan.chunk)
    if width % chunk:
        raise ValueError(f"prefill width {width} is not a multiple of the chunk size {chunk}")
    for c in range(0, width, chunk):
        cache = prefill(params, cache, on_device(tokens[:, c:c + chunk]), on_device(positions[:, c:c + chunk]),
                        on_device_int32(start + c), config=config, impl=plan.impl, fresh=start + c == 0)
    return cache


def plan_rows(prompts: List[List[int]], batch_ids: List[int], resolved: ResolvedOptions,
              min_prompt_len: int, constraints: Optional[Sequence[Optional[object]]] = None) -> List[Row]:
    """min_prompt_len: shortest prompt of the CTranslate2 sub-batch (sets the penalty history).
    constraints: each prompt's compiled constraint (None: free), or None for none at all."""
    opts = resolved.options
    m = min_prompt_len
    n_hyp = opts.num_hypotheses if opts.beam_size == 1 else 1
    rows = []
    constraints = [None] * len(prompts) if constraints is None else constraints
    for prompt, batch_id, constraint in zip(prompts, batch_ids, constraints):
        if opts.include_prompt_in_result:
            forced = prompt[1:opts.max_length + 1]
            offset = len(prompt) - 1
            history = prompt[1:]
            max_new = max(opts.max_length - offset, 0)
            min_new = max(opts.min_length - offset, 0)
        else:
            forced = []
            offset = len(prompt) - m
            history = prompt[m:]
            max_new, min_new = opts.max_length, opts.min_length
        for h in range(n_hyp):
            rows.append(Row(batch_id, h, prompt, forced, history, offset, max_new, min_new, len(forced), constraint))
    return rows


def prompt_width(rows: List[Row], plan: PassPlan) -> int:
    """Padded width of the prefill of the rows' prompts (all but their last token; 0: nothing)."""
    longest = max(len(r.prompt) - 1 for r in rows)
    return pass_width(bucket(longest, minimum=16), plan.chunk) if longest > 0 else 0


Share = Callable[[List[Row], int, int], Optional[KVCache]]


def prefill_rows(params: dict, config, rows: List[Row], prefix: KVCache, prefix_len: int, plan: PassPlan,
                 batch: int, cache_len: int, share: Optional[Share] = None) -> KVCache:
    """A cache of `batch` rows x `cache_len` positions holding the static prompt and each row's
    prompt but its last token (rows past len(rows) are padding). cache_len must be at least
    prefix_len + prompt_width(rows, plan). share(rows, batch, cache_len): the same cache built
    from shared prefix states (`jaxgen.runtime.prefix_passes`), or None when the rows share none."""
    if share is not None:
        cache = share(rows, batch, cache_len)
        if cache is not None:
            return cache
    width = prompt_width(rows, plan)
    cache = start_cache(prefix, config=config, batch=batch, length=cache_len)
    if width:
        cache = prefill_sequences(params, config, cache, [r.prompt[:-1] for r in rows], prefix_len, width, plan)
    return cache


def row_history(rows: List[Row], batch: int, hist_len: int, vocab_size: int):
    """The loop history of the rows (penalties, n-grams, suppress_sequences), padded to
    [batch, hist_len]."""
    return init_history(on_device(_pad2([r.history for r in rows], hist_len, 0, batch)),
                        on_device(np.array([len(r.history) for r in rows] + [0] * (batch - len(rows)), np.int32)),
                        vocab_size)


def processor_options(resolved: ResolvedOptions) -> ProcessorOptions:
    """The call's logits-processor options as traced arrays (sizes bucketed)."""
    opts = resolved.options
    end_ids = _pad2([resolved.end_ids], bucket(max(len(resolved.end_ids), 1), minimum=4), -1)[0]
    sup = resolved.suppress_ids
    sup_arr = _pad2(sup, bucket(max([len(x) for x in sup] + [1]), minimum=4), -1,
                    bucket(max(len(sup), 1), minimum=4))
    sup_lens = np.zeros((sup_arr.shape[0],), np.int32)
    sup_lens[:len(sup)] = [len(x) for x in sup]
    return ProcessorOptions(on_device(end_ids), on_device_float32(opts.repetition_penalty),
                            on_device_int32(opts.no_repeat_ngram_size), on_device_int32(resolved.unk_id),
                            on_device(sup_arr), on_device(sup_lens))


def stop_options(resolved: ResolvedOptions, vocab_size: int) -> StopStrings:
    """The call's stop-string tables as traced arrays (S = 0 without stop strings)."""
    if resolved.stop_tables is None:
        return StopStrings(on_device(np.zeros((0, 1, vocab_size), np.int8)), on_device(np.zeros((0,), np.int32)))
    table, lengths = resolved.stop_tables
    return StopStrings(on_device(table), on_device(lengths))


def sampling_options(opts) -> SamplingOptions:
    return SamplingOptions(on_device_int32(opts.sampling_topk), on_device_float32(opts.sampling_topp),
                           on_device_float32(opts.sampling_temperature if opts.is_sampling else 1.0))


def loop_spec(config, opts) -> LoopSpec:
    """The static choices of the greedy/sampling loop for these options."""
    return LoopSpec(config=config, sampling=opts.is_sampling,
                    k_static=candidate_count(opts.sampling_topk, config.vocab_size) if opts.is_sampling else 0,
                    return_logits=bool(opts.return_logits_vocab), processors=as_processors(opts.logits_processors))


def keys_of(rows: List[Row], seeds: Sequence[int], batch: int) -> jax.Array:
    """Each row's sampling key [batch, 2] from its call's seed (`seeds`, one per row) and its
    indices (padding rows get keys too): see sampling.row_keys."""
    pad = [0] * (batch - len(rows))
    return row_keys(on_device(np.array([s % 2**32 for s in seeds] + pad, np.uint32)),
                    on_device(np.array([r.batch_id for r in rows] + pad, np.int32)),
                    on_device(np.array([r.hypothesis_id for r in rows] + pad, np.int32)))


def constraint_words(rows: List[Row]) -> int:
    """The mask width of the rows' constraints (0: no row is constrained; see decoding.constrain)."""
    return max((r.constraint.words for r in rows if r.constraint is not None), default=0)


def completion(row: Row, ids: Sequence[int], end_ids: Sequence[int]) -> Optional[bool]:
    """Whether a hypothesis' generated ids (end tokens stripped) complete the row's constraint
    (None for a free row)."""
    if row.constraint is None:
        return None
    ids = list(ids)
    while ids and ids[-1] in end_ids:
        ids.pop()
    return row.constraint.accepts(ids)


@dataclasses.dataclass
class Prepared:
    """Loop inputs shared by greedy/sampling and beam search (rows padded to `bp`)."""

    bp: int
    n_out: int
    cache: KVCache
    history: object
    proc: ProcessorOptions
    samp: SamplingOptions
    max_new: np.ndarray
    min_new: np.ndarray
    last: np.ndarray
    position: np.ndarray

    @property
    def cache_len(self) -> int:
        return self.cache.length


def loop_sizes(rows: List[Row], opts, prefix_len: int, plan: PassPlan):
    """(padded rows, output slots, cache positions) of a loop over these rows (bucketed)."""
    n_out = bucket(max(max(r.max_new for r in rows), 1), minimum=16 if opts.return_logits_vocab else 64)
    return bucket(len(rows), minimum=1), n_out, bucket(prefix_len + prompt_width(rows, plan) + n_out, minimum=64)


def prepare(params: dict, config, rows: List[Row], resolved: ResolvedOptions, prefix: KVCache,
            prefix_len: int, plan: PassPlan, share: Optional[Share] = None) -> Prepared:
    """Prefills the prompts (all but their last token, right-padded, after the static prompt;
    from shared prefixes with `share`, see prefill_rows) and builds the traced loop options.
    Array sizes are bucketed to limit recompilation."""
    opts = resolved.options
    b = len(rows)
    bp, n_out, cache_len = loop_sizes(rows, opts, prefix_len, plan)
    cache = prefill_rows(params, config, rows, prefix, prefix_len, plan, bp, cache_len, share)
    hist_len = bucket(max(len(r.history) for r in rows) + n_out, minimum=64)
    pad = [0] * (bp - b)
    return Prepared(
        bp=bp, n_out=n_out, cache=cache, history=row_history(rows, bp, hist_len, config.vocab_size),
        proc=processor_options(resolved), samp=sampling_options(opts),
        max_new=np.array([r.max_new for r in rows] + pad, np.int32),
        min_new=np.array([r.min_new for r in rows] + pad, np.int32),
        last=np.array([r.prompt[-1] for r in rows] + pad, np.int32),
        position=np.array([prefix_len + len(r.prompt) - 1 for r in rows] + pad, np.int32),
    )


def loop_state(*, last: np.ndarray, position: np.ndarray, done: np.ndarray, n_out: int, history, cache: KVCache,
               keys: jax.Array, logits: jax.Array, stop_count: int, params: dict,
               constraint: Optional[np.ndarray] = None) -> DecodeState:
    """A greedy/sampling (or prompt-lookup) loop state at step 0 for rows starting from their last
    prompt token `last` [B] at `position` [B]; done [B] marks rows with nothing to generate (or
    free slots). Host zeros (a transfer, not one small compiled program per shape); `logits` is
    the [B, N or 0, V] buffer of stored logits, made on the device by the caller; stop_count: the
    stop strings followed (S of the call's StopStrings); constraint: the rows' matcher handles [B]
    (jaxgen.runtime.matchers; None: every row free). The state is committed to the device of
    `params`, the weights the loop runs with (`devices.committed_like`)."""
    b = len(last)
    if constraint is None:
        constraint = np.full((b,), -1, np.int32)
    zeros = lambda shape, dtype: on_device(np.zeros(shape, dtype))  # noqa: E731
    return committed_like(DecodeState(
        step=on_device_int32(0), last_token=on_device(np.asarray(last, np.int32)),
        position=on_device(np.asarray(position, np.int32)), done=on_device(np.asarray(done, bool)),
        out_tokens=zeros((b, n_out), np.int32), out_log_probs=zeros((b, n_out), np.float32),
        gen_len=zeros((b,), np.int32), history=history, cache=cache, key=keys, logits=logits,
        stop=zeros((b, stop_count), np.int32), constraint=on_device(np.asarray(constraint, np.int32))), params)


def run_in_segments(loop, state, until: int, first_position: int, cache_len: int, rows: int):
    """Runs `loop(state, attend_len)` (a jitted decoding loop that stops before a running row's
    position reaches attend_len) with the smallest live bound that fits, growing it until the
    loop is done or `until` steps ran, so that decode reads only the live part of the cache.

    first_position: the highest position fed at step 0 (any row); rows: the loop's batch rows."""
    step = int(jax.device_get(state.step))
    while True:
        attend_len = live_length(first_position + step + 1, cache_len, rows)
        state = loop(state, attend_len)
        if attend_len >= cache_len:
            return state
        step, done = jax.device_get((state.step, state.done))
        step = int(step)
        if step >= until or bool(np.all(done)):
            return state


def run_rows(params: dict, config, rows: List[Row], resolved: ResolvedOptions, prefix: KVCache,
             prefix_len: int, seed: int, vocabulary, callback: Optional[Callable], plan: PassPlan,
             share: Optional[Share] = None) -> List[dict]:
    """Greedy/sampling. Returns per row {"ids", "log_probs", "logits"} of its generated steps.
    seed: the call's random seed (each row's key derives from it and the row's indices)."""
    opts = resolved.options
    b = len(rows)
    p = prepare(params, config, rows, resolved, prefix, prefix_len, plan, share)
    bp, n_out, max_new = p.bp, p.n_out, p.max_new
    stops = stop_options(resolved, config.vocab_size)
    consts = DecodeConsts(proc=p.proc, samp=p.samp, max_new=on_device(max_new), min_new=on_device(p.min_new),
                          stops=stops)
    spec = loop_spec(config, opts)._replace(constraint_words=constraint_words(rows))
    handles = matchers.open_rows([r.constraint for r in rows] + [None] * (bp - b))
    try:
        state = loop_state(last=p.last, position=p.position, done=max_new <= 0, n_out=n_out, history=p.history,
                           cache=p.cache, keys=keys_of(rows, [seed] * b, bp),
                           logits=_device_zeros((bp, n_out if opts.return_logits_vocab else 0, config.vocab_size)),
                           stop_count=stops.lengths.shape[0], params=params, constraint=handles)
        return _decode_rows(params, config, rows, resolved, state, consts, spec, p, vocabulary, callback, prefix_len)
    finally:
        matchers.close_rows(handles)


def _decode_rows(params, config, rows: List[Row], resolved: ResolvedOptions, state: DecodeState,
                 consts: DecodeConsts, spec: LoopSpec, p: Prepared, vocabulary, callback: Optional[Callable],
                 prefix_len: int) -> List[dict]:
    """run_rows' loop and read-out (its matchers are open)."""
    opts = resolved.options
    b, bp, max_new = len(rows), p.bp, p.max_new
    total = int(max_new.max())
    first_position = int(p.position[:b].max())

    def run_until(state, until: int):
        return run_in_segments(lambda s, attend_len: decode(params, s, consts, on_device_int32(until), on_device_int32(bp + 1),
                                                            spec=spec._replace(attend_len=attend_len)),
                               state, until, first_position, p.cache_len, bp)

    stopped = [None] * b  # generated-token count at which a callback stopped the row
    if callback is None:
        state = run_until(state, total)
    else:
        _emit_forced(rows, resolved, vocabulary, callback, stopped)
        seen = 0
        chunk = 0
        while seen < total:
            steps = STREAM_CHUNKS[min(chunk, len(STREAM_CHUNKS) - 1)]
            chunk += 1
            state = run_until(state, seen + steps)
            tokens, log_probs, gen_len, step, done = jax.device_get(
                (state.out_tokens, state.out_log_probs, state.gen_len, state.step, state.done))
            # Each row gets its own [V] processed logits (spec §11 Q4), not the first row only.
            logits = state.logits[:b, seen:int(step)] if opts.return_logits_vocab else None
            new_stops = _emit_steps(rows, resolved, vocabulary, callback, stopped, tokens, log_probs, gen_len,
                                    seen, int(step), logits, done)
            seen = int(step)
            if new_stops:
                done = np.zeros((bp,), bool)
                done[new_stops] = True
                state = set_done(state, done)
            if bool(np.all(jax.device_get(state.done)[:b])):
                break
    tokens, log_probs, gen_len = jax.device_get((state.out_tokens, state.out_log_probs, state.gen_len))
    check_positions(config, prefix_len, rows, [int(gen_len[i]) if stopped[i] is None else stopped[i] for i in range(b)],
                    opts.max_length)
    out = []
    for i, r in enumerate(rows):
        n = int(gen_len[i]) if stopped[i] is None else stopped[i]
        out.append({
            "ids": tokens[i, :n].tolist(),
            "log_probs": log_probs[i, :n].astype(np.float64),
            "logits": state.logits[i, :n] if opts.return_logits_vocab else None,
            "complete": completion(r, tokens[i, :n].tolist(), resolved.end_ids),
        })
    return out


def run_lookup_rows(params: dict, config, rows: List[Row], resolved: ResolvedOptions, prefix: KVCache,
                    prefix_len: int, plan: PassPlan, share: Optional[Share] = None) -> List[dict]:
    """Greedy search with prompt-lookup speculation (`jaxgen.decoding.speculative`): the same
    results as `run_rows`. Drafts are capped to fit the model's sliding-window rings (`max_draft`).
    Returns per row {"ids", "log_probs", "logits": None} of its generated steps."""
    opts = resolved.options
    b = len(rows)
    draft = max_draft(config, loop_sizes(rows, opts, prefix_len, plan)[2], opts.prompt_lookup_tokens)
    if draft == 0:  # sliding-window rings of one slot
        return run_rows(params, config, rows, resolved, prefix, prefix_len, 0, None, None, plan, share)
    p = prepare(params, config, rows, resolved, prefix, prefix_len, plan, share)
    static = list(resolved.static_prompt_ids)
    contexts = [static + r.prompt for r in rows]
    width = bucket(max(len(c) for c in contexts) + p.n_out, minimum=64)
    stops = stop_options(resolved, config.vocab_size)
    consts = DecodeConsts(proc=p.proc, samp=p.samp, max_new=on_device(p.max_new), min_new=on_device(p.min_new),
                          stops=stops)
    base = loop_state(last=p.last, position=p.position, done=p.max_new <= 0, n_out=p.n_out, history=p.history,
                      cache=p.cache, keys=on_device(np.zeros((p.bp, 2), np.uint32)),
                      logits=_device_zeros((p.bp, 0, config.vocab_size)), stop_count=stops.lengths.shape[0],
                      params=params)
    state = committed_like(LookupState(
        rows=base, context=on_device(_pad2(contexts, width, 0, p.bp)),
        context_len=on_device(np.array([len(c) for c in contexts] + [1] * (p.bp - b), np.int32)),
        accepted=on_device(np.zeros((p.bp,), np.int32))), params)
    spec = LookupSpec(config=config, draft=draft)
    while True:  # grow the live bound of the cache reads as positions advance (see run_in_segments)
        position, done = jax.device_get((state.rows.position, state.rows.done))
        if bool(np.all(done)):
            break
        attend_len = live_length(int(position[~done].max()) + spec.draft + 1, p.cache_len, p.bp)
        state = lookup_decode(params, state, consts, spec=spec._replace(attend_len=attend_len))
        if attend_len >= p.cache_len:
            break
    tokens, log_probs, gen_len = jax.device_get((state.rows.out_tokens, state.rows.out_log_probs,
                                                 state.rows.gen_len))
    check_positions(config, prefix_len, rows, [int(n) for n in gen_len[:b]], opts.max_length)
    return [{"ids": tokens[i, :n].tolist(), "log_probs": log_probs[i, :n].astype(np.float64), "logits": None}
            for i, n in enumerate(int(x) for x in gen_len[:b])]


def run_beam(params: dict, config, rows: List[Row], resolved: ResolvedOptions, prefix: KVCache,
             prefix_len: int, key: jax.Array, plan: PassPlan, share: Optional[Share] = None) -> List[List[dict]]:
    """Beam search. Returns per row its finished hypotheses, best first: {"ids", "score"}."""
    opts = resolved.options
    k = opts.beam_size
    b = len(rows)
    p = prepare(params, config, rows, resolved, prefix, prefix_len, plan, share)
    cache, history = expand_beams(p.cache, p.history, beam_size=k)
    has_prefix = any(r.offset > 0 for r in rows)
    consts = BeamConsts(
        proc=p.proc, samp=p.samp, max_new=on_device(p.max_new), min_new=on_device(p.min_new),
        length_offset=on_device(np.array([r.length_offset for r in rows] + [0] * (p.bp - b), np.int32)),
        length_penalty=on_device_float32(opts.length_penalty),
        finish_target=on_device_int32(max_candidates(k, opts.patience)),
        disable_first_eos=on_device(np.bool_(has_prefix)), stops=stop_options(resolved, config.vocab_size))
    sampling = opts.sampling_topk != 1 and opts.sampling_temperature != 0
    spec = BeamSpec(config=config, beam_size=k, num_keep=opts.num_hypotheses, sampling=sampling,
                    k_static=candidate_count(opts.sampling_topk, k * config.vocab_size) if sampling else 0,
                    processors=as_processors(opts.logits_processors), constraint_words=constraint_words(rows))
    handles = matchers.open_rows([r.constraint for r in rows for _ in range(k)] + [None] * ((p.bp - b) * k))
    try:
        return _beam_rows(params, config, rows, resolved, prefix_len, key, p, consts, spec, cache, history, handles)
    finally:
        matchers.close_rows(handles)


def _beam_rows(params, config, rows: List[Row], resolved: ResolvedOptions, prefix_len: int, key: jax.Array,
               p: Prepared, consts: BeamConsts, spec: BeamSpec, cache: KVCache, history, handles: np.ndarray):
    """run_beam's loop and read-out (its matchers are open)."""
    opts = resolved.options
    k, b = opts.beam_size, len(rows)
    cum = np.full((p.bp, k), -np.inf, np.float32)
    cum[:, 0] = 0
    f = opts.num_hypotheses
    state = BeamState(
        step=on_device_int32(0), last_token=on_device(np.repeat(p.last, k)),
        position=on_device(np.repeat(p.position, k)), cum=on_device(cum),
        seqs=on_device(np.zeros((p.bp, k, p.n_out), np.int32)), history=history, cache=cache,
        done=on_device(p.max_new <= 0), top_finished=on_device(np.zeros((p.bp,), bool)),
        fin_tokens=on_device(np.zeros((p.bp, f, p.n_out), np.int32)),
        fin_len=on_device(np.zeros((p.bp, f), np.int32)),
        fin_score=on_device(np.full((p.bp, f), -np.inf, np.float32)),
        fin_count=on_device(np.zeros((p.bp,), np.int32)), key=key,
        stop=on_device(np.zeros((p.bp * k, consts.stops.lengths.shape[0]), np.int32)),
        constraint=on_device(handles), parent=on_device(np.arange(p.bp * k, dtype=np.int32)))
    state = run_in_segments(lambda s, attend_len: beam_decode(params, s, consts,
                                                              spec=spec._replace(attend_len=attend_len)),
                            state, p.n_out, int(p.position[:b].max()), p.cache_len, p.bp * k)
    tokens, lens, scores = jax.device_get((state.fin_tokens, state.fin_len, state.fin_score))
    # The longest kept hypothesis is a lower bound of the steps an example ran.
    check_positions(config, prefix_len, rows, [int(lens[i].max()) if rows[i].max_new > 0 else 0 for i in range(b)],
                    opts.max_length)
    out = []
    for i, r in enumerate(rows):
        if r.max_new <= 0:
            out.append([{"ids": [], "score": 0.0, "complete": completion(r, [], resolved.end_ids)}])
            continue
        hyps = [{"ids": tokens[i, j, :lens[i, j]].tolist(), "score": float(scores[i, j])}
                for j in range(f) if np.isfinite(scores[i, j])]
        for hyp in hyps:
            hyp["complete"] = completion(r, hyp["ids"], resolved.end_ids)
        out.append(hyps)
    return out


def check_positions(config, prefix_len: int, rows: List[Row], generated: List[int], max_length: int) -> None:
    """CTranslate2's RuntimeError for a model with learned positions fed past its table (spec
    §5.6): the positions it feeds are the static prompt, the prompt (up to max_length steps when
    the prompt is returned) and every generated token but the last."""
    if config.position_embedding != "learned":
        return
    limit = config.max_position_embeddings
    reached = -1
    for r, n in zip(rows, generated):
        fed = len(r.prompt) + n - 1 if n > 0 else min(len(r.prompt), max_length + 1) - 1
        reached = max(reached, prefix_len + fed - 1)
    if prefix_len - 1 >= limit:
        raise RuntimeError(f"No position encodings are defined for positions >= {limit}, but got position "
                           f"{prefix_len - 1}")
    if reached >= limit:
        raise RuntimeError(f"No position encodings are defined for positions >= {limit}, but got position {limit}")


def _emit_forced(rows, resolved, vocabulary, callback, stopped) -> None:
    """Callbacks for the prompt tokens CTranslate2 force-decodes and returns (return-prefix on)."""
    opts = resolved.options
    for i, r in enumerate(rows):
        for s, token in enumerate(r.forced):
            if stopped[i] is not None:
                break
            is_last = s == opts.max_length - 1
            step = GenerationStepResult(step=s, batch_id=r.batch_id, token_id=token, hypothesis_id=r.hypothesis_id,
                                        token=vocabulary.tokens[token],
                                        log_prob=0.0 if opts.return_scores else None, is_last=is_last)
            if callback(step):
                stopped[i] = 0


def _emit_steps(rows, resolved, vocabulary, callback, stopped, tokens, log_probs, gen_len, start, end,
                logits=None, done=None) -> List[int]:
    """Callbacks for generated steps [start, end); returns rows newly stopped by the callback.
    logits: [rows, end - start, V] processed logits when return_logits_vocab, else None; done
    [rows]: rows the loop finished (their last generated token is the last step, e.g. one that
    completed a stop string)."""
    opts = resolved.options
    end_ids = set(resolved.end_ids)
    newly = []
    for t in range(start, end):
        for i, r in enumerate(rows):
            if stopped[i] is not None or t >= gen_len[i]:
                continue
            token = int(tokens[i, t])
            is_last = token in end_ids or t + 1 >= r.max_new or (done is not None and done[i] and t + 1 == gen_len[i])
            step = GenerationStepResult(step=r.offset + t, batch_id=r.batch_id, token_id=token,
                                        hypothesis_id=r.hypothesis_id, token=vocabulary.tokens[token],
                                        log_prob=float(log_probs[i, t]) if opts.return_scores else None,
                                        is_last=is_last, logits=None if logits is None else logits[i, t - start])
            if callback(step):
                stopped[i] = t + 1
                newly.append(i)
    return newly


def assemble_results(rows: List[Row], hyps_per_row: List[List[dict]], resolved: ResolvedOptions, vocabulary,
                     bos_id, batch_ids: List[int], sort: bool = True) -> List[GenerationResult]:
    """Per example: strip end tokens, re-insert the first prompt token, normalise scores, order.

    A hypothesis dict has the generated "ids" and either a normalised "score" (beam search) or the
    per-step "log_probs" (greedy/sampling), and optionally "logits".
    """
    opts = resolved.options
    end_ids = set(resolved.end_ids)
    per_example = {bid: [] for bid in batch_ids}
    for r, hyps in zip(rows, hyps_per_row):
        for h in hyps:
            internal = list(r.forced) + list(h["ids"])
            if "score" in h:
                score = h["score"]
            else:
                length = r.length_offset + len(h["ids"])
                score = float(np.sum(h["log_probs"])) / (length ** opts.length_penalty if length else 1.0)
            ids = internal
            if not opts.return_end_token:
                while ids and ids[-1] in end_ids:
                    ids = ids[:-1]
            if opts.include_prompt_in_result and r.prompt[0] != bos_id:
                ids = [r.prompt[0]] + ids
            per_example[r.batch_id].append((score, ids, h.get("logits"), h.get("complete")))
    results = []
    for bid in batch_ids:
        hyps = per_example[bid]
        hyps = (sorted(hyps, key=lambda h: -h[0]) if sort else hyps)[:opts.num_hypotheses]
        results.append(GenerationResult(
            sequences=[vocabulary.to_tokens(h[1]) for h in hyps],
            sequences_ids=[h[1] for h in hyps],
            scores=[h[0] for h in hyps] if opts.return_scores else [],
            logits=[list(h[2]) if h[2] is not None else [] for h in hyps] if opts.return_logits_vocab else [],
            constraint_complete=[bool(h[3]) for h in hyps] if hyps and hyps[0][3] is not None else [],
        ))
    return results
