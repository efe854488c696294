"""Continuous batching: the slot scheduler behind `generate_batch` and `generate_iterable`.

Each replica has a worker thread that owns up to `width` decode slots (rows of one running
greedy/sampling loop state). The loop runs in chunks of steps; between chunks the worker retires
finished rows (a prompt's result is set as soon as all its rows are done) and prefills waiting
prompts into the free slots, each at its own positions (`jaxgen.decoding.slots`). A row never
waits for the longest row of its batch, and its result never depends on the rows beside it:
greedy output equals static batching token for token, and a sampled row draws with its own key
(`jaxgen.decoding.sampling.row_keys`: the seed folded with the prompt's index in the call).

One queue feeds every replica. Requests whose loop options agree (the same `session_key`: end
tokens, penalties, sampling settings, static prompt, width) share the running slots, including
those of concurrent calls from other threads; a request with other options waits until the
running session drains (first come, first served). Which calls take this path: `schedulable`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import jax
import numpy as np

from jaxgen.decoding.search import DecodeConsts, DecodeState, decode, live_length, set_done
from jaxgen.decoding.slots import grow_state, insert_rows, keep_rows
from jaxgen.model.decoder import PassPlan, init_cache
from jaxgen.results import GenerationResult
from jaxgen.runtime import matchers
from jaxgen.runtime.batching import bucket, slot_batch, smaller_slot_batch
from jaxgen.runtime.devices import on_device, on_device_int32
from jaxgen.runtime.generation import (Row, _device_zeros, assemble_results, check_positions, completion, keys_of,
                                       loop_spec, loop_state, plan_rows, prefill_rows, processor_options,
                                       prompt_width, row_history, sampling_options, stop_options)
from jaxgen.runtime.options import ResolvedOptions

# Decode steps per dispatch at most: between two chunks finished rows are retired, waiting prompts
# admitted and closed iterables noticed. A chunk also ends early, as soon as enough rows finished
# for a refill group while prompts wait, or, when none wait, as soon as the running rows fit a
# smaller batch (`slot_batch`).
CHUNK_STEPS = 16
# Free slots are refilled in groups of width / REFILL_FRACTION rows (fewer when fewer wait): a
# prefill reads every weight once, like a decode step, so one prefill per finished row would cost
# about a decode step each; a group keeps that overhead small at the price of a few idle slots.
REFILL_FRACTION = 8
# Slots per replica when the caller sets no max_batch_size.
DEFAULT_WIDTHS = {"cpu": 64, "cuda": 256, "tpu": 256}


def schedulable(resolved: ResolvedOptions, batch_type: str) -> bool:
    """Whether a generate call runs on the slot scheduler (else on static sub-batches).

    Static: beam search, `return_alternatives`, a `callback` (CTranslate2 calls it per
    sub-batch step), `return_logits_vocab`, `batch_type="tokens"`, `logits_processors` (their
    `step` argument is one scalar, every running row's step, which holds on sub-batches whose
    rows start together), `prompt_lookup_tokens` (its own loop, `jaxgen.decoding.speculative`), and
    `include_prompt_in_result=False` together with a repetition penalty, no-repeat n-grams or a
    multi-token suppressed sequence (there CTranslate2's loop history starts after the shortest
    prompt of the sub-batch, so results depend on the sub-batch).
    """
    opts = resolved.options
    if (opts.beam_size > 1 or opts.return_alternatives or opts.callback is not None or opts.return_logits_vocab
            or batch_type != "examples" or opts.logits_processors or opts.prompt_lookup_tokens):
        return False
    history_matters = (opts.repetition_penalty != 1 or opts.no_repeat_ngram_size > 0
                       or any(len(s) > 1 for s in resolved.suppress_ids))
    return opts.include_prompt_in_result or not history_matters


def session_key(resolved: ResolvedOptions, width: int, constraint_words: int = 0) -> tuple:
    """Requests with equal keys can share a loop: the options traced or compiled for the whole
    batch (max_length / min_length are per row and are not part of it). A call with constraints
    runs a loop that asks the host for token masks (constraint_words > 0); its rows, constrained
    by any constraint or free, share it with those of other such calls."""
    opts = resolved.options
    return (tuple(resolved.static_prompt_ids), opts.cache_static_prompt, tuple(resolved.end_ids),
            opts.repetition_penalty, opts.no_repeat_ngram_size, resolved.unk_id,
            tuple(tuple(s) for s in resolved.suppress_ids), opts.is_sampling,
            (opts.sampling_topk, opts.sampling_topp, opts.sampling_temperature) if opts.is_sampling else None, width,
            resolved.stop_strings, constraint_words)


class Call:
    """Options shared by the requests of one generate call; `cancel()` drops what is left."""

    def __init__(self, resolved: ResolvedOptions, seed: int, width: int, constraint_words: int = 0):
        self.resolved = resolved
        self.seed = seed
        self.width = width
        self.constraint_words = constraint_words  # > 0: some prompt is constrained (jaxgen.constraints)
        self.key = session_key(resolved, width, constraint_words)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class Request:
    """One prompt of a call. Its rows (one per hypothesis) occupy slots until they finish."""

    call: Call
    index: int  # position in the caller's input: the result's batch_id and the rows' sampling key
    rows: List[Row]
    future: concurrent.futures.Future
    hyps: List[Optional[dict]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.hyps = [None] * len(self.rows)


class PromptFuture:
    """A prompt's pending result (CTranslate2's AsyncGenerationResult: `result()`, `done()`)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def result(self) -> GenerationResult:
        return self._future.result()

    def done(self) -> bool:
        return self._future.done()


