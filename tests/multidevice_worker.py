"""Subprocess worker for tests/test_multi_device.py.

Several devices must be configured before JAX starts, so these runs happen in fresh processes:
  build DIR                         writes a random tiny model (4 query / 4 key-value heads)
  compare DIR N                     N simulated CPU devices: replicas and tensor parallelism vs one device
  host DIR PROCESS_ID N_PROC PORT   one process of a jax.distributed run (one CPU device each)
  tp_models DIR N CALLS NAME...     builds the tiny models NAME (see `tp_model_config`) under DIR and
                                    compares tensor parallelism over 2..N devices with one device
                                    (CALLS: "score", or "generate" for greedy/static-prompt outputs too)
  tp_default N                      the same for the default model (its directory from jaxgen)
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
    from jaxgen.model.config import ModelConfig

    config = ModelConfig(
        architecture="gemma3", vocab_size=len(VOCAB), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=16, intermediate_size=128, norm_offset=1.0, norm_placement="sandwich",
        qk_norm="head", activation="gelu_tanh", layer_types=("sliding", "full"), sliding_window=4,
        embedding_scale=8.0, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    save_random_model(directory, config)


def save_random_model(directory: str, config, seed: int = 1) -> None:
    """Writes a model directory with random weights for `config` and the worker's vocabulary."""
    import numpy as np

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir

    rng = np.random.default_rng(seed)
    flat = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_flat_shapes(config).items()}
    save_model_dir(directory, config, flat, VOCAB)


# Each architecture's specifics (as its converter sets them), on 4 query heads of 16 dims; the MLP
# width 90 divides by 2 but not by 4 (padded under tensor parallelism).
ARCHITECTURES = {
    "gpt2": dict(norm_type="layer", norm_eps=1e-5, activation="gelu_tanh", mlp="plain", attention_bias=True,
                 attention_out_bias=True, mlp_bias=True, position_embedding="learned", max_position_embeddings=64),
    "llama": dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral": dict(layer_types=("sliding", "sliding"), sliding_window=4, tie_word_embeddings=False),
    "qwen2": dict(layer_types=("full", "sliding"), sliding_window=4, attention_bias=True),
    "qwen3": dict(qk_norm="head", tie_word_embeddings=False),
    "gemma": dict(norm_offset=1.0, activation="gelu_tanh", embedding_scale=8.0),
    "gemma2": dict(layer_types=("sliding", "full"), sliding_window=4, attention_scale=24 ** -0.5,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, norm_placement="sandwich",
                   norm_offset=1.0, activation="gelu_tanh", embedding_scale=8.0),
    "gemma3": dict(layer_types=("sliding", "full"), sliding_window=4,
                   qk_norm="head", norm_placement="sandwich", norm_offset=1.0,
                   activation="gelu_tanh", embedding_scale=8.0, rope_theta=1e6, rope_local_theta=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_scale=20 ** -0.5),
    "phi3": dict(rotary_dim=8, tie_word_embeddings=False, max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [2.0, 3.0, 4.0, 5.0],
        "original_max_position_embeddings": 16}),
    # issue 17's block and position choices: parallel residual blocks with two norms (GPT-NeoX) or one
    # shared norm and a head bias (GPT-J), ALiBi with an embedding norm (BLOOM), experts with a shared
    # expert and a dense layer (Qwen2-MoE)
    "gpt_neox": dict(norm_type="layer", activation="gelu", mlp="plain", block="parallel", attention_bias=True,
                     attention_out_bias=True, mlp_bias=True, rotary_dim=4, tie_word_embeddings=False),
    "gptj": dict(norm_type="layer", activation="gelu_tanh", mlp="plain", block="parallel", shared_block_norm=True,
                 mlp_bias=True, rotary_dim=8, tie_word_embeddings=False, lm_head_bias=True),
    "bloom": dict(position_embedding="alibi", alibi_slopes=(0.25, 0.0625, 0.015625, 0.00390625), embedding_norm=True,
                  norm_type="layer", activation="gelu_tanh", mlp="plain", attention_bias=True, mlp_bias=True),
    "moe": dict(mlp="experts", num_experts=4, experts_per_token=2, expert_intermediate_size=90,
                shared_expert_intermediate_size=90, dense_layers=(0,), normalize_expert_weights=False),
    # Gemma 4: full layers with their own head dim (32) and one KV head, shared-KV layers with wider
    # MLPs, value norms, per-layer inputs, layer scales, proportional rotary embeddings; the last
    # two layers' MLPs: a gated MLP beside routed experts with a scaled router
    "gemma4": dict(num_layers=4, layer_types=("sliding", "full", "sliding", "full"), sliding_window=4,
                   full_head_dim=32, full_kv_heads=1, kv_sources=(0, 1, 0, 1), intermediate_sizes=(90, 90, 180, 180),
                   qk_norm="head", value_norm=True, norm_placement="sandwich", attention_scale=1.0,
                   per_layer_input_size=8, layer_scale=True, activation="gelu_tanh", embedding_scale=8.0,
                   rope_theta=1e6, rope_local_theta=1e4, final_logit_softcapping=5.0, rope_scaling={
                       "rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 1.0},
                   mlp="gated_and_experts", router="scaled", num_experts=4, experts_per_token=2,
                   expert_intermediate_size=90, dense_layers=(0, 1)),
}


