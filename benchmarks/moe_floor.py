"""The floor of a mixture-of-experts decode step on this CPU: what reading the experts' weights costs.

    python benchmarks/moe_floor.py                       # the `moe` workload's shapes (hidden 768, width 1536, 6 layers, 8 experts)
    python benchmarks/moe_floor.py --rows 1,4,16 --reps 9

At batch 16 with top-2 of 8 experts, 32 choices leave ~7.9 experts chosen per layer and step, so a
step must read (nearly) every expert's weights whatever the formulation: the MoE MLP cannot cost
less than the gated MLPs of all experts on a few rows each. This measures, in float32 with the
weights in the [in, out] layout and every weight distinct (as in a decode step, where they do not
stay in cache):

- `experts at R rows`: the gated MLPs of layers x experts distinct experts, each on R rows;
- `dense at 16 rows`: the gated MLPs of a dense model with the same active parameters per token
  (width 2F, `layers` layers) on 16 rows;
- `jaxgen experts_mlp at T tokens`: `jaxgen.model.experts.experts_mlp` (routing top-2, grouping,
  products, scatter) over the same layers x experts on T tokens, to set against the floor;
- the machine's read bandwidth (numpy sums over 512 MiB, 1 and 2 threads).

Absolute times move between runs on a shared machine; ratios within one run are steadier. With
`python benchmarks/run.py moe`'s dense and all-experts step times (D, A; the all-experts model reads
the same bytes as a batch-16 MoE step), r_d = dense / experts-at-16 and r_4 = experts-at-4 /
experts-at-16 from one run here: the MLP part of A is M = (A - D) / (1 - r_d), the rest C = A - M,
and a MoE step that only read each expert once on its ~4 rows would take C + r_4 * M (the README
does this sum).
Prints one line per measurement; medians of --reps runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Callable, List, Sequence, Tuple

import numpy as np


def read_bandwidth(threads: int, reps: int = 5) -> float:
    """GB/s of `threads` threads each summing its share of a 512 MiB float32 array (best of reps)."""
    data = np.ones(128 * 2**20, np.float32)
    parts = np.split(data, threads)
    best = 0.0
    for _ in range(reps):
        workers = [threading.Thread(target=lambda a=a: a.sum(dtype=np.float32)) for a in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def gated_stack(weights: Sequence[Tuple]) -> Callable:
    """A jitted sum over gated MLPs x [R, D] -> [R, D], one per (gate [D, F], up [D, F], down [F, D])."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(x, ws):
        total = jnp.zeros_like(x)
        for gate, up, down in ws:
            total = total + (jax.nn.silu(x @ gate) * (x @ up)) @ down
        return total

    return lambda x: run(x, weights)


def jaxgen_experts(d: int, f: int, layers: int, experts: int, weight) -> Callable:
    """jaxgen's experts MLP over `layers` layers of `experts` experts (top-2, silu), with random
    routers: x [T, 1, D] -> [T, 1, D]."""
    import jax

    from jaxgen.model.config import ModelConfig
    from jaxgen.model.experts import experts_mlp

    config = ModelConfig(architecture="moe-floor", vocab_size=512, hidden_size=d, num_layers=layers,
                         num_heads=max(1, d // 64), num_kv_heads=max(1, d // 128), head_dim=64,
                         max_position_embeddings=4096, mlp="experts", num_experts=experts, experts_per_token=2,
                         expert_intermediate_size=f, intermediate_size=f)
    params = [{"router": {"weight": weight((d, experts))},
               **{kind: {"weight": [weight(shape) for _ in range(experts)]}
                  for kind, shape in (("expert_gate", (d, f)), ("expert_up", (d, f)), ("expert_down", (f, d)))}}
              for _ in range(layers)]

    @jax.jit
    def run(x, params):
        for lp in params:
            x = x + experts_mlp(config, x, lp)
        return x

    return lambda x: run(x, params)


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--expert-width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", default="1,2,4,8,16", help="rows per expert product")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    import jax.numpy as jnp

    d, f, n = args.hidden, args.expert_width, args.layers * args.experts
    rng = np.random.default_rng(0)

    def weight(shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)

    print(f"CPU: {' '.join(harness.cpu_name())}; hidden {d}, expert width {f}, {args.layers} layers x {args.experts} experts, "
          f"float32, medians of {args.reps}")
    for threads in (1, 2):
        print(f"read bandwidth, {threads} thread(s): {read_bandwidth(threads):.1f} GB/s")
    experts = gated_stack([(weight((d, f)), weight((d, f)), weight((f, d))) for _ in range(n)])
    mib = n * 3 * d * f * 4 / 2**20
    for rows in (int(r) for r in args.rows.split(",")):
        x = weight((rows, d))
        ms = harness.median_ms(lambda: experts(x).block_until_ready(), args.reps)
        print(f"experts at {rows:2d} rows ({n} experts, {mib:,.0f} MiB): {ms:7.2f} ms  ({mib / 1024 / ms * 1000:.1f} GiB/s)")
    moe = jaxgen_experts(d, f, args.layers, args.experts, weight)
    for tokens in (1, 16):
        x = weight((tokens, 1, d))
        ms = harness.median_ms(lambda: moe(x).block_until_ready(), args.reps)
        print(f"jaxgen experts_mlp at {tokens:2d} tokens (top-2): {ms:7.2f} ms")
    dense = gated_stack([(weight((d, 2 * f)), weight((d, 2 * f)), weight((2 * f, d))) for _ in range(args.layers)])
    dense_mib = args.layers * 3 * d * 2 * f * 4 / 2**20
    x = weight((16, d))
    ms = harness.median_ms(lambda: dense(x).block_until_ready(), args.reps)
    print(f"dense at 16 rows ({args.layers} gated MLPs of width {2 * f}, {dense_mib:,.0f} MiB): {ms:7.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