class SlotScheduler:
    """The queue and one worker per replica (started on demand, gone when idle).

    prefix_of(replica, resolved) -> (KVCache, prefix_len): the static prompt's cached state; its
    `sharing(replica, resolved, prefix)`, when it has one, builds prefill_rows' `share` (prompts'
    shared prefixes, see `jaxgen.runtime.prefix_cache.StaticPrompts`).
    """

    def __init__(self, config, plan: PassPlan, vocabulary, bos_id: Optional[int], replicas: list,
                 prefix_of: Callable):
        self.config = config
        self.plan = plan
        self.vocabulary = vocabulary
        self.bos_id = bos_id
        self.replicas = replicas
        self.prefix_of = prefix_of
        self._cond = threading.Condition()
        self._queue: Deque[Request] = deque()
        self._workers: Dict[str, threading.Thread] = {}
        self._sessions = 0
        self._unfinished: Dict[Call, int] = {}  # prompts not resolved yet, per call
        self._stats = {"sessions": 0, "prompts": 0, "refills": 0, "shrinks": 0, "steps": 0, "slot_steps": 0, "tokens": 0,
                       "prefill_seconds": 0.0}

    # ------------------------------------------------------------------ submitting
    def submit(self, call: Call, prompts: List[List[int]], indices: List[int],
               constraints: Optional[List] = None) -> List[PromptFuture]:
        """Queues prompts (token ids) with their indices in the caller's input and their compiled
        constraints (None: free); returns one future per prompt, in the same order."""
        requests = []
        constraints = [None] * len(prompts) if constraints is None else constraints
        for prompt, index, constraint in zip(prompts, indices, constraints):
            rows = plan_rows([prompt], [index], call.resolved, len(prompt), [constraint])
            requests.append(Request(call, index, rows, concurrent.futures.Future()))
        with self._cond:
            self._unfinished[call] = self._unfinished.get(call, 0) + len(requests)
            self._queue.extend(requests)
            for replica in self.replicas:
                if replica.name not in self._workers:
                    # Not a daemon: the interpreter waits for a running chunk instead of killing
                    # the thread inside XLA (a worker leaves as soon as the queue is empty).
                    worker = threading.Thread(target=self._work, args=(replica,), daemon=False,
                                              name=f"jaxgen-slots-{replica.name}")
                    self._workers[replica.name] = worker
                    worker.start()
        return [PromptFuture(r.future) for r in requests]

    @property
    def stats(self) -> dict:
        """A copy of the counters: sessions started, prompts admitted, refills (prefills into free
        slots), shrinks (moves to a smaller batch), decode steps (loop iterations, summed over
        replicas), slot_steps (steps x slots), generated tokens and prefill_seconds (wall time of
        the refills' prefills); and `utilisation`, tokens / slot_steps (0.0 before any step)."""
        with self._cond:
            stats = dict(self._stats)
        stats["utilisation"] = stats["tokens"] / stats["slot_steps"] if stats["slot_steps"] else 0.0
        return stats

    def count(self, **increments: float) -> None:
        with self._cond:
            for name, value in increments.items():
                self._stats[name] += value

    @property
    def active(self) -> int:
        """Calls with prompts not resolved yet (waiting or decoding)."""
        with self._cond:
            return len(self._unfinished)

    def resolve(self, req: Request, result: Optional[GenerationResult] = None, error: Optional[BaseException] = None,
                cancel: bool = False, locked: bool = False) -> None:
        """Sets a request's outcome once (the call stops counting as active first, so that a
        caller woken by its last result sees the Generator idle)."""
        if req.future.done():
            return
        if not locked:
            with self._cond:
                self._forget(req)
        else:
            self._forget(req)
        if cancel:
            req.future.cancel()
        elif error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    def _forget(self, req: Request) -> None:
        left = self._unfinished.get(req.call, 0) - 1
        if left > 0:
            self._unfinished[req.call] = left
        else:
            self._unfinished.pop(req.call, None)

    def fail(self, requests: List[Request], exc: BaseException) -> None:
        for r in requests:
            self.resolve(r, error=exc)

    # ------------------------------------------------------------------ the worker
    def _take(self, key: Optional[tuple], limit: int, must_fit: bool = False) -> List[Request]:
        """Pops requests from the head of the queue while they share `key` (None: the head's key)
        and their rows fit in `limit` (the first one always does unless `must_fit`: a request with
        more hypotheses than the width starts a session of its own). Cancelled requests are dropped.
        With several replicas, takes at most a fair share of the queue. Call with the lock held."""
        taken: List[Request] = []
        rows = 0
        share = math.ceil(sum(len(r.rows) for r in self._queue) / len(self.replicas)) if len(self.replicas) > 1 else None
        while self._queue:
            head = self._queue[0]
            if head.call.cancelled:
                self.resolve(self._queue.popleft(), cancel=True, locked=True)
                continue
            if key is None:
                key = head.call.key
            if head.call.key != key or ((taken or must_fit) and rows + len(head.rows) > limit):
                break
            if share is not None and taken and rows + len(head.rows) > share:
                break
            taken.append(self._queue.popleft())
            rows += len(head.rows)
        return taken

    def waiting_rows(self, key: tuple, limit: int) -> int:
        """Rows of the requests at the head of the queue that share `key` (counted up to `limit`)."""
        rows = 0
        with self._cond:
            for req in self._queue:
                if req.call.cancelled:
                    continue
                if req.call.key != key or rows >= limit:
                    break
                rows += len(req.rows)
        return rows

    def _work(self, replica) -> None:
        while True:
            with self._cond:
                requests = self._take(None, limit=self._queue[0].call.width if self._queue else 0)
                if not requests:
                    del self._workers[replica.name]
                    return
                self._sessions += 1
                self._stats["sessions"] += 1
            try:
                _Session(self, replica, requests[0].call).run(requests)
            except BaseException as exc:  # reported to every caller of the session; the worker goes on
                self.fail(requests, exc)
            finally:
                with self._cond:
                    self._sessions -= 1


