"""Where a decode step's (or a prefill's) time goes, op by op, from JAX's profiler.

    python benchmarks/step_profile.py                                  # int8_float32, batch 1, 64 steps
    python benchmarks/step_profile.py --compute-type float32 --batch 16
    python benchmarks/step_profile.py --prefill 512                    # one 512-token prefill instead

Runs `generate_batch` on the default model (a warm-up, the median of --reps timed calls, then one
call under `jax.profiler`), reads the trace's XLA:CPU operations (thunks) and prints their time per step,
summed per kind of operation (`ffi_call`: jaxgen's native products; `ynn_fusion`: YNNPACK's dots
and reductions; loop fusions by their name), then the slowest single operations. Operations that
run at the same time on the intra-op threads are each counted in full, so the sums can exceed the
step (a prefill's attention especially): read them as where the work is, not as a partition.
Unlike `prefill_breakdown.py` (an ablation) nothing is replaced, so the outputs are the real ones.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a jaxgen model directory (default: the default model)")
    parser.add_argument("--compute-type", default="int8_float32")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (9-token prompts)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=0, metavar="TOKENS", help="profile one prefill of TOKENS instead")
    parser.add_argument("--top", type=int, default=12, help="how many single operations to list")
    parser.add_argument("--reps", type=int, default=3, help="timed calls without the profiler (median)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    import jax

    import jaxgen
    from jaxgen import default_model

    generator = jaxgen.Generator(args.model or default_model.default_model_path(progress=False),
                                 compute_type=args.compute_type)
    tokens = generator.vocabulary.tokens
    if args.prefill:
        prompt = harness.random_prompt(tokens, args.prefill)
        steps, unit = 1, "call"

        def run():
            generator.generate_batch([prompt], max_length=1, include_prompt_in_result=False)
    else:
        prompt = harness.random_prompt(tokens, 9)
        steps, unit = args.new_tokens, "step"

        def run():
            generator.generate_batch([prompt] * args.batch, max_length=steps, min_length=steps,
                                     include_prompt_in_result=False)

    wall_ms = harness.median_ms(run, args.reps) / steps
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    per_op: collections.Counter = collections.Counter()
    per_kind: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # XLA's operations only: not Python frames ($...), nor the executor's and the runtime's own spans
        if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "PjRt" in name \
                or name.startswith(("Pjit", "np.asarray", "SlinkyThreadPool")):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        per_op[name] += e["dur"]
        per_kind[kind] += e["dur"]
        count[kind] += 1
    what = f"prefill of {args.prefill} tokens" if args.prefill else f"decode, batch {args.batch}, {steps} steps"
    print(f"CPU: {' '.join(harness.cpu_name())}; {args.compute_type}, {what}: {wall_ms:.1f} ms per {unit} "
          f"(median of {args.reps} calls without the profiler)")
    print(f"\nper kind of operation (ms per {unit}, operations per {unit}):")
    for kind, us in per_kind.most_common(20):
        print(f"  {us / 1e3 / steps:9.2f}  {count[kind] / steps:7.1f}  {kind}")
    print(f"\nslowest single operations (ms per {unit}):")
    for name, us in per_op.most_common(args.top):
        print(f"  {us / 1e3 / steps:9.2f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
