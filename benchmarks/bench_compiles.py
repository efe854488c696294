"""How many XLA programs a realistic research loop compiles, and what compiling costs.

A seeded, reproducible loop of mixed calls on one `Generator` -- `generate_batch` with batch sizes
1..32, prompts of 5..600 tokens (log-uniform; the rows of a batch have mixed lengths), max_length
in {16, 32, 64, 100, 200}, greedy, top-k sampling, a few with a static prompt and a few beam
searches; `score_batch` with 1..16 sequences of 8..1000 tokens; a few `forward_batch` -- is run
in-process with JAX's persistent compilation cache OFF, and every XLA compilation is counted
through JAX's monitoring hooks (`/jax/core/compile/backend_compile_duration`, one event per
compiled program, with the jitted function's name).

Reported:
  * calls per API, loop wall time, and the load average;
  * per jitted function (prefill, decode, beam_decode, start_cache, expand_beams,
    target_log_probs, forward_logits; the small eager jnp ops grouped): programs compiled, compile
    seconds, trace/lowering seconds, and the distinct shapes / static arguments it was called with
    (observed by wrapping the engine's jitted functions, from this process only; the engine code is
    not changed);
  * which bucket dimensions multiply the program count: for each engine function, the distinct
    values of each dimension, the distinct keys as dimensions are added one by one, and how many
    programs would remain if one dimension were constant;
  * the first call vs. the warm second call of one representative generate_batch, run before the loop;
  * --persistent-cache: the same loop in two fresh processes sharing a new, empty cache directory
    (jaxgen's own setup: `<JAXGEN_HOME>/xla`, 0.5 s threshold): cold (compiles and writes), then
    warm (reads); their compile seconds and first-call times.

The loop's full size (40 generate, 20 score, 5 forward calls, the sizes above) is the default with
--tiny: a random-weight 6-layer copy of the model (hidden 64, vocabulary 1024) with its layer
pattern and sliding window, uncapped. Program counts do not depend on the model's size, so this
gives the exact program count of the full loop in a few minutes (compile seconds then are the tiny
model's). On a real model compute dominates (the 270M default model on 2 CPU cores: about 9 minutes
for 12/6/2 calls), so the default there is 12 generate, 6 score and 2 forward calls, and each call's
compute is capped: --max-tokens (rows x longest input of one generate/score call, default 1024) and
--max-decode (rows x max_length x beams of one generate call, default 1600); a capped call keeps its
lengths and gets fewer rows. --quick halves the number of calls.

    python benchmarks/bench_compiles.py --tiny                   # full loop, exact program counts (~3 min)
    python benchmarks/bench_compiles.py                          # default model, 12/6/2 calls, capped (~9 min)
    python benchmarks/bench_compiles.py --quick --persistent-cache --json out.json
    python benchmarks/bench_compiles.py --model DIR --device cuda --calls 40 --score-calls 20 \\
        --forward-calls 5 --max-tokens 0 --max-decode 0
"""

from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _bench_common import TEXT, cpu_count, cpu_model, git_revision, version_of  # noqa: E402

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"

# The engine's jitted entry points: (module, attribute). Each is wrapped in this process only, to
# see the shapes and static arguments it is called with.
ENGINE_FUNCTIONS = (
    ("jaxgen.runtime.generation", "start_cache"), ("jaxgen.runtime.generation", "prefill"), ("jaxgen.runtime.generation", "decode"),
    ("jaxgen.runtime.generation", "beam_decode"), ("jaxgen.runtime.generation", "expand_beams"),
    ("jaxgen.generator", "start_cache"), ("jaxgen.generator", "target_log_probs"),
    ("jaxgen.generator", "forward_logits"), ("jaxgen.runtime.scheduler", "decode"), ("jaxgen.runtime.scheduler", "insert_rows"),
    ("jaxgen.runtime.scheduler", "grow_state"),
)
ENGINE_ORDER = ("prefill", "decode", "beam_decode", "start_cache", "expand_beams", "target_log_probs",
                "forward_logits", "insert_rows", "grow_state")
STATIC_PROMPTS = (
    "You are a careful assistant. Answer with one short sentence.\n",
    "The following is a transcript of a long interview with a historian of science about clocks, "
    "navigation and the measurement of time. The historian answers in full sentences.\n",
)
REPRESENTATIVE = dict(api="generate", batch=8, max_length=64, mode="greedy", beam_size=1, static=None, seed=0,
                      include_prompt=False)


# ============================================================================ the plan
def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo))))))


