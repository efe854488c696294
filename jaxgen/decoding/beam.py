"""Beam search with CTranslate2's semantics (spec §5.5), as one `lax.while_loop`.

Rows are examples x beams (B*K). Each step takes the best 2K candidates of an example's K*V
cumulative scores; the first K candidates that are end tokens (or all, at the example's last
step) are registered as finished hypotheses and their slots refilled with the next non-end
candidates from positions K..2K-1. Finished hypotheses are kept as the best `num_keep` by
length-normalised score, plus a count for the stopping rule.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxgen.decoding.constrain import allowed_tokens
from jaxgen.decoding.processors import History, ProcessorOptions, append_history
from jaxgen.decoding.sampling import SamplingOptions, filtered_candidates
from jaxgen.decoding.step import next_logits
from jaxgen.decoding.stops import StopStrings, advance, completed
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import KVCache

DISABLED_SCORE = -1e10  # CTranslate2's score for candidates it rules out


class BeamSpec(NamedTuple):
    config: ModelConfig
    beam_size: int
    num_keep: int  # finished hypotheses kept per example (= num_hypotheses)
    sampling: bool  # stochastic beam search (Gumbel-top-2K among filtered candidates)
    k_static: int
    attend_len: Optional[int] = None  # decode reads cache slots [0, attend_len) (see search.live_length)
    processors: tuple = ()  # user logits processors (jaxgen.decoding.custom), in order
    constraint_words: int = 0  # > 0: beams may be constrained, masks of this many int32 words (constrain.py)


class BeamConsts(NamedTuple):
    proc: ProcessorOptions
    samp: SamplingOptions
    max_new: jax.Array  # [B] steps an example may run
    min_new: jax.Array  # [B] end ids forbidden while step < min_new
    length_offset: jax.Array  # [B] tokens before the generated ones in the internal hypothesis
    length_penalty: jax.Array  # [] float32
    finish_target: jax.Array  # [] int32: round(K * patience)
    disable_first_eos: jax.Array  # [] bool: rule out secondary end candidates at step 0
    stops: StopStrings  # a candidate that completes a stop string ends its hypothesis, like an end token


class BeamState(NamedTuple):
    step: jax.Array
    last_token: jax.Array  # [B*K]
    position: jax.Array  # [B*K]
    cum: jax.Array  # [B, K] cumulative log-probs
    seqs: jax.Array  # [B, K, N] generated tokens per beam
    history: History  # rows B*K
    cache: KVCache  # rows B*K
    done: jax.Array  # [B]
    top_finished: jax.Array  # [B] the best candidate ended at some step
    fin_tokens: jax.Array  # [B, F, N]
    fin_len: jax.Array  # [B, F] generated tokens (end token included)
    fin_score: jax.Array  # [B, F] normalised scores, -inf = empty
    fin_count: jax.Array  # [B]
    key: jax.Array
    stop: jax.Array  # [B*K, S] int32 each beam's progress on the stop strings
    constraint: jax.Array  # [B*K] int32 each beam row's matcher handle (jaxgen.runtime.matchers), -1: free
    parent: jax.Array  # [B*K] int32 the row each beam came from at the last step (its matcher's source)


def _gather_rows(tree, rows: jax.Array, axis: int):
    return jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=axis), tree)


def reorder_beams(cache: KVCache, parents: jax.Array, first: jax.Array, width: int) -> KVCache:
    """Row r of the new cache := row parents[r] of `cache`, copying only what can differ.

    Beams of an example share everything before position first[r] (the prompt, fed once before
    the beams split), so only the slots of positions [first, first + width) are copied (mod the
    ring size for sliding layers): O(rows x width) per step instead of the whole cache.
    parents, first: [rows] int32; width (static): the number of decoding steps.
    """
    rows = jnp.arange(parents.shape[0])[:, None]

    def copy(a: jax.Array) -> jax.Array:
        slots = a.shape[1]
        idx = jnp.mod(first[:, None] + jnp.arange(min(width, slots))[None, :], slots)  # [rows, n]
        return a.at[rows, idx].set(a[parents[:, None], idx])

    return KVCache(tuple(copy(a) for a in cache.k), tuple(copy(a) for a in cache.v), cache.length)


def _beam_step(params: dict, s: BeamState, c: BeamConsts, spec: BeamSpec) -> BeamState:
    config, k = spec.config, spec.beam_size
    b = s.cum.shape[0]
    v = config.vocab_size
    allowed = None
    if spec.constraint_words:  # each beam continues its parent's matcher with its last token
        handles = jnp.where(jnp.repeat(s.done, k), -1, s.constraint)
        allowed = allowed_tokens(handles, s.constraint[s.parent], s.last_token, jnp.broadcast_to(s.step, (b * k,)),
                                 spec.constraint_words)
    processed, cache = next_logits(params, config, s.last_token, s.position, s.cache, s.history, c.proc,
                                   jnp.repeat(s.step < c.min_new, k), attend_len=spec.attend_len,
                                   processors=spec.processors, outputs=(s.seqs.reshape(b * k, -1), s.step),
                                   step=s.step, allowed=allowed)
    log_probs = jax.nn.log_softmax(processed, axis=-1)
    total = (log_probs + s.cum.reshape(b * k, 1)).reshape(b, k * v)
    if spec.sampling:
        values, ids = filtered_candidates(total, c.samp, spec.k_static)
        key, sub = jax.random.split(s.key)
        noisy = values + jax.random.gumbel(sub, values.shape)
        _, pick = jax.lax.top_k(noisy, 2 * k)
        cand_idx = jnp.take_along_axis(ids, pick, axis=1)
        cand_score = jnp.take_along_axis(total, cand_idx, axis=1)
    else:
        key = s.key
        cand_score, cand_idx = jax.lax.top_k(total, 2 * k)
    cand_beam, cand_tok = cand_idx // v, (cand_idx % v).astype(jnp.int32)
    is_end = jnp.any(cand_tok[..., None] == c.proc.end_ids[None, None, :], axis=-1)  # [B, 2K]
    secondary = jnp.arange(2 * k)[None, :] >= 1
    rule_out = c.disable_first_eos & (s.step == 0) & secondary & is_end
    cand_tok = jnp.where(rule_out, 0, cand_tok)
    cand_score = jnp.where(rule_out, DISABLED_SCORE, cand_score)
    # Each candidate's progress on the stop strings (its beam's, then its token): completing one ends it.
    cand_stop = advance(c.stops, s.stop.reshape(b, k, -1)[jnp.arange(b)[:, None], cand_beam], cand_tok)  # [B, 2K, S]
    is_end = (is_end | completed(c.stops, cand_stop)) & ~rule_out

    active = ~s.done
    last_step = s.step + 1 >= c.max_new  # [B]
    finishing = active[:, None] & (is_end[:, :k] | last_step[:, None])  # [B, K]

    # Register finished hypotheses: beam history + candidate token.
    origin_seqs = jnp.take_along_axis(s.seqs, cand_beam[:, :k, None], axis=1)  # [B, K, N]
    new_seqs = origin_seqs.at[:, :, s.step].set(cand_tok[:, :k])
    length = c.length_offset[:, None] + s.step + 1
    norm_score = cand_score[:, :k] / jnp.power(length.astype(jnp.float32), c.length_penalty)
    norm_score = jnp.where(finishing, norm_score, -jnp.inf)
    all_scores = jnp.concatenate([s.fin_score, norm_score], axis=1)
    all_tokens = jnp.concatenate([s.fin_tokens, new_seqs], axis=1)
    all_len = jnp.concatenate([s.fin_len, jnp.broadcast_to(s.step + 1, (b, k))], axis=1)
    best_scores, best = jax.lax.top_k(all_scores, spec.num_keep)
    fin_tokens = jnp.take_along_axis(all_tokens, best[:, :, None], axis=1)
    fin_len = jnp.take_along_axis(all_len, best, axis=1)
    fin_count = s.fin_count + finishing.sum(axis=1)
    top_finished = s.top_finished | finishing[:, 0]

    # Refill finished slots with the next unused non-end candidates of positions K..2K-1.
    spare = ~is_end[:, k:]  # [B, K]
    spare_rank = jnp.cumsum(spare, axis=1)  # 1-based rank of each spare
    need_rank = jnp.cumsum(finishing, axis=1)  # 1-based rank among finishing slots
    match = spare[:, None, :] & (spare_rank[:, None, :] == need_rank[:, :, None])  # [B, K(slot), K(spare)]
    has_spare = jnp.any(match, axis=2)
    spare_pos = k + jnp.argmax(match, axis=2)
    sel = jnp.where(finishing & has_spare, spare_pos, jnp.arange(k)[None, :])  # [B, K] into 2K
    sel_beam = jnp.take_along_axis(cand_beam, sel, axis=1)
    sel_tok = jnp.take_along_axis(cand_tok, sel, axis=1)
    sel_score = jnp.take_along_axis(cand_score, sel, axis=1)

    rows = (jnp.arange(b)[:, None] * k + sel_beam).reshape(-1)
    seqs = jnp.take_along_axis(s.seqs, sel_beam[:, :, None], axis=1).at[:, :, s.step].set(sel_tok)
    history = append_history(_gather_rows(s.history, rows, 0), sel_tok.reshape(-1), jnp.ones((b * k,), bool))
    stop = jnp.take_along_axis(cand_stop, sel[:, :, None], axis=1).reshape(b * k, -1)
    cache = reorder_beams(cache, rows, s.position - s.step, s.seqs.shape[2])
    lp_zero = c.length_penalty == 0
    done_now = last_step | jnp.where(lp_zero, top_finished & (fin_count >= spec.num_keep),
                                     fin_count >= c.finish_target)
    keep = lambda new, old: jnp.where(active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
    return BeamState(
        step=s.step + 1,
        last_token=sel_tok.reshape(-1),
        position=s.position + 1,
        cum=keep(sel_score, s.cum),
        seqs=seqs,
        history=history,
        cache=cache,
        done=s.done | (active & done_now),
        top_finished=keep(top_finished, s.top_finished),
        fin_tokens=keep(fin_tokens, s.fin_tokens),
        fin_len=keep(fin_len, s.fin_len),
        fin_score=keep(best_scores, s.fin_score),
        fin_count=keep(fin_count, s.fin_count),
        key=key,
        stop=jnp.where(jnp.repeat(active, k)[:, None], stop, s.stop),
        constraint=s.constraint,
        parent=jnp.where(jnp.repeat(active, k), rows, jnp.arange(b * k)).astype(jnp.int32),
    )


@partial(jax.jit, static_argnames=("spec",), donate_argnums=(1,))
def beam_decode(params: dict, state: BeamState, consts: BeamConsts, *, spec: BeamSpec) -> BeamState:
    """Runs beam steps until every example is done, or a running row's position reaches
    spec.attend_len (the host then continues with a larger bound)."""
    limit = state.seqs.shape[2]
    k = spec.beam_size

    def cond(s: BeamState):
        go = (s.step < limit) & ~jnp.all(s.done)
        if spec.attend_len is not None:
            running = jnp.repeat(~s.done, k)
            go = go & (jnp.max(jnp.where(running, s.position, 0)) < spec.attend_len)
        return go

    return jax.lax.while_loop(cond, lambda s: _beam_step(params, s, consts, spec), state)


@partial(jax.jit, static_argnames=("beam_size",))
def expand_beams(cache: KVCache, history: History, beam_size: int):
    """Repeats every row `beam_size` times (row b*K + j is beam j of example b)."""
    rep = lambda a: jnp.repeat(a, beam_size, axis=0)  # noqa: E731
    return cache.map_rows(rep), History(rep(history.tokens), rep(history.length), rep(history.presence))