def tp_model_config(name: str):
    """"ARCH-kvK" -> the tiny ModelConfig of ARCH with K key/value heads (4 query heads), or
    "ARCH-qQ-kvK" with Q query heads (head_dim 16)."""
    from jaxgen.model.config import ModelConfig

    arch, *sizes = name.split("-")
    heads = dict((s[:2], int(s[2:])) if s.startswith("kv") else ("q", int(s[1:])) for s in sizes)
    hq = heads.get("q", 4)
    fields = dict(architecture=arch, vocab_size=len(VOCAB), hidden_size=64, num_layers=2, num_heads=hq,
                  num_kv_heads=heads["kv"], head_dim=16, intermediate_size=90, bos_token="<s>",
                  eos_token="</s>", unk_token="<unk>")
    fields.update(ARCHITECTURES[arch])
    return ModelConfig(**fields)


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


def tensor_parallel_outputs(directory: str, counts, generate: bool = True) -> dict:
    """{"single": outputs on one device, "tp2": ..., ...}: scores, and with `generate` greedy
    outputs with and without a static prompt, tensor parallelism over each device count in
    `counts`."""
    import jaxgen

    def run(generator) -> dict:
        out = {"score": [r.log_probs for r in generator.score_batch(PROMPTS)]}
        calls = {"greedy": dict(max_length=8, return_scores=True),
                 "static": dict(max_length=6, static_prompt=STATIC, include_prompt_in_result=False,
                                return_scores=True)} if generate else {}
        for name, kwargs in calls.items():
            out[name] = [[r.sequences_ids, r.scores] for r in generator.generate_batch(PROMPTS, **kwargs)]
        return out

    report = {"single": run(jaxgen.Generator(directory))}
    for n in counts:
        generator = jaxgen.Generator(directory, device_index=list(range(n)), tensor_parallel=True)
        report[f"tp{n}"] = run(generator)
        report[f"tp{n}_kv_head_copies"] = generator.config.kv_head_copies
    return report


def tp_models(root: str, n: int, names, generate: bool) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import time

    report = {}
    for name in names:
        t = time.perf_counter()
        directory = os.path.join(root, name)
        if not os.path.isdir(directory):
            save_random_model(directory, tp_model_config(name))
        counts = [c for c in (2, 4, 8) if c <= n and tp_model_config(name).num_heads % c == 0]
        report[name] = tensor_parallel_outputs(directory, counts, generate)
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(report), flush=True)


def tp_default(n: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    from jaxgen.default_model import default_model_path

    print("RESULT " + json.dumps(tensor_parallel_outputs(default_model_path(), [n])), flush=True)


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
    elif command == "tp_models":
        tp_models(args[0], int(args[1]), args[3:], args[2] == "generate")
    elif command == "tp_default":
        tp_default(int(args[0]))
    elif command == "single":
        import jaxgen

        print("RESULT " + json.dumps(outputs(jaxgen.Generator(args[0]))), flush=True)
