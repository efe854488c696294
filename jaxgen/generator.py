"""`Generator`: the thin stateful layer over the pure, jitted decoding functions.

It validates inputs, maps tokens <-> ids and splits batches; the work runs in `jaxgen.runtime`:
static sub-batches (`static_batches`), the slot scheduler (`scheduler`), scoring (`scoring`), the
prefix cache that holds shared prefixes and static prompts (`prefix_cache`), memory checks
(`memory`). No model math lives here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import jax
import numpy as np

from jaxgen.constraints import Constraint, ConstraintCompiler, as_constraints, compile_all
from jaxgen.decoding.custom import as_processors, check_processors
from jaxgen.decoding.scoring import LOGIT_ROWS, SCORE_CHUNK, forward_logits, pass_plan
from jaxgen.model.cpu_kernels import arrange_for_cpu
from jaxgen.model.loading import load_params
from jaxgen.results import ScoringResult
from jaxgen.runtime.batching import bucket, pass_width, split_batches
from jaxgen.runtime.compilation_cache import enable_compilation_cache
from jaxgen.runtime.devices import resolve_devices
from jaxgen.runtime.memory import MemoryBudget, MemoryJob
from jaxgen.runtime.options import GenerationOptions, check_context, positions_fed, validate_options
from jaxgen.runtime.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache, StaticPrompts
from jaxgen.runtime.prefix_passes import PrefixPasses
from jaxgen.runtime.replicas import ReplicaPool, replicate, shard_tensor_parallel, tensor_parallel_layout
from jaxgen.runtime.scheduler import DEFAULT_WIDTHS, Call, SlotScheduler, schedulable
from jaxgen.runtime.scoring import Scorer, pad_rows, truncate_for_scoring
from jaxgen.runtime.static_batches import StaticBatches, check_batch_options, generate_group
from jaxgen.runtime.stops import StopTables
from jaxgen.runtime.streaming import TokenStream, bridge_async, iterate_in_chunks
from jaxgen.vocabulary import Vocabulary, as_id_batch, as_ids


class Generator:
    """Decoder-only language model with CTranslate2's `Generator` API.

    Args mirror `ctranslate2.Generator`: `model_path` is a directory made by a jaxgen converter;
    `device` is "cpu", "cuda"/"gpu", "tpu" or "auto"; `device_index` an int or list of ints.

    `attention` (an extension): "auto" (the fused cuDNN kernel on NVIDIA GPUs, JAX's Pallas
    splash kernel on TPUs, where the model allows it; else "flash"), "flash" (portable blocked
    attention), "cudnn", "pallas", or "dense" (the reference that materialises the scores). `prefill_chunk`: positions per prefill / full-pass
    chunk (default by platform: 512 on CPU, 16384 on GPUs, 8192 on TPUs); long prompts run in
    chunks of this size, which bounds memory.

    `continuous_batching` (an extension): run the calls that allow it on the slot scheduler
    (`jaxgen.runtime.scheduler`: a finished row's slot takes the next waiting prompt, and concurrent calls
    share the slots); False runs every call on static sub-batches, as CTranslate2 does.

    `memory_limit` (an extension): bytes per device that one call may use for its KV cache and
    activations; None uses what the device reports as free. A call whose estimated need exceeds
    it raises ValueError before any work starts (see `jaxgen.runtime.memory`).

    `context_length` (an extension): the most positions a call may feed the model; None is the
    model's `max_position_embeddings`. A call that could go past it (static prompt + prompt +
    max_length - 1 in generation, counting max_length as CTranslate2 does; the sequence less its
    last token in `score_batch`; the sequence in `forward_batch`) raises ValueError naming both
    lengths before any work, where CTranslate2 runs it (or, with learned positions, raises
    RuntimeError once a position past the table is reached). Set it higher to run past the
    trained positions on purpose (RoPE scaling experiments); learned position tables still end.
    Compiled programs are kept in JAX's persistent cache, `<jaxgen cache dir>/xla`
    (`JAXGEN_COMPILATION_CACHE=0` turns that off; see `jaxgen.runtime.compilation_cache`).

    `prefix_cache` (an extension): True (default) keeps the KV states of token prefixes per
    device (up to 2 GiB each, least recently used first out) and computes a prefix that rows
    share (in whole blocks of 32 tokens: a few-shot context, a document asked several questions,
    a prompt sampled several times), within one call or across calls, once, in `score_batch`,
    `generate_batch`, `generate_iterable` and the scheduler (`jaxgen.runtime.prefix_cache`,
    `jaxgen.runtime.prefix_passes`); an int sets the bytes per device; False (or 0) turns sharing
    off (static prompts are still cached, `static_prompt_cache_size` of them per device).
    """

    _stop_tables: Optional[StopTables] = None  # the vocabulary's stop-string tables, made on first use
    _constraint_compiler: Optional[ConstraintCompiler] = None  # constraints compiled for the vocabulary

    def __init__(self, model_path: str, device: str = "cpu", *, device_index: Union[int, Sequence[int]] = 0,
                 compute_type: str = "default", inter_threads: int = 1, intra_threads: int = 0,
                 max_queued_batches: int = 0, tensor_parallel: bool = False,
                 static_prompt_cache_size: int = 16, memory_limit: Optional[int] = None,
                 attention: str = "auto", prefill_chunk: Optional[int] = None, continuous_batching: bool = True,
                 context_length: Optional[int] = None, prefix_cache: Union[bool, int] = True):
        enable_compilation_cache()
        if not isinstance(prefix_cache, (bool, int)) or (not isinstance(prefix_cache, bool) and prefix_cache < 0):
            raise TypeError(f"prefix_cache must be a bool or an int >= 0 (bytes), got {prefix_cache!r}")
        if context_length is not None and (not isinstance(context_length, int) or isinstance(context_length, bool)):
            raise TypeError(f"context_length must be an int or None, got {type(context_length).__name__}")
        if context_length is not None and context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        for name, value in (("inter_threads", inter_threads), ("intra_threads", intra_threads),
                            ("max_queued_batches", max_queued_batches),
                            ("static_prompt_cache_size", static_prompt_cache_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if inter_threads < 1:
            raise ValueError(f"inter_threads must be >= 1, got {inter_threads}")
        if memory_limit is not None and (not isinstance(memory_limit, int) or isinstance(memory_limit, bool)):
            raise TypeError(f"memory_limit must be an int (bytes) or None, got {type(memory_limit).__name__}")
        if memory_limit is not None and memory_limit < 0:
            raise ValueError(f"memory_limit must be >= 0, got {memory_limit}")
        if not isinstance(continuous_batching, bool):
            raise TypeError(f"continuous_batching must be a bool, got {type(continuous_batching).__name__}")
        self._continuous = continuous_batching
        self._memory_limit = memory_limit
        self._inter_threads = inter_threads
        self._platform, self._devices = resolve_devices(device, device_index)
        self._device_index = [device_index] if isinstance(device_index, int) else list(device_index)
        config, params, tokens, ctype = load_params(model_path, compute_type, self._platform)
        self.config = config
        self.context_length = config.max_position_embeddings if context_length is None else context_length
        self._ctype = ctype
        self._compute_type_requested = compute_type
        self._vocab = Vocabulary(tokens, config.unk_token)
        self._plan = pass_plan(attention, prefill_chunk, self._platform, config, ctype.dtype)
        self._tensor_parallel = bool(tensor_parallel)
        replicas = self._place(params)
        del params
        self._pool = ReplicaPool(replicas, inter_threads)
        self._host_params: Optional[dict] = None  # kept by unload_model(to_cpu=True)
        self._loaded = True
        self.model_path = os.fspath(model_path)
        share = prefix_cache is not False and prefix_cache != 0
        self._prefixes = PrefixCache(max_bytes=DEFAULT_MAX_BYTES if isinstance(prefix_cache, bool) else prefix_cache,
                                     static_entries=static_prompt_cache_size)
        passes = PrefixPasses(self.config, self._plan, ctype.dtype, self._prefixes) if share else None
        self._static_prompts = StaticPrompts(self._prefixes, self.config, self._plan, ctype.dtype, passes)
        self._scorer = Scorer(self.config, self._plan, ctype.dtype, passes)
        self._budget = MemoryBudget(self.config, ctype.dtype, self._devices, self._platform, len(replicas),
                                    inter_threads, self._plan.chunk, memory_limit,
                                    len(self._devices) if self._tensor_parallel else 1)
        self._static_lock = threading.Lock()
        self._seed_lock = threading.Lock()
        self._seed_rng = np.random.default_rng()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=inter_threads * len(replicas), thread_name_prefix="jaxgen")
        self._batches = StaticBatches(self._pool, self._executor)
        self._scheduler = SlotScheduler(self.config, self._plan, self._vocab, self._bos_id(), self._pool.replicas,
                                        self._static_prompts)

    def _place(self, params: dict):
        """Host params -> replicas (one per device, or one sharded over all of them)."""
        if self._tensor_parallel:
            self.config = tensor_parallel_layout(self.config, self._devices)  # with its mesh (replicas.py)
            return [shard_tensor_parallel(params, self.config, self._devices)]
        if self._platform == "cpu":  # each weight in its measured layout (jaxgen.model.cpu_kernels)
            params = arrange_for_cpu(params, self.config)
        return replicate(params, self._devices)

    # ------------------------------------------------------------------ unload / load
    def unload_model(self, to_cpu: bool = False) -> None:
        """Frees the device weights (CTranslate2 §1.2). Does nothing while batches are active.

        to_cpu=True keeps a host copy for a fast `load_model()` (and does nothing on a CPU device);
        otherwise the prefix cache (static prompts included) is dropped too.
        """
        if not self._loaded or self.num_active_batches > 0 or (to_cpu and self._platform == "cpu"):
            return
        if to_cpu and self._host_params is None:
            self._host_params = jax.device_get(self._pool.replicas[0].params)
        elif not to_cpu:
            self._host_params = None
            self._prefixes.clear()  # static prompts and shared prefixes
        for replica in self._pool.replicas:
            replica.params = None
        self._loaded = False

    def load_model(self, keep_cache: bool = False) -> None:
        """Puts the weights back on the devices (from the host copy, else from disk)."""
        if self._loaded:
            return
        params = self._host_params
        if params is None:
            params = load_params(self.model_path, self._compute_type_requested, self._platform)[1]
        for replica, placed in zip(self._pool.replicas, self._place(params)):
            replica.params = placed.params
        if not keep_cache:
            self._host_params = None
        self._loaded = True

    @property
    def model_is_loaded(self) -> bool:
        return self._loaded

    def _check_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError("The model for this translator was unloaded")

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> str:
        return self._platform

    @property
    def device_index(self) -> List[int]:
        return list(self._device_index)

    @property
    def num_replicas(self) -> int:
        return len(self._pool.replicas)

    @property
    def num_generators(self) -> int:
        return len(self._pool.replicas)

    @property
    def num_queued_batches(self) -> int:
        return self._pool.queued

    @property
    def num_active_batches(self) -> int:
        return self._pool.queued + self._pool.running + self._scheduler.active

    @property
    def compute_type(self) -> str:
        return self._ctype.name

    @property
    def attention(self) -> str:
        """The attention implementation that runs ("flash", "cudnn", "pallas" or "dense")."""
        return self._plan.impl

    @property
    def scheduler_stats(self) -> dict:
        """Counters of the slot scheduler since the Generator was made: sessions, prompts admitted,
        refills (prefills into free slots) and their prefill_seconds, shrinks, decode steps,
        slot_steps, generated tokens, and the slot `utilisation` (tokens / slot_steps; see
        `jaxgen.runtime.scheduler.SlotScheduler.stats`)."""
        return self._scheduler.stats

    @property
    def tensor_parallel(self) -> bool:
        return self._tensor_parallel

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocab

    @property
    def prefix_cache(self) -> PrefixCache:
        """The prefix cache (static prompts and shared prefixes; see `jaxgen.runtime.prefix_cache`):
        `count()`, `nbytes()`, `stats` (hits, misses, reused tokens, ...), `clear()`."""
        return self._prefixes

    # ------------------------------------------------------------------ generation
    def generate_batch(self, start_tokens, *, max_batch_size: int = 0, batch_type: str = "examples",
                       asynchronous: bool = False, beam_size: int = 1, patience: float = 1,
                       num_hypotheses: int = 1, length_penalty: float = 1, repetition_penalty: float = 1,
                       no_repeat_ngram_size: int = 0, disable_unk: bool = False, suppress_sequences=None,
                       end_token=None, return_end_token: bool = False, max_length: int = 512,
                       min_length: int = 0, static_prompt=None, cache_static_prompt: bool = True,
                       include_prompt_in_result: bool = True, return_scores: bool = False,
                       return_logits_vocab: bool = False, return_alternatives: bool = False,
                       min_alternative_expansion_prob: float = 0, sampling_topk: int = 1,
                       sampling_topp: float = 1, sampling_temperature: float = 1, callback=None,
                       random_seed: Optional[int] = None, logits_processors=None, prompt_lookup_tokens: int = 0,
                       stop_strings=None, constraint=None):
        """Generates continuations of prompts given as lists of token strings (CTranslate2 §2).

        Returns one GenerationResult per prompt (or futures with `asynchronous=True`).
        Extensions:
        `random_seed` makes sampling reproducible.
        `logits_processors`: a list of JAX functions `fn(logits [B, V] float32, generated [B, N]
        int32, step int32 scalar) -> logits [B, V]` traced into the decoding loop, applied after
        CTranslate2's processors and before the greedy / sampling / beam choice; see
        `jaxgen.decoding.custom` for `generated` (-1 past each row's step) and `step`. A processor
        that raises or returns another shape or dtype raises ValueError naming it, before any
        work. Such calls run on static sub-batches.
        `prompt_lookup_tokens=K` (greedy search only): prompt-lookup speculative decoding, which
        drafts up to K tokens per step from an earlier occurrence of the text's last n-gram in
        the prompt (static prompt included) and the text generated so far, and verifies them in
        one pass; the output is exactly greedy search's (`jaxgen.decoding.speculative`).
        `stop_strings`: a string or a list of strings; a hypothesis ends at the first generated
        token whose text completes one of them (matched on the generated text, across tokens or
        inside one, in the decoding loop), and that token is its last token (cut the decoded text
        at the string yourself: `text[:text.find(s) + len(s)]`). See `jaxgen.runtime.stops`.
        `constraint`: structured output (`jaxgen.constraints`: JsonSchema, Regex, Choice, Grammar),
        one for every prompt or a list with one per prompt (None: a free prompt). The generated
        text (not the prompt tokens returned with include_prompt_in_result) keeps to it: greedy
        search, sampling and beam search (each beam its own state); the end token is allowed only
        once it is complete, and `GenerationResult.constraint_complete` tells, per hypothesis,
        whether it is (False: cut by max_length, a stop string or a callback). A constraint wins
        over min_length and the processors' bans where they conflict. Not with
        return_alternatives or prompt_lookup_tokens. Bad constraints raise ValueError before any
        work. Needs llguidance (`pip install 'jaxgen[constraints]'`).
        """
        if isinstance(start_tokens, list) and not start_tokens:
            return []  # nothing is validated for an empty batch (spec §2.1)
        check_batch_options(max_batch_size, batch_type)
        self._check_loaded()
        if not isinstance(asynchronous, (bool, int, float)) and asynchronous is not None:
            raise TypeError(f"asynchronous must be a bool, got {type(asynchronous).__name__}")
        resolved = self._resolve_options(
            beam_size=beam_size, patience=patience, num_hypotheses=num_hypotheses, length_penalty=length_penalty,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            disable_unk=disable_unk, suppress_sequences=suppress_sequences, end_token=end_token,
            return_end_token=return_end_token, max_length=max_length, min_length=min_length,
            static_prompt=static_prompt, cache_static_prompt=cache_static_prompt,
            include_prompt_in_result=include_prompt_in_result, return_scores=return_scores,
            return_logits_vocab=return_logits_vocab, return_alternatives=return_alternatives,
            min_alternative_expansion_prob=min_alternative_expansion_prob, sampling_topk=sampling_topk,
            sampling_topp=sampling_topp, sampling_temperature=sampling_temperature, callback=callback,
            random_seed=random_seed, logits_processors=logits_processors,
            prompt_lookup_tokens=prompt_lookup_tokens, stop_strings=stop_strings)
        prompts = as_id_batch(start_tokens, self._vocab, "start_tokens", allow_ids=False)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("One input has no decoder start token")
        self._check_generation_context(prompts, resolved, first_index=0)
        compiled = self._compile_constraints(as_constraints(constraint, len(prompts)), resolved)
        if logits_processors:
            rows = len(prompts) * (beam_size if beam_size > 1 else num_hypotheses)
            check_processors(as_processors(logits_processors), rows, bucket(max_length, minimum=64),
                             self.config.vocab_size)
        seed = random_seed if random_seed is not None else self._next_seed()
        if self._continuous and schedulable(resolved, batch_type):
            call = Call(resolved, seed, self._slot_width(max_batch_size, resolved), _words(compiled))
            self._check_scheduled_memory(prompts, call)
            futures = self._scheduler.submit(call, prompts, list(range(len(prompts))), compiled)
            if asynchronous:
                return futures
            try:
                return [f.result() for f in futures]
            finally:
                call.cancel()  # after an error (or an interrupt), the other prompts stop too
        groups = split_batches([len(p) for p in prompts], max_batch_size, batch_type)
        # The shortest prompt of each sub-batch sets CTranslate2's penalty history (spec §5.3);
        # it is kept when a sub-batch is split over replicas so that results do not change.
        min_len = {}
        for group in groups:
            for i in group:
                min_len[i] = min(len(prompts[j]) for j in group)
        groups = self._batches.spread(groups)
        opts, static_len = resolved.options, len(resolved.static_prompt_ids)
        per_prompt = opts.beam_size if opts.beam_size > 1 else opts.num_hypotheses
        jobs = []
        for group in groups:
            longest, rows = max(len(prompts[i]) for i in group), len(group) * per_prompt
            jobs.append(MemoryJob(batch=rows, cache_length=static_len + longest + opts.max_length,
                                  chunk_tokens=longest, decode=True, vocab_rows=rows,
                                  stored_logits_rows=rows * opts.max_length if opts.return_logits_vocab else 0))
        self._budget.check("generate_batch", jobs, len(groups), "lower the batch size (max_batch_size), "
                           + ("beam_size, " if opts.beam_size > 1 else "")
                           + ("num_hypotheses, " if per_prompt > 1 and opts.beam_size == 1 else "")
                           + "max_length, or the prompt length")

        def job(replica, group_index: int, group: List[int]):
            return generate_group(replica, self.config, self._plan, self._vocab, self._bos_id(), self._static_prompts,
                                  [prompts[i] for i in group], group, resolved, seed, group_index,
                                  min(min_len[i] for i in group), [compiled[i] for i in group])

        return self._batches.run(groups, job, len(prompts), asynchronous)

    def generate_tokens(self, prompt, max_batch_size: int = 0, batch_type: str = "examples", *,
                        max_length: int = 512, min_length: int = 0, sampling_topk: int = 1,
                        sampling_topp: float = 1, sampling_temperature: float = 1, return_log_prob: bool = False,
                        repetition_penalty: float = 1, no_repeat_ngram_size: int = 0, disable_unk: bool = False,
                        suppress_sequences=None, end_token=None, static_prompt=None,
                        cache_static_prompt: bool = True, callback=None, random_seed: Optional[int] = None,
                        logits_processors=None, stop_strings=None, constraint=None) -> TokenStream:
        """Streams GenerationStepResult for one prompt (list of str) or a batch (list of lists).

        The end token is yielded as the last step of an entry that stops on it. Options are
        validated before this returns; `close()` stops the decoding within a few steps.
        `logits_processors`, `stop_strings`, `constraint`: as for `generate_batch` (the token that
        completes a stop string is the entry's last step, `is_last=True`).
        """
        batch = [prompt] if prompt and isinstance(prompt[0], str) else prompt
        options = dict(max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, beam_size=1,
                       include_prompt_in_result=False, return_scores=return_log_prob, max_length=max_length,
                       min_length=min_length, sampling_topk=sampling_topk, sampling_topp=sampling_topp,
                       sampling_temperature=sampling_temperature, repetition_penalty=repetition_penalty,
                       no_repeat_ngram_size=no_repeat_ngram_size, disable_unk=disable_unk,
                       suppress_sequences=suppress_sequences, end_token=end_token, static_prompt=static_prompt,
                       cache_static_prompt=cache_static_prompt, random_seed=random_seed,
                       logits_processors=logits_processors, stop_strings=stop_strings, constraint=constraint)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        return TokenStream(lambda cb: self.generate_batch(batch, callback=cb, **options), callback)

    async def async_generate_tokens(self, prompt, max_batch_size: int = 0, batch_type: str = "examples", **kwargs):
        """`generate_tokens` as an async iterator; waiting for tokens never blocks the event loop."""
        stream = self.generate_tokens(prompt, max_batch_size, batch_type, **kwargs)
        async for step in bridge_async(stream):
            yield step

    def generate_iterable(self, start_tokens: Iterable, max_batch_size: int = 32, batch_type: str = "examples",
                          **kwargs):
        """Generates from an iterable of prompts; yields results in input order, each as soon as it
        and the ones before it are done. Takes the options of `generate_batch`.

        Calls that `jaxgen.runtime.scheduler.schedulable` accepts run on the slot scheduler with
        `max_batch_size` slots (continuous batching: a finished row's slot takes the next prompt);
        the others read the iterable in chunks of sub-batches, as CTranslate2 does. A prompt that
        is not a valid token list raises, naming its index, after the results before it.
        Closing the generator stops the decoding of the prompts it had read ahead.
        `constraint`: one constraint for every prompt (or None), or an iterable of constraints (None
        for a free prompt) read alongside the prompts, one per prompt (the loop then asks for masks
        whatever the entries). A bad constraint raises like a bad prompt, naming its index.
        """
        check_batch_options(max_batch_size, batch_type)
        if "asynchronous" in kwargs:
            raise TypeError("generate_iterable() got an unexpected keyword argument 'asynchronous'")
        self._check_loaded()
        constraint = kwargs.pop("constraint", None)
        resolved = self._resolve_options(**kwargs)
        if constraint is None or isinstance(constraint, Constraint):
            single = self._compile_constraints([constraint], resolved)[0]
            words = _words([single])
            constraint_of = lambda index: single  # noqa: E731
        else:
            if isinstance(constraint, (str, bytes, dict)) or not hasattr(constraint, "__iter__"):
                raise TypeError("constraint must be a jaxgen.constraints constraint, an iterable of them (None "
                                f"for a free prompt), or None; got {type(constraint).__name__}")
            constraint_of = self._constraint_reader(iter(constraint), resolved)
            words = self._compile_constraints([], resolved, mask_words=True)
        if max_batch_size < 1 or not self._continuous or not schedulable(resolved, batch_type):
            read = [0]  # prompts submitted so far (a chunk's first index)

            def run_chunk(chunk):
                first, read[0] = read[0], read[0] + len(chunk)
                kept = [constraint_of(first + i) for i in range(len(chunk))]
                return self.generate_batch(chunk, max_batch_size=max_batch_size, batch_type=batch_type,
                                           asynchronous=True, constraint=[c and c.constraint for c in kept], **kwargs)
            return iterate_in_chunks(start_tokens, run_chunk, max_batch_size, batch_type)
        seed = resolved.options.random_seed
        call = Call(resolved, seed if seed is not None else self._next_seed(),
                    self._slot_width(max_batch_size, resolved), words)
        return self._iterate_scheduled(iter(start_tokens), call, read_ahead=16 * max_batch_size,
                                       constraint_of=constraint_of)

    def _constraint_reader(self, constraints: Iterator, resolved):
        """index -> the compiled constraint of prompt `index`, read from `constraints` as needed
        (entries past its end are free); ValueError / TypeError name the index."""
        compiled: Dict[int, object] = {}
        read = [0]

        def constraint_of(index: int):
            while read[0] <= index:
                entry = next(constraints, None)
                try:
                    compiled[read[0]] = self._compile_constraints(as_constraints([entry], 1), resolved)[0]
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"constraint[{read[0]}]: {exc}") from None
                read[0] += 1
            return compiled.pop(index, None)

        return constraint_of

    def _iterate_scheduled(self, items, call: Call, read_ahead: int, constraint_of=lambda index: None):
        """The generator behind a scheduled generate_iterable: keeps up to `read_ahead` prompts
        submitted (topped up in blocks, so that slots start full) and yields results in order."""
        pending: collections.deque = collections.deque()
        index = 0
        error: Optional[Exception] = None
        exhausted = False
        try:
            while True:
                if not exhausted and error is None and len(pending) <= read_ahead // 2:
                    block: List[List[int]] = []
                    constraints: list = []
                    first = index
                    for tokens in items:
                        try:
                            ids = self._prompt_ids(tokens, f"start_tokens[{index}]")
                            self._check_generation_context([ids], call.resolved, first_index=index)
                            constraints.append(constraint_of(index))
                        except (TypeError, ValueError) as exc:
                            error = exc
                            break
                        block.append(ids)
                        index += 1
                        if len(pending) + len(block) >= read_ahead:
                            break
                    else:
                        exhausted = True
                    if block:
                        self._check_scheduled_memory(block, call)
                        pending.extend(self._scheduler.submit(call, block, list(range(first, first + len(block))),
                                                              constraints))
                if not pending:
                    break
                yield pending.popleft().result()
            if error is not None:
                raise error
        finally:
            call.cancel()

    def score_iterable(self, tokens: Iterable, max_batch_size: int = 64, batch_type: str = "examples", **kwargs):
        """Scores an iterable of token lists, reading it in chunks; results in input order."""
        return iterate_in_chunks(tokens, lambda chunk: self.score_batch(
            chunk, max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **kwargs),
            max_batch_size, batch_type)

    def clear_static_prompt_cache(self) -> None:
        """Drops every cached static-prompt state (on every device)."""
        self._prefixes.clear(static=True)

    def _next_seed(self) -> int:
        with self._seed_lock:
            return int(self._seed_rng.integers(0, 2**31 - 1))

    # ------------------------------------------------------------------ forward / score
    def forward_batch(self, tokens, lengths=None, *, return_log_probs: bool = False) -> jax.Array:
        """Full logits (or log-probs) of a batch: float32 array [batch, max_len, vocab].

        tokens: lists of token strings or of ids (mixed lengths allowed, right-padded), or a
        dense int array [batch, max_len] together with `lengths` [batch].
        Positions past a row's length hold values computed from padding.
        """
        self._check_loaded()
        ids, lens = self._forward_inputs(tokens, lengths)
        batch, max_len = len(ids), int(max(lens))
        longest = lens.index(max_len)
        check_context(max_len, self.context_length, f"inputs[{longest}] ({max_len} tokens)")
        self._budget.check("forward_batch", [MemoryJob(batch=batch, cache_length=max_len, chunk_tokens=max_len,
                                                       decode=False, vocab_rows=batch * max_len)], 1,
                           "pass fewer or shorter sequences at a time")
        width = pass_width(bucket(max_len), self._plan.chunk)
        padded, lengths_arr = pad_rows(ids, lens, width, bucket(batch, minimum=1))
        out = forward_logits(self._pool.replicas[0].params, padded, lengths_arr, config=self.config,
                             dtype=self._ctype.dtype, log_probs=bool(return_log_probs), chunk=self._plan.chunk,
                             impl=self._plan.impl)
        return out[:batch, :max_len]

    def _forward_inputs(self, tokens, lengths):
        if isinstance(tokens, (np.ndarray, jax.Array)):
            arr = np.asarray(tokens)
            if arr.ndim != 2:
                raise ValueError(f"dense inputs must have rank 2 [batch, max_len], got shape {arr.shape}")
            if lengths is None:
                raise ValueError("lengths vector is required when passing a dense input")
            lens = [int(x) for x in np.asarray(lengths).reshape(-1)]
            if len(lens) != arr.shape[0]:
                raise ValueError(f"lengths has {len(lens)} entries for a batch of {arr.shape[0]}")
            if any(not 1 <= n <= arr.shape[1] for n in lens):
                raise ValueError(f"lengths must be in [1, {arr.shape[1]}], got {lens}")
            ids = [arr[i, :n].astype(np.int64).tolist() for i, n in enumerate(lens)]
            ids = as_id_batch(ids, self._vocab, "inputs", allow_ids=True)
        else:
            ids = as_id_batch(tokens, self._vocab, "inputs", allow_ids=True)
            lens = [len(s) for s in ids]
        if not ids:
            raise ValueError("forward_batch needs at least one sequence")
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"inputs[{i}] is empty")
        return ids, lens

    def score_batch(self, tokens, *, max_batch_size: int = 0, batch_type: str = "examples",
                    max_input_length: int = 1024, offset: Union[int, Sequence[int]] = 0, asynchronous: bool = False,
                    return_greedy: bool = False):
        """Log-likelihood of each token given its prefix (CTranslate2 §4.1).

        Returns one ScoringResult(tokens=input[1:], log_probs) per sequence; sequences shorter
        than 2 tokens get empty results. Sequences longer than `max_input_length` are truncated,
        keeping a final end token. `offset` drops the first `offset` scored tokens; a list (an
        extension) gives one offset per sequence (e.g. a context's length: only the continuation
        is returned, and a shared context's state is then computed without the vocabulary head).
        `return_greedy` (an extension): ScoringResult.greedy[t] tells whether token t has the
        highest logit at its position (what greedy search would choose; lm-eval's `is_greedy`).
        Rows that share a prefix compute it once (see the class's `prefix_cache`).
        """
        check_batch_options(max_batch_size, batch_type)
        self._check_loaded()
        offsets = list(offset) if isinstance(offset, (list, tuple)) else None
        for name, value in [("max_input_length", max_input_length)] + (
                [(f"offset[{i}]", v) for i, v in enumerate(offsets)] if offsets is not None else [("offset", offset)]):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        ids = as_id_batch(tokens, self._vocab, "tokens", allow_ids=True)
        if offsets is not None and len(offsets) != len(ids):
            raise ValueError(f"offset has {len(offsets)} entries for {len(ids)} sequences")
        if not ids:
            return []
        offsets = offsets if offsets is not None else [offset] * len(ids)
        eos = self._eos_ids()
        prepared = [truncate_for_scoring(seq, max_input_length, eos) for seq in ids]
        longest = max(range(len(prepared)), key=lambda i: len(prepared[i]))
        check_context(len(prepared[longest]) - 1, self.context_length,
                      f"tokens[{longest}] ({len(prepared[longest])} tokens after max_input_length)")
        groups = split_batches([max(len(seq) - 1, 0) for seq in prepared], max_batch_size, batch_type)
        groups = self._batches.spread(groups)
        jobs = []
        for group in groups:
            longest = max(len(prepared[i]) for i in group)
            jobs.append(MemoryJob(batch=len(group), cache_length=longest, chunk_tokens=longest, decode=False,
                                  vocab_rows=max(len(group) * SCORE_CHUNK, LOGIT_ROWS)))
        self._budget.check("score_batch", jobs, len(groups),
                           "lower the batch size (max_batch_size) or the sequence length (max_input_length)")

        def job(replica, _: int, group: List[int]) -> List[ScoringResult]:
            todo = [i for i in group if len(prepared[i]) >= 2]
            scored = dict(zip(todo, self._scorer.score(replica, [prepared[i] for i in todo], bool(return_greedy),
                                                       [offsets[i] for i in todo]) if todo else []))
            out = []
            for i in group:
                if i not in scored:
                    out.append(ScoringResult([], []))
                else:
                    targets, skip = prepared[i][1:], offsets[i]
                    log_probs, greedy = scored[i]
                    out.append(ScoringResult(self._vocab.to_tokens(targets[skip:]), log_probs[skip:],
                                             greedy[skip:] if return_greedy else []))
            return out

        return self._batches.run(groups, job, len(prepared), asynchronous)

    # ------------------------------------------------------------------ helpers
    def _resolve_options(self, **options):
        """generate_batch's decoding options, validated, with tokens resolved to ids."""
        resolved = validate_options(GenerationOptions(**options), self._vocab, self._eos_ids())
        if not resolved.stop_strings:
            return resolved
        with self._static_lock:
            if self._stop_tables is None:
                self._stop_tables = StopTables(self._vocab.tokens, [] if self._vocab.unk_id is None
                                               else [self._vocab.unk_id])
        tables = self._stop_tables.tables(resolved.stop_strings, resolved.end_ids)
        return dataclasses.replace(resolved, stop_tables=tables)

    def prepare_constraint(self, constraint) -> None:
        """Compiles a constraint (`jaxgen.constraints`) for this model's vocabulary and caches it,
        so that a bad one raises ValueError here (generate calls do this themselves)."""
        self._compile_constraints(as_constraints(constraint, 1), self._resolve_options())

    def _compile_constraints(self, constraints: list, resolved, mask_words: bool = False):
        """The prompts' constraints compiled for this vocabulary (cached), or ValueError before any
        work: a malformed or unenforceable constraint, or options that cannot honour one.
        mask_words: check the options only and return the vocabulary's mask width instead."""
        if all(c is None for c in constraints) and not mask_words:
            return constraints
        opts = resolved.options
        for bad, what in ((opts.return_alternatives, "return_alternatives"),
                          (bool(opts.prompt_lookup_tokens), "prompt_lookup_tokens"),
                          (not resolved.end_ids, "end_token=[] (a constrained row ends with an end token)")):
            if bad:
                raise ValueError(f"constraint cannot be combined with {what}")
        with self._static_lock:
            if self._constraint_compiler is None:
                config = self.config
                named = [config.bos_token, config.eos_token, config.unk_token, getattr(config, "pad_token", None)]
                eos = self._eos_ids()
                self._constraint_compiler = ConstraintCompiler(self._vocab.tokens, eos[0] if eos else None, named)
        if mask_words:
            return self._constraint_compiler.mask_words
        return compile_all(self._constraint_compiler, constraints)

    def _check_generation_context(self, prompts: List[List[int]], resolved, first_index: int) -> None:
        """ValueError when a prompt could feed the model more positions than the context length."""
        opts, static = resolved.options, len(resolved.static_prompt_ids)
        lengths = [positions_fed(len(p), opts, static) for p in prompts]
        i = max(range(len(prompts)), key=lengths.__getitem__)
        what = (f"start_tokens[{first_index + i}] ({len(prompts[i])} tokens"
                + (f", after a static prompt of {static}" if static else "")
                + f") with max_length={opts.max_length}"
                + (" (which counts the prompt: include_prompt_in_result=True)" if opts.include_prompt_in_result
                   else ""))
        check_context(lengths[i], self.context_length, what)

    def _prompt_ids(self, tokens, what: str) -> List[int]:
        ids = as_ids(tokens, self._vocab, what, allow_ids=False)
        if not ids:
            raise ValueError(f"{what} has no decoder start token")
        return ids

    def _slot_width(self, max_batch_size: int, resolved) -> int:
        """Decode slots per replica for a scheduled call: max_batch_size prompts' rows, or the
        platform's default when it is 0."""
        if max_batch_size == 0:
            return DEFAULT_WIDTHS.get(self._platform, 64)
        return max_batch_size * resolved.options.num_hypotheses

    def _check_scheduled_memory(self, prompts: List[List[int]], call: Call) -> None:
        opts = call.resolved.options
        rows = min(call.width, len(prompts) * opts.num_hypotheses)
        longest = max(len(p) for p in prompts)
        job = MemoryJob(batch=rows, cache_length=len(call.resolved.static_prompt_ids) + longest + opts.max_length,
                        chunk_tokens=longest, decode=True, vocab_rows=rows, stored_logits_rows=0)
        replicas = min(len(self._pool.replicas), -(-len(prompts) * opts.num_hypotheses // rows))
        self._budget.check("generate_batch", [job] * replicas, replicas,
                           "lower the batch size (max_batch_size), max_length, or the prompt length")

    def _bos_id(self) -> Optional[int]:
        return self._vocab.id_of(self.config.bos_token) if self.config.bos_token in self._vocab else None

    def _eos_ids(self) -> List[int]:
        eos = self.config.eos_token
        return [self._vocab.id_of(eos)] if eos is not None and eos in self._vocab else []



def _words(compiled: list) -> int:
    """Mask words of a call's compiled constraints (0: none; see jaxgen.decoding.constrain)."""
    return max((c.words for c in compiled if c is not None), default=0)
