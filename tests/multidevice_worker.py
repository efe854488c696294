"""Subprocess worker for tests/test_multi_device.py.

Several devices must be configured before JAX starts, so these runs happen in fresh processes:
  build DIR                         writes a random tiny model (4 query / 4 key-value heads)
  compare DIR N                     N simulated CPU devices: replicas and tensor parallelism vs one device
  host DIR PROCESS_ID N_PROC PORT   one process of a jax.distributed run (one CPU device each)
Each prints one JSON line prefixed with RESULT.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = [["<s>", "t5", "t9", "t33", "t4", "t7"], ["<s>", "t8", "t100"], ["<s>", "t8"], ["<s>", "t4", "t5", "t6"]]
STATIC = ["<s>", "t11", "t12", "t13"]
VOCAB = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, 128)]


def build(directory: str) -> None:
    import numpy as np

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    config = ModelConfig(
        architecture="gemma3", vocab_size=len(VOCAB), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=16, intermediate_size=128, norm_offset=1.0, post_attention_norm=True, post_mlp_norm=True,
        qk_norm=True, activation="gelu_tanh", layer_types=("sliding", "full"), sliding_window=4,
        embedding_scale=8.0, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    rng = np.random.default_rng(1)
    flat = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_flat_shapes(config).items()}
    save_model_dir(directory, config, flat, VOCAB)


def outputs(generator) -> dict:
    results = {}
    for name, kwargs in {
        "greedy": dict(max_length=10, return_scores=True),
        "static": dict(max_length=8, static_prompt=STATIC, include_prompt_in_result=False, return_scores=True),
        "beam": dict(beam_size=2, max_length=6, return_scores=True),
        "split": dict(max_length=6, max_batch_size=1, return_scores=True),
    }.items():
        out = generator.generate_batch(PROMPTS, **kwargs)
        results[name] = [[r.sequences_ids, r.scores] for r in out]
    results["score"] = [r.log_probs for r in generator.score_batch(PROMPTS)]
    return results


def compare(directory: str, n: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import jaxgen

    report = {"single": outputs(jaxgen.Generator(directory))}
    replicas = jaxgen.Generator(directory, device_index=list(range(n)))
    report["replicas"] = outputs(replicas)
    report["num_replicas"] = replicas.num_replicas
    report["tensor_parallel"] = outputs(jaxgen.Generator(directory, device_index=list(range(n)),
                                                         tensor_parallel=True))
    print("RESULT " + json.dumps(report), flush=True)


def host(directory: str, process_id: int, num_processes: int, port: int) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    import jaxgen

    generator = jaxgen.Generator(directory, device_index=list(range(len(jax.devices()))), tensor_parallel=True)
    print("RESULT " + json.dumps({"devices": len(jax.devices()), "outputs": outputs(generator)}), flush=True)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "build":
        build(args[0])
    elif command == "compare":
        compare(args[0], int(args[1]))
    elif command == "host":
        host(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif command == "single":
        import jaxgen

        print("RESULT " + json.dumps(outputs(jaxgen.Generator(args[0]))), flush=True)
