"""Memory needed by a job, estimated from shapes, and checked before the job starts.

A request that cannot fit (say 64 prompts x 8 beams x 4,096 tokens on a small GPU) would
otherwise fail deep inside XLA with an allocation error after minutes of work, or get the
process killed on a CPU host. `Generator` calls `check_jobs_fit` before it submits anything,
so such a request fails at once with a ValueError that names the sizes and what to lower, and
the Generator stays usable.

The numbers are estimates from array shapes, not measurements: they count the KV cache (exact
for the cache layout), the activations of the tokens processed at once, the float32 logits rows,
and the decode loop's per-row state, with generous factors for XLA's temporaries. Weights
are not counted: they are already on the device, and the free memory it reports excludes them.

KV cache layout (what the estimate assumes): layers with full attention keep keys and values
for every position of the sequence; sliding-window layers keep a ring of `sliding_window` slots
per sequence, whatever its length (or fewer slots when the sequence is shorter).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Sequence

_UNITS = (" B", " KiB", " MiB", " GiB", " TiB", " PiB")
ATTENTION_KEY_BLOCK = 1024  # bound on the keys whose scores exist at once per query chunk
FLOAT_BYTES = 4  # activations, scores and logits are counted as float32 whatever the compute type


# ============================================================================ cache sizes
def _itemsize(dtype) -> int:
    import jax.numpy as jnp

    return int(jnp.dtype(dtype).itemsize)


def _slot_bytes(config, dtype, kind: str) -> int:
    """Keys and values of one position summed over the layers of one kind ("full" or "sliding"),
    as stored (tensor parallelism may hold copies of each KV head; full layers may have their own
    head dim and KV heads, `ModelConfig.layer_head_dim`)."""
    types = tuple(config.layer_types) or ("full",) * config.num_layers
    return sum(2 * config.layer_stored_kv_heads(i) * config.layer_head_dim(i) * _itemsize(dtype)
               for i, t in enumerate(types) if (t == "sliding") == (kind == "sliding"))


def kv_cache_bytes_per_token(config, dtype) -> int:
    """Bytes the KV cache grows by per token of one sequence: keys and values of the layers with
    full attention (all layers when `config.layer_types` is empty), 2 * num_kv_heads * head_dim
    * itemsize(dtype) per full layer."""
    return _slot_bytes(config, dtype, "full")


def sliding_cache_bytes_per_sequence(config, dtype) -> int:
    """Bytes of the sliding-window layers' rings for one sequence of at least `sliding_window`
    tokens: 2 * sliding_window * num_kv_heads * head_dim * itemsize(dtype) per sliding layer
    (0 without sliding layers)."""
    if not config.has_sliding_layers:
        return 0
    return int(config.sliding_window) * _slot_bytes(config, dtype, "sliding")


def kv_cache_bytes(config, dtype, batch: int, length: int) -> int:
    """KV cache of `batch` sequences of `length` slots: full layers hold `length` positions,
    sliding layers min(sliding_window, length)."""
    ring = min(int(config.sliding_window), length) if config.has_sliding_layers else 0
    per_sequence = length * kv_cache_bytes_per_token(config, dtype) + ring * _slot_bytes(config, dtype, "sliding")
    return batch * per_sequence


# ============================================================================ job estimate
@dataclasses.dataclass(frozen=True)
class MemoryJob:
    """The shapes of one job (one sub-batch on one device), what `estimate_job` reads.

    batch: rows (prompts x beams or hypotheses); cache_length: KV cache positions per row;
    chunk_tokens: new tokens per row processed at once (a prompt chunk); decode: a generation
    loop (its per-row state counts); vocab_rows: rows of float32 logits at once;
    stored_logits_rows: logits rows kept for the result (`return_logits_vocab`)."""

    batch: int
    cache_length: int
    chunk_tokens: int
    vocab_rows: int
    decode: bool = True
    stored_logits_rows: int = 0

    def estimate(self, config, dtype) -> "JobEstimate":
        return estimate_job(config, dtype, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class JobEstimate:
    """Bytes of one job by kind (see `estimate_job`). `activations` are hidden-size activations
    (whole on every device under tensor parallelism), `head_activations` the MLP intermediates and
    attention scores (split with the heads and MLP columns)."""

    batch: int
    cache_length: int
    cache: int
    activations: int
    logits: int
    state: int
    head_activations: int = 0

    @property
    def total(self) -> int:
        return self.cache + self.activations + self.head_activations + self.logits + self.state

    def per_device(self, shards: int = 1) -> int:
        """Bytes on each device when tensor parallelism splits the job over `shards` devices: the
        KV cache (as stored, KV-head copies included), MLP intermediates and attention scores are
        divided; hidden states, logits and the loop state are held whole by every device."""
        shards = max(int(shards), 1)
        split = -(-(self.cache + self.head_activations) // shards)
        return split + self.activations + self.logits + self.state

    def describe(self) -> str:
        """E.g. "KV cache 10.0 GiB for 8 rows x 17,408 slots, activations 2.3 GiB, logits 24.0 MiB"."""
        parts = [f"KV cache {format_bytes(self.cache)} for {self.batch:,} rows x {self.cache_length:,} slots",
                 f"activations {format_bytes(self.activations + self.head_activations + self.state)}"]
        if self.logits:
            parts.append(f"logits {format_bytes(self.logits)}")
        return ", ".join(parts)


def estimate_job(config, dtype, *, batch: int, cache_length: int, chunk_tokens: int, decode: bool = True,
                 vocab_rows: int, stored_logits_rows: int = 0) -> JobEstimate:
    """Estimated device memory of one job, from shapes (see `estimate_job_bytes`)."""
    batch, cache_length = max(int(batch), 0), max(int(cache_length), 0)
    chunk = max(min(int(chunk_tokens), max(cache_length, 1)), 1)
    cache = kv_cache_bytes(config, dtype, batch, cache_length)
    hidden = batch * chunk * config.hidden_size * 4 * FLOAT_BYTES
    mlp = batch * chunk * config.intermediate_size * 3 * FLOAT_BYTES
    scores = batch * config.num_heads * chunk * min(cache_length, ATTENTION_KEY_BLOCK) * FLOAT_BYTES
    logits = (max(int(vocab_rows), 0) * 3 + max(int(stored_logits_rows), 0)) * config.vocab_size * FLOAT_BYTES
    state = batch * cache_length * 4 * 2 if decode else 0  # int32 token history and slot positions
    return JobEstimate(batch, cache_length, cache, hidden, logits, state, mlp + scores)


def estimate_job_bytes(config, dtype, *, batch: int, cache_length: int, chunk_tokens: int, decode: bool = True,
                       vocab_rows: int, stored_logits_rows: int = 0) -> int:
    """A conservative estimate, from shapes only, of the device bytes one job needs beyond the weights.

    - KV cache: `kv_cache_bytes(config, dtype, batch, cache_length)` (counted once).
    - Activations of `chunk_tokens` new tokens per row processed at once (a prompt chunk):
      batch * chunk * (hidden_size * 4 + intermediate_size * 3) * 4 bytes, plus attention scores
      bounded by batch * num_heads * chunk * min(cache_length, 1024) * 4 bytes.
    - float32 logits of `vocab_rows` rows: vocab_rows * vocab_size * 4 * 3 (logits, processed
      logits, log-probs), plus `stored_logits_rows` * vocab_size * 4 for logits kept for the
      result (`return_logits_vocab`).
    - decode=True (generation): the loop's int32 token history and slot positions,
      batch * cache_length * 8 bytes.

    batch counts rows (prompts x beams or hypotheses). It is an estimate: XLA's real peak can
    differ, which is why the factors above are generous.
    """
    return estimate_job(config, dtype, batch=batch, cache_length=cache_length, chunk_tokens=chunk_tokens,
                        decode=decode, vocab_rows=vocab_rows, stored_logits_rows=stored_logits_rows).total


# ============================================================================ available memory
def available_device_bytes(device) -> Optional[int]:
    """Bytes free on `device` for new arrays, or None when unknown.

    GPU/TPU: `device.memory_stats()`'s bytes_limit - bytes_in_use (the allocator's view, so
    the weights already placed are excluded). CPU: the host's MemAvailable (/proc/meminfo).
    """
    if getattr(device, "platform", None) == "cpu":
        return host_available_bytes()
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics
        return None
    if not stats or stats.get("bytes_limit") is None:
        return None
    return max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0)


def host_available_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable of the host in bytes, or None when it cannot be read (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                    return int(fields[1]) * scale
    except (OSError, ValueError, IndexError):
        return None
    return None


# ============================================================================ checks
def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; 12 -> "12 B"."""
    value = float(n)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == " B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}{_UNITS[-1]}"


