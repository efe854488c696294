#!/usr/bin/env python
"""GPU benchmark of jaxgen vs transformers on random-weight models in real shapes (no download).

    python benchmarks/bench_gpu.py                                    # every model, every engine
    python benchmarks/bench_gpu.py --models gemma3-270m,llama-3.2-1b --out gpu.json
    python benchmarks/bench_gpu.py --models llama-3-8b --prefill-lengths 2048,8192 --engines jaxgen,hf-eager
    python benchmarks/bench_gpu.py --tiny --device cpu                # CPU smoke run, about a minute

Models (configurations written below; weights random, built with torch on the GPU, then cached):
  gemma3-270m   Gemma3ForCausalLM: vocab 262144, hidden 640, 18 layers (5 sliding : 1 full, window
                512), 4 heads / 1 kv head of 256, MLP 2048, tied embeddings, 32768 positions
  llama-3.2-1b  vocab 128256, hidden 2048, 16 layers, 32 / 8 kv heads of 64, MLP 8192, llama3 rope
                scaling (factor 32), tied embeddings, 131072 positions
  llama-3-8b    vocab 128256, hidden 4096, 32 layers, 32 / 8 kv heads of 128, MLP 14336, untied,
                32768 positions (the real model has 8192; raised so that 16k/32k prompts run)
  --tiny turns each into a few-layer, small-hidden, 1024-token-vocabulary model of the same family.

What is measured (each engine in its own process, one after the other; never two at once):
* decode tok/s: B prompts of --prompt-tokens random ids, --new-tokens greedy new tokens, end token
  disabled (jaxgen end_token=[], transformers min_new_tokens), B x N / wall time of the whole call
  (prefill included). "decode-only" (in the JSON and the details) = B x (N - 1) / (t(N) - t(1)),
  t(1) being the same call with one new token; the fraction of the card's bandwidth uses it.
* prefill tok/s: one prompt of T tokens / time of generate(max_length=1) (transformers:
  generate(max_new_tokens=1)).
* score tok/s: one sequence of T tokens / time of score_batch([seq], max_input_length=0)
  (transformers: forward of the decoder, then lm_head + log_softmax + gather of the targets in
  chunks of positions, so that the [T, V] logits never exist at once).
* first call (compilation included) vs the warm median of --reps repetitions after it; jaxgen's
  persistent compilation cache is off in its process (JAXGEN_COMPILATION_CACHE=0 unless already set),
  so its first calls really compile.
* jaxgen memory stress: 8 prompts of 16k tokens, 64 new tokens: ok (with its time) or the error.
* transformers runs "hf-eager" (sdpa attention, dynamic cache) and "hf-static"
  (cache_implementation="static", generate's torch.compile of the decoding step); score is not run
  for hf-static (no cache is involved: it would repeat hf-eager).

Fraction of the card's limit (the device name picks a row of CARDS; unknown cards print n/a):
* decode: achieved decode-only steps/s x bytes read per step / bandwidth, bytes per step = weights
  read (parameters x dtype size, without an untied input embedding, of which only B rows are read)
  + B x KV cache bytes of one row averaged over the steps (sliding layers read at most their window).
* prefill / score: achieved FLOP/s / dense bf16 peak, FLOPs = 2 x non-embedding parameters x T
  + causal attention 4 x heads x head_dim x sum over positions of the attended length, per layer
  (score also counts the lm_head on every position: 2 x V x hidden x T).

Models are cached under --work-dir (default /tmp/jaxgen_bench_gpu): hf/ (save_pretrained +
a WordLevel tokenizer.json) and jaxgen/ (jaxgen.converters.TransformersConverter). Per-engine logs
are in <work-dir>/logs. JAX preallocates 75% of the GPU memory by default
(XLA_PYTHON_CLIENT_MEM_FRACTION and --jax-mem-fraction change that).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc  # noqa: E402  (lean: no jax / torch at import)

SCRIPT = os.path.abspath(__file__)
BUILD_VERSION = "1"  # bump to rebuild the cached models
DEFAULT_WORK_DIR = "/tmp/jaxgen_bench_gpu"
ENGINES = ("jaxgen", "hf-eager", "hf-static")
ENGINE_LABELS = {"jaxgen": "jaxgen", "hf-eager": "HF eager", "hf-static": "HF static"}

# ============================================================================ models
_GEMMA_SPECIALS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}


def _gemma3_layer_types(layers: int) -> List[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]


MODELS: Dict[str, dict] = {
    "gemma3-270m": {
        "family": "gemma3",
        "real": dict(vocab=262144, hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256, intermediate=2048,
                     sliding_window=512, max_positions=32768, tie=True, rope_theta=1_000_000.0,
                     rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                     specials=_GEMMA_SPECIALS),
        "tiny": dict(vocab=1024, hidden=64, layers=6, heads=4, kv_heads=1, head_dim=16, intermediate=128,
                     sliding_window=16, max_positions=32768, tie=True, rope_theta=1_000_000.0,
                     rope_local_base_freq=10_000.0, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
                     specials=_GEMMA_SPECIALS),
    },
    "llama-3.2-1b": {
        "family": "llama",
        "real": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                     max_positions=131072, tie=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192),
                     specials={"bos": 128000, "eos": 128001}),
        "tiny": dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                     max_positions=131072, tie=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192),
                     specials={"bos": 1000, "eos": 1001}),
    },
    "llama-3-8b": {
        "family": "llama",
        "real": dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                     max_positions=32768, tie=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                     specials={"bos": 128000, "eos": 128001}),
        "tiny": dict(vocab=1024, hidden=128, layers=2, heads=8, kv_heads=2, head_dim=16, intermediate=256,
                     max_positions=32768, tie=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                     specials={"bos": 1000, "eos": 1001}),
    },
}

# Card limits, matched in order on the device name: (pattern, label, HBM bytes/s, dense bf16 FLOP/s).
CARDS = [
    (r"H200", "H200", 4.8e12, 989e12),
    (r"H100.*PCIe", "H100 PCIe", 2.0e12, 756e12),
    (r"H100.*NVL", None, None, None),  # neither SXM nor PCIe: unknown here
    (r"H100", "H100 SXM", 3.35e12, 989e12),
    (r"A100.*80GB|A100 80GB", "A100 80GB", 2.0e12, 312e12),
    (r"\bL4\b", "L4", 0.3e12, 121e12),
]

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def model_spec(name: str, tiny: bool, max_positions: Optional[int]) -> dict:
    entry = MODELS[name]
    spec = dict(entry["tiny" if tiny else "real"])
    spec["family"] = entry["family"]
    spec["name"] = name + ("-tiny" if tiny else "")
    if max_positions:
        spec["max_positions"] = int(max_positions)
    if spec["family"] == "gemma3":
        spec["layer_types"] = _gemma3_layer_types(spec["layers"])
    return spec


def card_limits(device_name: str):
    for pattern, label, bandwidth, flops in CARDS:
        if re.search(pattern, device_name or ""):
            return (label, bandwidth, flops) if label else None
    return None


# ============================================================================ analytic model
def param_counts(spec: dict) -> dict:
    """Parameter counts of the architecture (checked against torch's count in the build)."""
    h, hd, nh, kv, i, v = (spec[k] for k in ("hidden", "head_dim", "heads", "kv_heads", "intermediate", "vocab"))
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    mlp = 3 * h * i
    norms = 2 * h + (2 * h + 2 * hd if spec["family"] == "gemma3" else 0)  # gemma3: pre/post ffw, q/k norms
    layer = attn + mlp + norms
    layers = spec["layers"] * layer + h  # + final norm
    embed = v * h
    head = 0 if spec["tie"] else v * h
    return {"layers": layers, "embed": embed, "lm_head": head, "total": layers + embed + head}


def _attended(t: int, window: Optional[int]) -> int:
    """Sum over positions 1..t of the number of positions each attends to (causal, window)."""
    w = t if not window or window >= t else window
    return w * (w + 1) // 2 + (t - w) * w


def _layer_windows(spec: dict) -> List[Optional[int]]:
    if spec["family"] == "gemma3":
        return [spec["sliding_window"] if lt == "sliding_attention" else None for lt in spec["layer_types"]]
    return [None] * spec["layers"]


def forward_flops(spec: dict, t: int, with_head: bool) -> float:
    counts = param_counts(spec)
    flops = 2.0 * counts["layers"] * t
    if with_head:
        flops += 2.0 * spec["vocab"] * spec["hidden"] * t
    for window in _layer_windows(spec):
        flops += 4.0 * spec["heads"] * spec["head_dim"] * _attended(t, window)
    return flops


def decode_bytes_per_step(spec: dict, batch: int, prompt: int, new: int, dtype_bytes: int) -> float:
    counts = param_counts(spec)
    weights = (counts["layers"] + counts["embed"] if spec["tie"] else counts["layers"] + counts["lm_head"])
    weights *= dtype_bytes
    per_token = 2 * spec["kv_heads"] * spec["head_dim"] * dtype_bytes  # K and V, one layer
    steps = max(1, new - 1)
    total = 0
    for s in range(steps):
        context = prompt + s + 1
        total += sum(per_token * (min(context, w) if w else context) for w in _layer_windows(spec))
    return weights + batch * total / steps


# ============================================================================ shared by children
def make_ids(seed: int, count: int, length: int, spec: dict) -> List[List[int]]:
    """`count` prompts of `length` ids: the BOS id then random ordinary ids (specials avoided)."""
    rng = random.Random(seed)
    specials = set(spec["specials"].values())
    low = 4
    high = spec["vocab"] - 1
    out = []
    for _ in range(count):
        row = [spec["specials"]["bos"]]
        while len(row) < length:
            x = rng.randint(low, high)
            if x not in specials:
                row.append(x)
        out.append(row[:length])
    return out


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


class _Timer:
    """Runs one workload: a first call (compilation included), then `reps` timed calls."""

    def __init__(self, sync):
        self.sync = sync

    def time(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t


def _run_workloads(engine, workloads: List[dict], reps: int, result: dict, result_path: str) -> None:
    timer = _Timer(engine.sync)
    for w in workloads:
        if w["kind"] not in engine.kinds:
            continue
        entry = {"workload": w["id"], "kind": w["kind"], "tokens": w["tokens"], **{k: w[k] for k in
                 ("batch", "length", "new_tokens") if k in w}}
        _say(f"{engine.name}: {w['id']} ...")
        try:
            engine.before(w)
            call = engine.call(w)
            entry["first_s"] = timer.time(call)
            n_reps = 1 if w["kind"] == "stress" else reps
            entry["times_s"] = [timer.time(call) for _ in range(n_reps)]
            entry["median_s"] = statistics.median(entry["times_s"])
            entry["tok_s"] = w["tokens"] / entry["median_s"]
            entry["first_tok_s"] = w["tokens"] / entry["first_s"]
            if w["kind"] == "decode":  # the same prompts with one new token: decode-only rate
                one = engine.call(dict(w, new_tokens=1))
                entry["prefill_first_s"] = timer.time(one)
                entry["prefill_times_s"] = [timer.time(one) for _ in range(reps)]
                entry["prefill_median_s"] = statistics.median(entry["prefill_times_s"])
                dt = entry["median_s"] - entry["prefill_median_s"]
                if dt > 0 and w["new_tokens"] > 1:
                    entry["decode_only_tok_s"] = w["batch"] * (w["new_tokens"] - 1) / dt
            entry.update(engine.check(w))
            if w["kind"] == "stress":
                entry["status"] = "ok"
            _say(f"{engine.name}: {w['id']}: {entry['tok_s']:.1f} tok/s (first call {entry['first_s']:.2f} s, "
                 f"median {entry['median_s']:.3f} s)")
        except Exception as exc:  # reported in the table; the next workload still runs
            traceback.print_exc()
            entry["error"] = _short_error(exc)
            if w["kind"] == "stress":
                entry["status"] = "error"
            _say(f"{engine.name}: {w['id']}: {entry['error']}")
            engine.recover()
        entry["device_peak_mib"] = engine.device_peak_mib()
        result["workloads"].append(entry)
        _write_json(result_path, result)


def _child_result(spec: dict, engine_name: str) -> dict:
    return {"engine": engine_name, "model": spec["model"]["name"], "ok": False, "workloads": [], "info": {}}


# ---------------------------------------------------------------------------- build child (torch)
def child_build(job: dict, result_path: str) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    spec = job["model"]
    out = job["hf_dir"]
    dtype = getattr(torch, job["dtype"])
    use_cuda = job["device"] == "cuda" and torch.cuda.is_available()
    torch.manual_seed(0)
    cfg = _hf_config(spec)
    t = time.perf_counter()
    with (torch.device("cuda") if use_cuda else contextlib.nullcontext()):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t
    tmp = tempfile.mkdtemp(prefix=".hf-build-", dir=os.path.dirname(out))
    try:
        import inspect

        kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
            model.save_pretrained).parameters else {}
        model.save_pretrained(tmp, **kwargs)
        _write_tokenizer(tmp, spec)
        with open(os.path.join(tmp, ".bench-complete"), "w", encoding="utf-8") as f:
            json.dump({"key": job["key"], "parameters": n_params}, f)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"built {spec['name']} ({n_params / 1e6:.1f} M parameters, {job['dtype']}) on {'cuda' if use_cuda else 'cpu'} "
         f"in {built:.1f} s, saved in {time.perf_counter() - t - built:.1f} s")
    _write_json(result_path, {"ok": True, "parameters": n_params, "seconds": time.perf_counter() - t})