def _row_lengths(rng: random.Random, batch: int, longest: int) -> List[int]:
    """Mixed lengths: the longest, then the others uniform in [longest / 2, longest]."""
    return [longest] + [rng.randint(max(1, longest // 2), longest) for _ in range(batch - 1)]


def _cap(batch: int, per_row: int, budget: int) -> int:
    return batch if budget <= 0 or batch * per_row <= budget else max(1, budget // max(per_row, 1))


def build_plan(args) -> dict:
    """The calls, a pure function of the arguments (seeded)."""
    rng = random.Random(args.seed)
    n = args.calls
    n_beam = max(1, round(n * 0.1)) if n >= 4 else 0
    n_static = max(1, round(n * 0.125)) if n >= 4 else 0
    n_sampling = round(n * 0.3)
    modes = (["beam"] * n_beam + ["static"] * n_static + ["sampling"] * n_sampling
             + ["greedy"] * (n - n_beam - n_static - n_sampling))
    rng.shuffle(modes)
    calls = []
    for i, mode in enumerate(modes):
        max_length = rng.choice(args.max_lengths)
        beam_size = rng.choice((2, 4)) if mode == "beam" else 1
        batch = rng.randint(1, min(args.max_batch, 8) if mode == "beam" else args.max_batch)
        longest = _log_uniform(rng, args.min_prompt, args.max_prompt)
        wanted = batch
        batch = _cap(batch, longest, args.max_tokens)
        batch = _cap(batch, max_length * beam_size, args.max_decode)
        static = rng.randrange(len(STATIC_PROMPTS)) if mode == "static" else None
        calls.append(dict(api="generate", batch=batch, wanted_batch=wanted, lengths=_row_lengths(rng, batch, longest),
                          max_length=max_length, beam_size=beam_size, static=static, seed=1000 + i,
                          mode="beam" if mode == "beam" else ("sampling" if mode == "sampling" or
                                                              (mode == "static" and i % 2) else "greedy"),
                          include_prompt=False))
    for _ in range(args.score_calls):
        batch = rng.randint(1, args.max_score_batch)
        longest = _log_uniform(rng, 8, args.max_score_len)
        wanted = batch
        batch = _cap(batch, longest, args.max_tokens)
        calls.append(dict(api="score", batch=batch, wanted_batch=wanted, lengths=_row_lengths(rng, batch, longest)))
    for _ in range(args.forward_calls):
        batch = rng.randint(1, 4)
        longest = _log_uniform(rng, 8, args.max_forward_len)
        wanted = batch
        batch = _cap(batch, longest, min(args.max_tokens, 512) if args.max_tokens > 0 else 0)
        calls.append(dict(api="forward", batch=batch, wanted_batch=wanted, lengths=_row_lengths(rng, batch, longest),
                          log_probs=bool(rng.random() < 0.5)))
    rng.shuffle(calls)
    rep = dict(REPRESENTATIVE)
    rep["wanted_batch"] = rep["batch"]
    rep["lengths"] = _row_lengths(random.Random(args.seed + 1), rep["batch"], 96)
    return {"representative": rep, "calls": calls}


def describe(call: dict) -> str:
    lengths = call["lengths"]
    capped = f"(cap {call['wanted_batch']})" if call["batch"] != call["wanted_batch"] else ""
    size = f"b={call['batch']}{capped}"
    size += f" L={min(lengths)}..{max(lengths)}"
    if call["api"] == "generate":
        mode = call["mode"] + (f"{call['beam_size']}" if call["mode"] == "beam" else "")
        static = f" static{call['static']}" if call["static"] is not None else ""
        return f"generate {size} max_len={call['max_length']} {mode}{static}"
    if call["api"] == "forward":
        return f"forward {size}{' log_probs' if call['log_probs'] else ''}"
    return f"score {size}"


# ============================================================================ instrumentation
def _short_name(name: str) -> str:
    """'jit(decode)' / 'jit_decode' / 'decode' -> 'decode'."""
    name = str(name)
    if name.startswith("jit(") and name.endswith(")"):
        return name[4:-1]
    if name.startswith("jit_"):
        return name[4:]
    return name


class Recorder:
    """Counts compilations (JAX monitoring events) and the engine's jitted calls, per phase and call."""

    def __init__(self):
        self.tls = threading.local()
        self.lock = threading.Lock()
        self.phase = "setup"
        self.call: Optional[int] = None
        self.compiles: List[dict] = []
        self.trace_s: Dict[str, float] = collections.defaultdict(float)
        self.lower_s: Dict[str, float] = collections.defaultdict(float)
        self.dispatches: List[dict] = []
        self.wrapped: Dict[str, object] = {}

    # --- JAX monitoring listeners
    def on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event not in (BACKEND_COMPILE, TRACE, LOWER):
            return
        name = _short_name(kwargs.get("fun_name", "?"))
        with self.lock:
            if event == BACKEND_COMPILE:
                current = getattr(self.tls, "current", None)
                hit = getattr(self.tls, "cache_hit", False)
                self.tls.cache_hit = False
                self.compiles.append(dict(fn=name, seconds=duration, phase=self.phase, call=self.call,
                                          cache_hit=hit, sig=current[1] if current and current[0] == name else None,
                                          full=current[2] if current and current[0] == name else None))
            elif event == TRACE:
                self.trace_s[name] += duration
            else:
                self.lower_s[name] += duration

    def on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT:
            self.tls.cache_hit = True

    def install(self) -> None:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self.on_duration)
        jax.monitoring.register_event_listener(self.on_event)

    # --- wrappers around the engine's jitted functions
    def wrap_engine(self) -> List[str]:
        import importlib

        missing = []
        for module_name, attr in ENGINE_FUNCTIONS:
            module = importlib.import_module(module_name)
            fn = getattr(module, attr, None)
            if fn is None:
                missing.append(f"{module_name}.{attr}")
                continue
            original = getattr(fn, "_bench_original", fn)
            self.wrapped[attr] = original
            setattr(module, attr, self._wrapper(attr, original))
        return missing

    def _wrapper(self, name: str, fn):
        try:
            signature = inspect.signature(getattr(fn, "__wrapped__", fn))
        except (TypeError, ValueError):
            signature = None

        def wrapper(*args, **kwargs):
            sig, full = _signatures(name, signature, args, kwargs)
            with self.lock:
                self.dispatches.append(dict(fn=name, sig=sig, full=full, phase=self.phase, call=self.call))
            previous = getattr(self.tls, "current", None)
            self.tls.current = (name, sig, full)
            try:
                return fn(*args, **kwargs)
            finally:
                self.tls.current = previous

        wrapper._bench_original = fn
        return wrapper

    def cache_sizes(self) -> Dict[str, int]:
        out = {}
        for name, fn in self.wrapped.items():
            size = getattr(fn, "_cache_size", None)
            if size is not None:
                out[name] = size()
        return out


def _shape(x):
    return tuple(int(d) for d in x.shape)


def _signatures(name: str, signature, args, kwargs):
    """(named bucket dimensions, full key: every array leaf's shape/dtype and every static value)."""
    import jax

    try:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
    except Exception:  # noqa: BLE001 - an engine change: fall back to the full key only
        a = None
    named = None
    try:
        if a is not None:
            named = _named_dims(name, a)
    except Exception:  # noqa: BLE001
        named = None
    try:
        leaves = jax.tree_util.tree_leaves(
            [v for k, v in (a.items() if a is not None else enumerate(list(args) + list(kwargs.values())))
             if k != "params"])
        full = tuple((_shape(x), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)[:200]
                     for x in leaves)
        if a is not None:  # static ints of a pytree's aux data (KVCache.length) are not leaves
            full += tuple(getattr(v, "length", None) for v in a.values() if hasattr(v, "k") and hasattr(v, "length"))
            full += tuple(getattr(v.cache, "length", None) for v in a.values() if hasattr(v, "cache"))
        full = str(hash(full))
    except Exception:  # noqa: BLE001
        full = None
    return named, full


def _named_dims(name: str, a: dict) -> dict:
    if name == "start_cache":
        return dict(rows=a["batch"], cache_len=a["length"], prefix_len=a["prefix"].length)
    if name == "prefill":
        return dict(rows=_shape(a["tokens"])[0], width=_shape(a["tokens"])[1], cache_len=a["cache"].length,
                    fresh=bool(a["fresh"]))
    if name == "decode":
        s, spec = a["state"], a["spec"]
        return dict(rows=_shape(s.out_tokens)[0], n_out=_shape(s.out_tokens)[1], cache_len=s.cache.length,
                    attend_len=spec.attend_len, hist_len=_shape(s.history.tokens)[1], sampling=spec.sampling,
                    k_static=spec.k_static, return_logits=spec.return_logits)
    if name == "beam_decode":
        s, spec = a["state"], a["spec"]
        return dict(rows=_shape(s.cum)[0], beam=spec.beam_size, n_out=_shape(s.seqs)[2], cache_len=s.cache.length,
                    attend_len=spec.attend_len, hist_len=_shape(s.history.tokens)[1], sampling=spec.sampling,
                    num_keep=spec.num_keep)
    if name == "expand_beams":
        return dict(rows=_shape(a["history"].tokens)[0], beam=a["beam_size"], cache_len=a["cache"].length,
                    hist_len=_shape(a["history"].tokens)[1])
    if name == "target_log_probs":
        return dict(rows=_shape(a["inputs"])[0], width=_shape(a["inputs"])[1])
    if name == "forward_logits":
        return dict(rows=_shape(a["tokens"])[0], width=_shape(a["tokens"])[1], log_probs=bool(a["log_probs"]))
    if name == "insert_rows":
        s = a["state"]
        return dict(rows=_shape(s.out_tokens)[0], new_rows=_shape(a["slots"])[0], n_out=_shape(s.out_tokens)[1],
                    cache_len=s.cache.length, hist_len=_shape(s.history.tokens)[1])
    if name == "grow_state":
        s = a["state"]
        return dict(rows=_shape(s.out_tokens)[0], to_rows=a["batch"], n_out=_shape(s.out_tokens)[1],
                    to_n_out=a["n_out"], cache_len=s.cache.length, to_cache_len=a["length"],
                    hist_len=_shape(s.history.tokens)[1], to_hist_len=a["hist_len"])
    return {}


# ============================================================================ the tiny model
def build_tiny_model(source_dir: str, out_dir: str, seed: int = 0) -> str:
    """A random-weight copy of `source_dir`'s architecture with small dimensions: 6 layers with the
    source's first 6 layer types and its sliding window, hidden 64, vocabulary 1024. Bucketing
    (and so the program count) does not depend on these sizes."""
    import numpy as np

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    src = ModelConfig.load(source_dir)
    layers = 6
    types = tuple(src.layer_types[:layers]) if len(src.layer_types) >= layers else ("full",) * layers
    config = src.replace(vocab_size=1024, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=1,
                         head_dim=16, intermediate_size=128, layer_types=types, weight_dtype="float32",
                         embedding_scale=8.0 if src.embedding_scale else None)
    specials = list(dict.fromkeys(t for t in (src.pad_token, src.eos_token, src.bos_token, src.unk_token) if t))
    vocabulary = specials + [f"tok{i}" for i in range(config.vocab_size - len(specials))]
    rng = np.random.default_rng(seed)
    flat = {k: (rng.standard_normal(shape) * 0.05).astype(np.float32)
            for k, shape in expected_flat_shapes(config).items()}
    save_model_dir(out_dir, config, flat, vocabulary)
    return out_dir


# ============================================================================ one measurement (in this process)
class TokenSource:
    """Prompt tokens: the model's tokenizer over real text, or (tiny model) vocabulary tokens."""

    def __init__(self, model_dir: str, generator, tiny: bool):
        self.bos = generator.config.bos_token
        if tiny:
            vocab = generator.vocabulary.tokens
            self.stream = [vocab[i] for i in random.Random(0).choices(range(8, len(vocab)), k=4096)]
            self.statics = [self.stream[100:130], self.stream[200:260]]
        else:
            from jaxgen.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
            self.stream = tokenizer.encode(TEXT)
            self.statics = [tokenizer.encode(t) for t in STATIC_PROMPTS]
        if self.bos:
            self.statics = [[self.bos] + s for s in self.statics]

    def sequence(self, length: int, offset: int, bos: bool = True) -> List[str]:
        head = [self.bos] if bos and self.bos else []
        n = len(self.stream)
        return head + [self.stream[(offset + i) % n] for i in range(length - len(head))]


def run_call(generator, tokens: TokenSource, call: dict, index: int):
    lengths = call["lengths"]
    if call["api"] == "generate":
        static = tokens.statics[call["static"]] if call["static"] is not None else None
        prompts = [tokens.sequence(n, 37 * index + 101 * j, bos=static is None) for j, n in enumerate(lengths)]
        kwargs = dict(max_length=call["max_length"], include_prompt_in_result=call["include_prompt"])
        if static is not None:
            kwargs["static_prompt"] = static
        if call["mode"] == "beam":
            kwargs["beam_size"] = call["beam_size"]
        elif call["mode"] == "sampling":
            kwargs.update(sampling_topk=40, sampling_temperature=0.8, random_seed=call["seed"])
        results = generator.generate_batch(prompts, **kwargs)
        return sum(len(r.sequences_ids[0]) for r in results)
    seqs = [tokens.sequence(n, 53 * index + 89 * j) for j, n in enumerate(lengths)]
    if call["api"] == "score":
        results = generator.score_batch(seqs)
        return sum(len(r.log_probs) for r in results)
    out = generator.forward_batch(seqs, return_log_probs=call["log_probs"])
    out.block_until_ready()
    return int(out.shape[0] * out.shape[1])


def measure(args, plan: dict, model_dir: str, cache_mode: str, log) -> dict:
    """Runs the representative call (twice) and the loop on one Generator, counting compilations.

    cache_mode: "off" (the persistent compilation cache disabled) or "on" (jaxgen's default setup;
    the caller chose JAXGEN_HOME). Must run before anything in this process imported jax.
    """
    if cache_mode == "off":
        os.environ["JAXGEN_COMPILATION_CACHE"] = "0"
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ.pop("JAXGEN_COMPILATION_CACHE", None)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax

    if cache_mode == "off":
        jax.config.update("jax_enable_compilation_cache", False)
    rec = Recorder()
    rec.install()
    import jaxgen

    missing = rec.wrap_engine()
    if missing:
        log(f"note: not found, not wrapped (engine changed?): {', '.join(missing)}")
    load_avg_start = os.getloadavg()
    t0 = time.perf_counter()
    rec.phase = "load"
    generator = jaxgen.Generator(model_dir, device=args.device, compute_type=args.compute_type)
    load_s = time.perf_counter() - t0
    cache_dir = jax.config.jax_compilation_cache_dir if cache_mode == "on" else None
    tokens = TokenSource(model_dir, generator, args.tiny)
    log(f"loaded {model_dir} in {load_s:.1f} s ({generator.device}, {generator.compute_type}, "
        f"attention {generator.attention}); persistent cache: {cache_dir or 'off'}")

    def timed(call, index, phase):
        rec.phase, rec.call = phase, index
        start_compiles = len(rec.compiles)
        t = time.perf_counter()
        produced = run_call(generator, tokens, call, index)
        seconds = time.perf_counter() - t
        new = rec.compiles[start_compiles:]
        engine_new = [c for c in new if c["fn"] in ENGINE_ORDER]
        return dict(index=index, phase=phase, what=describe(call), api=call["api"], seconds=seconds, produced=produced,
                    programs=len(new), engine_programs=len(engine_new),
                    compile_s=sum(c["seconds"] for c in new), engine_compile_s=sum(c["seconds"] for c in engine_new),
                    cache_hits=sum(c["cache_hit"] for c in new),
                    new_by_fn=dict(collections.Counter(c["fn"] for c in engine_new)))

    rep = plan["representative"]
    first = timed(rep, -2, "representative")
    log(f"representative call, first: {first['seconds']:.2f} s ({first['programs']} programs, "
        f"{first['compile_s']:.2f} s compiling)")
    second = timed(rep, -1, "representative")
    log(f"representative call, again: {second['seconds']:.2f} s ({second['programs']} programs)")

    per_call = []
    t_loop = time.perf_counter()
    for i, call in enumerate(plan["calls"]):
        r = timed(call, i, "loop")
        per_call.append(r)
        log(f"[{i + 1:3d}/{len(plan['calls'])}] {r['what']:<58} {r['seconds']:7.2f} s  +{r['engine_programs']:2d} "
            f"engine programs ({r['engine_compile_s']:.1f} s) +{r['programs'] - r['engine_programs']} small")
    loop_s = time.perf_counter() - t_loop
    rec.phase, rec.call = "done", None
    return dict(cache_mode=cache_mode, cache_dir=cache_dir, model=model_dir, device=generator.device,
                compute_type=generator.compute_type, attention=generator.attention, load_s=load_s,
                load_avg_start=load_avg_start, load_avg_end=os.getloadavg(),
                representative=dict(what=describe(rep), first=first, second=second),
                loop_s=loop_s, calls=per_call, compiles=rec.compiles, dispatches=rec.dispatches,
                trace_s=dict(rec.trace_s), lower_s=dict(rec.lower_s), jit_cache_sizes=rec.cache_sizes(),
                wrapped_missing=missing)


# ============================================================================ analysis
def summarize(result: dict, phases=("representative", "loop")) -> dict:
    compiles = [c for c in result["compiles"] if c["phase"] in phases]
    dispatches = [d for d in result["dispatches"] if d["phase"] in phases]
    functions = {}
    for name in ENGINE_ORDER:
        mine = [c for c in compiles if c["fn"] == name]
        calls = [d for d in dispatches if d["fn"] == name]
        if not mine and not calls:
            continue
        sigs = [c["sig"] for c in mine if c["sig"] is not None]
        functions[name] = dict(
            programs=len(mine), compile_s=sum(c["seconds"] for c in mine),
            cache_hits=sum(c["cache_hit"] for c in mine),
            trace_s=result["trace_s"].get(name, 0.0), lower_s=result["lower_s"].get(name, 0.0),
            dispatches=len(calls), distinct_calls=len({d["full"] for d in calls}),
            dims=_dimension_analysis(sigs))
    small = [c for c in compiles if c["fn"] not in ENGINE_ORDER]
    small_names = collections.Counter(c["fn"] for c in small)
    calls = collections.Counter(c["api"] for c in result["calls"])
    engine_compiles = [c for c in compiles if c["fn"] in ENGINE_ORDER]
    return dict(
        calls=dict(calls), total_programs=len(compiles), engine_programs=len(engine_compiles),
        small_programs=len(small), compile_s=sum(c["seconds"] for c in compiles),
        engine_compile_s=sum(c["seconds"] for c in engine_compiles), small_compile_s=sum(c["seconds"] for c in small),
        trace_s=sum(result["trace_s"].values()), lower_s=sum(result["lower_s"].values()),
        cache_hits=sum(c["cache_hit"] for c in compiles),
        functions=functions, small_top=small_names.most_common(8))


def _dimension_analysis(sigs: List[dict]) -> dict:
    """Distinct values per dimension, and the programs left if one dimension were constant."""
    if not sigs:
        return {}
    keys = list(sigs[0])
    distinct = {tuple(sorted(s.items())) for s in sigs}
    out = {}
    for k in keys:
        values = sorted({s.get(k) for s in sigs}, key=lambda v: (v is None, v))
        without = {tuple((kk, vv) for kk, vv in sorted(s.items()) if kk != k) for s in sigs}
        out[k] = dict(values=values, n=len(values), programs_if_constant=len(without))
    out["_distinct"] = len(distinct)
    out["_product"] = math.prod(v["n"] for k, v in out.items() if not k.startswith("_"))
    # Greedy build-up: the dimension that adds the most distinct keys first, then the next...
    chosen, steps = [], []
    remaining = [k for k in keys if out[k]["n"] > 1]
    while remaining:
        best = max(remaining, key=lambda k: len({tuple(s.get(c) for c in chosen + [k]) for s in sigs}))
        chosen.append(best)
        remaining.remove(best)
        steps.append((best, len({tuple(s.get(c) for c in chosen) for s in sigs})))
    out["_buildup"] = steps
    return out


def _fmt_values(values, limit: int = 9) -> str:
    shown = ",".join("-" if v is None else str(v) for v in values[:limit])
    return "{" + shown + (",..." if len(values) > limit else "") + "}"


def report_lines(result: dict, title: str) -> List[str]:
    s = summarize(result)
    rep = result["representative"]
    lines = [f"## {title}", ""]
    lines.append(f"- calls: {', '.join(f'{k} {v}' for k, v in sorted(s['calls'].items()))} (loop), plus the "
                 f"representative generate_batch twice before it")
    lines.append(f"- loop wall time {result['loop_s']:.1f} s; load average {_fmt_load(result['load_avg_start'])} at "
                 f"start, {_fmt_load(result['load_avg_end'])} at end (1/5/15 min)")
    lines.append(f"- XLA programs compiled: {s['total_programs']} ({s['engine_programs']} of the engine's jitted "
                 f"functions, {s['small_programs']} small eager jnp ops); backend compile {s['compile_s']:.1f} s "
                 f"(engine {s['engine_compile_s']:.1f} s, small ops {s['small_compile_s']:.1f} s); tracing "
                 f"{s['trace_s']:.1f} s, lowering {s['lower_s']:.1f} s"
                 + (f"; persistent-cache hits {s['cache_hits']}" if result["cache_mode"] == "on" else ""))
    lines.append(f"- representative call ({rep['what']}): first {rep['first']['seconds']:.2f} s "
                 f"({rep['first']['programs']} programs, {rep['first']['compile_s']:.2f} s compiling"
                 + (f", {rep['first']['cache_hits']} cache hits" if result["cache_mode"] == "on" else "")
                 + f"), warm {rep['second']['seconds']:.2f} s")
    lines.append("")
    lines.append("| function | calls | distinct calls | programs | compile s | trace+lower s "
                 "| dimensions (distinct values) |")
    lines.append("| :--- | ---: | ---: | ---: | ---: | ---: | :--- |")
    for name, f in s["functions"].items():
        dims = f["dims"]
        dim_text = "; ".join(f"{k} {_fmt_values(v['values'])}" for k, v in dims.items()
                             if not k.startswith("_") and v["n"] > 1)
        lines.append(f"| {name} | {f['dispatches']} | {f['distinct_calls']} | {f['programs']} | {f['compile_s']:.1f} | "
                     f"{f['trace_s'] + f['lower_s']:.1f} | {dim_text} |")
    small_text = ", ".join(f"{n} {c}" for n, c in s["small_top"])
    lines.append(f"| small eager ops | | | {s['small_programs']} | {s['small_compile_s']:.1f} | | {small_text} |")
    lines.append("")
    lines.append("How the dimensions multiply (distinct keys of the compiled programs):")
    lines.append("")
    for name, f in s["functions"].items():
        dims = f["dims"]
        if not dims or f["programs"] < 2:
            continue
        parts = [f"{k}: {v['programs_if_constant']}" for k, v in dims.items()
                 if not k.startswith("_") and v["n"] > 1]
        buildup = " -> ".join(f"x {k} {n}" if i else f"{k} {n}" for i, (k, n) in enumerate(dims["_buildup"]))
        lines.append(f"- {name}: {f['programs']} programs, {dims['_distinct']} distinct keys (product of the "
                     f"dimensions' value counts: {dims['_product']}). Keys as dimensions are added: {buildup}. "
                     f"Left if one dimension were constant: " + ", ".join(parts))
    sizes = result.get("jit_cache_sizes") or {}
    if sizes:
        lines.append("")
        lines.append("In-memory jit cache entries at the end (cross-check, whole process): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(sizes.items())))
    # cumulative: do new calls stop compiling?
    calls = result["calls"]
    if calls:
        marks = sorted({max(1, len(calls) * q // 4) for q in (1, 2, 3, 4)})
        cum, acc = [], 0
        for i, c in enumerate(calls, 1):
            acc += c["engine_programs"]
            if i in marks:
                cum.append(f"after {i} calls {acc}")
        tail = calls[len(calls) // 2:]
        lines.append("")
        lines.append(f"Engine programs compiled by the loop, cumulative: {', '.join(cum)}; calls in the second half "
                     f"that compiled something: {sum(1 for c in tail if c['engine_programs'])}/{len(tail)}")
    return lines


def _fmt_load(load) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "n/a"


def per_call_lines(result: dict) -> List[str]:
    lines = ["| # | call | s | engine programs | compile s | new programs by function |",
             "| ---: | :--- | ---: | ---: | ---: | :--- |"]
    for c in [result["representative"]["first"], result["representative"]["second"]] + result["calls"]:
        by_fn = ", ".join(f"{k} {v}" for k, v in sorted(c["new_by_fn"].items()))
        lines.append(f"| {c['index'] + 1 if c['index'] >= 0 else 'rep'} | {c['what']} | {c['seconds']:.2f} | "
                     f"{c['engine_programs']} | {c['compile_s']:.1f} | {by_fn} |")
    return lines


# ============================================================================ processes
def child_main(args_path: str, out_path: str) -> None:
    with open(args_path, encoding="utf-8") as f:
        args = argparse.Namespace(**json.load(f))
    plan = build_plan(args)
    log = lambda msg: print(f"[child] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = measure(args, plan, args.model, "on", log)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, default=str)


def run_child(args, label: str, home: str, work: str, log) -> dict:
    args_path = os.path.join(work, "args.json")
    with open(args_path, "w", encoding="utf-8") as f:
        json.dump(vars(args), f)
    out_path = os.path.join(work, f"{label}.json")
    env = dict(os.environ)
    env["JAXGEN_HOME"] = home  # jaxgen's default cache setup: <home>/xla, 0.5 s threshold
    env.pop("JAXGEN_COMPILATION_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    log(f"{label}: a fresh process, persistent cache in {home}/xla")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args_path, out_path], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {label} process failed (exit code {proc.returncode})")
    with open(out_path, encoding="utf-8") as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jaxgen model directory (default: the default model)")
    p.add_argument("--tiny", action="store_true",
                   help="a random-weight 6-layer copy of the model's architecture (exact program counts, fast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, default=None,
                   help="generate_batch calls (default: 40 with --tiny, 12 on a real model; --quick halves)")
    p.add_argument("--score-calls", type=int, default=None,
                   help="score_batch calls (default 20 with --tiny, else 6; --quick halves)")
    p.add_argument("--forward-calls", type=int, default=None,
                   help="forward_batch calls (default 5 with --tiny, else 2; --quick halves)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=5)
    p.add_argument("--max-prompt", type=int, default=600)
    p.add_argument("--max-lengths", default="16,32,64,100,200")
    p.add_argument("--max-score-batch", type=int, default=16)
    p.add_argument("--max-score-len", type=int, default=1000)
    p.add_argument("--max-forward-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on rows x longest input of one generate/score call (fewer rows); 0: none "
                        "(default 1024 on the real model, 0 with --tiny)")
    p.add_argument("--max-decode", type=int, default=None,
                   help="cap on rows x max_length (x beams) of one generate call; 0: none "
                        "(default 1600 on the real model, 0 with --tiny)")
    p.add_argument("--quick", action="store_true", help="fewer calls")
    p.add_argument("--persistent-cache", action="store_true",
                   help="then run the loop in two fresh processes sharing a new cache directory (cold, warm)")
    p.add_argument("--per-call", action="store_true", help="print the per-call table")
    p.add_argument("--json", default=None, help="write the figures (and every compile event) to this file")
    p.add_argument("--child", nargs=2, metavar=("ARGS_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(*args.child)
        return
    # The full loop (40/20/5) with --tiny; on a real model a quarter of it by default, which takes
    # about 9 minutes for the 270M default model on 2 CPU cores (compute, not compiling, dominates).
    full = (40, 20, 5) if args.tiny else (12, 6, 2)
    sizes = tuple(max(1, n // 2) for n in full) if args.quick else full
    if args.calls is None:
        args.calls = sizes[0]
    if args.score_calls is None:
        args.score_calls = sizes[1]
    if args.forward_calls is None:
        args.forward_calls = sizes[2]
    if args.max_tokens is None:
        args.max_tokens = 0 if args.tiny else 1024
    if args.max_decode is None:
        args.max_decode = 0 if args.tiny else 1600
    args.max_lengths = [int(x) for x in str(args.max_lengths).split(",")] if isinstance(args.max_lengths, str) \
        else list(args.max_lengths)
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    command = " ".join([os.path.basename(sys.executable), "benchmarks/bench_compiles.py"] + sys.argv[1:])
    work = tempfile.mkdtemp(prefix="bench-compiles-")
    try:
        os.environ["JAXGEN_COMPILATION_CACHE"] = "0"  # before jaxgen is imported (default_model imports it)
        from jaxgen.default_model import default_model_path

        source = args.model or default_model_path()
        if args.tiny:
            args.model = build_tiny_model(source, os.path.join(work, "tiny-model"), args.seed)
        else:
            args.model = source
        plan = build_plan(args)
        header = [
            "# XLA programs compiled by a research loop (benchmarks/bench_compiles.py)", "",
            f"- command: `{command}`",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; jaxgen revision "
            f"{git_revision()}; jax {version_of('jax')}, jaxlib {version_of('jaxlib')}",
            f"- machine: {cpu_model()}, {cpu_count()} usable cores; load average {_fmt_load(os.getloadavg())}",
            f"- model: {source}" + (" -> tiny random-weight copy (6 layers, hidden 64, vocabulary 1024)" if args.tiny
                                   else ""),
            f"- loop: {args.calls} generate_batch (batch 1..{args.max_batch}, longest prompt {args.min_prompt}.."
            f"{args.max_prompt} tokens, max_length {args.max_lengths}, include_prompt_in_result=False; greedy, "
            f"top-k 40 sampling, static prompts, beam 2/4), {args.score_calls} score_batch (1..{args.max_score_batch}"
            f" x 8..{args.max_score_len}), {args.forward_calls} forward_batch (1..4 x 8..{args.max_forward_len}); "
            f"seed {args.seed}; caps: rows x input <= {args.max_tokens or 'none'}, rows x max_length <= "
            f"{args.max_decode or 'none'} ({sum(c['batch'] != c['wanted_batch'] for c in plan['calls'])} calls capped)",
        ]
        print("\n".join(header), flush=True)
        main_result = measure(args, plan, args.model, "off", log)
        lines = report_lines(main_result, "Persistent compilation cache off (this process)")
        if args.per_call:
            lines += ["", "Per call:", ""] + per_call_lines(main_result)
        print("\n" + "\n".join(lines), flush=True)
        out = dict(command=command, header=header, args=vars(args), plan=plan,
                   main=dict(summary=summarize(main_result), result=main_result))
        if args.persistent_cache:
            home = os.path.join(work, "home")
            os.makedirs(home)
            cold = run_child(args, "cold", home, work, log)
            warm = run_child(args, "warm", home, work, log)
            files = len(os.listdir(os.path.join(home, "xla"))) if os.path.isdir(os.path.join(home, "xla")) else 0
            lines = ["", "## Persistent compilation cache on: fresh processes, empty cache then warm", "",
                     f"Cache directory after the cold run: {files} programs written (jaxgen writes programs that "
                     f"compile in >= 0.5 s).", "",
                     "| process | process s | loop s | programs compiled or loaded | cache hits | compile s "
                     "(hits: load time) | representative first call s | warm call s |",
                     "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for label, r in (("cache off (above)", main_result), ("cold cache", cold), ("warm cache", warm)):
                s = summarize(r)
                rep = r["representative"]
                process_s = f"{r['process_s']:.1f}" if "process_s" in r else "—"
                lines.append(f"| {label} | {process_s} | {r['loop_s']:.1f} | "
                             f"{s['total_programs']} | {s['cache_hits']} | {s['compile_s']:.1f} | "
                             f"{rep['first']['seconds']:.2f} | {rep['second']['seconds']:.2f} |")
            lines += [""] + report_lines(warm, "Warm cache process, in detail")
            print("\n".join(lines), flush=True)
            out["cold_cache"] = dict(summary=summarize(cold), result=cold)
            out["warm_cache"] = dict(summary=summarize(warm), result=warm)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1, default=str)
            log(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
