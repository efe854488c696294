"""score_batch, jaxgen against CTranslate2, alternating in one process (a quick check of the
scoring case of `make bench`): the same 16 x 128-token real-text batch, float32, medians.

    python benchmarks/bench_score.py            # prepares the models once, like bench_compare.py
    python benchmarks/bench_score.py --reps 9 --work-dir DIR
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench_common as bc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--work-dir", default=bc.DEFAULT_WORK_DIR)
    args = p.parse_args()
    art = bc.prepare_artefacts(args.work_dir, ["jaxgen", "ct2"], {})
    import ctranslate2

    import jaxgen

    score = art["prompts"]["score"]
    ours = jaxgen.Generator(art["jaxgen"], compute_type="float32")
    theirs = ctranslate2.Generator(art["ct2-float32"], device="cpu", compute_type="float32",
                                   intra_threads=bc.cpu_count())
    tokens = sum(len(x) - 1 for x in score)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    seconds(lambda: ours.score_batch(score))
    seconds(lambda: theirs.score_batch(score))
    times = {"jaxgen": [], "ct2": []}
    for _ in range(args.reps):
        times["jaxgen"].append(seconds(lambda: ours.score_batch(score)))
        time.sleep(0.5)
        times["ct2"].append(seconds(lambda: theirs.score_batch(score)))
        time.sleep(0.5)
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"score_batch {len(score)} sequences, {tokens} tokens, float32: jaxgen {rate['jaxgen']:.1f} tok/s, "
          f"CTranslate2 {rate['ct2']:.1f} tok/s, ratio {rate['jaxgen'] / rate['ct2']:.2f}x")
    for k, v in times.items():
        print(f"  {k} seconds: {' '.join(f'{x:.2f}' for x in v)}")


if __name__ == "__main__":
    main()