def _hf_config(spec: dict):
    import transformers

    sp = spec["specials"]
    common = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                  num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                  head_dim=spec["head_dim"], intermediate_size=spec["intermediate"],
                  max_position_embeddings=spec["max_positions"], tie_word_embeddings=spec["tie"],
                  rms_norm_eps=spec["rms_norm_eps"], rope_theta=spec["rope_theta"],
                  bos_token_id=sp["bos"], eos_token_id=sp["eos"], pad_token_id=sp.get("pad"))
    if spec["family"] == "gemma3":
        return transformers.Gemma3TextConfig(
            sliding_window=spec["sliding_window"], layer_types=spec["layer_types"],
            rope_local_base_freq=spec["rope_local_base_freq"], query_pre_attn_scalar=spec["query_pre_attn_scalar"],
            hidden_activation="gelu_pytorch_tanh", **common)
    if spec.get("rope_scaling"):
        common["rope_scaling"] = dict(spec["rope_scaling"])
    return transformers.LlamaConfig(hidden_act="silu", **common)


def _token_name(i: int, spec: dict) -> str:
    for name, j in spec["specials"].items():
        if i == j:
            return f"<{name}>"
    return f"t{i}"


def _write_tokenizer(directory: str, spec: dict) -> None:
    """A WordLevel tokenizer over the whole vocabulary: token i is "t<i>" (specials "<bos>", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {_token_name(i, spec): i for i in range(spec["vocab"])}
    unk = "<unk>" if "unk" in spec["specials"] else None
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or "t4"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
              "model_max_length": spec["max_positions"]}
    for name in spec["specials"]:
        config[f"{name}_token"] = f"<{name}>"
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


# ---------------------------------------------------------------------------- jaxgen child
class _JaxgenEngine:
    name = "jaxgen"
    kinds = ("decode", "prefill", "score", "stress")

    def __init__(self, job: dict, info: dict):
        import inspect

        import jax

        import jaxgen

        self.jax = jax
        self.spec = job["model"]
        path = job["jaxgen_dir"]
        kwargs = {"device": job["device"], "compute_type": job["dtype"]}
        accepts_attention = "attention" in inspect.signature(jaxgen.Generator).parameters
        if job.get("attention"):
            if accepts_attention:
                kwargs["attention"] = job["attention"]
            else:
                info["note"] = f"--attention {job['attention']} ignored: jaxgen.Generator has no attention parameter"
        t = time.perf_counter()
        self.gen = jaxgen.Generator(path, **kwargs)
        info["load_seconds"] = time.perf_counter() - t
        info["description"] = (f"jaxgen {self.gen.compute_type} on {self.gen.device}"
                               + (f", attention={kwargs['attention']}" if "attention" in kwargs else ""))
        dev = jax.devices()[0] if job["device"] != "cpu" else jax.devices("cpu")[0]
        self.dev = dev
        info["device_name"] = getattr(dev, "device_kind", str(dev))
        self.tokens = self.gen.vocabulary.tokens
        self.end_kwargs = {"end_token": []}  # disables the end token (an empty list of end tokens)

    def sync(self) -> None:  # jaxgen returns Python lists and floats: already synchronised
        pass

    def before(self, w: dict) -> None:
        pass

    def _prompts(self, w: dict) -> List[List[str]]:
        if "prompts" not in w:
            w["prompts"] = [[self.tokens[i] for i in row]
                            for row in make_ids(w["seed"], w["batch"], w["length"], self.spec)]
        return w["prompts"]

    def call(self, w: dict):
        prompts = self._prompts(w)
        if w["kind"] == "score":
            def run():
                res = self.gen.score_batch(prompts, max_input_length=0)
                w["_out"] = [len(r.log_probs) for r in res]
            return run
        new = w.get("new_tokens", 1)

        def run():
            try:
                res = self.gen.generate_batch(prompts, max_length=new, include_prompt_in_result=False,
                                              **self.end_kwargs)
            except (TypeError, ValueError) as exc:
                if "end_token" not in self.end_kwargs or "end" not in str(exc).lower():
                    raise
                self.end_kwargs = {"min_length": new}  # fallback: force the length with min_length
                res = self.gen.generate_batch(prompts, max_length=new, include_prompt_in_result=False,
                                              **self.end_kwargs)
            w["_out"] = [len(r.sequences_ids[0]) for r in res]
        return run

    def check(self, w: dict) -> dict:
        out = w.pop("_out", None)
        if out is None:
            return {}
        if w["kind"] == "score":
            return {"scored": sum(out)}
        return {"generated_min": min(out), "generated_max": max(out),
                "end_token_disabled_with": sorted(self.end_kwargs)[0]}

    def recover(self) -> None:
        import gc

        gc.collect()

    def device_peak_mib(self) -> Optional[float]:
        try:
            stats = self.dev.memory_stats() or {}
        except Exception:
            return None
        peak = stats.get("peak_bytes_in_use")
        return peak / 2**20 if peak else None


def child_jaxgen(job: dict, result_path: str) -> None:
    result = _child_result(job, "jaxgen")
    info = result["info"]
    path = job["jaxgen_dir"]
    marker = os.path.join(path, ".bench-complete")
    if not _marker_ok(marker, job["key"]):
        from jaxgen.converters import TransformersConverter

        t = time.perf_counter()
        TransformersConverter(job["hf_dir"]).convert(path, force=True)
        with open(marker, "w", encoding="utf-8") as f:
            json.dump({"key": job["key"]}, f)
        info["convert_seconds"] = time.perf_counter() - t
        _say(f"converted {job['model']['name']} for jaxgen in {info['convert_seconds']:.1f} s")
    import jax

    info["jax_devices"] = [str(d) for d in jax.devices()]
    info["torch_imported"] = "torch" in sys.modules  # must stay False: one framework per process
    engine = _JaxgenEngine(job, info)
    _say(f"{info['description']} loaded in {info['load_seconds']:.1f} s ({info['device_name']})")
    _write_json(result_path, result)
    _run_workloads(engine, job["workloads"], job["reps"], result, result_path)
    result["ok"] = True
    _write_json(result_path, result)


# ---------------------------------------------------------------------------- transformers child
class _HFEngine:
    kinds = ("decode", "prefill", "score")

    def __init__(self, job: dict, info: dict, static: bool):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.name = "hf-static" if static else "hf-eager"
        self.static = static
        self.spec = job["model"]
        self.device = "cuda" if job["device"] == "cuda" else "cpu"
        if static:
            self.kinds = ("decode", "prefill")
            try:
                import torch._dynamo

                torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            except Exception:
                pass
        dtype = getattr(torch, job["dtype"])
        t = time.perf_counter()
        kwargs = dict(attn_implementation="sdpa")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=dtype,
                                                                      device_map=self.device, **kwargs)
        except (TypeError, ValueError, ImportError):
            model = transformers.AutoModelForCausalLM.from_pretrained(job["hf_dir"], torch_dtype=dtype, **kwargs)
        self.model = model.to(self.device).eval()
        self.sync()
        info["load_seconds"] = time.perf_counter() - t
        info["device_name"] = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        info["description"] = (f"transformers {job['dtype']} on {self.device}, sdpa, "
                               + ("static cache + torch.compile (generate's auto-compile)" if static
                                  else "dynamic cache (eager)"))
        self.pad_id = self.spec["specials"].get("pad", self.spec["specials"]["eos"])
        self.compile_config = None
        if static:
            from transformers import CompileConfig

            self.compile_config = CompileConfig()
            if self.device != "cuda":  # generate() only auto-compiles on accelerators unless told
                self.compile_config._compile_all_devices = True
        self.info = info

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def before(self, w: dict) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def _ids(self, w: dict):
        if "ids" not in w:
            w["ids"] = self.torch.tensor(make_ids(w["seed"], w["batch"], w["length"], self.spec), device=self.device)
        return w["ids"]

    def call(self, w: dict):
        torch = self.torch
        ids = self._ids(w)
        if w["kind"] == "score":
            return lambda: self._score(w, ids)
        new = w.get("new_tokens", 1)
        extra = {}
        if self.static:
            extra = dict(cache_implementation="static", compile_config=self.compile_config)

        def run():
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=self.pad_id,
                                          top_k=None, top_p=None, **extra)
            w["_out"] = int(out.shape[1]) - int(ids.shape[1])
        return run

    def _score(self, w: dict, ids) -> None:
        torch = self.torch
        model = self.model
        softcap = getattr(model.config, "final_logit_softcapping", None)
        vocab = model.config.vocab_size
        chunk = max(1, min(ids.shape[1], 2**30 // (4 * vocab)))  # float32 logits of <= 1 GiB at once
        with torch.inference_mode():
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            targets = ids[:, 1:]
            parts = []
            for s in range(0, targets.shape[1], chunk):
                logits = model.lm_head(hidden[:, s:s + chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, s:s + chunk, None])[..., 0]
                parts.append(lp)
            w["_out"] = int(torch.cat(parts, dim=1).cpu().numel())

    def check(self, w: dict) -> dict:
        out = w.pop("_out", None)
        if out is None:
            return {}
        if w["kind"] == "score":
            return {"scored": out}
        entry = {"generated_min": out, "generated_max": out}
        if self.static and w["kind"] == "decode":  # generate() compiled its decoding step
            entry["torch_compile_used"] = hasattr(self.model, "_compiled_call")
        return entry

    def recover(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def device_peak_mib(self) -> Optional[float]:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


def child_hf(job: dict, result_path: str, static: bool) -> None:
    result = _child_result(job, "hf-static" if static else "hf-eager")
    engine = _HFEngine(job, result["info"], static)
    result["info"]["jax_imported"] = "jax" in sys.modules  # must stay False: one framework per process
    _say(f"{result['info']['description']} loaded in {result['info']['load_seconds']:.1f} s")
    _write_json(result_path, result)
    _run_workloads(engine, job["workloads"], job["reps"], result, result_path)
    result["ok"] = True
    _write_json(result_path, result)


def child_main(argv: Sequence[str]) -> int:
    role, job_path, result_path = argv
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    try:
        if role == "build":
            child_build(job, result_path)
        elif role == "jaxgen":
            child_jaxgen(job, result_path)
        elif role in ("hf-eager", "hf-static"):
            child_hf(job, result_path, static=role == "hf-static")
        else:
            raise ValueError(f"unknown child role {role!r}")
    except BaseException as exc:
        traceback.print_exc()
        try:
            with open(result_path, encoding="utf-8") as f:
                partial = json.load(f)
        except (OSError, ValueError):
            partial = {"workloads": [], "info": {}}
        partial["ok"] = False
        partial["error"] = _short_error(exc)
        _write_json(result_path, partial)
        return 1
    return 0


# ============================================================================ orchestration
def _marker_ok(marker: str, key: str) -> bool:
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f).get("key") == key
    except (OSError, ValueError):
        return False


def child_env(args, role: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "2", "TRANSFORMERS_VERBOSITY": "error",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    if role == "jaxgen":
        env.setdefault("JAXGEN_COMPILATION_CACHE", "0")  # first calls really compile
        if args.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        if args.jax_mem_fraction:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.jax_mem_fraction)
    if args.device == "cpu" and role != "jaxgen":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(args, role: str, job: dict, log_path: str, log) -> dict:
    """Runs one child process to completion (or --child-timeout) and returns its JSON result."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd, job_path = tempfile.mkstemp(prefix=f"job-{role}-", suffix=".json", dir=os.path.dirname(log_path))
    os.close(fd)
    result_path = job_path[:-5] + "-result.json"
    _write_json(job_path, job)
    t = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--child", role, job_path, result_path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=child_env(args, role), cwd=bc.REPO)

        def pump():
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if line.startswith("[bench] "):
                    log(f"  {line[8:].rstrip()}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()  # the child this function started
            proc.wait()
        reader.join(10)
    try:
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"ok": False, "workloads": [], "info": {}}
    if timed_out:
        result["ok"] = False
        result["error"] = f"timed out after {args.child_timeout} s"
    elif proc.returncode != 0 and not result.get("error"):
        result["ok"] = False
        result["error"] = f"exit status {proc.returncode}: {_log_tail(log_path)}"
    result["wall_seconds"] = time.perf_counter() - t
    result["log"] = log_path
    for p in (job_path, result_path):
        with contextlib.suppress(OSError):
            os.remove(p)
    return result


