#!/usr/bin/env python
"""Streaming: decode tok/s through generate_tokens and generate_batch (B=1 and 16), and how long
`close()` takes on a generate_tokens stream after reading a few tokens; jaxgen vs CTranslate2.

    python benchmarks/bench_stream_close.py
    python benchmarks/bench_stream_close.py --quick --engines jaxgen

Each engine runs in its own process; after a warm-up the repetitions alternate between engines
(round-robin within each case); cells are medians. close(): the stream asks for up to 512 tokens
(min_length=512, so it would not end by itself), `--close-after` tokens are read, then the time of
stream.close() — which in both engines waits until the decoding job has stopped.
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
    p.add_argument("--quick", action="store_true", help="1 repetition, 32 new tokens")
    p.add_argument("--engines", default="jaxgen,ct2", help="comma-separated subset of jaxgen,ct2")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128; --quick: 32")
    p.add_argument("--close-after", default="1,4,16", help="tokens read before close() (default 1,4,16)")
    p.add_argument("--reps", type=int, default=None, help="default 5; --quick: 1")
    p.add_argument("--threads", type=int, default=bc.cpu_count())
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--ct2-use-mkl", action="store_true", help="CT2_USE_MKL=1 for CTranslate2")
    p.add_argument("--work-dir", default=bc.DEFAULT_WORK_DIR)
    p.add_argument("--output", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in args.engines:
        if e not in ("jaxgen", "ct2"):
            p.error(f"unknown engine {e!r}: jaxgen or ct2")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.close_after = [int(b) for b in args.close_after.split(",") if b.strip()]
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.update(bc.thread_env(args.threads))
    header = bc.header_lines("jaxgen streaming: decode throughput and close()", args.threads, args.device)
    print("\n".join(header), flush=True)
    paths = bc.prepare_artefacts(args.work_dir, args.engines, {"prefill_tokens": 16, "score_batch": 1,
                                                               "score_length": 16})
    prompts = paths.pop("prompts")
    specs = {}
    for e in args.engines:
        env = {}
        if e == "ct2":
            env = {"CT2_VERBOSE": "1", **({"CT2_USE_MKL": "1"} if args.ct2_use_mkl else {})}
        specs[e] = {"engine": e, "precision": args.compute_type, "compute_type": args.compute_type,
                    "device": args.device, "threads": args.threads, "paths": paths, "prompts": prompts, "env": env}
    keys = list(specs)
    n = args.new_tokens
    cases = []
    for b in args.batch_sizes:
        cases.append({"id": f"batch-B{b}", "kind": "decode", "batch": b, "new_tokens": n, "workers": keys,
                      "label": f"generate_batch decode tok/s ↑, B={b}", "tokens": b * n})
        cases.append({"id": f"stream-B{b}", "kind": "stream_decode", "batch": b, "new_tokens": n, "workers": keys,
                      "label": f"generate_tokens decode tok/s ↑, B={b}", "tokens": b * n})
    for k in args.close_after:
        cases.append({"id": f"close-{k}", "kind": "close", "read": k, "max_length": 512, "workers": keys,
                      "label": f"close() after reading {k} token(s), ms ↓"})
    workers = bc.start_workers(specs, os.path.join(args.work_dir, "logs"), log)
    try:
        results = bc.run_plan(cases, workers, args.reps, args.pause, log)
    finally:
        for w in workers.values():
            w.finish()

    ratio = "ct2" in keys and "jaxgen" in keys
    rows = []
    for case in cases:
        values = {}
        for key in keys:
            ss = results[(case["id"], key)]["samples"]
            if not ss:
                values[key] = None
            elif case["kind"] == "close":
                values[key] = bc.median([s * 1000 for s in ss])
            else:
                values[key] = bc.median([case["tokens"] / s for s in ss])
        cells = [case["label"]] + [bc.fmt(values[k]) for k in keys]
        if ratio:
            j, c = values["jaxgen"], values["ct2"]
            cells.append(f"{j / c:.2f}x" if j and c else "—")
        rows.append(cells)
        if case["kind"] == "close":  # how long the tokens before close() took, for context
            for key in keys:
                reads = [x.get("read_seconds") for x in results[(case["id"], key)]["extra"]]
                if reads:
                    case.setdefault("reads", {})[key] = bc.median(reads) * 1000
    lines = list(header) + ["", f"Model: Gemma 3 270M, {args.compute_type}; {len(prompts['short'])}-token prompt; "
                                f"{n} new tokens forced with min_length; medians of {args.reps} alternating "
                                "repetitions after a warm-up.", "", "Engines:"]
    for key, w in workers.items():
        lines.append(f"- {key}: {w.info.get('description', 'failed: ' + str(w.error))}")
    lines += ["", *bc.markdown_table(["metric"] + [bc.ENGINE_LABELS[k] for k in keys] +
                                     (["jaxgen / CT2"] if ratio else []), rows), "", "Notes:",
              "- decode tok/s = B x new tokens / wall time of the call (generate_tokens: until the stream ends).",
              "- close(): the stream would decode up to 512 tokens; the time is that of stream.close() alone."]
    for case in cases:
        if case.get("reads"):
            lines.append(f"- reading the first {case['read']} token(s) before close() took (median ms): " +
                         ", ".join(f"{bc.ENGINE_LABELS[k]} {bc.fmt(v)}" for k, v in case["reads"].items()))
    lines.append(f"- total wall time: {(time.perf_counter() - t_start) / 60:.1f} min.")
    bc.emit_report(lines, len(header), args.output, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
