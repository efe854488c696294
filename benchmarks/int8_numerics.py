"""How far int8 moves the default model's outputs from float32: jaxgen int8 against jaxgen float32,
next to CTranslate2 int8 against CTranslate2 float32, on the same text.

- log-probs: every paragraph of the benchmark text (BOS + up to 200 tokens), scored one sequence
  per call (CTranslate2 4.8.5 rejects this mixed-length batch for Gemma 3); max / mean / p99 of
  |delta log-prob| over all scored tokens.
- greedy: the first words of each paragraph, 128 new tokens forced with min_length; how many
  tokens each prompt's int8 output keeps before it first differs from float32's.

Each engine and type runs in its own process (like bench_compare.py), on the same conversions:

    python benchmarks/int8_numerics.py                  # about 2 minutes on 2 cores
    python benchmarks/int8_numerics.py --output numerics.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

RUNS = ("jaxgen-float32", "jaxgen-int8", "ct2-float32", "ct2-int8")
PAIRS = (("jaxgen-int8", "jaxgen-float32"), ("ct2-int8", "ct2-float32"), ("jaxgen-int8", "ct2-int8"),
         ("ct2-float32", "jaxgen-float32"))


def corpus(jaxgen_dir: str, prompts: int, prompt_tokens: int):
    from jaxgen.tokenizer import load_tokenizer

    tok = load_tokenizer(jaxgen_dir)
    paragraphs = [p for p in bc.TEXT.split("\n\n") if p.strip()]
    scored = [[tok.bos_token] + tok.encode(p)[:200] for p in paragraphs]
    starts = [[tok.bos_token] + tok.encode(p)[:prompt_tokens] for p in paragraphs[:prompts]]
    return scored, starts


def run_one(which: str, paths: dict, args, out: str) -> None:
    """In a child process: scores and greedy outputs of one engine and type, as JSON."""
    scored, starts = corpus(paths["jaxgen"], args.prompts, args.prompt_tokens)
    engine, compute_type = which.split("-")
    if engine == "jaxgen":
        import jaxgen

        gen = jaxgen.Generator(paths["jaxgen"], compute_type=compute_type)
    else:
        import ctranslate2

        gen = ctranslate2.Generator(paths[f"ct2-{compute_type}"], device="cpu", compute_type=compute_type,
                                    intra_threads=bc.cpu_count())
    log_probs = [list(map(float, gen.score_batch([s])[0].log_probs)) for s in scored]
    results = gen.generate_batch(starts, max_length=args.new_tokens, min_length=args.new_tokens,
                                 include_prompt_in_result=False)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"log_probs": log_probs, "greedy": [r.sequences_ids[0] for r in results]}, f)


def compare(a: dict, b: dict, new_tokens: int) -> List[str]:
    d = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)) for x, y in zip(a["log_probs"], b["log_probs"])])
    kept = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            for x, y in zip(a["greedy"], b["greedy"])]
    return [f"{d.max():.3f}", f"{d.mean():.4f}", f"{np.percentile(d, 99):.3f}",
            f"{sum(kept)} / {len(kept) * new_tokens}", " ".join(map(str, kept))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=bc.DEFAULT_WORK_DIR, help="the conversions bench_compare.py uses")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--output", default=None, help="also write the report (markdown) here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-paths", default=None, help=argparse.SUPPRESS)  # the parent's artefacts, JSON
    args = p.parse_args()

    if args.child:
        run_one(args.child, json.loads(args.child_paths), args, args.child_out)
        return
    paths = bc.prepare_artefacts(args.work_dir, ["jaxgen", "ct2"], {})
    paths.pop("prompts")

    lines = bc.header_lines("int8 against float32 on the default model", bc.cpu_count(), "cpu")
    header_len = len(lines)
    print("\n".join(lines), flush=True)
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in RUNS:
            out = os.path.join(tmp, f"{which}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--child-out", out,
                   "--child-paths", json.dumps(paths), "--prompts", str(args.prompts),
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            subprocess.run(cmd, check=True, env={**os.environ, **bc.thread_env(bc.cpu_count())})
            with open(out, encoding="utf-8") as f:
                results[which] = json.load(f)

    scored, starts = corpus(paths["jaxgen"], args.prompts, args.prompt_tokens)
    lines += ["", f"{len(scored)} scored sequences ({sum(len(s) - 1 for s in scored)} tokens); greedy: "
                  f"{len(starts)} prompts x {args.new_tokens} new tokens.", ""]
    rows = [[f"{a} vs {b}"] + compare(results[a], results[b], args.new_tokens) for a, b in PAIRS]
    lines += bc.markdown_table(["pair", "max abs d log-prob", "mean", "p99", "greedy tokens kept before the first "
                                "difference", "per prompt"], rows, align="lrrrrr")
    bc.emit_report(lines, header_len, args.output, print)


if __name__ == "__main__":
    main()
