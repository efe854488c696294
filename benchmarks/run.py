#!/usr/bin/env python
"""Runs one benchmark workload and prints its report (markdown, the README's format).

    python benchmarks/run.py                    # main: the README's main table (= make bench)
    python benchmarks/run.py --list             # every workload with its parameters
    python benchmarks/run.py WORKLOAD [--tiny] [--reps N] [--PARAMETER VALUE ...] [--output FILE] [--json FILE]
    make bench WORKLOAD=long_context BENCH_ARGS="--score-tokens 8192 --prompt-tokens 8192"

--tiny runs the workload on tests/hf_models.py's tiny model with tiny sizes (a smoke test, seconds).
A workload's parameters are given as --name value (lists comma-separated: --batch-sizes 1,8).
Converted models are cached in --work-dir (default ~/.cache/jaxgen-bench); logs of every engine
process are in <work-dir>/logs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import types
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import models  # noqa: E402
from workloads import WORKLOADS, Context  # noqa: E402


def parse_params(workload, rest: List[str], tiny: bool) -> Dict[str, object]:
    """--name value pairs into the workload's parameters, typed like their defaults."""
    params = dict(workload.params, **(workload.tiny if tiny else {}))
    if len(rest) % 2 or any(not a.startswith("--") for a in rest[::2]):
        raise SystemExit(f"expected --parameter value pairs, got {' '.join(rest)}")
    for flag, text in zip(rest[::2], rest[1::2]):
        name = flag[2:].replace("-", "_")
        if name not in params:
            raise SystemExit(f"{workload.name} has no parameter {flag}; it has "
                             f"{', '.join('--' + k.replace('_', '-') for k in params)}")
        default = workload.params[name]
        params[name] = tuple(int(x) for x in text.split(",") if x) if isinstance(default, tuple) \
            else type(default)(text)
    return params


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(usage="run.py [WORKLOAD] [options] [--PARAMETER VALUE ...]",
                                 description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--list", action="store_true", help="list the workloads and their parameters")
    ap.add_argument("--tiny", action="store_true", help="tiny model, tiny sizes, 1 repetition: a smoke test")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; --tiny: 1)")
    ap.add_argument("--threads", type=int, default=h.cpu_count(), help="threads of every engine (default: the cores)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between two runs (default 0.5)")
    ap.add_argument("--work-dir", default=models.DEFAULT_WORK_DIR)
    ap.add_argument("--output", help="also write the report here")
    ap.add_argument("--json", help="also write every reply of every engine here")
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "main"
    if name not in WORKLOADS:
        ap.error(f"unknown workload {name!r}; choose from {', '.join(sorted(WORKLOADS))}")
    args, rest = ap.parse_known_args(argv)
    if args.list:
        for w in WORKLOADS.values():
            print(f"{w.name}: {w.title}\n    " + " ".join(f"--{k.replace('_', '-')} "
                                                          f"{','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                                          for k, v in w.params.items()))
        return 0
    workload = WORKLOADS[name]
    params = parse_params(workload, rest, args.tiny)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ctx = Context(types.SimpleNamespace(**params), args.tiny, args.reps or (1 if args.tiny else 5), args.threads,
                  0.0 if args.tiny else args.pause, os.path.abspath(args.work_dir), log)
    os.makedirs(ctx.work_dir, exist_ok=True)
    head = h.header(workload.title + (" (tiny model)" if args.tiny else ""), args.threads)
    print("\n".join(head), flush=True)
    start = time.perf_counter()
    lines = ["", *inspect.cleandoc(workload.run.__doc__ or "").split("\n"), "", *workload.run(ctx),
             "", f"Total wall time {(time.perf_counter() - start) / 60:.1f} min."]
    print("\n".join(lines), flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(head + lines) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"workload": workload.name, "params": params, "header": head, "report": lines,
                       "runs": ctx.records}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