def check_fits(required: int, available: Optional[int], what: str, advice: str, *,
               detail: Optional[str] = None, where: Optional[str] = None) -> None:
    """Raises ValueError when `required` bytes exceed `available` (no check when it is None):

    "{what} needs about 12.3 GiB ({detail}) but {where} has 4.0 GiB available; {advice}".
    """
    if available is None or required <= available:
        return
    inner = f" ({detail})" if detail else ""
    raise ValueError(f"{what} needs about {format_bytes(required)}{inner} but {where or 'the device'} has "
                     f"{format_bytes(available)} available; {advice}")


def check_jobs_fit(config, dtype, devices: Sequence, jobs: Iterable[MemoryJob], *, what: str, advice: str,
                   memory_limit: Optional[int] = None, concurrent: int = 1, shards: int = 1) -> None:
    """Checks, before anything runs, that the jobs of one call fit on the device with the least
    free memory (`memory_limit` bytes per device instead of what the devices report, when given).

    jobs: one MemoryJob per job. The `concurrent` largest jobs
    may run at once on one device; `shards` > 1 splits a job over that many devices (tensor
    parallelism; see `JobEstimate.per_device`). Raises ValueError (see `check_fits`).
    """
    estimates: List[JobEstimate] = sorted((job.estimate(config, dtype) for job in jobs),
                                          key=lambda e: e.total, reverse=True)
    if not estimates:
        return
    if memory_limit is not None:
        available, where = memory_limit, f"{_device_name(devices[0])} (memory_limit)" if devices else "memory_limit"
    else:
        known = [(b, d) for d in devices for b in [available_device_bytes(d)] if b is not None]
        if not known:
            return
        available, device = min(known, key=lambda item: item[0])
        where = _device_name(device)
    running = estimates[:max(int(concurrent), 1)]
    required = sum(e.per_device(shards) for e in running)
    detail = running[0].describe()
    if len(running) > 1:
        detail += f"; {len(running)} sub-batches at once"
    if shards > 1:
        detail += f"; split over {shards} devices"
    check_fits(required, available, what, advice, detail=detail, where=where)


