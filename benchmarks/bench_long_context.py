"""Long inputs on the default model (CPU by default): peak memory and time of
- score_batch over one sequence of --score-tokens tokens (default 32,768), checked against scoring a
  short prefix of it (the long score's first log-probs must agree), and
- generate_batch from one prompt of --prompt-tokens tokens (default 16,384), --new-tokens new tokens.

Each workload runs in its own process, so that its peak resident memory (ru_maxrss) is its own.
The text is real: the repository's own README and sources, tokenized and repeated to the length.

    python benchmarks/bench_long_context.py                       # both workloads, default sizes
    python benchmarks/bench_long_context.py --score-tokens 4096 --prompt-tokens 2048   # quicker
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_long_context.py ...       # another jaxgen
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def corpus_tokens(tokenizer, n: int) -> list:
    """n token strings of real text (this repository's README and Python sources), repeated."""
    files = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "jaxgen", "**", "*.py"),
                                                                 recursive=True))
    text = "\n".join(open(f, encoding="utf-8").read() for f in files)
    pieces = tokenizer.encode(text)
    out = [tokenizer.bos_token] if tokenizer.bos_token else []
    while len(out) < n:
        out.extend(pieces)
    return out[:n]


def child(args) -> None:
    import numpy as np

    import jaxgen
    from jaxgen.tokenizer import load_tokenizer

    model_dir = args.model or jaxgen.default_model_path()
    tokenizer = load_tokenizer(model_dir)
    kwargs = {"attention": args.attention} if args.attention else {}
    generator = jaxgen.Generator(model_dir, device=args.device, compute_type=args.compute_type, **kwargs)
    result = {"workload": args.workload}
    if args.workload == "score":
        tokens = corpus_tokens(tokenizer, args.score_tokens)
        start = time.perf_counter()
        long = generator.score_batch([tokens], max_input_length=0)[0].log_probs
        result["seconds"] = time.perf_counter() - start
        prefix = generator.score_batch([tokens[:args.prefix_tokens]], max_input_length=0)[0].log_probs
        result["tokens"] = len(tokens)
        result["prefix_max_abs_diff"] = float(np.max(np.abs(np.asarray(long[:len(prefix)]) - np.asarray(prefix))))
        result["mean_log_prob"] = float(np.mean(long))
    else:
        tokens = corpus_tokens(tokenizer, args.prompt_tokens)
        start = time.perf_counter()
        out = generator.generate_batch([tokens], max_length=args.new_tokens, include_prompt_in_result=False,
                                       end_token=[])[0]
        result["seconds"] = time.perf_counter() - start
        result["tokens"] = len(tokens)
        result["new_tokens"] = len(out.sequences_ids[0])
        result["text"] = tokenizer.decode(out.sequences_ids[0])
    print("RESULT " + json.dumps(result), flush=True)


def run_child(argv) -> dict:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"] + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    result = {"peak_rss_gib": usage.ru_maxrss / 2**20, "exit_status": status}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
    if "seconds" not in result:
        result["error"] = (err.strip().splitlines() or ["(no output)"])[-1][:300]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=["score", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--workloads", default="score,generate")
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--attention", default=None, help="Generator(attention=...) when this jaxgen has it")
    p.add_argument("--score-tokens", type=int, default=32768)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    common = ["--device", args.device, "--compute-type", args.compute_type, "--score-tokens", str(args.score_tokens),
              "--prefix-tokens", str(args.prefix_tokens), "--prompt-tokens", str(args.prompt_tokens),
              "--new-tokens", str(args.new_tokens)]
    if args.model:
        common += ["--model", args.model]
    if args.attention:
        common += ["--attention", args.attention]
    results = []
    for workload in args.workloads.split(","):
        r = run_child(common + ["--workload", workload])
        results.append(r)
        size = r.get("tokens", args.score_tokens if workload == "score" else args.prompt_tokens)
        line = f"{workload:8s} {size:6d} tokens  peak RSS {r['peak_rss_gib']:.2f} GiB"
        if "error" in r:
            line += f"  FAILED: {r['error']}"
        else:
            line += f"  {r['seconds']:.1f} s ({size / r['seconds']:.0f} tok/s, compilation included)"
            if "prefix_max_abs_diff" in r:
                line += f"  |long - prefix({args.prefix_tokens})| max {r['prefix_max_abs_diff']:.2e}"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
