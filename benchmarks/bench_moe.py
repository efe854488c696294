"""Decode cost of a mixture of experts against dense models (CPU, float32, random weights).

Three layer stacks with the same attention and hidden size, decoded greedily for a fixed number
of tokens at batch 1 and 16 (medians of alternating repetitions, each model in this process):

  moe        8 experts of width F, top-2 routing (jaxgen.model.experts: each token runs its own 2)
  dense      one gated MLP of width 2F: the same *active* parameters per token
  all        one gated MLP of width 8F: the cost of running every expert on every token

The issue's mark: moe within 1.5x of dense at batch 1 and 16, far below all.

    python benchmarks/bench_moe.py                   # hidden 768, F 1536, 6 layers, 64 new tokens
    python benchmarks/bench_moe.py --quick           # tiny shapes, a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
        return f"{model} ({isa}, {os.cpu_count()} CPUs)"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def model_dir(root: str, name: str, mlp: dict, hidden: int, layers: int, vocab: int) -> str:
    """A jaxgen model directory with random weights (std 0.02) for one stack."""
    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    config = ModelConfig(architecture=name, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=hidden // 64, num_kv_heads=hidden // 128, head_dim=64,
                         max_position_embeddings=4096, tie_word_embeddings=True, **mlp)
    rng = np.random.default_rng(0)
    flat = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_flat_shapes(config).items()}
    path = os.path.join(root, name)
    save_model_dir(path, config, flat, [f"t{i}" for i in range(vocab)])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--expert-width", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes and one repetition")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.expert_width, args.layers, args.vocab, args.new_tokens, args.reps = 128, 64, 2, 512, 8, 1
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jaxgen
    from jaxgen.model.checkpoint import active_parameter_count
    from jaxgen.model.config import ModelConfig

    f = args.expert_width
    stacks = {
        "moe": dict(mlp="experts", num_experts=8, experts_per_token=2, expert_intermediate_size=f,
                    intermediate_size=f),
        "dense": dict(mlp="gated", intermediate_size=2 * f),
        "all": dict(mlp="gated", intermediate_size=8 * f),
    }
    with tempfile.TemporaryDirectory() as root:
        paths = {name: model_dir(root, name, mlp, args.hidden, args.layers, args.vocab) for name, mlp in stacks.items()}
        generators = {name: jaxgen.Generator(path, compute_type="float32") for name, path in paths.items()}
        print(f"# {cpu_name()}; hidden {args.hidden}, {args.layers} layers, expert width {f}, "
              f"{args.new_tokens} new tokens, float32")
        for name, path in paths.items():
            config = ModelConfig.load(path)
            print(f"#   {name}: {active_parameter_count(config) / 1e6:.1f}M active parameters per token")
        print("| batch | moe (tok/s) | dense, same active parameters | all experts | moe / dense time | moe / all time |")
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            prompts = [[f"t{(7 * i + j) % args.vocab}" for j in range(8)] for i in range(batch)]

            def run(name: str) -> float:
                start = time.perf_counter()
                generators[name].generate_batch(prompts, max_length=args.new_tokens, min_length=args.new_tokens,
                                                include_prompt_in_result=False)
                return time.perf_counter() - start

            for name in stacks:  # compile
                run(name)
            times = {name: [] for name in stacks}
            for _ in range(args.reps):
                for name in stacks:
                    times[name].append(run(name))
            median = {name: statistics.median(v) for name, v in times.items()}
            rate = {name: batch * args.new_tokens / t for name, t in median.items()}
            print(f"| {batch} | {rate['moe']:.1f} | {rate['dense']:.1f} | {rate['all']:.1f} | "
                  f"{median['moe'] / median['dense']:.2f}x | {median['moe'] / median['all']:.2f}x |")


if __name__ == "__main__":
    main()