class _Session:
    """Slots on one replica serving requests of one session key, until none is left."""

    def __init__(self, scheduler: SlotScheduler, replica, call: Call):
        self.s = scheduler
        self.replica = replica
        self.key = call.key
        self.width = call.width
        config = scheduler.config
        self.prefix, self.prefix_len = scheduler.prefix_of(replica, call.resolved)
        sharing = getattr(scheduler.prefix_of, "sharing", None)  # shared prompt prefixes (prefix_cache.StaticPrompts)
        self.share = sharing(replica, call.resolved, self.prefix) if sharing is not None else None
        opts = call.resolved.options
        self.spec = loop_spec(config, opts)._replace(constraint_words=call.constraint_words)
        self.proc = processor_options(call.resolved)
        self.samp = sampling_options(opts)
        self.stops = stop_options(call.resolved, config.vocab_size)
        self.slots: List[Optional[Tuple[Request, int]]] = []  # (request, row index) or None (free)
        self.state: Optional[DecodeState] = None
        self.max_new = np.zeros((0,), np.int32)
        self.min_new = np.zeros((0,), np.int32)
        self.position = np.zeros((0,), np.int32)
        self.handles = np.zeros((0,), np.int32)  # each slot's matcher handle (jaxgen.runtime.matchers)
        self.requests: List[Request] = []  # every request admitted (for failure reports)
        self.step = 0  # loop iterations run (the state's `step`, read after each chunk)

    # ------------------------------------------------------------------ capacity
    @property
    def batch(self) -> int:
        return len(self.slots)

    def _ensure_capacity(self, batch: int, rows: List[Row]) -> None:
        """Grows the state (or makes the first one) to hold `batch` slots and these rows."""
        config = self.s.config
        width = prompt_width(rows, self.s.plan)
        length = max([self.prefix_len + width] + [self.prefix_len + len(r.prompt) - 1 + r.max_new for r in rows])
        n_out = max(r.max_new for r in rows)
        hist = max(len(r.history) + r.max_new for r in rows)
        if self.state is None:
            l0, n0, h0 = bucket(length, minimum=64), bucket(n_out, minimum=64), bucket(hist, minimum=64)
            self.state = loop_state(
                last=np.zeros((batch,), np.int32), position=np.zeros((batch,), np.int32),
                done=np.ones((batch,), bool), n_out=n0, history=row_history([], batch, h0, config.vocab_size),
                cache=init_cache(config, batch, l0, self.prefix.dtype),
                keys=on_device(np.zeros((batch, 2), np.uint32)),
                logits=_device_zeros((batch, 0, config.vocab_size)), stop_count=self.stops.lengths.shape[0],
                params=self.replica.params)
        else:
            state = self.state
            l0, n0, h0 = state.cache.length, state.out_tokens.shape[1], state.history.tokens.shape[1]
            if batch > self.batch or length > l0 or n_out > n0 or hist > h0:
                self.state = grow_state(state, config=config, batch=max(batch, self.batch),
                                        length=max(l0, bucket(length, minimum=64)),
                                        n_out=max(n0, bucket(n_out, minimum=64)), hist_len=max(h0, bucket(hist, minimum=64)))
        grow = batch - self.batch
        if grow > 0:
            self.slots.extend([None] * grow)
            self.max_new = np.concatenate([self.max_new, np.zeros((grow,), np.int32)])
            self.min_new = np.concatenate([self.min_new, np.zeros((grow,), np.int32)])
            self.position = np.concatenate([self.position, np.zeros((grow,), np.int32)])
            self.handles = np.concatenate([self.handles, np.full((grow,), matchers.FREE, np.int32)])

    # ------------------------------------------------------------------ admit / retire
    def admit(self, requests: List[Request]) -> None:
        """Prefills the requests' rows into free slots (growing the batch up to the width)."""
        self.requests.extend(requests)
        self.s.count(prompts=len(requests))
        pending: List[Tuple[Request, int]] = []
        for req in requests:
            for j, row in enumerate(req.rows):
                if row.max_new <= 0:  # nothing to generate (the prompt fills max_length)
                    req.hyps[j] = {"ids": [], "log_probs": np.zeros((0,), np.float64),
                                   "complete": completion(row, [], req.call.resolved.end_ids)}
                else:
                    pending.append((req, j))
            self._maybe_finish(req)
        if not pending:
            return
        need = sum(s is not None for s in self.slots) + len(pending)
        # Up to the width in slot_batch steps (one request with more hypotheses than the width gets them all).
        batch = self.batch if need <= self.batch else slot_batch(need, self.width)
        rows = [req.rows[j] for req, j in pending]
        self._ensure_capacity(batch, rows)
        free = [i for i, s in enumerate(self.slots) if s is None][:len(pending)]
        n = bucket(len(pending), minimum=1)
        config = self.s.config
        started = time.perf_counter()
        # Not waited for here: the rows' state below is built while the prefill runs.
        cache = prefill_rows(self.replica.params, config, rows, self.prefix, self.prefix_len,
                             self.s.plan, n, self.state.cache.length, self.share)
        history = row_history(rows, n, self.state.history.tokens.shape[1], config.vocab_size)
        pad = [0] * (n - len(rows))
        slots = np.array(free + [self.batch] * (n - len(rows)), np.int32)
        positions = [self.prefix_len + len(r.prompt) - 1 for r in rows]
        handles = matchers.open_rows([r.constraint for r in rows] + [None] * (n - len(rows)))
        self.handles[free] = handles[:len(rows)]
        fresh = loop_state(last=np.array([r.prompt[-1] for r in rows] + pad, np.int32),
                           position=np.array(positions + pad, np.int32), done=np.zeros((n,), bool),
                           n_out=self.state.out_tokens.shape[1], history=history, cache=cache,
                           keys=keys_of(rows, [req.call.seed for req, _ in pending], n),
                           logits=_device_zeros((n, 0, config.vocab_size)),
                           stop_count=self.stops.lengths.shape[0], params=self.replica.params, constraint=handles)
        self.state = insert_rows(self.state, on_device(slots), fresh)
        jax.block_until_ready(cache)
        self.s.count(refills=1, prefill_seconds=time.perf_counter() - started)
        for slot, (req, j), row, pos in zip(free, pending, rows, positions):
            self.slots[slot] = (req, j)
            self.max_new[slot] = row.max_new
            self.min_new[slot] = row.min_new
            self.position[slot] = pos

    def retire(self) -> None:
        """Reads the loop state, hands over finished rows and frees their slots (and those of
        cancelled calls)."""
        done, gen_len, position, step = jax.device_get((self.state.done, self.state.gen_len, self.state.position,
                                                        self.state.step))
        self.position = np.array(position, np.int32)
        self.s.count(steps=int(step) - self.step, slot_steps=(int(step) - self.step) * self.batch)
        self.step = int(step)
        finished = [i for i, s in enumerate(self.slots) if s is not None and done[i]]
        cancelled = [i for i, s in enumerate(self.slots) if s is not None and not done[i] and s[0].call.cancelled]
        if finished:
            tokens, log_probs = jax.device_get((self.state.out_tokens, self.state.out_log_probs))
            for i in finished:
                req, j = self.slots[i]
                n = int(gen_len[i])
                ids = tokens[i, :n].tolist()
                req.hyps[j] = {"ids": ids, "log_probs": log_probs[i, :n].astype(np.float64),
                               "complete": completion(req.rows[j], ids, req.call.resolved.end_ids)}
                self.s.count(tokens=n)
                self.slots[i] = None
                self._free_handle(i)
                self._maybe_finish(req)
        if cancelled:
            mask = np.zeros((self.batch,), bool)
            mask[cancelled] = True
            self.state = set_done(self.state, mask)
            for i in cancelled:
                req = self.slots[i][0]
                self.slots[i] = None
                self._free_handle(i)
                self.s.resolve(req, cancel=True)

    def _free_handle(self, slot: int) -> None:
        matchers.close_rows(self.handles[slot:slot + 1])
        self.handles[slot] = matchers.FREE

    def _maybe_finish(self, req: Request) -> None:
        if req.future.done() or any(h is None for h in req.hyps):
            return
        try:
            resolved = req.call.resolved
            check_positions(self.s.config, self.prefix_len, req.rows, [len(h["ids"]) for h in req.hyps],
                            resolved.options.max_length)
            result = assemble_results(req.rows, [[h] for h in req.hyps], resolved, self.s.vocabulary, self.s.bos_id,
                                      [req.index])[0]
        except Exception as exc:  # e.g. learned positions exhausted: this prompt's error only
            self.s.resolve(req, error=exc)
            return
        self.s.resolve(req, result=result)

    # ------------------------------------------------------------------ the loop
    def run(self, first: List[Request]) -> None:
        """Serves `first` and every request of the same key that arrives while slots run; an error
        fails the requests it admitted (the worker then goes on with the queue)."""
        try:
            self._run(first)
        except BaseException as exc:
            self.s.fail(self.requests, exc)
        finally:
            matchers.close_rows(self.handles)

    def _run(self, first: List[Request]) -> None:
        s = self.s
        self.admit(first)
        while True:
            occupied = sum(slot is not None for slot in self.slots)
            room = self.batch - occupied + max(self.width - self.batch, 0)
            waiting = s.waiting_rows(self.key, self.width)
            # Refill in groups (a prefill costs about one decode step whatever its rows), or at once
            # when the slots would otherwise stop.
            if room and waiting and (room >= min(self.refill_rows, waiting) or not occupied):
                with s._cond:
                    more = s._take(self.key, room, must_fit=True)
                if more:
                    self.admit(more)
                    waiting = s.waiting_rows(self.key, self.width)
            occupied_slots = [i for i, slot in enumerate(self.slots) if slot is not None]
            if not occupied_slots:
                return
            if not waiting and slot_batch(len(occupied_slots), self.width) < self.batch:
                occupied_slots = self._shrink(occupied_slots)
            self._decode_chunk(occupied_slots, waiting)
            self.retire()

    def _shrink(self, occupied: List[int]) -> List[int]:
        """Moves the running rows into a batch of slot_batch(len(occupied)) slots (the tail of a
        job: nothing waits, and a step of the full width would cost for the idle slots)."""
        batch = slot_batch(len(occupied), self.width)
        keep = occupied + [i for i, slot in enumerate(self.slots) if slot is None][:batch - len(occupied)]
        self.state = keep_rows(self.state, on_device(np.array(keep, np.int32)))
        self.slots = [self.slots[i] for i in keep]
        self.max_new, self.min_new, self.position, self.handles = (
            a[keep] for a in (self.max_new, self.min_new, self.position, self.handles))
        self.s.count(shrinks=1)
        return list(range(len(occupied)))

    @property
    def refill_rows(self) -> int:
        return max(1, self.width // REFILL_FRACTION)

    def _decode_chunk(self, occupied: List[int], waiting: int) -> None:
        """Runs up to CHUNK_STEPS steps; while rows wait for slots, stops as soon as enough rows
        finished for a refill group; while none wait, as soon as the running rows fit a smaller
        batch (the next chunk runs on it)."""
        state = self.state
        attend_len = live_length(int(self.position[occupied].max()) + 1, state.cache.length, self.batch)
        free = self.batch - len(occupied)
        if waiting:
            stop_done = max(min(self.refill_rows, waiting), free + 1)
        else:
            stop_done = self.batch - smaller_slot_batch(self.batch) if self.batch > 1 else self.batch + 1
        consts = DecodeConsts(proc=self.proc, samp=self.samp, max_new=on_device(self.max_new),
                              min_new=on_device(self.min_new), stops=self.stops)
        self.state = decode(self.replica.params, state, consts, on_device_int32(self.step + CHUNK_STEPS), on_device_int32(stop_done),
                            spec=self.spec._replace(attend_len=attend_len))
