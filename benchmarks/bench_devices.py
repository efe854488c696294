#!/usr/bin/env python
"""jaxgen throughput with 1, 2 and 4 (simulated) devices: one replica per device (data parallel),
and the weights sharded over the devices (tensor parallel).

    python benchmarks/bench_devices.py                 # CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4
    python benchmarks/bench_devices.py --quick
    python benchmarks/bench_devices.py --device cuda --devices 1,2   # real GPUs, if there are several

`jaxgen.Generator(model, device_index=[0..n-1])` holds one replica per device; `max_batch_size=ceil(B/n)`
splits each call into n sub-batches that run on the replicas at the same time.
`jaxgen.Generator(model, device_index=[0..n-1], tensor_parallel=True)` holds one copy of the weights
split over the n devices (query heads, MLP columns, the hidden axis of the embedding; Gemma 3 270M's
one KV head copied to every device) and runs each call whole. Two workloads:
score_batch (B sequences x L tokens) and greedy generate_batch (B prompts, N new tokens forced with
min_length). All generators live in this one process and the repetitions alternate between them, so
drift hits every device count alike; cells are medians.

On CPU the devices are simulated: XLA splits the host into N "devices" that share the same cores (and
memory bandwidth), so do not expect a speed-up; the figures show the overhead (or gain from overlap)
of the data-parallel path, not what N real accelerators would give.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition, 32 new tokens, 8x64 scoring")
    p.add_argument("--devices", default="1,2,4", help="device counts to compare (default 1,2,4)")
    p.add_argument("--no-tensor-parallel", action="store_true", help="replicas only (no tensor-parallel rows)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compute-type", default="float32", help="jaxgen compute_type (default float32)")
    p.add_argument("--batch", type=int, default=16, help="generate_batch batch size (default 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128; --quick: 32)")
    p.add_argument("--score", default=None, help="score_batch workload BxL (default 16x128; --quick: 8x64)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; --quick: 1)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between runs (default 0.5)")
    p.add_argument("--work-dir", default=bc.DEFAULT_WORK_DIR, help="cache of converted models (default %(default)s)")
    p.add_argument("--output", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    args.devices = [int(x) for x in args.devices.split(",") if x.strip()]
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    score = args.score or ("8x64" if args.quick else "16x128")
    args.score_batch, args.score_length = (int(x) for x in score.lower().split("x"))
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    n_max = max(args.devices)
    if args.device == "cpu":  # must happen before JAX starts (here and in the preparing child)
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n_max}"])
    threads = bc.cpu_count()
    for k, v in bc.thread_env(threads).items():
        os.environ.setdefault(k, v)
    header = bc.header_lines("jaxgen data and tensor parallelism over 1, 2, 4 devices", threads, args.device)
    print("\n".join(header), flush=True)
    paths = bc.prepare_artefacts(args.work_dir, ["jaxgen"], {
        "prefill_tokens": 16, "score_batch": args.score_batch, "score_length": args.score_length})
    prompts = paths.pop("prompts")

    import jax

    import jaxgen

    available = len(jax.devices("gpu" if args.device == "cuda" else "cpu"))
    counts = [n for n in args.devices if n <= available]
    skipped = [n for n in args.devices if n > available]
    # setups: (n, layout) with layout "replicas" (data parallel) or "tensor parallel"
    setups = [(n, "replicas") for n in counts]
    if not args.no_tensor_parallel:
        setups += [(n, "tensor parallel") for n in counts if n > 1]
    gens = {}
    for n, layout in setups:
        t = time.perf_counter()
        gens[(n, layout)] = jaxgen.Generator(paths["jaxgen"], device=args.device, device_index=list(range(n)),
                                             compute_type=args.compute_type, tensor_parallel=layout != "replicas")
        log(f"loaded {n} device(s), {layout}, in {time.perf_counter() - t:.1f} s (RSS {bc.rss_now_mib():.0f} MiB)")

    B, L = len(prompts["score"]), len(prompts["score"][0])
    workloads = {
        "score": (lambda g, mbs: g.score_batch(prompts["score"], max_batch_size=mbs), B * L),
        "generate": (lambda g, mbs: g.generate_batch([prompts["short"]] * args.batch, max_batch_size=mbs,
                                                     max_length=args.new_tokens, min_length=args.new_tokens,
                                                     include_prompt_in_result=False), args.batch * args.new_tokens),
    }

    def batch_sizes(setup) -> tuple:
        """(score, generate) max_batch_size: n sub-batches for replicas, the whole batch sharded."""
        n, layout = setup
        return (-(-B // n), -(-args.batch // n)) if layout == "replicas" else (B, args.batch)

    def run(name: str, setup) -> float:
        fn, _ = workloads[name]
        mbs = batch_sizes(setup)[0 if name == "score" else 1]
        time.sleep(args.pause)
        t = time.perf_counter()
        fn(gens[setup], mbs)
        return time.perf_counter() - t

    samples = {(w, setup): [] for w in workloads for setup in setups}
    log("warm-up (compiles; not timed)")
    for w in workloads:
        for setup in setups:
            log(f"  warm-up {w} n={setup[0]} {setup[1]}: {run(w, setup):.2f} s")
    for rep in range(args.reps):
        for w in workloads:
            order = setups[rep % len(setups):] + setups[:rep % len(setups)]
            for setup in order:
                s = run(w, setup)
                samples[(w, setup)].append(s)
                log(f"  rep {rep + 1} {w} n={setup[0]} {setup[1]}: {s:.2f} s")

    rows = []
    base = {}
    for setup in setups:
        cells = [str(setup[0]), setup[1], *(str(b) for b in batch_sizes(setup))]
        for w in workloads:
            tokens = workloads[w][1]
            rate = bc.median([tokens / s for s in samples[(w, setup)]])
            base.setdefault(w, rate)
            cells += [bc.fmt(rate), f"{rate / base[w]:.2f}x"]
        rows.append(cells)
    lines = list(header) + [
        "",
        f"Model: Gemma 3 270M (jaxgen {args.compute_type}); score_batch: {B} x {L} tokens; generate_batch: "
        f"B={args.batch}, {args.new_tokens} new tokens (greedy, min_length), a {len(prompts['short'])}-token "
        f"prompt; medians of {args.reps} alternating repetitions after a warm-up.",
        "",
        *bc.markdown_table(["devices", "layout", "score max_batch_size", "generate max_batch_size",
                            "score_batch tok/s", "vs 1 device", "generate tok/s", "vs 1 device"], rows),
        "",
        "Notes:",
        "- tok/s = tokens / wall time of one call (score: input tokens; generate: B x new tokens).",
    ]
    if args.device == "cpu":
        lines.append(f"- CPU devices simulated with XLA_FLAGS=--xla_force_host_platform_device_count={n_max}: "
                     f"all of them share the same {bc.cpu_count()} cores and memory bandwidth, so this measures "
                     "the data-parallel and tensor-parallel machinery (tensor parallelism adds two all-reduces "
                     "per layer, here through host memory), not a real multi-device speed-up.")
    if skipped:
        lines.append(f"- skipped device counts {skipped}: only {available} device(s) available.")
    lines.append(f"- every replica holds its own copy of the weights, a tensor-parallel generator one copy split "
                 f"over its devices: peak RSS of this process (all generators) {bc.peak_rss_mib():.0f} MiB.")
    lines.append(f"- total wall time: {(time.perf_counter() - t_start) / 60:.1f} min.")
    for (w, (n, layout)), ss in samples.items():
        lines.append(f"- raw seconds {w} n={n} {layout}: {' '.join(f'{s:.3f}' for s in ss)}")
    bc.emit_report(lines, len(header), args.output, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
