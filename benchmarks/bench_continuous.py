"""Continuous batching (the slot scheduler) against static sub-batches of the same width, on the
default model (Gemma 3 270M, float32, CPU unless --device says otherwise).

256 prompts of real English text (prose sentences of Python's own documentation, cut in the
middle), greedy with end tokens "<eos>", "\\n" and "." and max_length 256, so output lengths
spread widely; then the same with sampling (top-k 40, seed 0). Each width runs both paths on
the same prompts, after a warm-up; prompts/s and generated tokens/s are reported, with the
output-length distribution, the scheduler's slot utilisation, and whether both paths gave the
same outputs (they should: per-prompt sampling keys make even sampling identical).

    python benchmarks/bench_continuous.py                       # 256 prompts, widths 16 and 64
    python benchmarks/bench_continuous.py --prompts 64 --widths 16 --modes greedy --output report.md
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Dict, List, Sequence

import _bench_common as bc

END_TOKENS = ["<eos>", "\n", "."]


def prose_prompts(n: int) -> List[str]:
    """n prompts: the first half (at least 5 words) of prose sentences of Python's documentation
    topics (pydoc_data), spread evenly over all of them; deterministic for a Python version."""
    from pydoc_data.topics import topics

    sentences: List[str] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.split("\n")
            if any(line.startswith((" ", "\t", ">>>", "*", "-", "=")) for line in lines):
                continue  # code, lists, tables, titles
            text = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                words = sentence.split()
                if 10 <= len(words) <= 40 and sentence.isascii() and "::" not in sentence and "`" not in sentence:
                    sentences.append(sentence)
    if len(sentences) < n:
        raise SystemExit(f"only {len(sentences)} prose sentences found, {n} asked for")
    stride = len(sentences) / n
    picked = [sentences[int(i * stride)] for i in range(n)]
    return [" ".join(s.split()[:max(5, len(s.split()) // 2)]) for s in picked]


def distribution(lengths: Sequence[int]) -> str:
    q = statistics.quantiles(lengths, n=4)
    return (f"min {min(lengths)}, p25 {q[0]:.0f}, median {statistics.median(lengths):.0f}, p75 {q[2]:.0f}, "
            f"max {max(lengths)}, mean {statistics.mean(lengths):.1f}; "
            f"{sum(n >= max(lengths) for n in lengths)} prompts hit the limit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--widths", default="16,64", help="batch widths (max_batch_size) to compare")
    p.add_argument("--modes", default="greedy,sampling")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--output", default=None, help="also write the report (markdown) here")
    args = p.parse_args()

    import jaxgen
    from jaxgen.default_model import default_model_path
    from jaxgen.tokenizer import load_tokenizer

    header = bc.header_lines("Continuous batching vs static sub-batches", bc.cpu_count(), args.device)
    print("\n".join(header), flush=True)
    model = args.model or default_model_path()
    tok = load_tokenizer(model)
    texts = prose_prompts(args.prompts)
    prompts = [[tok.bos_token] + tok.encode(t) for t in texts]
    engines = {name: jaxgen.Generator(model, device=args.device, compute_type=args.compute_type,
                                      continuous_batching=(name == "scheduler")) for name in ("static", "scheduler")}
    modes = {"greedy": dict(), "sampling": dict(sampling_topk=40, random_seed=0)}
    lines = list(header) + ["", f"- prompts: {len(prompts)} (prompt tokens: {distribution([len(x) for x in prompts])})",
                            f"- options: end_token={END_TOKENS!r}, max_length={args.max_length}, "
                            "include_prompt_in_result=False, return_end_token=True", ""]
    rows = []
    for mode in args.modes.split(","):
        for width in [int(w) for w in args.widths.split(",")]:
            kwargs = dict(modes[mode], max_batch_size=width, end_token=END_TOKENS, max_length=args.max_length,
                          include_prompt_in_result=False, return_end_token=True)
            warm = prompts[:width]
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.generate_batch(warm, **kwargs)
                print(f"warm-up {mode} width {width} {name}: {time.perf_counter() - start:.1f} s", flush=True)
            results: Dict[str, list] = {}
            seconds: Dict[str, float] = {}
            for name, engine in engines.items():
                stats = engine.scheduler_stats
                start = time.perf_counter()
                results[name] = engine.generate_batch(prompts, **kwargs)
                seconds[name] = time.perf_counter() - start
                after = engine.scheduler_stats
                tokens = sum(len(r.sequences_ids[0]) for r in results[name])
                util = ""
                if name == "scheduler":
                    util = f"{(after['tokens'] - stats['tokens']) / max(after['slot_steps'] - stats['slot_steps'], 1):.0%}"
                print(f"{mode} width {width} {name}: {seconds[name]:.1f} s, {len(prompts) / seconds[name]:.2f} prompts/s, "
                      f"{tokens / seconds[name]:.1f} tok/s {util}", flush=True)
                results[name + "_util"] = util
            lengths = [len(r.sequences_ids[0]) for r in results["scheduler"]]
            same = sum(a.sequences_ids == b.sequences_ids for a, b in zip(results["static"], results["scheduler"]))
            rate = {k: len(prompts) / v for k, v in seconds.items()}
            tokens = sum(lengths)
            rows.append([mode, str(width), f"{rate['static']:.2f}", f"{rate['scheduler']:.2f}",
                         f"{rate['scheduler'] / rate['static']:.2f}x", f"{tokens / seconds['static']:.1f}",
                         f"{tokens / seconds['scheduler']:.1f}", results["scheduler_util"],
                         f"{same}/{len(prompts)}"])
            lines.append(f"- {mode}, width {width}: output tokens {distribution(lengths)}")
    lines += [""] + bc.markdown_table(
        ["mode", "width", "static prompts/s", "scheduler prompts/s", "scheduler / static", "static tok/s",
         "scheduler tok/s", "slot use", "same outputs"], rows, align="llrrrrrrr")
    bc.emit_report(lines, len(header), args.output, print)


if __name__ == "__main__":
    main()