def _log_tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1][:300] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def build_workloads(args) -> List[dict]:
    out = []
    p, n = args.prompt_tokens, args.new_tokens
    for b in args.decode_batches:
        out.append({"id": f"decode B={b}", "kind": "decode", "batch": b, "length": p, "new_tokens": n,
                    "tokens": b * n, "seed": 1000 + b})
    for t in args.prefill_lengths:
        out.append({"id": f"prefill {t}", "kind": "prefill", "batch": 1, "length": t, "new_tokens": 1,
                    "tokens": t, "seed": 2000 + t})
    for t in args.score_lengths:
        out.append({"id": f"score {t}", "kind": "score", "batch": 1, "length": t, "tokens": t, "seed": 3000 + t})
    if args.stress_batch > 0:
        b, t, m = args.stress_batch, args.stress_length, args.stress_new_tokens
        out.append({"id": f"stress {b}x{t} +{m}", "kind": "stress", "batch": b, "length": t, "new_tokens": m,
                    "tokens": b * m, "seed": 4000})
    return out


def model_key(spec: dict, dtype: str) -> str:
    blob = json.dumps({"spec": spec, "dtype": dtype, "version": BUILD_VERSION}, sort_keys=True)
    return f"{spec['name']}-{dtype}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def run_model(args, name: str, log) -> dict:
    spec = model_spec(name, args.tiny, args.max_positions)
    key = model_key(spec, args.dtype)
    root = os.path.join(args.work_dir, "models", key)
    os.makedirs(root, exist_ok=True)
    hf_dir, jaxgen_dir = os.path.join(root, "hf"), os.path.join(root, "jaxgen")
    log_dir = os.path.join(args.work_dir, "logs")
    counts = param_counts(spec)
    entry = {"model": spec["name"], "spec": spec, "key": key, "parameters": counts, "engines": {}, "notes": []}
    longest = max([w["length"] + w.get("new_tokens", 0) for w in args.workloads] + [0])
    if longest > spec["max_positions"]:
        entry["notes"].append(f"{spec['name']}: the longest workload needs {longest} positions, the config has "
                              f"{spec['max_positions']} (--max-positions raises it)")
    job = {"model": spec, "key": key, "dtype": args.dtype, "device": args.device, "hf_dir": hf_dir,
           "jaxgen_dir": jaxgen_dir, "reps": args.reps, "workloads": args.workloads, "attention": args.attention}
    log(f"{spec['name']}: {counts['total'] / 1e6:,.1f} M parameters ({args.dtype}); cache {root}")
    with bc.file_lock(os.path.join(args.work_dir, ".lock")):
        if not _marker_ok(os.path.join(hf_dir, ".bench-complete"), key):
            log(f"{spec['name']}: building the random-weight checkpoint (once) ...")
            res = run_child(args, "build", job, os.path.join(log_dir, f"{spec['name']}-build.log"), log)
            if not res.get("ok"):
                entry["error"] = f"build failed: {res.get('error')}"
                log(f"{spec['name']}: {entry['error']}")
                return entry
            if res.get("parameters") and res["parameters"] != counts["total"]:
                entry["notes"].append(f"{spec['name']}: torch counts {res['parameters']:,} parameters, the analytic "
                                      f"model {counts['total']:,} (fractions use the analytic count)")
        for engine in args.engines:
            log(f"{spec['name']}: {engine} ...")
            res = run_child(args, engine, job, os.path.join(log_dir, f"{spec['name']}-{engine}.log"), log)
            entry["engines"][engine] = res
            if not res.get("ok"):
                log(f"{spec['name']}: {engine} failed: {res.get('error')} (log: {res['log']})")
    return entry


