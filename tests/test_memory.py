"""Memory estimates (jaxgen.runtime.memory) and the check that Generator runs before any work starts."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from jaxgen.model.config import ModelConfig
from jaxgen.runtime import memory

PROMPT = ["<bos>", "\u2581the"]


def _config(**changes) -> ModelConfig:
    base = dict(architecture="test", vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=8, intermediate_size=64, layer_types=("sliding", "full", "sliding"), sliding_window=16)
    base.update(changes)
    return ModelConfig(**base)


# ============================================================================ formulas, by hand
def test_cache_bytes_by_hand():
    cfg = _config()
    slot = 2 * 2 * 8 * 4  # K and V x 2 kv heads x head_dim 8 x float32
    assert slot == 128
    assert memory.kv_cache_bytes_per_token(cfg, jnp.float32) == 1 * slot  # one full layer
    assert memory.kv_cache_bytes_per_token(cfg, jnp.bfloat16) == slot // 2
    assert memory.kv_cache_bytes_per_token(cfg, "float16") == slot // 2
    assert memory.sliding_cache_bytes_per_sequence(cfg, jnp.float32) == 2 * 16 * slot  # 2 layers x 16-slot ring
    # shorter than the window: the rings hold only the sequence
    assert memory.kv_cache_bytes(cfg, jnp.float32, 3, 10) == 3 * (10 * slot + 2 * 10 * slot)
    # longer: full layers grow, rings stop at the window
    assert memory.kv_cache_bytes(cfg, jnp.float32, 3, 100) == 3 * (100 * slot + 2 * 16 * slot)
    assert memory.kv_cache_bytes(cfg, jnp.float32, 0, 100) == 0


def test_cache_bytes_all_full_layers():
    cfg = _config(layer_types=(), sliding_window=None)  # empty layer_types: every layer is full
    assert memory.kv_cache_bytes_per_token(cfg, jnp.float32) == 3 * 128
    assert memory.sliding_cache_bytes_per_sequence(cfg, jnp.float32) == 0
    assert memory.kv_cache_bytes(cfg, jnp.float32, 2, 50) == 2 * 50 * 3 * 128


def test_job_estimate_by_hand():
    cfg = _config()
    cache = 2 * (2048 * 128 + 2 * 16 * 128)
    hidden = 2 * 8 * (32 * 4 + 64 * 3) * 4
    scores = 2 * 4 * 8 * 1024 * 4  # keys bounded by 1024
    logits = 2 * 100 * 4 * 3
    state = 2 * 2048 * 4 * 2
    kwargs = dict(batch=2, cache_length=2048, chunk_tokens=8, vocab_rows=2)
    assert memory.estimate_job_bytes(cfg, jnp.float32, decode=True, **kwargs) == cache + hidden + scores + logits + state
    assert memory.estimate_job_bytes(cfg, jnp.float32, decode=False, **kwargs) == cache + hidden + scores + logits
    estimate = memory.estimate_job(cfg, jnp.float32, decode=False, stored_logits_rows=10, **kwargs)
    assert estimate.logits == logits + 10 * 100 * 4
    assert estimate.describe().startswith("KV cache 520.0 KiB for 2 rows x 2,048 slots, activations ")


def test_no_false_positive_for_a_normal_request_on_gemma3_270m_shapes():
    # Gemma 3 270M's shapes: one request of 20 prompt tokens and the default max_length (512)
    cfg = ModelConfig(architecture="gemma3", vocab_size=262144, hidden_size=640, num_layers=18, num_heads=4,
                      num_kv_heads=1, head_dim=256, intermediate_size=2048,
                      layer_types=(("sliding",) * 5 + ("full",)) * 3, sliding_window=512)
    assert memory.kv_cache_bytes_per_token(cfg, jnp.float32) == 3 * 2 * 256 * 4
    assert memory.sliding_cache_bytes_per_sequence(cfg, jnp.float32) == 15 * 2 * 512 * 256 * 4
    need = memory.estimate_job_bytes(cfg, jnp.float32, batch=1, cache_length=20 + 512, chunk_tokens=20,
                                     vocab_rows=1)
    assert need < 64 * 2**20


def test_format_and_check_fits():
    assert memory.format_bytes(12) == "12 B"
    assert memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(int(12.3 * 2**30)) == "12.3 GiB"
    memory.check_fits(10, None, "x", "y")  # unknown: no check
    memory.check_fits(10, 10, "x", "y")
    with pytest.raises(ValueError) as err:
        memory.check_fits(int(12.3 * 2**30), 4 * 2**30, "generate_batch", "lower max_length",
                          detail="KV cache 10.0 GiB for 8 rows x 17,408 slots, activations 2.3 GiB", where="cpu:0")
    assert str(err.value) == ("generate_batch needs about 12.3 GiB (KV cache 10.0 GiB for 8 rows x 17,408 slots, "
                              "activations 2.3 GiB) but cpu:0 has 4.0 GiB available; lower max_length")


def test_available_bytes(tmp_path):
    import jax

    cpu = memory.available_device_bytes(jax.devices("cpu")[0])
    assert cpu is None or (isinstance(cpu, int) and cpu > 0)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    4000000 kB\n")
    assert memory.host_available_bytes(str(meminfo)) == 4000000 * 1024
    assert memory.host_available_bytes(str(tmp_path / "missing")) is None

    class Accelerator:
        platform, id = "gpu", 0

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    assert memory.available_device_bytes(Accelerator({"bytes_limit": 1000, "bytes_in_use": 300})) == 700
    assert memory.available_device_bytes(Accelerator(None)) is None
    assert memory.available_device_bytes(Accelerator(RuntimeError("no stats"))) is None


def test_check_jobs_fit_uses_the_least_free_device_and_concurrency():
    cfg = _config()

    class Device:
        platform = "gpu"

        def __init__(self, id, free):
            self.id, self.free = id, free

        def memory_stats(self):
            return {"bytes_limit": self.free, "bytes_in_use": 0}

    job = memory.MemoryJob(batch=1, cache_length=100, chunk_tokens=10, vocab_rows=1)
    need = memory.estimate_job_bytes(cfg, jnp.float32, batch=1, cache_length=100, chunk_tokens=10, vocab_rows=1)
    assert job.estimate(cfg, jnp.float32).total == need
    memory.check_jobs_fit(cfg, jnp.float32, [Device(0, need)], [job], what="w", advice="a")
    with pytest.raises(ValueError, match=r"gpu:1 has"):
        memory.check_jobs_fit(cfg, jnp.float32, [Device(0, 10 * need), Device(1, need - 1)], [job],
                              what="w", advice="a")
    with pytest.raises(ValueError, match="2 sub-batches at once"):
        memory.check_jobs_fit(cfg, jnp.float32, [Device(0, need)], [job, job], what="w", advice="a", concurrent=2)
    memory.check_jobs_fit(cfg, jnp.float32, [Device(0, need)], [job, job], what="w", advice="a", concurrent=1)
    memory.check_jobs_fit(cfg, jnp.float32, [Device(0, 1)], [job], what="w", advice="a", memory_limit=need)


# ============================================================================ Generator
@pytest.fixture(scope="module")
def limited(cli_tiny_model):
    import jaxgen

    # 1 MiB per device; the context check (512 positions) is lifted so that the memory check is what fails
    return jaxgen.Generator(cli_tiny_model, memory_limit=1 << 20, context_length=1 << 20)


def test_memory_limit_validation(cli_tiny_model):
    import jaxgen

    for bad in ("1GB", 1.5, True):
        with pytest.raises(TypeError, match="memory_limit"):
            jaxgen.Generator(cli_tiny_model, memory_limit=bad)
    with pytest.raises(ValueError, match="memory_limit"):
        jaxgen.Generator(cli_tiny_model, memory_limit=-1)


def test_too_big_generate_fails_before_running_then_generator_still_works(limited):
    steps = []
    with pytest.raises(ValueError) as err:
        limited.generate_batch([PROMPT] * 64, max_length=4000, callback=steps.append, asynchronous=True)
    message = str(err.value)
    assert re.match(r"generate_batch needs about [\d.]+ MiB \(KV cache [\d.]+ MiB for 64 rows x 4,002 slots, "
                    r"activations .*\) but cpu:0 \(memory_limit\) has 1\.0 MiB available; ", message), message
    assert "max_batch_size" in message and "max_length" in message and "prompt length" in message
    assert not steps and limited.num_active_batches == 0
    with pytest.raises(ValueError, match="beam_size"):
        limited.generate_batch([PROMPT] * 8, max_length=2000, beam_size=4)
    with pytest.raises(ValueError, match="max_length"):
        limited.generate_tokens(PROMPT * 10, max_length=100000)
    # the same Generator, a small request
    result = limited.generate_batch([PROMPT], max_length=6, include_prompt_in_result=False)
    assert len(result[0].sequences[0]) == 6
    # a large request split into small sub-batches fits
    results = limited.generate_batch([PROMPT] * 64, max_length=4, max_batch_size=8, include_prompt_in_result=False)
    assert len(results) == 64


def test_too_big_score_and_forward(limited):
    with pytest.raises(ValueError, match=r"score_batch needs about .*max_batch_size.*max_input_length"):
        limited.score_batch([PROMPT * 500] * 64)
    with pytest.raises(ValueError, match=r"forward_batch needs about .* for 16 rows x 1,000 slots"):
        limited.forward_batch([PROMPT * 500] * 16)
    assert len(limited.score_batch([PROMPT * 2])[0].log_probs) == 3
    assert limited.forward_batch([PROMPT]).shape == (1, 2, 100)


def test_default_generator_accepts_normal_requests(cli_tiny_model):
    import jaxgen

    generator = jaxgen.Generator(cli_tiny_model)
    assert generator._memory_limit is None
    results = generator.generate_batch([PROMPT] * 4, max_length=8, beam_size=2)
    assert len(results) == 4
    assert len(generator.score_batch([PROMPT * 3] * 4)) == 4
    assert generator.forward_batch([PROMPT] * 2).shape == (2, 2, 100)
