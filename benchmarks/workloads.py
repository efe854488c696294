"""The questions the README asks, each a short workload over the harness and the engine protocol.

A workload is a function `(ctx) -> report lines`, registered with its parameters: each parameter has
a default and a `--tiny` value (tests/hf_models.py's tiny model, seconds), and can be set on the
command line (`--new-tokens 64`, `--batch-sizes 1,8`). `benchmarks/run.py` lists them.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import harness as h
import models
from engines import llama_cpp_repack_works
from harness import Case, Spec
from models import SHORT_TEXT, TEXT, Tokens

WORKLOADS: Dict[str, "Workload"] = {}


@dataclasses.dataclass
class Workload:
    name: str
    title: str
    run: Callable
    params: Dict[str, object]  # name -> default
    tiny: Dict[str, object]  # name -> value with --tiny


def workload(title: str, tiny: Dict[str, object], **params):
    def register(fn):
        WORKLOADS[fn.__name__] = Workload(fn.__name__, title, fn, params, tiny)
        return fn
    return register


@dataclasses.dataclass
class Context:
    """What a workload gets: its parameters (`ctx.p.name`), the run's settings, and helpers."""

    p: object
    tiny: bool
    reps: int
    threads: int
    pause: float
    work_dir: str
    log: Callable[[str], None]
    records: List[dict] = dataclasses.field(default_factory=list)
    _paths: Dict[tuple, dict] = dataclasses.field(default_factory=dict)

    def paths(self, need=()) -> Dict[str, str]:
        """The default model (the tiny model with --tiny): jaxgen, gguf, and the hf / ct2 copies in `need`."""
        import models

        if tuple(need) not in self._paths:
            maker = models.tiny_model if self.tiny else models.default_model
            self._paths[tuple(need)] = maker(self.work_dir, self.log, need)
        return self._paths[tuple(need)]

    def tokens(self, jaxgen_dir: Optional[str] = None) -> Tokens:
        return Tokens(jaxgen_dir or self.paths()["jaxgen"], self.tiny)

    def run(self, specs: List[Spec], cases: List[Case], prompts: dict, reps: Optional[int] = None) -> h.Results:
        results = h.run(specs, cases, prompts, self.reps if reps is None else reps,
                        os.path.join(self.work_dir, "logs"), self.threads, self.pause, self.log)
        self.records.append({"cases": [dataclasses.asdict(c) for c in cases], "workers": results.workers,
                             "results": [{"case": c, "engine": k, **dataclasses.asdict(r)}
                                         for (c, k), r in results.items()]})
        return results


def jaxgen_spec(key: str, model: str, compute_type: str = "float32", group: int = 0, env: Optional[dict] = None,
                device: str = "cpu", **generator) -> Spec:
    return Spec(key, "jaxgen", model, {"compute_type": compute_type, "device": device, "generator": generator},
                env or {}, group)


def failures(results: h.Results) -> List[str]:
    lines = [f"- {k} failed: {w['error'].strip().splitlines()[-1]} (log: {w['log']})"
             for k, w in results.workers.items() if w["error"]]
    return lines + [f"- {c} / {k} failed: {r.error.strip().splitlines()[-1]}" for (c, k), r in results.items()
                    if r.error and r.error != "unsupported"]


def outputs(results: h.Results, case: Case, key: str):
    r = results[(case.id, key)]
    reply = r.runs[-1] if r.runs else r.first
    return None if reply is None else reply.get("outputs")


# ============================================================================ main: the CPU comparison
@workload("jaxgen against CTranslate2 and llama.cpp on the default model (CPU)",
          tiny=dict(batch_sizes=(1, 4), new_tokens=8, prefill_tokens=32, score="2x4", startup_reps=1),
          engines="jaxgen,ct2,llama.cpp", precisions="float32,int8", batch_sizes=(1, 16), new_tokens=128,
          prefill_tokens=512, score="16x128", close_after=4, startup_reps=3,
          cases="decode,prefill,score,first_token,close,startup")
def main(ctx: Context) -> List[str]:
    """Every engine in its own process; per precision group, the cases alternate between engines.
    decode: B x N tokens / time of one greedy call, N forced with min_length, a 9-token prompt;
    prefill: prompt tokens / time to the first token; score: input tokens / time of score_batch;
    first token and close() of a stream in a warm process; startup: a new process from its launch to
    its first streamed token (jaxgen with an empty, then a filled persistent compilation cache)."""
    p = ctx.p
    engines = [e for e in p.engines.split(",") if e]
    paths = ctx.paths(need=[e for e in ("hf", "ct2") if e in engines])
    precisions = [x for x in p.precisions.split(",") if x]
    wanted = set(p.cases.split(","))
    notes = []
    if "ct2" in engines and "ct2-float32" not in paths:
        engines.remove("ct2")
        notes.append("- CTranslate2 is not installed: left out.")
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        engines.remove("llama.cpp")
        notes.append("- llama.cpp left out: llama-cpp-python is not installed (`pip install llama-cpp-python`, "
                     "the `bench` extra; it builds llama.cpp from source).")
    repack = "llama.cpp" not in engines or llama_cpp_repack_works(paths["gguf"], ctx.threads)
    if not repack:
        notes.append("- llama.cpp crashed (SIGSEGV) at its first decode with its repacked kernels (extra buffer "
                     "types, AMX) on this CPU: it ran without them (llama.cpp's --no-repack).")
    llama_spec = Spec("llama.cpp Q4_K_M", "llama.cpp", paths["gguf"], {"vocabulary": os.path.join(
        paths["jaxgen"], "vocabulary.json"), "n_seq": max(p.batch_sizes), "n_ctx": max(1024, p.prefill_tokens + 16),
        "repack": repack})
    specs = []
    for group, prec in enumerate(precisions):
        specs += [jaxgen_spec(f"jaxgen {prec}", paths["jaxgen"], prec, group)] if "jaxgen" in engines else []
        specs += [Spec(f"CTranslate2 {prec}", "ct2", paths[f"ct2-{prec}"], {"compute_type": prec}, {}, group)
                  for e in engines if e == "ct2"]
        specs += [Spec(f"transformers {prec}", "hf", paths["hf"], {"compute_type": prec}, {}, group)
                  for e in engines if e == "hf" and prec == "float32"]
        if "llama.cpp" in engines and prec == ("int8" if "int8" in precisions else precisions[-1]):
            specs.append(dataclasses.replace(llama_spec, group=group))
    tok = ctx.tokens()
    batch, length = (int(x) for x in p.score.split("x"))
    prompts = {"short": [tok.prompt(SHORT_TEXT)], "long": [tok.prompt(TEXT, p.prefill_tokens)],
               "score": tok.windows(TEXT, batch, length)}
    cases = [Case(f"decode tok/s, batch {b} ({p.new_tokens} new tokens)", "generate",
                  dict(prompts="short", batch=b, new_tokens=p.new_tokens), work=b * p.new_tokens)
             for b in p.batch_sizes if "decode" in wanted]
    cases += [Case(f"prefill tok/s, {p.prefill_tokens}-token prompt", "prefill", dict(prompts="long"),
                   work=p.prefill_tokens)] if "prefill" in wanted else []
    cases += [Case(f"`score_batch` tok/s, {p.score}", "score", dict(prompts="score"), work=batch * length)
              ] if "score" in wanted else []
    cases += [Case("first streamed token, warm process, ms", "first_token", dict(max_length=p.new_tokens))
              ] if "first_token" in wanted else []
    cases += [Case(f"`close()` of a running stream after {p.close_after} tokens, ms", "close",
                   dict(read=p.close_after, max_length=p.new_tokens * 4))] if "close" in wanted else []
    results = ctx.run(specs, cases, prompts)

    # The README's format: one row per metric and precision, one column per engine; llama.cpp's
    # figures in the rows of the group it ran with (its Q4_K_M file beside the int8 engines).
    columns = [e for e in ("jaxgen", "CTranslate2", "transformers", "llama.cpp") if any(
        s.key.startswith(e) for s in specs)]
    group = {s.key: s.group for s in specs}

    def key(column: str, prec: str) -> Optional[str]:
        k = "llama.cpp Q4_K_M" if column == "llama.cpp" else f"{column} {prec}"
        return k if group.get(k) == precisions.index(prec) else None

    def value(case: Case, k: Optional[str]) -> Optional[float]:
        if k is None:
            return None
        return results.ms(case, k) if case.op in ("first_token", "close") else results.rate(case, k)

    rows = []
    for prec in precisions:
        for case in cases:
            v = {c: value(case, key(c, prec)) for c in columns}
            rows.append([f"{case.id}, {prec}", *(h.fmt(v[c]) for c in columns),
                         h.ratio(v.get("jaxgen"), v.get("CTranslate2"))])
        peaks = [key(c, prec) and results.workers[key(c, prec)]["final"].get("peak_rss_mib") for c in columns]
        rows.append([f"peak RSS over the cases, MiB, {prec}", *map(h.fmt, peaks), ""])
        k = key("jaxgen", prec)
        if k:
            compiled = len(results.workers[k]["info"].get("compiled", [])) + sum(
                len(r.first.get("compiled", [])) for (_, kk), r in results.items() if kk == k and r.first)
            rows.append([f"programs JAX compiled (load and warm-up), {prec}",
                         *(str(compiled) if c == "jaxgen" else "—" for c in columns), ""])
    if "startup" in wanted:
        rows += startup_rows(ctx, [s for s in specs if s.engine == "llama.cpp" or s.key.endswith(" float32")],
                             prompts, columns)
    lines = ["Engines (one process each):"]
    lines += [f"- {s.key}: {results.workers[s.key]['info'].get('description', 'failed')}" for s in specs]
    heads = [f"{c} Q4_K_M" if c == "llama.cpp" else c for c in columns]
    lines += ["", *h.markdown_table(["metric", *heads, "jaxgen / CT2"], rows)]
    lines += ["", f"Medians of {ctx.reps} repetitions after a warm-up, engines alternating within each "
                  "precision group; startup: medians of new processes. jaxgen / CT2 > 1 favours jaxgen for tok/s, "
                  "CTranslate2 for ms.", *notes, *failures(results)]
    return lines


