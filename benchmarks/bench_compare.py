#!/usr/bin/env python
"""jaxgen vs CTranslate2 vs transformers on the default model (Gemma 3 270M), in one run.

    python benchmarks/bench_compare.py                    # full run (CPU), table on stdout
    python benchmarks/bench_compare.py --quick            # smoke test: 1 repetition, fewer tokens
    python benchmarks/bench_compare.py --engines jaxgen,ct2 --batch-sizes 1,8 --output bench.md
    python benchmarks/bench_compare.py --device cuda      # GPU: float32 / bfloat16 / int8

How it measures
* Every engine (and precision) lives in its own spawned process ("worker"), loaded once. After an
  untimed warm-up run of every case (jaxgen compiles there), the repetitions ALTERNATE: within each
  repetition, each case runs on every engine one after another, the starting engine rotating, so
  machine drift hits all engines alike. Cells are medians over the repetitions.
* decode tok/s: B x N / (wall time of one generate_batch call), greedy, N new tokens forced with
  min_length (transformers: min_new_tokens), a 9-token prompt (BOS + 8), so the prompt's prefill is
  included but negligible.
* prefill tok/s: a 512-token prompt of real text (B=1) / time to the first generated token
  (generate_batch(max_length=1); transformers generate(max_new_tokens=1)).
* score_batch tok/s: 16 sequences x 128 tokens (input tokens / time); transformers: one forward
  pass + log_softmax + gather.
* TTFT: generate_tokens(...) until the first streamed step, in a warm process (transformers: a
  streamer's first new token).
* close(): a generate_tokens stream that would run to the end is read for a few tokens, then the
  time of stream.close() (which waits for the decoding to stop).
* startup: a NEW Python process, timed from its launch to its first streamed token (import, load,
  compile or cache load, first token). jaxgen runs "cold" (an empty JAX persistent compilation cache
  directory) and then "warm" (the directory that cold run filled), with
  jax_persistent_cache_min_compile_time_secs=0 and jax_persistent_cache_min_entry_size_bytes=0.
  CTranslate2 and transformers have no compilation to cache; their figure is in both rows.
* memory: each worker's own peak RSS (getrusage RUSAGE_SELF in that process) over its load and all its
  cases; and the peak RSS of each startup probe (reaped with os.wait4), i.e. load + one token.
Converted models are cached in --work-dir (default ~/.cache/jaxgen-bench); the first run builds them
(minutes: transformers' GGUF loader is slow).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc  # noqa: E402

SCRIPT = os.path.abspath(__file__)


CASE_KINDS = ("decode", "prefill", "score", "ttft", "close")  # the timed workloads, in run order

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 repetition, 32 new tokens, 128-token prefill, 4x64 scoring, 1 startup run")
    p.add_argument("--engines", default="jaxgen,ct2,hf", help="comma-separated subset of jaxgen,ct2,hf")
    p.add_argument("--batch-sizes", default="1,16", help="decode batch sizes (default 1,16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precisions", default=None,
                   help="comma-separated; default float32,int8 on cpu and float32,bfloat16,int8 on cuda")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 5; --quick: 1)")
    p.add_argument("--startup-reps", type=int, default=None,
                   help="repetitions of the new-process startup measurements (default 3; --quick: 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default 128; --quick: 32)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (default 512; --quick: 128)")
    p.add_argument("--score", default=None, help="score_batch workload BxL (default 16x128; --quick: 4x64)")
    p.add_argument("--close-after", type=int, default=4, help="tokens read before close() (default 4)")
    p.add_argument("--threads", type=int, default=bc.cpu_count(),
                   help="torch threads and CTranslate2 intra_threads (default: the usable cores)")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds between two runs so the previous engine's threads go idle (default 0.5)")
    p.add_argument("--ct2-use-mkl", action="store_true",
                   help="CT2_USE_MKL=1 for CTranslate2 (on AMD CPUs it otherwise uses oneDNN for float32 GEMMs)")
    p.add_argument("--skip-startup", action="store_true", help="skip the new-process startup measurements")
    p.add_argument("--cases", default=",".join(CASE_KINDS),
                   help=f"comma-separated subset of {','.join(CASE_KINDS)} (default: all)")
    p.add_argument("--work-dir", default=bc.DEFAULT_WORK_DIR, help="cache of converted models (default %(default)s)")
    p.add_argument("--output", help="also write the markdown report to this file")
    p.add_argument("--json", help="also write every sample as JSON to this file")
    args = p.parse_args(argv)
    q = args.quick
    args.reps = args.reps if args.reps is not None else (1 if q else 5)
    args.startup_reps = args.startup_reps if args.startup_reps is not None else (1 if q else 3)
    args.new_tokens = args.new_tokens or (32 if q else 128)
    args.prefill_tokens = args.prefill_tokens or (128 if q else 512)
    score = args.score or ("4x64" if q else "16x128")
    try:
        args.score_batch, args.score_length = (int(x) for x in score.lower().split("x"))
    except ValueError:
        p.error(f"--score must look like 16x128, got {score!r}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.cases:
        if c not in CASE_KINDS:
            p.error(f"unknown case {c!r}; expected a subset of {','.join(CASE_KINDS)}")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in args.engines:
        if e not in bc.ENGINE_LABELS:
            p.error(f"unknown engine {e!r}; expected jaxgen, ct2, hf")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    default_prec = "float32,int8" if args.device == "cpu" else "float32,bfloat16,int8"
    args.precisions = [x.strip() for x in (args.precisions or default_prec).split(",") if x.strip()]
    for x in args.precisions:
        if x not in ("float32", "bfloat16", "float16", "int8"):
            p.error(f"unknown precision {x!r}")
    return args


def compute_type(engine: str, precision: str, device: str):
    """The compute_type (dtype name for transformers) an engine uses for a precision, or None."""
    if precision == "int8":
        if engine == "hf":
            return None  # no comparable int8 path in plain transformers
        return "int8" if device == "cpu" else "int8_bfloat16"
    if precision in ("bfloat16", "float16") and device == "cpu":
        return None if engine == "hf" else precision
    return precision


def engine_env(engine: str, args) -> dict:
    """Extra environment of an engine's processes (set before the engine is imported)."""
    if engine != "ct2":
        return {}
    env = {"CT2_VERBOSE": "1"}  # it then logs its ISA and GEMM backends, reported with the results
    if args.ct2_use_mkl:
        env["CT2_USE_MKL"] = "1"
    return env