def _device_name(device) -> str:
    return f"{getattr(device, 'platform', 'device')}:{getattr(device, 'id', 0)}"


@dataclasses.dataclass
class MemoryBudget:
    """What one Generator checks its calls against: the model's shapes, its devices, how many
    jobs run at once. `check` raises ValueError, before anything runs, when the jobs of one call
    would not fit (estimates above; `memory_limit` replaces the free bytes the devices report).
    The jobs on one replica run `inter_threads` at a time and process at most one prefill chunk
    of `chunk` tokens at once."""

    config: object
    dtype: object
    devices: Sequence
    platform: str
    replicas: int
    inter_threads: int
    chunk: int
    memory_limit: Optional[int] = None
    shards: int = 1

    def check(self, what: str, jobs: List[MemoryJob], n_jobs: int, advice: str) -> None:
        jobs = [dataclasses.replace(job, chunk_tokens=min(job.chunk_tokens, self.chunk)) for job in jobs]
        if self.platform == "cpu":  # CPU devices share the host's memory
            concurrent = min(self.inter_threads * self.replicas, n_jobs)
        else:
            concurrent = min(self.inter_threads, -(-n_jobs // self.replicas))
        check_jobs_fit(self.config, self.dtype, self.devices, jobs, what=what, advice=advice,
                       memory_limit=self.memory_limit, concurrent=concurrent, shards=self.shards)
