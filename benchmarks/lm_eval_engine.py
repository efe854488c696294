"""One lm-eval backend in its own process, for the `lm_eval_prefix` workload (benchmarks/workloads.py).

    python benchmarks/lm_eval_engine.py SPEC.json OUT.json

SPEC: {"engine": "jaxgen" | "hf", "model": DIR, "prefix_cache": bool (jaxgen), "batch": N,
"task": NAME, "include_path": DIR, "warmup": items}. The model is loaded, `warmup` items are
evaluated untimed (jaxgen compiles its programs there; its prefix cache is emptied afterwards, so
the timed run starts cold), then the whole task is evaluated with `lm_eval.simple_evaluate`, timed
(wall seconds, and the process's CPU seconds over all its threads, which a shared machine's load
disturbs less). OUT: seconds, cpu_seconds, the metrics, every sample's per-choice log-likelihoods, peak RSS, and jaxgen's
prefix-cache counters.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    manager = TaskManager(include_path=spec["include_path"], include_defaults=False)
    started = time.perf_counter()
    if spec["engine"] == "jaxgen":
        from jaxgen.lm_eval import JaxgenLM

        lm = JaxgenLM(model=spec["model"], max_batch_size=spec["batch"], prefix_cache=spec["prefix_cache"])
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=spec["model"], dtype="float32", batch_size=spec["batch"], device="cpu")
    load_seconds = time.perf_counter() - started

    def evaluate(limit=None):
        return lm_eval.simple_evaluate(model=lm, tasks=[spec["task"]], task_manager=manager, limit=limit,
                                       log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                       fewshot_random_seed=0, verbosity="ERROR")

    if spec.get("warmup"):
        evaluate(spec["warmup"])
    generator = getattr(lm, "generator", None)
    if generator is not None:
        generator.prefix_cache.clear()
        stats_before = dict(generator.prefix_cache.stats)
    start, cpu = time.perf_counter(), time.process_time()
    result = evaluate()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    task = spec["task"]
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    out = {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "load_seconds": load_seconds,
        "metrics": {k: v for k, v in result["results"][task].items() if isinstance(v, (int, float))},
        "samples": [{"doc_id": s["doc_id"], "target": s["target"],
                     "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
                     "arguments": [list(a) for a in s["arguments"]]} for s in samples],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if generator is not None:
        stats = generator.prefix_cache.stats
        out["prefix_cache"] = {k: stats[k] - stats_before.get(k, 0) for k in stats}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