def startup_rows(ctx: Context, specs: List[Spec], prompts: dict, columns: List[str]) -> List[List[str]]:
    """New process -> first streamed token, alternating between engines; jaxgen twice on one fresh
    JAXGEN_HOME: cold (compiles, fills its cache), then warm (loads from it)."""
    times: Dict[tuple, list] = collections.defaultdict(list)
    for _ in range(ctx.p.startup_reps):
        home = tempfile.mkdtemp(prefix="jaxgen-home-", dir=ctx.work_dir)
        for spec in specs:
            for label in (["cold", "warm"] if spec.engine == "jaxgen" else [""]):
                env = {**spec.env, "JAXGEN_HOME": home} if label else spec.env
                try:
                    r = h.start_up(dataclasses.replace(spec, env=env), "first_token", {}, prompts,
                                   os.path.join(ctx.work_dir, "logs"), ctx.threads)
                except RuntimeError as exc:
                    ctx.log(f"  startup {spec.key}: {exc}")
                    continue
                times[(spec.key.split()[0], label)].append(r["done"])
                ctx.log(f"  startup {spec.key} {label}: {r['done']:.2f} s (imported {r['imported']:.2f}, "
                        f"loaded {r['loaded']:.2f}; {r['compiled']} programs compiled or loaded)")
        shutil.rmtree(home, ignore_errors=True)
    row = ["new process to first token, s (jaxgen: cold / warm JAX cache)"]
    for column in columns:
        cold, warm, plain = (times.get((column, x)) for x in ("cold", "warm", ""))
        row.append(f"{h.fmt(statistics.median(cold))} / {h.fmt(statistics.median(warm))}" if cold and warm
                   else h.fmt(statistics.median(plain)) if plain else "—")
    return [row + [""]]


# ============================================================================ the command's start-up
CLI_PHASES = r"""
import json, os, sys, time
t0 = time.perf_counter()
spawned = float(os.environ["SPAWNED_AT"])
marks = {"process start (interpreter, site)": time.time() - spawned}
import jax  # noqa: F401
marks["import jax"] = time.perf_counter() - t0
t = time.perf_counter()
import jaxgen.cli as cli
import jaxgen.generator as generator
import jaxgen.tokenizer as tokenizer
marks["import jaxgen (cli, generator, tokenizer)"] = time.perf_counter() - t
spent = {"tokenizer": 0.0, "Generator()": 0.0}

def timed(name, fn):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    return run

tokenizer.load_tokenizer = timed("tokenizer", tokenizer.load_tokenizer)
generator.Generator.__init__ = timed("Generator()", generator.Generator.__init__)
for label in ("first", "again"):
    before = dict(spent)
    t = time.perf_counter()
    cli.main(sys.argv[1:])
    total = time.perf_counter() - t
    loads = sum(spent.values()) - sum(before.values())
    if label == "first":
        marks.update((k, v - before[k]) for k, v in spent.items())
        marks["generation (prefill, 16 steps, detokenizing, printing)"] = total - loads
    else:
        marks["the same command again in the process (load + generation)"] = total
with open(os.environ["PHASES_OUT"], "w") as f:
    json.dump(marks, f)
"""