def ct2_cuda_devices() -> int:
    try:
        out = subprocess.run([sys.executable, "-c", "import ctranslate2; print(ctranslate2.get_cuda_device_count())"],
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.update(bc.thread_env(args.threads))  # inherited by every engine process
    notes = []
    engines = list(args.engines)
    if args.device == "cuda" and "ct2" in engines and ct2_cuda_devices() == 0:
        engines.remove("ct2")
        notes.append("CTranslate2 skipped: this ctranslate2 build sees no CUDA device (a CPU-only wheel or no GPU).")
    header = bc.header_lines("jaxgen vs CTranslate2 vs transformers", args.threads, args.device)
    for line in header:
        print(line, flush=True)

    prompt_spec = {"prefill_tokens": args.prefill_tokens, "score_batch": args.score_batch,
                   "score_length": args.score_length}
    os.makedirs(args.work_dir, exist_ok=True)
    log_dir = os.path.join(args.work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    t = time.perf_counter()
    paths = bc.prepare_artefacts(args.work_dir, engines, prompt_spec)
    prep_seconds = time.perf_counter() - t
    prompts = paths.pop("prompts")
    log(f"artefacts ready in {prep_seconds:.0f} s: {args.work_dir}")

    # ---------------------------------------------------------------- workers
    specs = {}
    for prec in args.precisions:
        for engine in engines:
            ctype = compute_type(engine, prec, args.device)
            if ctype is None:
                continue
            specs[f"{engine}-{prec}"] = {"engine": engine, "precision": prec, "compute_type": ctype,
                                         "device": args.device, "threads": args.threads, "paths": paths,
                                         "prompts": prompts, "env": engine_env(engine, args)}
    cases = []
    for prec in args.precisions:
        keys = [k for k, s in specs.items() if s["precision"] == prec]
        if not keys:
            continue
        for b in args.batch_sizes:
            cases.append({"id": f"decode-B{b}-{prec}", "kind": "decode", "batch": b, "new_tokens": args.new_tokens,
                          "precision": prec, "workers": keys, "tokens": b * args.new_tokens})
        cases.append({"id": f"prefill-{prec}", "kind": "prefill", "precision": prec, "workers": keys,
                      "tokens": len(prompts["long"])})
        cases.append({"id": f"score-{prec}", "kind": "score", "precision": prec, "workers": keys,
                      "tokens": sum(len(s) for s in prompts["score"])})
        cases.append({"id": f"ttft-{prec}", "kind": "ttft", "precision": prec, "workers": keys,
                      "max_length": args.new_tokens})
        cases.append({"id": f"close-{prec}", "kind": "close", "precision": prec, "read": args.close_after,
                      "max_length": 512, "workers": [k for k in keys if specs[k]["engine"] != "hf"]})

    cases = [c for c in cases if c["kind"] in args.cases]
    workers = bc.start_workers(specs, log_dir, log)
    try:
        results = bc.run_plan(cases, workers, args.reps, args.pause, log)
    finally:
        for w in workers.values():
            w.finish()

    # ---------------------------------------------------------------- startup probes (new processes)
    startup = {}
    if not args.skip_startup:
        startup = run_startup(args, engines, paths, prompts, log_dir)

    elapsed = time.perf_counter() - t_start
    report = build_report(header, args, engines, specs, cases, results, workers, startup, prompts, notes,
                          elapsed, prep_seconds)
    bc.emit_report(report, len(header), args.output, log)
    if args.json:
        dump = {"args": {k: v for k, v in vars(args).items()}, "header": header,
                "results": [{"case": c, "worker": k, **v} for (c, k), v in results.items()],
                "workers": {k: {"info": w.info, "final": w.final, "error": w.error} for k, w in workers.items()},
                "startup": startup, "elapsed_seconds": elapsed}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dump, f, indent=1, default=str)
        log(f"wrote {args.json}")
    return 0


def run_startup(args, engines, paths, prompts, log_dir) -> dict:
    """Alternating new-process runs: jaxgen cold, jaxgen warm, CTranslate2, transformers."""
    out = {"jaxgen-cold": [], "jaxgen-warm": [], "ct2": [], "hf": [], "cache": [], "errors": {}}
    base = {"precision": "float32", "compute_type": "float32", "device": args.device, "threads": args.threads,
            "paths": paths, "prompts": {"short": prompts["short"], "long": prompts["short"],
                                        "score": [prompts["short"]]},
            "max_length": args.new_tokens}
    cache_root = os.path.join(args.work_dir, "jax-cache-probe")
    log("startup: new processes, launch -> first streamed token")
    for rep in range(args.startup_reps):
        shutil.rmtree(cache_root, ignore_errors=True)
        os.makedirs(cache_root)
        cache_dir = tempfile.mkdtemp(prefix="cold-", dir=cache_root)  # empty: a cold cache
        plan = []
        if "jaxgen" in engines:
            plan += [("jaxgen-cold", "jaxgen", cache_dir), ("jaxgen-warm", "jaxgen", cache_dir)]
        plan += [(e, e, None) for e in ("ct2", "hf") if e in engines]
        for label, engine, cache in plan:
            if label in out["errors"]:
                continue
            spec = dict(base, engine=engine, jax_cache_dir=cache, env=engine_env(engine, args))
            time.sleep(args.pause)
            try:
                res = bc.run_probe(SCRIPT, engine, spec, os.path.join(log_dir, f"probe-{label}.log"))
            except RuntimeError as exc:
                out["errors"][label] = str(exc)
                log(f"  {label}: {exc}")
                continue
            out[label].append(res)
            log(f"  rep {rep + 1} {label:<12} first token {res['first_token']:.2f} s (import {res['imported']:.2f}, "
                f"loaded {res['loaded']:.2f}), peak RSS {res['peak_rss_mib']:.0f} MiB")
            if label == "jaxgen-cold":
                files, size = bc.dir_stats(cache)
                out["cache"].append({"files": files, "bytes": size})
        shutil.rmtree(cache_root, ignore_errors=True)
    return out


# ============================================================================ report
def build_report(header, args, engines, specs, cases, results, workers, startup, prompts, notes, elapsed,
                 prep_seconds):
    cols = [e for e in ("jaxgen", "ct2", "hf") if e in engines]
    ratio_cols = [e for e in cols if e != "ct2"] if "ct2" in cols else []
    table_header = ["metric"] + [bc.ENGINE_LABELS[e] for e in cols] + \
        [f"{bc.ENGINE_LABELS[e]} / CT2" for e in ratio_cols]
    rows, details = [], []

    def add_row(metric: str, values: dict, fmt_value=bc.fmt, ratio=True):
        cells = [metric] + [fmt_value(values.get(e)) for e in cols]
        ref = values.get("ct2")
        for e in ratio_cols:
            v = values.get(e)
            cells.append(f"{v / ref:.2f}x" if (ratio and v is not None and ref) else "—")
        rows.append(cells)

    def case_label(case):
        prec = case["precision"]
        kind = case["kind"]
        if kind == "decode":
            return f"decode tok/s ↑, B={case['batch']}, {prec}"
        if kind == "prefill":
            return f"prefill tok/s ↑, {case['tokens']}-token prompt, B=1, {prec}"
        if kind == "score":
            return f"score_batch tok/s ↑, {len(prompts['score'])}x{len(prompts['score'][0])}, {prec}"
        if kind == "ttft":
            return f"time to first streamed token, warm process, ms ↓, {prec}"
        if kind == "close":
            return f"stream close() after {case['read']} tokens, ms ↓, {prec}"
        return case["id"]

    for case in cases:
        values = {}
        for key in case["workers"]:
            entry = results[(case["id"], key)]
            engine = specs[key]["engine"]
            samples = entry["samples"]
            if not samples:
                values[engine] = float("nan")
                details.append([case_label(case), bc.ENGINE_LABELS[engine], "error: see the log", "", "", "0", ""])
                continue
            if case["kind"] in ("ttft", "close"):
                vals = [s * 1000 for s in samples]
            else:
                vals = [case["tokens"] / s for s in samples]
            values[engine] = bc.median(vals)
            details.append([case_label(case), bc.ENGINE_LABELS[engine], bc.fmt(values[engine]), bc.fmt(min(vals)),
                            bc.fmt(max(vals)), str(len(vals)), " ".join(f"{s:.3f}" for s in samples)])
            bad = [x for x in entry["extra"] if "generated" in x and case["kind"] == "decode"
                   and x["generated"] != case["new_tokens"]]
            if bad:
                notes.append(f"{bc.ENGINE_LABELS[engine]} {case['id']}: generated {bad[0]['generated']} tokens, "
                             f"not {case['new_tokens']}")
        add_row(case_label(case), values)

    if startup:
        def med(label, field):
            vals = [r[field] for r in startup.get(label, [])]
            return bc.median(vals)

        for variant in ("cold", "warm"):
            jl = f"jaxgen-{variant}"
            add_row(f"startup: launch → first token, s ↓, {variant} JAX cache",
                    {"jaxgen": med(jl, "first_token"), "ct2": med("ct2", "first_token"), "hf": med("hf", "first_token")})
            add_row(f"startup: model loaded → first token, s ↓, {variant} JAX cache",
                    {"jaxgen": _diff(startup, jl), "ct2": _diff(startup, "ct2"), "hf": _diff(startup, "hf")})
        for label in ("jaxgen-cold", "jaxgen-warm", "ct2", "hf"):
            for r in startup.get(label, []):
                details.append([f"startup ({label}): import / loaded / first token, s", label.split("-")[0],
                                bc.fmt(r["first_token"]), "", "", "1",
                                f"{r['imported']:.2f} / {r['loaded']:.2f} / {r['first_token']:.2f}"])
        add_row("peak RSS, startup process (load + 1 token), MiB ↓",
                {"jaxgen": med("jaxgen-warm", "peak_rss_mib") or med("jaxgen-cold", "peak_rss_mib"),
                 "ct2": med("ct2", "peak_rss_mib"), "hf": med("hf", "peak_rss_mib")}, bc.fmt)

    for prec in args.precisions:
        peak, loaded, dev = {}, {}, {}
        for key, spec in specs.items():
            if spec["precision"] != prec:
                continue
            w = workers[key]
            e = spec["engine"]
            peak[e] = w.final.get("peak_rss_mib", float("nan")) if not w.error else float("nan")
            loaded[e] = w.info.get("rss_after_load_mib", float("nan")) if not w.error else float("nan")
            dev[e] = w.final.get("device_peak_mib")
        if not peak:
            continue
        add_row(f"RSS after load, MiB ↓, {prec}", loaded)
        add_row(f"peak RSS over all {prec} cases, MiB ↓, {prec}", peak)
        if args.device == "cuda":
            add_row(f"peak GPU memory (allocator), MiB ↓, {prec}", {k: v for k, v in dev.items() if v is not None})

    lines = list(header)
    lines += ["", f"Default model: Gemma 3 270M (GGUF Q4_K_M from the PyPI package, dequantized; float32 "
                  f"conversions for every engine, CTranslate2 int8 = its own int8 conversion). Work dir: "
                  f"`{args.work_dir}`.",
              f"Repetitions: {args.reps} timed (medians; after one untimed warm-up each), engines alternating "
              f"round-robin within every case; {args.startup_reps} startup repetition(s). Short prompt: "
              f"{len(prompts['short'])} tokens; decode: {args.new_tokens} new tokens forced with min_length.",
              ""]
    lines += ["Engines (one process each):"]
    for key, w in workers.items():
        if w.info:
            lines.append(f"- {key}: {w.info['description']}; loaded in {w.info['load_seconds']:.1f} s")
    lines += ["", *bc.markdown_table(table_header, rows), ""]
    lines += ["Notes:",
              f"- decode tok/s = B x {args.new_tokens} / wall time of the whole generate call (a "
              f"{len(prompts['short'])}-token prompt: its prefill is included and negligible).",
              "- prefill tok/s = prompt tokens / time of generate(max_length=1); score_batch tok/s = input tokens "
              "/ time (transformers: forward + log_softmax + gather).",
              "- ratios are value / CTranslate2's value (> 1 is better for ↑ rows, < 1 is better for ↓ rows).",
              "- startup: a new Python process from launch; CTranslate2 and transformers compile nothing, so their "
              "figures (the same runs) appear in the cold and the warm rows.",
              "- int8: jaxgen compute_type=\"int8\" (int8 weights; on CPU float32 activations quantized per "
              "row to int8 for int8 x int8 -> int32 products, as CTranslate2 does) vs CTranslate2 "
              "compute_type=\"int8\" on its int8 conversion; transformers has no comparable int8 path here.",
              f"- {bc.cpu_count()} usable cores are shared by every engine; other load on the machine shows in the "
              "spread (see the details)."]
    if startup.get("cache"):
        c = startup["cache"][-1]
        lines.append(f"- JAX persistent cache after a cold start: {c['files']} files, {c['bytes'] / 2**20:.1f} MiB.")
    for label, err in (startup.get("errors") or {}).items():
        lines.append(f"- startup {label} failed: {err}")
    for key, w in workers.items():
        if w.error:
            lines.append(f"- {key} failed: {w.error.strip().splitlines()[-1]} (log: {w.log_path})")
    lines += [f"- {n}" for n in notes]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        lines.append(f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    lines.append(f"- total wall time: {elapsed / 60:.1f} min (of which preparing artefacts {prep_seconds:.0f} s).")
    lines += ["", "Details (value: median, min, max over the repetitions; raw seconds per run):", "",
              *bc.markdown_table(["metric", "engine", "median", "min", "max", "n", "raw seconds"], details,
                                 "llrrrrl")]
    return lines


def _diff(startup: dict, label: str):
    vals = [r["first_token"] - r["loaded"] for r in startup.get(label, [])]
    return bc.median(vals)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        bc.probe_main(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