# ============================================================================ report
def _fraction(spec: dict, w: dict, dtype: str, card) -> Optional[float]:
    if card is None or w.get("error") or not w.get("tok_s"):
        return None
    _, bandwidth, peak = card
    if w["kind"] == "decode":
        tok_s = w.get("decode_only_tok_s") or w["tok_s"]
        steps_per_s = tok_s / w["batch"]
        return steps_per_s * decode_bytes_per_step(spec, w["batch"], w["length"], w["new_tokens"],
                                                   DTYPE_BYTES[dtype]) / bandwidth
    if w["kind"] in ("prefill", "score"):
        if dtype not in ("bfloat16", "float16"):
            return None
        flops = forward_flops(spec, w["length"], with_head=w["kind"] == "score")
        return flops / w["median_s"] / peak
    return None


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(w: Optional[dict]) -> str:
    if w is None:
        return "—"
    if w.get("error"):
        return "error"
    return bc.fmt(w.get("tok_s"))


def build_report(args, header: List[str], models: List[dict], device_name: str, card) -> List[str]:
    rows, details, first_rows, notes = [], [], [], []
    for m in models:
        spec = m["spec"]
        if m.get("error"):
            notes.append(f"{m['model']}: {m['error']}")
            continue
        notes += m.get("notes", [])
        by_engine = {e: {w["workload"]: w for w in r.get("workloads", [])} for e, r in m["engines"].items()}
        for e, r in m["engines"].items():
            if r.get("error"):
                notes.append(f"{m['model']} {e}: {r['error']} (log: {r.get('log')})")
            if r.get("info", {}).get("note"):
                notes.append(f"{m['model']} {e}: {r['info']['note']}")
        for wl in args.workloads:
            wid = wl["id"]
            cells = {e: by_engine.get(e, {}).get(wid) for e in ENGINES}
            if wl["kind"] == "stress":
                j = cells.get("jaxgen")
                if j is None:
                    continue
                text = (f"ok: {j['median_s']:.2f} s a call (first {j['first_s']:.1f} s)" if not j.get("error")
                        else f"error: {j['error']}")
                rows.append([m["model"], f"{wid} (memory stress)", text, "—", "—", "—", "—"])
            else:
                j = cells.get("jaxgen")
                hf = [c["tok_s"] for c in (cells.get("hf-eager"), cells.get("hf-static"))
                      if c and not c.get("error") and c.get("tok_s")]
                ratio = (f"{j['tok_s'] / max(hf):.2f}x" if j and not j.get("error") and j.get("tok_s") and hf
                         else "—")
                frac = _pct(_fraction(spec, j, args.dtype, card)) if j and not j.get("error") else "—"
                rows.append([m["model"], wid, _cell(j), _cell(cells.get("hf-eager")), _cell(cells.get("hf-static")),
                             ratio, frac])
            for e in ENGINES:
                w = cells.get(e)
                if w is None:
                    continue
                if w.get("error"):
                    notes.append(f"{m['model']} {e} {wid}: {w['error']}")
                    continue
                first_rows.append([m["model"], wid, ENGINE_LABELS[e], f"{w['first_s']:.3f}", f"{w['median_s']:.3f}",
                                   f"{w['first_s'] / w['median_s']:.1f}x"])
                fr = _fraction(spec, w, args.dtype, card)
                dec = bc.fmt(w.get("decode_only_tok_s")) if w["kind"] == "decode" else ""
                peak = bc.fmt(w.get("device_peak_mib")) if w.get("device_peak_mib") else "—"
                details.append([m["model"], wid, ENGINE_LABELS[e], bc.fmt(w["tok_s"]), dec, _pct(fr),
                                " ".join(f"{s:.3f}" for s in w["times_s"]), peak])
    lines = list(header)
    card_text = (f"{card[0]}: {card[1] / 1e12:.2f} TB/s, {card[2] / 1e12:.0f} TFLOP/s dense bf16" if card
                 else f"unknown card ({device_name or 'no device name'}): fractions n/a")
    lines += ["", f"Card limits: {card_text}. Repetitions: first call + median of {args.reps}; decode prompts "
                  f"{args.prompt_tokens} random ids + {args.new_tokens} new tokens (greedy, end token disabled).", ""]
    for m in models:
        for e, r in m.get("engines", {}).items():
            info = r.get("info", {})
            if info.get("description"):
                extra = f", converted in {info['convert_seconds']:.0f} s" if info.get("convert_seconds") else ""
                lines.append(f"- {m['model']} {e}: {info['description']}; loaded in "
                             f"{info.get('load_seconds', float('nan')):.1f} s{extra}")
    lines += ["", *bc.markdown_table(["model", "workload", "jaxgen tok/s", "HF eager", "HF static",
                                      "jaxgen/HF", "fraction of card limit"], rows, "llrrrrr"), ""]
    lines += ["Notes:",
              "- decode tok/s = B x new tokens / wall time of the whole call (prefill of the prompts included); "
              "the fraction uses decode-only tok/s = B x (N-1) / (t(N) - t(1)) and the bytes read per step "
              "(weights + KV cache) against the card's bandwidth.",
              "- prefill / score fraction = useful FLOP/s (2 x non-embedding params x T + causal attention; score "
              "adds the lm_head on every position) / dense bf16 peak.",
              "- jaxgen/HF = jaxgen tok/s / the faster of HF eager and HF static.",
              "- hf-static: score is not run (no cache is involved; it would repeat HF eager)."]
    lines += [f"- {n}" for n in notes]
    lines += ["", "First call (compilation included) vs warm median, seconds:", "",
              *bc.markdown_table(["model", "workload", "engine", "first call s", "warm median s", "first/warm"],
                                 first_rows, "lllrrr"),
              "", "Details:", "",
              *bc.markdown_table(["model", "workload", "engine", "tok/s", "decode-only tok/s", "fraction",
                                  "raw seconds", "device peak MiB"], details, "lllrrrlr")]
    return lines