def _cli_run(argv: List[str], env: dict) -> Tuple[float, Optional[float]]:
    """(seconds to exit, seconds to the first byte on stdout) of one new process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - start if first else None
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, first_at


@workload("The jaxgen command's start-up: a warm `jaxgen generate --max-length 16` from process start to exit",
          tiny=dict(models="tiny"), models="default,tiny", prompt="The capital of France is")
def cli_startup(ctx: Context) -> List[str]:
    """`jaxgen generate --max-length 16 PROMPT` in new processes, warm: after one untimed call that
    fills JAX's compilation cache (a fresh JAXGEN_HOME of the work directory, the user's default).
    The default model, and the CLI tests' tiny model (tests/cli_models.py: 2 layers, 100 tokens).
    Wall time to exit (the README's command), and to the first generated text on stdout (the same
    with --no-echo), alternating, --reps times each; medians and ranges. Then where one warm process spends its time
    (the command run in-process, its loads timed)."""
    cli_models = models.tests_module("cli_models")
    exe = os.path.join(os.path.dirname(sys.executable), "jaxgen")
    home = os.path.join(ctx.work_dir, "cli-startup-home")
    env = {**os.environ, "JAXGEN_HOME": home, **h.thread_env(ctx.threads)}
    models_dirs = {}
    for name in ctx.p.models.split(","):
        if name == "tiny":
            directory = os.path.join(ctx.work_dir, "tiny", "cli-model")
            models_dirs[name] = directory if os.path.isdir(directory) else cli_models.build_cli_tiny_model(directory)
        else:
            models_dirs[name] = models.default_model(ctx.work_dir, ctx.log, need=())["jaxgen"]
    rows, phases = [], {}
    for name, directory in models_dirs.items():
        argv = [exe, "generate", "--model", directory, "--max-length", "16", ctx.p.prompt]
        _cli_run(argv, env)  # fills the cache
        exits, firsts = [], []
        for _ in range(ctx.reps):
            exits.append(_cli_run(argv, env)[0])
            firsts.append(_cli_run(argv[:2] + ["--no-echo"] + argv[2:], env)[1])
            ctx.log(f"  {name}: exit {exits[-1]:.2f} s, first token {firsts[-1]:.2f} s")
        rows.append([name, f"{statistics.median(exits):.2f} ({min(exits):.2f}-{max(exits):.2f})",
                     f"{statistics.median(firsts):.2f} ({min(firsts):.2f}-{max(firsts):.2f})"])
        out = os.path.join(ctx.work_dir, "cli-phases.json")
        child = subprocess.run([sys.executable, "-c", CLI_PHASES, *argv[1:]], capture_output=True, text=True,
                               env={**env, "SPAWNED_AT": repr(time.time()), "PHASES_OUT": out})
        if child.returncode:
            raise RuntimeError(f"the phase breakdown failed: {child.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            phases[name] = json.load(f)
    lines = [f"- command: `jaxgen generate --model DIR --max-length 16 {ctx.p.prompt!r}`; {ctx.reps} runs each", "",
             *h.markdown_table(["model", "process start to exit, s", "process start to first token, s"], rows, "lrr"),
             "", "Where one warm process spends its time (seconds):", ""]
    names = list(next(iter(phases.values())))
    lines += h.markdown_table(["phase", *phases], [[k, *(f"{p[k]:.2f}" for p in phases.values())] for k in names],
                              "l" + "r" * len(phases))
    return lines


# ============================================================================ int8: numerics
@workload("int8 against float32: jaxgen next to CTranslate2, on the same text",
          tiny=dict(prompts=2, prompt_tokens=4, new_tokens=8, score_tokens=3), prompts=6, prompt_tokens=24,
          new_tokens=128, score_tokens=200)
def int8(ctx: Context) -> List[str]:
    """log-probs of every paragraph of the benchmark text (one sequence per call: CTranslate2 4.8.5
    rejects this mixed-length Gemma 3 batch): max / mean / p99 |Δ log-prob|; greedy outputs of the
    first words of each paragraph, N new tokens forced: tokens kept before the first difference."""
    import numpy as np

    p, paths = ctx.p, ctx.paths(need=["ct2"])
    tok = ctx.tokens()
    paragraphs = [x for x in TEXT.split("\n\n") if x.strip()]
    prompts = {"scored": [[tok.bos] + tok.encode(x)[:p.score_tokens] for x in paragraphs],
               "starts": [[tok.bos] + tok.encode(x)[:p.prompt_tokens] for x in paragraphs[:p.prompts]]}
    specs = [jaxgen_spec(f"jaxgen {q}", paths["jaxgen"], q, i) for i, q in enumerate(("float32", "int8"))]
    specs += [Spec(f"CTranslate2 {q}", "ct2", paths[f"ct2-{q}"], {"compute_type": q}, {}, 2 + i)
              for i, q in enumerate(("float32", "int8")) if f"ct2-{q}" in paths]
    score = Case("score", "score", dict(prompts="scored", one_by_one=True, outputs=True), reps=0)
    greedy = Case("greedy", "generate", dict(prompts="starts", new_tokens=p.new_tokens, outputs=True), reps=0)
    results = ctx.run(specs, [score, greedy], prompts)
    rows = []
    for a, b in (("jaxgen int8", "jaxgen float32"), ("CTranslate2 int8", "CTranslate2 float32"),
                 ("jaxgen int8", "CTranslate2 int8"), ("jaxgen float32", "CTranslate2 float32")):
        la, lb, ga, gb = (outputs(results, c, k) for c in (score, greedy) for k in (a, b))
        if None in (la, lb, ga, gb):
            continue
        d = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)) for x, y in zip(la, lb)])
        kept = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))) for x, y in zip(ga, gb)]
        rows.append([f"{a} vs {b}", f"{d.max():.3f}", f"{d.mean():.3f}", f"{np.percentile(d, 99):.3f}",
                     f"{sum(kept)} / {len(kept) * p.new_tokens}"])
    return [f"{len(prompts['scored'])} scored sequences ({sum(len(s) - 1 for s in prompts['scored'])} tokens); "
            f"greedy: {len(prompts['starts'])} prompts x {p.new_tokens} new tokens.", "",
            *h.markdown_table(["pair", "max \\|Δ log-prob\\|", "mean", "p99",
                               "greedy tokens kept before the first difference"], rows), *failures(results)]


SHAPES = {  # the default model's int8 products: name -> (K, N, weight stored [N, K] as a tied head is)
    "up": (640, 2048, False), "down": (2048, 640, False), "q": (640, 1024, False), "o": (1024, 640, False),
    "kv": (640, 256, False), "head_block": (640, 16384, True), "head_block_int8": (640, 4096, True),
    "head": (640, 262144, True)}


@workload("int8 matrix-product formulations on XLA, in the default model's shapes",
          tiny=dict(shapes="kv,head_block_int8", ms=(1, 16)), shapes=",".join(SHAPES), ms=(1, 16, 512),
          candidates="f32,w8,a8,u8,c8,c32")
def int8_kernels(ctx: Context) -> List[str]:
    """y = x [M, K] @ (int8 weight x per-channel scale) per formulation (see engines.Int8ProductsEngine;
    u8, c8 and c32 are jaxgen's; c8 (int8) and c32 (float32) are the native kernels, always with the
    weight stored [N, K], as jaxgen stores it where it chooses them), alternating, medians; error:
    max |y - ref| / rms(ref), ref in float64 (f32, c32: against the float32 weight). M = 1: batch-1
    decode, 16: batch-16 decode, 512: prefill / scoring rows."""
    p = ctx.p
    cases = [Case(f"{name} M={m} {c}", "matmul", dict(k=SHAPES[name][0], n=SHAPES[name][1], m=m, candidate=c,
                                                      nk=SHAPES[name][2] or c in ("c8", "c32")), warmup={"check": True})
             for name in p.shapes.split(",") for m in p.ms for c in p.candidates.split(",")
             if not (name == "head" and m > 64)]  # the whole head never runs at 512 rows
    results = ctx.run([Spec("xla", "int8 products", "")], cases, {})
    rows, base = [], {}
    for case in cases:
        name, m, candidate = case.id.split()
        seconds = results.median(case, "xla")
        base.setdefault((name, m), seconds if candidate == "f32" else None)
        first = results[(case.id, "xla")].first or {}
        rows.append([name, "{k} x {n}".format(**case.args), m[2:], candidate, h.fmt(seconds and 1000 * seconds),
                     h.ratio(base[(name, m)], seconds), f"{first.get('max_error', float('nan')):.1e}"])
    return h.markdown_table(["shape", "K x N", "M", "candidate", "median ms", "speed vs f32", "max err / rms"],
                            rows, "lllrrrr") + failures(results)


# ============================================================================ long inputs
@workload("Long inputs: peak memory and time of one long score and one long prompt (jaxgen, CPU)",
          tiny=dict(score_tokens=48, prefix_tokens=16, prompt_tokens=40, new_tokens=4),
          score_tokens=32768, prefix_tokens=1024, prompt_tokens=16384, new_tokens=16, attention="")
def long_context(ctx: Context) -> List[str]:
    """Each workload in its own process (its peak RSS is its own), once, compilation included; the
    text is this repository's README and sources. The long score must agree with scoring its prefix."""
    import numpy as np

    import models

    p, paths = ctx.p, ctx.paths()
    text = models.repository_text()
    tok = ctx.tokens()
    prompts = {"score": [tok.prompt(text, p.score_tokens)], "prefix": [tok.prompt(text, p.prefix_tokens)],
               "prompt": [tok.prompt(text, p.prompt_tokens)]}
    extra = {"attention": p.attention} if p.attention else {}
    specs = [jaxgen_spec("score", paths["jaxgen"], group=0, **extra),
             jaxgen_spec("generate", paths["jaxgen"], group=1, **extra)]
    long = Case("score_batch", "score", dict(prompts="score", outputs=True, max_input_length=0), ["score"], reps=0)
    prefix = Case("prefix", "score", dict(prompts="prefix", outputs=True, max_input_length=0), ["score"], reps=0)
    gen = Case("generate_batch", "generate", dict(prompts="prompt", batch=1, new_tokens=p.new_tokens, exact=False,
                                                  end_token=[]), ["generate"], reps=0)
    results = ctx.run(specs, [long, prefix, gen], prompts)
    rows = []
    for case, key, what in ((long, "score", f"`score_batch`, one {p.score_tokens:,}-token sequence"),
                            (gen, "generate", f"`generate_batch` from one {p.prompt_tokens:,}-token prompt, "
                                              f"{p.new_tokens} new tokens")):
        peak = results.workers[key]["final"].get("peak_rss_mib")
        rows.append([what, h.fmt(peak / 1024 if peak else None), h.fmt(results.median(case, key))])
    lines = h.markdown_table(["workload", "peak RSS, GiB", "seconds (compilation included)"], rows)
    a, b = outputs(results, long, "score"), outputs(results, prefix, "score")
    if a and b:
        diff = float(np.max(np.abs(np.asarray(a[0][:len(b[0])]) - np.asarray(b[0]))))
        lines.append(f"\nThe long score agrees with scoring its first {p.prefix_tokens:,} tokens alone within "
                     f"{diff:.1e} (max |Δ log-prob|).")
    return lines + failures(results)


