"""The cost of beam search against greedy decoding at the same number of rows.

Greedy decodes R = prompts x beams rows; beam search decodes `prompts` examples with `beams`
beams each (also R rows). Both generate exactly --new-tokens tokens (end token disabled), after
a warm-up call that compiles; the figure is the median wall time of --reps calls.

    python benchmarks/bench_beam.py                                  # default model, CPU
    python benchmarks/bench_beam.py --prompt-tokens 2048             # a long prompt per example
    python benchmarks/bench_beam.py --model DIR --device cuda --compute-type bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import jaxgen
from jaxgen.tokenizer import load_tokenizer

TEXT = ("The history of science is the study of the development of science and scientific knowledge, "
        "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
        "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
        "explanation, and prediction of real-world phenomena. ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    model_dir = args.model or jaxgen.default_model_path()
    tokenizer = load_tokenizer(model_dir)
    generator = jaxgen.Generator(model_dir, device=args.device, compute_type=args.compute_type)
    body = tokenizer.encode(TEXT * (1 + args.prompt_tokens // 40))
    prompts = [[tokenizer.bos_token] + body[i:i + args.prompt_tokens - 1] for i in range(args.prompts)]
    rows = args.prompts * args.beams
    options = dict(max_length=args.new_tokens, min_length=args.new_tokens, end_token=[],
                   include_prompt_in_result=False)

    def timed(fn):
        fn()  # compile
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    greedy_prompts = [prompts[i % args.prompts] for i in range(rows)]
    greedy = timed(lambda: generator.generate_batch(greedy_prompts, **options))
    beam = timed(lambda: generator.generate_batch(prompts, beam_size=args.beams, **options))
    print(f"{generator.device} {args.compute_type}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    print(f"greedy {rows} rows:                  {greedy:.3f} s ({rows * args.new_tokens / greedy:.0f} tok/s)")
    print(f"beam {args.prompts} prompts x {args.beams} beams:        {beam:.3f} s "
          f"({rows * args.new_tokens / beam:.0f} row-tok/s)")
    print(f"beam / greedy cost: {beam / greedy:.2f}x")


if __name__ == "__main__":
    main()