def header_lines(args) -> List[str]:
    return [
        "# jaxgen vs transformers on the GPU (random weights, real shapes)",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; jaxgen revision: "
        f"{bc.git_revision()}",
        f"- versions: python {platform.python_version()}, jaxgen {bc.version_of('jaxgen')}, "
        f"jax {bc.version_of('jax')}, jaxlib {bc.version_of('jaxlib')}, torch {bc.version_of('torch')}, transformers "
        f"{bc.version_of('transformers')}",
        f"- machine: {bc.cpu_model()}, {bc.cpu_count()} usable cores; device: {args.device}"
        + (f" ({bc.gpu_model()})" if args.device == "cuda" else ""),
        f"- models: {', '.join(args.models)}{' (tiny variants)' if args.tiny else ''}; dtype {args.dtype}; "
        f"engines {', '.join(args.engines)}",
    ]


# ============================================================================ main
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="few-layer small variants (CPU smoke run)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_BYTES))
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of jaxgen,hf-eager,hf-static")
    p.add_argument("--decode-batches", type=_ints, default=None, help="default 1,16,64,256 (--tiny: 1,16)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="decode prompt length (default 128; --tiny 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 128; --tiny 32)")
    p.add_argument("--prefill-lengths", type=_ints, default=None,
                   help="default 2048,8192,16384,32768 (--tiny: 256,1024)")
    p.add_argument("--score-lengths", type=_ints, default=None, help="default: the prefill lengths")
    p.add_argument("--stress-batch", type=int, default=8, help="jaxgen memory stress prompts (0 skips it)")
    p.add_argument("--stress-length", type=int, default=None, help="default 16384 (--tiny: 256)")
    p.add_argument("--stress-new-tokens", type=int, default=None, help="default 64 (--tiny: 8)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after the first call (median)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="override max_position_embeddings of every model (e.g. 32768)")
    p.add_argument("--attention", default=None,
                   help="jaxgen.Generator(attention=...) when the Generator accepts that parameter")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR, help=f"model cache and logs (default {DEFAULT_WORK_DIR})")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--report", default=None, help="also write the markdown report here")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per engine process (default 3600)")
    p.add_argument("--jax-mem-fraction", type=float, default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION for the jaxgen process (default: JAX's 0.75)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r} (choose from {', '.join(ENGINES)})")
    tiny = args.tiny
    if args.decode_batches is None:
        args.decode_batches = [1, 16] if tiny else [1, 16, 64, 256]
    if args.prompt_tokens is None:
        args.prompt_tokens = 32 if tiny else 128
    if args.new_tokens is None:
        args.new_tokens = 32 if tiny else 128
    if args.prefill_lengths is None:
        args.prefill_lengths = [256, 1024] if tiny else [2048, 8192, 16384, 32768]
    if args.score_lengths is None:
        args.score_lengths = list(args.prefill_lengths)
    if args.stress_length is None:
        args.stress_length = 256 if tiny else 16384
    if args.stress_new_tokens is None:
        args.stress_new_tokens = 8 if tiny else 64
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if "jaxgen" not in args.engines:
        args.stress_batch = 0
    args.work_dir = os.path.abspath(args.work_dir)
    args.workloads = build_workloads(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(args.work_dir, exist_ok=True)
    header = header_lines(args)
    for line in header:
        print(line, flush=True)
    if args.device == "cuda" and shutil.which("nvidia-smi") is None:
        log("warning: nvidia-smi not found; the engines will fail without a CUDA device (use --device cpu)")
    models = [run_model(args, name, log) for name in args.models]
    device_name = ""
    for m in models:
        for r in m.get("engines", {}).values():
            device_name = device_name or r.get("info", {}).get("device_name", "")
    if args.device == "cpu":
        device_name = device_name or "cpu"
    card = card_limits(device_name) if args.device == "cuda" else None
    report = build_report(args, header, models, device_name, card)
    print("\n".join(report[len(header):]), flush=True)
    elapsed = time.perf_counter() - t0
    log(f"total wall time {elapsed:.0f} s")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write("\n".join(report) + "\n")
    if args.out:
        results = []
        for m in models:
            for e, r in m.get("engines", {}).items():
                for w in r.get("workloads", []):
                    results.append({"model": m["model"], "engine": e, **w,
                                    "fraction": _fraction(m["spec"], w, args.dtype, card)})
        dump = {"args": {k: v for k, v in vars(args).items() if k != "workloads"}, "header": header,
                "device_name": device_name, "card": card, "workloads": args.workloads, "results": results,
                "models": models, "elapsed_seconds": elapsed}
        _write_json(args.out, dump)
        log(f"wrote {args.out}")
    failed = any(m.get("error") for m in models) or any(
        not r.get("ok") for m in models for r in m.get("engines", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