# ============================================================================ continuous batching
def prose_prompts(n: int) -> List[str]:
    """n prompts: the first half (at least 5 words) of prose sentences of Python's documentation
    (pydoc_data), spread evenly over all of them; deterministic for a Python version."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.split("\n")
            if any(line.startswith((" ", "\t", ">>>", "*", "-", "=")) for line in lines):
                continue  # code, lists, tables, titles
            for s in re.split(r"(?<=[.!?])\s+", " ".join(line.strip() for line in lines)):
                if 10 <= len(s.split()) <= 40 and s.isascii() and "::" not in s and "`" not in s:
                    sentences.append(s)
    picked = [sentences[int(i * len(sentences) / n)] for i in range(n)]
    return [" ".join(s.split()[:max(5, len(s.split()) // 2)]) for s in picked]


def distribution(lengths: List[int]) -> str:
    q = statistics.quantiles(lengths, n=4)
    return (f"min {min(lengths)}, p25 {q[0]:.0f}, median {statistics.median(lengths):.0f}, p75 {q[2]:.0f}, "
            f"max {max(lengths)} ({sum(n >= max(lengths) for n in lengths)} prompts), "
            f"mean {statistics.mean(lengths):.1f}")


@workload("Continuous batching (the slot scheduler) against static sub-batches of the same width",
          tiny=dict(prompts=12, widths=(4,), max_length=16), prompts=256, widths=(16, 64), modes="greedy,sampling",
          max_length=256, sampling_temperature=1.0)
def continuous(ctx: Context) -> List[str]:
    """Real prose prompts, end tokens "<eos>", "\\n", "."; greedy, then top-k 40 sampling with seed 0 at
    --sampling-temperature; each (mode, width) once on both paths after a warm-up on `width` prompts;
    the outputs must agree."""
    p, paths = ctx.p, ctx.paths()
    tok = ctx.tokens()
    prose = [tok.prompt(t) for t in prose_prompts(p.prompts)]
    vocab = set(tok.vocabulary)
    end = [t for t in ("<eos>", "\n", ".") if t in vocab] + (tok.vocabulary[10:40] if ctx.tiny else [])
    specs = [jaxgen_spec(k, paths["jaxgen"], continuous_batching=k == "scheduler") for k in ("static", "scheduler")]
    cases = []
    for mode in p.modes.split(","):
        for w in p.widths:
            args = dict(prompts="prose", new_tokens=p.max_length, exact=False, outputs=True, end_token=end,
                        max_batch_size=w, return_end_token=True)
            if mode == "sampling":
                args.update(sampling_topk=40, random_seed=0, sampling_temperature=p.sampling_temperature)
            cases.append(Case(f"{mode} {w}", "generate", args, work=len(prose), reps=1, warmup={"prompts": prose[:w]}))
    results = ctx.run(specs, cases, {"prose": prose})
    rows, notes = [], []
    for case in cases:
        rate = {k: results.rate(case, k) for k in ("static", "scheduler")}
        out = {k: outputs(results, case, k) for k in rate}
        if None in out.values():
            continue
        tokens = sum(map(len, out["scheduler"]))
        sched = results[(case.id, "scheduler")].runs[0]["scheduler"]
        rows.append([*case.id.split(), h.fmt(rate["static"]), h.fmt(rate["scheduler"]),
                     h.ratio(rate["scheduler"], rate["static"]), h.fmt(tokens / len(prose) * rate["static"]),
                     h.fmt(tokens / len(prose) * rate["scheduler"]),
                     f"{sched.get('tokens', 0) / max(sched.get('slot_steps', 0), 1):.0%}",
                     f"{sched.get('refills', 0)} / {sched.get('prefill_seconds', 0):.1f} s", str(sched.get("shrinks", 0)),
                     f"{sum(a == b for a, b in zip(out['static'], out['scheduler']))}/{len(prose)}"])
        notes.append(f"- {case.id}: output tokens {distribution([len(x) for x in out['scheduler']])}")
    return [f"- {len(prose)} prompts of {distribution([len(x) for x in prose])} tokens; end tokens {end[:3]!r}, "
            f"max_length {p.max_length}", *notes, "",
            *h.markdown_table(["mode", "width", "static prompts/s", "scheduler prompts/s", "scheduler / static",
                               "static tok/s", "scheduler tok/s", "slot use", "refills / prefill", "shrinks",
                               "same outputs"], rows, "llrrrrrrrrr"),
            *failures(results)]


# ============================================================================ prompt lookup, beam search
CODE = '''def summarize(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        if order.status != "paid":
            continue
        total += order.amount
        count += 1
        if largest is None or order.amount > largest.amount:
            largest = order
    average = total / count if count else 0.0
    return {"total": total, "count": count, "average": average, "largest": largest}
'''
LOOKUP_TASKS = {
    "copy/edit: restate a 13-line Python function (asked to rename a variable)":
        "Here is a Python function:\n\n```python\n" + CODE + "```\n\nHere is the same function, unchanged except "
        "that the variable `total` is renamed to `revenue`:\n\n```python\n",
    "copy/edit: restate a shopping list with one quantity changed":
        "Shopping list:\n- 2 pounds of apples\n- 1 loaf of whole wheat bread\n- 12 eggs\n- 1 gallon of milk\n"
        "- 3 cans of tomato soup\n- 1 bag of rice\n- 2 onions\n- 1 jar of honey\n\nThe same shopping list with 24 "
        "eggs instead of 12:\n- 2 pounds of apples\n",
    f'free text ("{SHORT_TEXT}")': SHORT_TEXT,
}


@workload("Prompt-lookup speculative decoding against greedy search, batch 1 (jaxgen)",
          tiny=dict(draft=4, new_tokens=16), draft=8, new_tokens=128)
def prompt_lookup(ctx: Context) -> List[str]:
    """Each task greedy and with prompt_lookup_tokens=K (outputs must be identical), alternating."""
    p, paths = ctx.p, ctx.paths()
    tok = ctx.tokens()
    prompts = {task: [tok.prompt(text)] for task, text in LOOKUP_TASKS.items()}
    cases = [Case(f"{task} {mode}", "generate", dict(prompts=task, new_tokens=p.new_tokens, exact=False, outputs=True,
                                                     **({"prompt_lookup_tokens": p.draft} if mode == "lookup" else {})))
             for task in prompts for mode in ("greedy", "lookup")]
    results = ctx.run([jaxgen_spec("jaxgen", paths["jaxgen"])], cases, prompts)
    rows = []
    for task, (plain, fast) in zip(prompts, zip(cases[::2], cases[1::2])):
        out = outputs(results, plain, "jaxgen")
        if out is None or results.median(fast, "jaxgen") is None:
            continue
        same = "" if out == outputs(results, fast, "jaxgen") else " (OUTPUTS DIFFER)"
        n = len(out[0])
        rows.append([task + same, str(len(prompts[task][0])), str(n), h.fmt(n / results.median(plain, "jaxgen")),
                     h.fmt(n / results.median(fast, "jaxgen")),
                     h.ratio(results.median(plain, "jaxgen"), results.median(fast, "jaxgen"))])
    return [f"K = {p.draft}, up to {p.new_tokens} new tokens, medians of {ctx.reps}.", "",
            *h.markdown_table(["task", "prompt tokens", "new tokens", "greedy tok/s", "prompt lookup tok/s",
                               "speed-up"], rows), *failures(results)]


@workload("Beam search against greedy decoding at the same number of rows (jaxgen)",
          tiny=dict(prompts=2, beams=2, prompt_tokens=8, new_tokens=8), prompts=4, beams=4, prompt_tokens=64,
          new_tokens=64)
def beam(ctx: Context) -> List[str]:
    """Greedy decodes prompts x beams rows; beam search the prompts with `beams` beams each; both
    generate exactly N tokens (end token disabled)."""
    p, paths = ctx.p, ctx.paths()
    prompts = {"beam": ctx.tokens().windows(TEXT, p.prompts, p.prompt_tokens)}
    rows = p.prompts * p.beams
    common = dict(prompts="beam", new_tokens=p.new_tokens, end_token=[])
    greedy = Case("greedy", "generate", dict(common, batch=rows), work=rows * p.new_tokens)
    beams = Case("beam", "generate", dict(common, beam_size=p.beams), work=rows * p.new_tokens)
    results = ctx.run([jaxgen_spec("jaxgen", paths["jaxgen"])], [greedy, beams], prompts)
    g, b = results.median(greedy, "jaxgen"), results.median(beams, "jaxgen")
    return [f"{p.prompt_tokens}-token prompts, {p.new_tokens} new tokens, medians of {ctx.reps}:", "",
            *h.markdown_table(["search", "rows", "seconds", "row-tok/s"],
                              [[f"greedy, {rows} rows", str(rows), h.fmt(g), h.fmt(results.rate(greedy, "jaxgen"))],
                               [f"beam, {p.prompts} prompts x {p.beams} beams", str(rows), h.fmt(b),
                                h.fmt(results.rate(beams, "jaxgen"))]]),
            "", f"beam / greedy cost: {h.ratio(b, g)}", *failures(results)]


CONSTRAINT_RECORD = {  # objects, arrays, enums, bounded integers, nested objects, string lengths
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["science", "art", "sport", "music"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
CONSTRAINT_TEXT = ("People in the report, one JSON record each: Ada Lovelace, 36, mathematician in London; "
                   "Alan Turing, 41, from Wilmslow; Grace Hopper, 85, of Arlington. Records:")


@workload("Structured output: sampling under a JSON Schema against free sampling (jaxgen, CPU float32)",
          tiny=dict(batch_sizes=(1, 4), new_tokens=8, regex="([wx][0-9]+)+"), batch_sizes=(1, 16), new_tokens=64,
          regex="")
def constraints(ctx: Context) -> List[str]:
    """Sampling (top-k 40, temperature 0.8) of exactly N new tokens per row, free and under a JSON
    Schema (an array of at least 40 person records: it cannot complete within N tokens, so every row
    runs N steps; --regex PATTERN uses a regular expression instead), alternating; tok/s counts the
    tokens returned; CPU ms/token is the process's CPU time (all threads) per token returned, which a
    shared machine disturbs less than wall time; constrained / free (CPU) is free over constrained CPU
    time, so that, as for tok/s, 1.00x means the constraint costs nothing; host mask ms/token is the
    time inside the constraints' host callback (advancing the matchers, computing the masks:
    jaxgen.runtime.matchers.stats) per token. Preparation: compiling a schema never seen before for the vocabulary
    (Generator.prepare_constraint), its first call in the process (which also builds the vocabulary's
    matcher tables) and a later one (the warm-up's figure, then the repetitions' median)."""
    p, paths = ctx.p, ctx.paths()
    tok = ctx.tokens()
    prompts = {"extract": [tok.prompt(CONSTRAINT_TEXT)]}
    constraint = {"regex": p.regex} if p.regex else {"json_schema": {"type": "array", "items": CONSTRAINT_RECORD,
                                                                     "minItems": 40}}
    sampling = dict(sampling_topk=40, sampling_temperature=0.8, random_seed=0)
    cases = [Case("preparation of a new constraint", "prepare_constraint", dict(constraint=constraint))]
    pairs = []
    for b in p.batch_sizes:
        pair = []
        for mode in ("free", "constrained"):
            extra = {"constraint": constraint} if mode == "constrained" else {}
            pair.append(Case(f"{mode}, batch {b}", "generate",
                             dict(prompts="extract", batch=b, new_tokens=p.new_tokens, **sampling, **extra),
                             work=b * p.new_tokens))
        pairs.append((b, pair))
        cases += pair
    results = ctx.run([jaxgen_spec("jaxgen", paths["jaxgen"])], cases, prompts)

    def rate(case: Case) -> Optional[float]:
        r = results.get((case.id, "jaxgen"))
        seconds = results.median(case, "jaxgen")
        if r is None or not r.runs or not seconds:
            return None
        return statistics.median(run["tokens"] for run in r.runs) / seconds

    def cpu_ms_per_token(case: Case) -> Optional[float]:
        r = results.get((case.id, "jaxgen"))
        if r is None or not r.runs or "cpu_seconds" not in r.runs[0]:
            return None
        return 1000 * statistics.median(run["cpu_seconds"] / max(run["tokens"], 1) for run in r.runs)

    def host_ms_per_token(case: Case) -> Optional[float]:
        r = results.get((case.id, "jaxgen"))
        if r is None or not r.runs or "matchers" not in r.runs[0]:
            return None
        return 1000 * statistics.median(run["matchers"]["seconds"] / max(run["tokens"], 1) for run in r.runs)

    def compile_seconds(case: Case) -> float:
        r = results.get((case.id, "jaxgen"))
        return sum(c[1] for c in (r.first or {}).get("compiled", [])) if r is not None and r.first else 0.0

    rows = []
    for b, (free, constrained) in pairs:
        f, c = rate(free), rate(constrained)
        fc, cc = cpu_ms_per_token(free), cpu_ms_per_token(constrained)
        rows.append([str(b), h.fmt(f), h.fmt(c), h.ratio(c, f), h.fmt(fc), h.fmt(cc), h.ratio(fc, cc),
                     h.fmt(host_ms_per_token(constrained)), h.fmt(compile_seconds(constrained))])
    prep = cases[0]
    first = results.get((prep.id, "jaxgen"))
    first_s = first.first["seconds"] if first is not None and first.first else None
    what = f"regex {p.regex!r}" if p.regex else "the JSON Schema (array of person records)"
    return [f"{p.new_tokens} new tokens per row, sampling top-k 40, T 0.8, {what}; medians of {ctx.reps}.", "",
            *h.markdown_table(["batch", "free tok/s", "constrained tok/s", "constrained / free (tok/s)",
                               "free CPU ms/token", "constrained CPU ms/token", "constrained / free (CPU)",
                               "host mask ms/token", "first constrained call: XLA compile s"], rows),
            "", f"Preparation of a new constraint: first in the process {h.fmt(first_s)} s (builds the "
                f"vocabulary's matcher tables once), then {h.fmt(results.median(prep, 'jaxgen'))} s per new schema.",
            *failures(results)]


@workload("Mixtures of experts against dense models with the same active parameters, and all experts (jaxgen, CPU)",
          tiny=dict(hidden=128, expert_width=64, layers=2, vocab=512, new_tokens=8, batch_sizes=(1, 4)),
          hidden=768, expert_width=1536, layers=6, vocab=8192, new_tokens=64, batch_sizes=(1, 16))
def moe(ctx: Context) -> List[str]:
    """Three random-weight stacks with the same attention: 8 experts of width F, top-2 (each token
    runs its own 2, jaxgen.model.experts); one gated MLP of width 2F (the same active parameters per
    token); one of width 8F (every expert on every token). Greedy decode, exactly N new tokens."""
    from jaxgen.model.checkpoint import active_parameter_count
    from jaxgen.model.config import ModelConfig

    p, f = ctx.p, ctx.p.expert_width
    common = dict(vocab_size=p.vocab, hidden_size=p.hidden, num_layers=p.layers, num_heads=p.hidden // 64,
                  num_kv_heads=max(1, p.hidden // 128), head_dim=64, max_position_embeddings=4096)
    stacks = {"moe": dict(mlp="experts", num_experts=8, experts_per_token=2, expert_intermediate_size=f,
                          intermediate_size=f),
              "dense": dict(mlp="gated", intermediate_size=2 * f), "all": dict(mlp="gated", intermediate_size=8 * f)}
    paths = {k: models.random_jaxgen_model(ctx.work_dir, f"bench-{k}-{p.hidden}-{f}-{p.layers}", ctx.log,
                                           **common, **mlp) for k, mlp in stacks.items()}
    prompts = {"moe": [[f"t{(7 * i + j) % p.vocab}" for j in range(8)] for i in range(max(p.batch_sizes))]}
    cases = [Case(f"batch {b}", "generate", dict(prompts="moe", batch=b, new_tokens=p.new_tokens),
                  work=b * p.new_tokens) for b in p.batch_sizes]
    results = ctx.run([jaxgen_spec(k, path) for k, path in paths.items()], cases, prompts)
    rows = [[str(c.args["batch"]), *(h.fmt(results.rate(c, k)) for k in stacks),
             h.ratio(results.median(c, "moe"), results.median(c, "dense")),
             h.ratio(results.median(c, "moe"), results.median(c, "all"))] for c in cases]
    active = {k: active_parameter_count(ModelConfig.load(path)) / 1e6 for k, path in paths.items()}
    return [f"hidden {p.hidden}, {p.layers} layers, expert width {f}, {p.new_tokens} new tokens, float32, medians "
            f"of {ctx.reps}; active parameters per token: " + ", ".join(f"{k} {v:.1f}M" for k, v in active.items()),
            "", *h.markdown_table(["batch", "moe tok/s", "dense (same active parameters) tok/s", "all experts tok/s",
                                   "moe / dense time", "moe / all time"], rows), *failures(results)]


# ============================================================================ compilation
def compile_plan(p, tok: Tokens) -> List[Case]:
    """A seeded mixed research loop: generate_batch (batch 1..max_batch, prompts min..max_prompt
    tokens log-uniform with mixed row lengths, max_length from a list, greedy / top-k sampling /
    static prompts / beam 2 or 4), score_batch and forward_batch calls, shuffled; a representative
    generate_batch runs twice first."""
    rng = random.Random(p.seed)
    stream = tok.random(1, 4096, p.seed)[0][1:]
    statics = [[tok.bos] + stream[100:130], [tok.bos] + stream[200:260]]

    def rows(batch: int, longest: int, bos: bool = True) -> List[List[str]]:
        lengths = [longest] + [rng.randint(max(1, longest // 2), longest) for _ in range(batch - 1)]
        starts = [rng.randrange(len(stream) - n) for n in lengths]
        return [([tok.bos] if bos else []) + stream[s:s + n - 1] for s, n in zip(starts, lengths)]

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    modes = ["beam"] * round(p.calls * 0.1) + ["static"] * round(p.calls * 0.125) + ["sampling"] * round(p.calls * 0.3)
    modes += ["greedy"] * (p.calls - len(modes))
    rng.shuffle(modes)
    calls = []
    for i, mode in enumerate(modes):
        args = dict(new_tokens=rng.choice(p.max_lengths), exact=False)
        batch = rng.randint(1, min(p.max_batch, 8) if mode == "beam" else p.max_batch)
        args["prompts"] = rows(batch, log_uniform(5, p.max_prompt), bos=mode != "static")
        if mode == "beam":
            args["beam_size"] = rng.choice((2, 4))
        if mode == "static":
            args["static_prompt"] = rng.choice(statics)
        if mode == "sampling" or (mode == "static" and i % 2):
            args.update(sampling_topk=40, sampling_temperature=0.8, random_seed=1000 + i)
        calls.append(Case(f"generate {i} {mode} b={batch}", "generate", args, reps=0))
    for i in range(p.score_calls):
        calls.append(Case(f"score {i}", "score", dict(prompts=rows(rng.randint(1, 16), log_uniform(8, p.max_score)),
                                                      max_input_length=0), reps=0))
    for i in range(p.forward_calls):
        calls.append(Case(f"forward {i}", "forward", dict(prompts=rows(rng.randint(1, 4), log_uniform(8, 128)),
                                                          log_probs=rng.random() < 0.5), reps=0))
    rng.shuffle(calls)
    rep = dict(prompts=rows(8, 96), new_tokens=64, exact=False)
    return [Case("representative, first", "generate", rep, reps=0),
            Case("representative, again", "generate", rep, reps=0)] + calls


def jaxgen_jitted_names() -> set:
    """Names of the jitted functions defined in jaxgen's modules (what the events' fun_name holds)."""
    import jaxgen

    names = set()
    for info in pkgutil.walk_packages(jaxgen.__path__, "jaxgen."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - an optional backend (Pallas, ...) that cannot import here
            continue
        names |= {getattr(v, "__name__", k) for k, v in vars(module).items() if callable(v) and hasattr(v, "lower")}
    return names


@workload("XLA programs a mixed research loop compiles (jaxgen)",
          tiny=dict(calls=2, score_calls=1, forward_calls=1, max_prompt=40, max_score=40),
          calls=40, score_calls=20, forward_calls=5, seed=0, max_batch=32, max_prompt=600, max_score=1000,
          max_lengths=(16, 32, 64, 100, 200), persistent_cache=0, model="tiny")
def compiles(ctx: Context) -> List[str]:
    """Counts what JAX compiled, from its monitoring events (/jax/core/compile/backend_compile_duration:
    one per program, named after the jitted function; /jax/compilation_cache/cache_hits), with the
    persistent cache off; with --persistent-cache 1 the loop runs again in two fresh processes sharing
    an empty cache directory (cold, then warm). --model tiny (default): tests/hf_models.py's model with
    the default model's window and context (program counts do not depend on sizes); --model default."""
    import models

    p = ctx.p
    if p.model == "tiny":
        tiny = models.tiny_model(ctx.work_dir, ctx.log)["jaxgen"]
        model = models.config_variant(tiny, os.path.join(ctx.work_dir, "tiny", "jaxgen-window512"),
                                      sliding_window=512, max_position_embeddings=32768)
        tok = Tokens(model, tiny=True)
    else:
        model = ctx.paths()["jaxgen"]
        tok = ctx.tokens()
    cases = compile_plan(p, tok)
    specs = [jaxgen_spec("cache off", model, "default", env={"JAXGEN_COMPILATION_CACHE": "0"})]
    home = tempfile.mkdtemp(prefix="jaxgen-home-", dir=ctx.work_dir)
    if p.persistent_cache:
        env = {"JAXGEN_HOME": home, "JAXGEN_COMPILATION_CACHE": "1"}
        if ctx.tiny:  # the tiny model's programs compile faster than jaxgen's 0.5 s threshold: cache them all
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        specs += [jaxgen_spec(k, model, "default", group=i + 1, env=env)
                  for i, k in enumerate(("cold cache", "warm cache"))]
    try:
        results = ctx.run(specs, cases, {}, reps=0)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    ours = jaxgen_jitted_names()
    lines = [f"- loop: {sum(c.op == 'generate' for c in cases) - 2} generate_batch, {p.score_calls} score_batch, "
             f"{p.forward_calls} forward_batch calls (seed {p.seed}) after a representative generate_batch run "
             f"twice; model {model}", ""]
    summary = []
    for spec in specs:
        per_call = [results[(c.id, spec.key)].first or {} for c in cases]
        compiled = [e for r in per_call for e in r.get("compiled", [])]
        engine = [e for e in compiled if e[0] in ours]
        summary.append([spec.key, str(len(compiled)), str(len(engine)), h.fmt(sum(e[1] for e in compiled)),
                        str(sum(e[2] for e in compiled)), h.fmt(sum(r.get("seconds", 0) for r in per_call)),
                        h.fmt(per_call[0].get("seconds")), h.fmt(per_call[1].get("seconds"))])
        if spec.key == "cache off":
            by_fn = collections.Counter(e[0] for e in engine)
            seconds = collections.defaultdict(float)
            for e in engine:
                seconds[e[0]] += e[1]
            table = [[f, str(n), h.fmt(seconds[f])] for f, n in by_fn.most_common()]
            others = collections.Counter(e[0] for e in compiled if e[0] not in ours)
            table.append(["other programs (eager jnp operations, closures)", str(sum(others.values())),
                          h.fmt(sum(e[1] for e in compiled if e[0] not in ours))])
            cumulative, acc = [], 0
            for i, r in enumerate(per_call[2:], 1):
                acc += sum(e[0] in ours for e in r.get("compiled", []))
                if i in {max(1, (len(per_call) - 2) * q // 4) for q in (1, 2, 3, 4)}:
                    cumulative.append(f"after {i} calls {acc}")
            lines += h.markdown_table(["jaxgen function", "programs", "compile s"], table)
            lines += ["", f"jaxgen programs compiled by the loop, cumulative: {', '.join(cumulative)}; "
                          f"other names: {', '.join(f'{k} {v}' for k, v in others.most_common(6))}", ""]
    lines += h.markdown_table(["process", "programs", "of jaxgen's functions", "compile s", "cache hits", "calls s",
                               "representative first s", "again s"], summary)
    return lines + failures(results)


# ============================================================================ devices
@workload("jaxgen over several devices: replicas (data parallel) and tensor parallelism",
          tiny=dict(devices=(1, 2), batch=4, new_tokens=4, score="2x16"), devices=(1, 4), batch=16, new_tokens=128,
          score="16x128", device="cpu", compute_type="float32")
def devices(ctx: Context) -> List[str]:
    """One process per layout (on CPU, XLA_FLAGS simulates the devices: they share the same cores,
    so this measures the machinery's overhead, not a speed-up); replicas split each call into n
    sub-batches (max_batch_size = ceil(B / n)), tensor parallelism runs it whole; alternating."""
    p, paths = ctx.p, ctx.paths()
    tok = ctx.tokens()
    batch, length = (int(x) for x in p.score.split("x"))
    prompts = {"short": [tok.prompt(SHORT_TEXT)], "score": tok.windows(TEXT, batch, length)}
    specs, sizes = [], {}
    for n in p.devices:
        for tp in ([False, True] if n > 1 else [False]):
            key = f"{n} device{'s' * (n > 1)}, " + ("tensor parallel" if tp else "replicas" if n > 1 else "one device")
            env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"} if p.device == "cpu" else {}
            specs.append(jaxgen_spec(key, paths["jaxgen"], p.compute_type, env=env, device=p.device,
                                     device_index=list(range(n)), tensor_parallel=tp))
            sizes[key] = (batch if tp else -(-batch // n), p.batch if tp else -(-p.batch // n))
    cases = [Case("score", "score", dict(prompts="score"), work=batch * length),
             Case("generate", "generate", dict(prompts="short", batch=p.batch, new_tokens=p.new_tokens),
                  work=p.batch * p.new_tokens)]
    for spec in specs:  # each layout's own max_batch_size, given with every call
        spec.options["score_options"] = {"max_batch_size": sizes[spec.key][0]}
        spec.options["generate_options"] = {"max_batch_size": sizes[spec.key][1]}
    results = ctx.run(specs, cases, prompts)
    base = {c.id: results.rate(c, specs[0].key) for c in cases}
    rows = [[s.key, *map(str, sizes[s.key]), *(x for c in cases for x in (h.fmt(results.rate(c, s.key)),
                                                                         h.ratio(results.rate(c, s.key), base[c.id]))),
             h.fmt(results.workers[s.key]["final"].get("peak_rss_mib"))] for s in specs]
    return [f"score_batch {p.score}; generate_batch B={p.batch}, {p.new_tokens} new tokens; medians of {ctx.reps}.", "",
            *h.markdown_table(["layout", "score max_batch_size", "generate max_batch_size", "score_batch tok/s",
                               "vs 1 device", "generate tok/s", "vs 1 device", "peak RSS MiB"], rows),
            *failures(results)]


# ============================================================================ GPU
CARDS = [  # matched in order on the device name: (pattern, label, HBM bytes/s, dense bf16 FLOP/s)
    (r"H200", "H200", 4.8e12, 989e12), (r"H100.*PCIe", "H100 PCIe", 2.0e12, 756e12), (r"H100.*NVL", None, None, None),
    (r"H100", "H100 SXM", 3.35e12, 989e12), (r"A100.*80GB", "A100 80GB", 2.0e12, 312e12),
    (r"\bL4\b", "L4", 0.3e12, 121e12),
]


def card_limits(name: str):
    for pattern, label, bandwidth, flops in CARDS:
        if re.search(pattern, name or ""):
            return (label, bandwidth, flops) if label else None
    return None


def _attended(t: int, window: Optional[int]) -> int:
    """Sum over positions 1..t of the positions each attends to (causal, within the window)."""
    w = t if not window or window >= t else window
    return w * (w + 1) // 2 + (t - w) * w


def _windows(config) -> List[Optional[int]]:
    types = config.layer_types or ("full",) * config.num_layers
    return [config.sliding_window if t == "sliding" else None for t in types]


def forward_flops(config, t: int, with_head: bool) -> float:
    """2 x body parameters x T (+ the head on every position) + causal attention."""
    import models

    counts = models.parameter_count(config)
    flops = 2.0 * counts["body"] * t + (2.0 * config.vocab_size * config.hidden_size * t if with_head else 0)
    return flops + sum(4.0 * config.num_heads * config.head_dim * _attended(t, w) for w in _windows(config))


def decode_bytes(config, batch: int, prompt: int, new: int, dtype_bytes: int) -> float:
    """Bytes one decode step reads: the weights (one embedding row per token, not the table, unless
    tied) and every row's KV cache, averaged over the steps."""
    import models

    counts = models.parameter_count(config)
    weights = counts["body"] + (counts["embed"] if config.tie_word_embeddings else counts["lm_head"])
    per_token = 2 * config.num_kv_heads * config.head_dim * dtype_bytes
    steps = max(1, new - 1)
    kv = sum(per_token * (min(prompt + s + 1, w) if w else prompt + s + 1)
             for s in range(steps) for w in _windows(config))
    return weights * dtype_bytes + batch * kv / steps


@workload("GPU: jaxgen against transformers (eager; static cache + torch.compile), random weights in real shapes",
          tiny=dict(models="gemma3-270m", decode_batches=(1,), prompt_tokens=8, new_tokens=8, lengths=(32,),
                    stress_batch=2, stress_length=32, stress_new_tokens=4, device="cpu", dtype="float32"),
          models="gemma3-270m,llama-3.2-1b,llama-3-8b", engines="jaxgen,hf-eager,hf-static", device="cuda",
          dtype="bfloat16", decode_batches=(1, 16, 64, 256), prompt_tokens=128, new_tokens=128,
          lengths=(2048, 8192, 16384, 32768), stress_batch=8, stress_length=16384, stress_new_tokens=64)
def gpu(ctx: Context) -> List[str]:
    """Each (model, engine) in its own process, one after the other: decode at several batch sizes
    (and the same prompts with one new token, for the decode-only rate), prefill and score of long
    inputs, a jaxgen memory stress; first call (compilation included) and warm medians; each figure
    as a fraction of the card's HBM bandwidth (decode) or dense bf16 matrix rate (prefill, score)."""
    import models
    from jaxgen.model.config import ModelConfig

    p = ctx.p
    engines = p.engines.split(",")
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "cpu"
    card = card_limits(name) if p.device == "cuda" else None
    size = {"bfloat16": 2, "float16": 2, "float32": 4}[p.dtype]
    rows, first_rows, notes = [], [], []
    for model in p.models.split(","):
        paths = models.random_model(model, ctx.work_dir, ctx.tiny, p.device, p.dtype, ctx.log)
        config = ModelConfig.load(paths["jaxgen"])
        tok = Tokens(paths["jaxgen"], tiny=True)
        prompts = {f"decode {b}": tok.random(b, p.prompt_tokens, b) for b in p.decode_batches}
        prompts.update({f"length {t}": tok.random(1, t, t) for t in p.lengths})
        prompts["stress"] = tok.random(p.stress_batch, p.stress_length, 7)
        cases = [Case(f"decode B={b}", "generate", dict(prompts=f"decode {b}", new_tokens=p.new_tokens),
                      work=b * p.new_tokens) for b in p.decode_batches]
        cases += [Case(f"decode B={b}, 1 token", "generate", dict(prompts=f"decode {b}", new_tokens=1), work=b)
                  for b in p.decode_batches]
        cases += [Case(f"prefill {t}", "prefill", dict(prompts=f"length {t}"), work=t) for t in p.lengths]
        cases += [Case(f"score {t}", "score", dict(prompts=f"length {t}", max_input_length=0), ["jaxgen", "hf-eager"],
                       work=t) for t in p.lengths]
        cases += [Case(f"stress {p.stress_batch}x{p.stress_length} +{p.stress_new_tokens}", "generate",
                       dict(prompts="stress", new_tokens=p.stress_new_tokens), ["jaxgen"], reps=1)
                  ] if p.stress_batch else []
        specs = [jaxgen_spec("jaxgen", paths["jaxgen"], p.dtype, i, device=p.device) if e == "jaxgen" else
                 Spec(e, "hf", paths["hf"], {"compute_type": p.dtype, "device": p.device, "static": e == "hf-static"},
                      {}, i) for i, e in enumerate(engines)]
        results = ctx.run(specs, cases, prompts)
        notes += [f"- {model}: {line[2:]}" for line in failures(results)]
        for case in cases:
            if case.id.endswith("1 token"):
                continue
            cells, fraction = {}, "—"
            for e in engines:
                r = results.get((case.id, e))
                if r is None or results.median(case, e) is None:
                    cells[e] = "—"
                    continue
                cells[e] = h.fmt(results.rate(case, e))
                first_rows.append([model, case.id, e, h.fmt(r.first["seconds"]), h.fmt(results.median(case, e))])
            j = results.median(case, "jaxgen") if "jaxgen" in engines else None
            if card and j:
                if case.op == "generate" and not case.id.startswith("stress"):
                    b = int(case.id.split("=")[1])
                    one = results.median(next(c for c in cases if c.id == case.id + ", 1 token"), "jaxgen")
                    step = (j - one) / (p.new_tokens - 1) if one and j > one else j / p.new_tokens
                    fraction = f"{decode_bytes(config, b, p.prompt_tokens, p.new_tokens, size) / step / card[1]:.1%}"
                elif case.op in ("prefill", "score") and size == 2:
                    flops = forward_flops(config, int(case.id.split()[1]), case.op == "score")
                    fraction = f"{flops / j / card[2]:.1%}"
            hf = [results.rate(case, e) for e in ("hf-eager", "hf-static") if e in engines and results.rate(case, e)]
            rows.append([model, case.id, *(cells[e] for e in engines),
                         h.ratio(results.rate(case, "jaxgen"), max(hf)) if hf and j else "—", fraction])
    card_text = f"{card[0]}: {card[1] / 1e12:.2f} TB/s, {card[2] / 1e12:.0f} TFLOP/s dense bf16" if card else \
        f"no known card ({name}): fractions n/a"
    return [f"Device: {name}; {card_text}; {p.dtype}; decode prompts {p.prompt_tokens} random tokens + "
            f"{p.new_tokens} new tokens; first call + median of {ctx.reps}.", "",
            *h.markdown_table(["model", "workload", *(f"{e} tok/s" for e in engines), "jaxgen / best HF",
                               "fraction of card limit"], rows), "",
            "Decode fraction: decode-only step time (t(N) - t(1)) / (N - 1) against the bytes a step reads "
            "(weights + KV cache); prefill / score: useful FLOP/s against the dense bf16 rate.", *notes, "",
            "First call (compilation included) against the warm median, seconds:", "",
            *h.markdown_table(["model", "workload", "engine", "first call s", "warm median s"], first_rows, "lllrr")]


# ============================================================================ lm-eval with shared prefixes
def mc_sentences() -> List[str]:
    """Prose sentences (10-40 words) of Python's documentation (pydoc_data), in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.split("\n")
            if any(line.startswith((" ", "\t", ">>>", "*", "-", "=")) for line in lines):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(line.strip() for line in lines)):
                if 10 <= len(s.split()) <= 40 and s.isascii() and "::" not in s and "`" not in s and "{" not in s:
                    out.append(s)
    return out


def mc_documents(n: int, passage_words: int, seed: int) -> List[dict]:
    """n multiple-choice documents: a passage of consecutive sentences (about `passage_words`
    words) whose last word is cut off; the choices are that word and the last words of three
    other sentences, in a seeded order ({"passage", "choices", "label"})."""
    sentences = mc_sentences()
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start = rng.randrange(len(sentences) - 40)
        words: List[str] = []
        i = start
        while len(words) < passage_words:
            words += sentences[i].split()
            i += 1
        answer = words[-1].strip(".!?,;:")
        others = []
        while len(others) < 3:
            w = rng.choice(sentences).split()[-1].strip(".!?,;:")
            if w and w != answer and w not in others:
                others.append(w)
        choices = others + [answer]
        rng.shuffle(choices)
        docs.append({"passage": " ".join(words[:-1]), "choices": choices, "label": choices.index(answer)})
    return docs


def write_mc_task(directory: str, name: str, docs: List[dict], shots: List[dict], num_fewshot: int,
                  sampler: str) -> None:
    """A local lm-eval YAML task over JSON files (nothing downloaded)."""
    for split, records in (("test", docs), ("train", shots)):
        with open(os.path.join(directory, f"{split}.json"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {directory}/train.json
    test: {directory}/test.json
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Passage: {{{{passage}}}}\\nQuestion: Which word ends the passage?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
num_fewshot: {num_fewshot}
fewshot_config:
  sampler: {sampler}
metric_list:
  - metric: acc
""")


@workload("lm-eval multiple choice with few-shot contexts: jaxgen with and without prefix sharing, lm-eval's hf "
          "backend (CPU, float32)",
          tiny=dict(items=8, shots=2, passage_words=20, hf_batch=4, warmup=2),
          items=200, shots=5, passage_words=100, batch=32, hf_batch=2, engines="jaxgen,jaxgen-noshare,hf",
          sampler="first_n", warmup=8, hf_warmup=1)
def lm_eval_prefix(ctx: Context) -> List[str]:
    """`lm_eval.simple_evaluate` on a local YAML task (passages of Python's documentation, the
    passage's last word to pick among 4; `shots` examples before each item, the same ones for every
    item with --sampler first_n, as tasks with fixed few-shot examples have them). Each engine in its
    own process (benchmarks/lm_eval_engine.py): the model loaded, `warmup` items untimed (jaxgen
    compiles its programs there: 8 items are one batch of 32 requests; `hf_warmup` for hf), then the
    whole task timed once: wall seconds, and the process's CPU seconds (all threads), which a
    machine shared with other jobs disturbs less; speeds are compared in items per CPU second. jaxgen: max_batch_size `batch`, with its prefix cache (a context's four
    continuations, and the shots every item repeats, computed once) and without it
    (`prefix_cache=false`); lm-eval's hf backend with batch size `hf_batch` (it keeps logits of every
    position: [batch, ~800, 262,144] floats). The log-likelihoods must agree."""
    p = ctx.p
    engines = [e for e in p.engines.split(",") if e]
    docs = mc_documents(p.items + p.shots, p.passage_words, seed=0)
    shots, docs = docs[:p.shots], docs[p.shots:]
    task_dir = tempfile.mkdtemp(prefix="lm-eval-task-", dir=ctx.work_dir)
    name = "jaxgen_bench_mc"
    write_mc_task(task_dir, name, docs, shots, p.shots, p.sampler)
    if ctx.tiny:
        import models

        corpus = [d["passage"] + " " + " ".join(d["choices"]) for d in shots + docs]
        paths = models.lm_eval_tiny_model(ctx.work_dir, corpus, ctx.log)
    else:
        paths = ctx.paths(need=["hf"] if "hf" in engines else [])
    results, errors, logs = {}, {}, os.path.join(ctx.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    for engine in engines:
        spec = {"engine": "hf" if engine == "hf" else "jaxgen", "model": paths["hf" if engine == "hf" else "jaxgen"],
                "prefix_cache": engine == "jaxgen", "batch": p.hf_batch if engine == "hf" else p.batch,
                "task": name, "include_path": task_dir, "warmup": p.hf_warmup if engine == "hf" else p.warmup}
        spec_path, out_path = (os.path.join(task_dir, f"{engine}.{x}.json") for x in ("spec", "out"))
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        env = {**os.environ, **h.thread_env(ctx.threads)}
        env["PYTHONPATH"] = os.pathsep.join(x for x in (h.REPO, env.get("PYTHONPATH")) if x)
        ctx.log(f"lm_eval_prefix: {engine} ...")
        with open(os.path.join(logs, f"lm_eval_prefix-{engine}.log"), "w", encoding="utf-8") as log:
            code = subprocess.call([sys.executable, os.path.join(h.HERE, "lm_eval_engine.py"), spec_path, out_path],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=h.REPO)
        errors[engine] = None
        if code == 0:
            with open(out_path, encoding="utf-8") as f:
                results[engine] = json.load(f)
        else:
            errors[engine] = f"exit status {code}; see {log.name}"
            ctx.log(f"lm_eval_prefix: {engine} failed ({errors[engine]})")
    ctx.records.append({"cases": [], "workers": {k: {"error": e} for k, e in errors.items()},
                        "results": [{"case": "lm_eval", "engine": k, "error": None, "runs": [],
                                     "first": {x: r.get(x) for x in ("seconds", "load_seconds", "metrics",
                                                                     "prefix_cache", "peak_rss_mib")}}
                                    for k, r in results.items()]})
    shutil.rmtree(task_dir, ignore_errors=True)
    if not results:
        return ["- every engine failed (see the logs)"]
    failed = [f"- {k} failed: {e}" for k, e in errors.items() if e]
    any_result = next(iter(results.values()))
    contexts = [len(s["arguments"][0][0]) for s in any_result["samples"]]
    rate = {k: len(r["samples"]) / r["cpu_seconds"] for k, r in results.items()}
    ref = results.get("jaxgen-noshare")

    def agreement(r) -> Tuple[str, str]:
        if ref is None or r is ref:
            return "", ""
        diff = max(abs(a - b) for x, y in zip(r["samples"], ref["samples"])
                   for a, b in zip(x["loglikelihoods"], y["loglikelihoods"]))
        same = sum(max(range(4), key=x["loglikelihoods"].__getitem__) == max(range(4), key=y["loglikelihoods"].__getitem__)
                   for x, y in zip(r["samples"], ref["samples"]))
        return f"{diff:.1e}", f"{same}/{len(r['samples'])}"

    rows = []
    for k, r in results.items():
        diff, same = agreement(r)
        reused = r.get("prefix_cache", {}).get("reused_tokens")
        rows.append([k, str(len(r["samples"])), h.fmt(r["seconds"]), h.fmt(r["cpu_seconds"]), h.fmt(rate[k]),
                     h.ratio(rate[k], rate.get("hf")), h.ratio(rate[k], rate.get("jaxgen-noshare")),
                     f"{r['metrics'].get('acc,none', float('nan')):.3f}", diff, same,
                     f"{reused:,}" if reused is not None else "", f"{r['peak_rss_mib']:,.0f}"])
    return [f"- {len(docs)} items, {p.shots}-shot contexts (sampler {p.sampler}) of {distribution(contexts)} "
            f"characters, 4 answers each; jaxgen batch {p.batch}, hf batch {p.hf_batch}; warm-up {p.warmup} items "
            f"untimed ({p.hf_warmup} for hf)", "",
            *h.markdown_table(["engine", "items", "wall s", "CPU s", "items per CPU s", "vs hf",
                               "vs jaxgen without sharing", "acc", "max |Δ log-lik| vs no sharing", "same choice",
                               "prefix tokens reused", "peak RSS MiB"], rows, "lrrrrrrrrrrr"), *failed]
