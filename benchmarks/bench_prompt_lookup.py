"""Prompt-lookup speculative decoding against plain greedy search, batch 1.

Two tasks on the default model (Gemma 3 270M): a copy/edit task (restate a code snippet and a list
with a small change: most of the output is in the prompt) and free text (nothing to copy). Each
is generated with plain greedy search and with `prompt_lookup_tokens=K`; the outputs must be
identical (the script checks), and the figure is generated tokens / median wall time of --reps
calls, after a warm-up call of each that compiles.

    python benchmarks/bench_prompt_lookup.py                       # default model, CPU
    python benchmarks/bench_prompt_lookup.py --draft 4 --new-tokens 64 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jaxgen
from jaxgen.tokenizer import load_tokenizer

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

COPY_EDIT = ("Here is a Python function:\n\n```python\n" + CODE + "```\n\n"
             "Here is the same function, unchanged except that the variable `total` is renamed to "
             "`revenue`:\n\n```python\n")

LIST_EDIT = ("Shopping list:\n- 2 pounds of apples\n- 1 loaf of whole wheat bread\n- 12 eggs\n"
             "- 1 gallon of milk\n- 3 cans of tomato soup\n- 1 bag of rice\n- 2 onions\n- 1 jar of honey\n\n"
             "The same shopping list with 24 eggs instead of 12:\n- 2 pounds of apples\n")

FREE_TEXT = "The three most important inventions in history are"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--draft", type=int, default=8, help="prompt_lookup_tokens (K)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    model_dir = args.model or jaxgen.default_model_path()
    tokenizer = load_tokenizer(model_dir)
    generator = jaxgen.Generator(model_dir, device=args.device, compute_type=args.compute_type)
    options = dict(max_length=args.new_tokens, include_prompt_in_result=False)

    def timed(prompt, **kwargs):
        generator.generate_batch([prompt], **options, **kwargs)  # compile
        times, result = [], None
        for _ in range(args.reps):
            start = time.perf_counter()
            result = generator.generate_batch([prompt], **options, **kwargs)[0]
            times.append(time.perf_counter() - start)
        return statistics.median(times), result.sequences_ids[0]

    print(f"model {model_dir}, {args.device}, {generator.compute_type}, batch 1, K = {args.draft}, "
          f"up to {args.new_tokens} new tokens, median of {args.reps}")
    outputs = {}
    print("| task | prompt tokens | new tokens | greedy tok/s | prompt lookup tok/s | speed-up |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    for name, text in (("copy/edit: code", COPY_EDIT), ("copy/edit: list", LIST_EDIT), ("free text", FREE_TEXT)):
        prompt = [tokenizer.bos_token] + tokenizer.encode(text)
        plain_s, plain_ids = timed(prompt)
        fast_s, fast_ids = timed(prompt, prompt_lookup_tokens=args.draft)
        if fast_ids != plain_ids:
            raise SystemExit(f"{name}: prompt-lookup output differs from greedy's:\n{plain_ids}\n{fast_ids}")
        n = len(plain_ids)
        outputs[name] = plain_ids
        print(f"| {name} | {len(prompt)} | {n} | {n / plain_s:.1f} | {n / fast_s:.1f} | {plain_s / fast_s:.2f}x |",
              flush=True)
    for name, ids in outputs.items():
        print(f"\n{name} continuation (first 300 characters):\n{tokenizer.decode(ids)[:300]}")


if __name__ == "__main__":
    main()
