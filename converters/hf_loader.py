"""What the Hugging Face loaders share: the registry, config access with class defaults, the
tensor mapping (`Spec`) and helpers for the ways checkpoints store their tensors.

A loader is a function `loader(hf: HFConfig, weights: SafetensorsReader) -> Spec` registered for
one or more `model_type`s with `@register_loader(model_type, defaults={...})` (the defaults are the
values of the HF config class for keys `config.json` may omit: save_pretrained writes only values
that differ from them). The Spec names each canonical jaxgen tensor's source (a tensor, a part of
a fused tensor, a transposed or permuted tensor) and the `ModelConfig` fields; the converter reads
the tensors, checks that every checkpoint tensor was used, and writes the model directory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from jaxgen.converters.safetensors_reader import SafetensorsReader

_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
}

FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_ALIASES = {"float32": "float32", "float": "float32", "fp32": "float32",
                  "float16": "float16", "half": "float16", "fp16": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Loader:
    fn: Callable[["HFConfig", SafetensorsReader], "Spec"]
    defaults: dict


LOADERS: Dict[str, Loader] = {}


def register_loader(*model_types: str, defaults: Optional[dict] = None):
    """Registers the decorated function as the loader of `model_types` (see the module docstring)."""
    def wrap(fn):
        for model_type in model_types:
            if model_type in LOADERS:
                raise ValueError(f"a loader is already registered for {model_type!r}")
            LOADERS[model_type] = Loader(fn, dict(defaults or {}))
        return fn

    return wrap


class HFConfig:
    """The (text) config of a checkpoint with the HF class defaults for omitted keys."""

    def __init__(self, raw: dict):
        self.raw = raw
        self.model_type = raw["model_type"]
        if self.model_type in ("gemma3", "gemma4"):  # multimodal: the decoder is the text config
            text = dict(raw.get("text_config") or {})
            text.setdefault("model_type", self.model_type + "_text")
            for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id", "dtype",
                        "torch_dtype"):
                if key in raw and key not in text:
                    text[key] = raw[key]
            self.cfg = text
            self.defaults = dict(LOADERS[self.model_type + "_text"].defaults)
            if self.model_type == "gemma3":
                self.defaults["vocab_size"] = 262208
        else:
            self.cfg = raw
            self.defaults = dict(LOADERS[self.model_type].defaults)

    def get(self, key: str, default=None):
        if key in self.cfg:
            return self.cfg[key]
        return self.defaults.get(key, default)

    def require(self, *keys: str):
        for key in keys:
            value = self.get(key)
            if value is not None:
                return value
        raise ValueError(f"config.json of this {self.model_type} checkpoint has no {keys[0]!r}")

    def ids(self, key: str) -> List[int]:
        value = self.get(key)
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, list) else [value])]


def weight_dtype(hf: HFConfig, weights: SafetensorsReader, embed_name: str) -> str:
    """The checkpoint's float type: `dtype`/`torch_dtype` of config.json, else the embedding's."""
    for key in ("dtype", "torch_dtype"):
        value = hf.get(key)
        if isinstance(value, str) and value.replace("torch.", "") in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[value.replace("torch.", "")]
    stored = weights.dtype(embed_name)
    for name, dtype in FLOAT_DTYPES.items():
        if dtype == stored:
            return name
    return "float32"


def activation(name: str, model_type: str) -> str:
    if model_type == "gemma" and name == "gelu":
        return "gelu_tanh"  # HF rewrites Gemma's legacy "gelu" to the tanh approximation
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} in this {model_type} checkpoint")
    return _ACTIVATIONS[name]


def rope(hf: HFConfig, head_dim: int, max_positions: int) -> dict:
    """rope_theta, rope_scaling, rope_local_theta and rotary_dim from new or old config styles."""
    params = hf.cfg.get("rope_parameters")
    local: Optional[dict] = None
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    elif isinstance(params, dict) and params:
        full = dict(params)
    else:
        full = dict(hf.cfg.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.model_type in ("gemma3", "gemma3_text"):
        local = local if local is not None else {}
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))

    def kind_of(d: dict) -> str:
        kind = d.get("rope_type", d.get("type")) or "default"
        return "longrope" if kind in ("su", "yarn") and hf.model_type == "phi3" else kind

    kind = kind_of(full)
    partial = full.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0
    scaling = None
    if kind != "default":
        if kind not in ("linear", "llama3", "longrope"):
            raise ValueError(f"unsupported rope type {kind!r} in this {hf.model_type} checkpoint "
                             f"(supported: default, linear, llama3, longrope)")
        scaling = {k: v for k, v in full.items()
                   if k not in ("rope_theta", "partial_rotary_factor", "type", "rope_type") and v is not None}
        scaling["rope_type"] = kind
        if kind == "longrope":
            original = scaling.get("original_max_position_embeddings",
                                   hf.get("original_max_position_embeddings", max_positions))
            scaling["original_max_position_embeddings"] = original
            factor = scaling.get("factor") or max_positions / original
            if scaling.get("attention_factor") is None:  # as transformers computes it
                scaling["attention_factor"] = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    local_theta = None
    if local is not None:
        if kind_of(local) != "default":
            raise ValueError(f"unsupported rope type {kind_of(local)!r} for sliding layers of this checkpoint")
        local_theta = float(local["rope_theta"])
    rotary = int(head_dim * float(partial))
    return dict(rope_theta=float(full["rope_theta"]), rope_scaling=scaling, rope_local_theta=local_theta,
                rotary_dim=None if rotary == head_dim else rotary)


def layer_types(hf: HFConfig, num_layers: int, window: Optional[int]) -> Tuple[tuple, Optional[int]]:
    types = hf.cfg.get("layer_types")
    if window is None:
        return ("full",) * num_layers, None
    if types is None:
        return ("sliding",) * num_layers, window
    mapping = {"full_attention": "full", "sliding_attention": "sliding"}
    unknown = sorted({t for t in types if t not in mapping})
    if unknown:
        raise ValueError(f"unsupported layer types {unknown} in this {hf.model_type} checkpoint")
    if len(types) != num_layers:
        raise ValueError(f"config.json has {len(types)} layer_types for {num_layers} layers")
    out = tuple(mapping[t] for t in types)
    return out, (window if "sliding" in out else None)


# ---------------------------------------------------------------------------- tensor mapping
class Spec:
    """The ModelConfig fields of an architecture and a getter for each canonical tensor."""

    def __init__(self, weights: SafetensorsReader, embed_name: str, ignore: Callable[[str], bool]):
        self.weights = weights
        self.embed_name = embed_name
        self.config_fields: dict = {}
        self.tensors: Dict[str, Callable[[], np.ndarray]] = {}
        self._used: set = set()
        self._ignore = ignore

    def has(self, name: str) -> bool:
        return name in self.weights

    def add(self, canonical: str, hf_name: str, transpose: bool = False) -> None:
        if not self.has(hf_name):
            raise ValueError(f"checkpoint has no tensor {hf_name!r} (needed for {canonical})")
        self._used.add(hf_name)

        def getter(w=self.weights, n=hf_name, t=transpose):
            a = w.get(n)
            return a.T if t else a

        self.tensors[canonical] = getter

    def add_split(self, canonicals: List[str], hf_name: str, sizes: List[int], axis: int,
                  transpose: bool) -> None:
        """A fused tensor split along `axis` into parts of `sizes` (e.g. qkv_proj, gate_up_proj)."""
        if not self.has(hf_name):
            raise ValueError(f"checkpoint has no tensor {hf_name!r} (needed for {', '.join(canonicals)})")
        total = self.weights.shape(hf_name)[axis]
        if total != sum(sizes):
            raise ValueError(f"tensor {hf_name} has {total} rows on axis {axis}, expected {sum(sizes)}")
        self._used.add(hf_name)
        offsets = np.cumsum([0] + sizes)
        for canonical, start, stop in zip(canonicals, offsets[:-1], offsets[1:]):
            def getter(w=self.weights, n=hf_name, a=axis, s=int(start), e=int(stop), t=transpose):
                part = np.take(w.get(n), np.arange(s, e), axis=a)
                return part.T if t else part

            self.tensors[canonical] = getter

    def add_linear(self, canonical: str, hf_prefix: str, transpose: bool = True) -> bool:
        """`{hf_prefix}.weight` (and `.bias` when present); returns whether a bias exists."""
        self.add(f"{canonical}.weight", f"{hf_prefix}.weight", transpose)
        if self.has(f"{hf_prefix}.bias"):
            self.add(f"{canonical}.bias", f"{hf_prefix}.bias")
            return True
        return False

    def add_derived(self, canonicals: Sequence[str], hf_names: Sequence[str],
                    fn: Callable[..., Sequence[np.ndarray]]) -> None:
        """Canonical tensors computed from checkpoint tensors: `fn(*arrays)` returns one array per
        canonical name (a fused tensor split per head, an interleaved rotary permuted, experts
        stacked). Computed once, when the first of them is read."""
        for name in hf_names:
            if not self.has(name):
                raise ValueError(f"checkpoint has no tensor {name!r} (needed for {', '.join(canonicals)})")
        self._used.update(hf_names)
        cache: dict = {}

        def compute():
            if "out" not in cache:
                cache["out"] = list(fn(*[self.weights.get(n) for n in hf_names]))
            return cache["out"]

        for i, canonical in enumerate(canonicals):
            self.tensors[canonical] = lambda i=i: compute()[i]

    def check_all_used(self) -> None:
        unused = sorted(n for n in self.weights.names() if n not in self._used and not self._ignore(n))
        if unused:
            raise ValueError(f"checkpoint has tensors this converter does not map: {unused[:8]}"
                             f"{' ...' if len(unused) > 8 else ''}")


def find_prefix(weights: SafetensorsReader, candidates: List[str], suffix: str) -> str:
    for prefix in candidates:
        if prefix + suffix in weights:
            return prefix
    raise ValueError(f"checkpoint has no embedding tensor (looked for {[p + suffix for p in candidates]})")


def common_sizes(hf: HFConfig) -> dict:
    hidden = int(hf.require("hidden_size"))
    heads = int(hf.require("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    return dict(hidden_size=hidden, num_layers=int(hf.require("num_hidden_layers")), num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=int(hf.require("intermediate_size")))


def float_or_none(value) -> Optional[float]:
    return None if value is None else float(value)




# ---------------------------------------------------------------------------- shared tensor layouts
def split_rows_per_head(fused: np.ndarray, heads: int, parts: Sequence[int], head_dim: int) -> List[np.ndarray]:
    """A fused projection whose output rows are grouped per head, [heads, sum(parts) * head_dim]
    (torch [out, in] layout; e.g. GPT-NeoX/BLOOM q|k|v per head: parts (1, 1, 1)), -> one [in, out]
    weight per part (or [out] bias), each with its heads in order."""
    grouped = fused.reshape((heads, sum(parts) * head_dim) + fused.shape[1:])
    out, start = [], 0
    for n in parts:
        part = grouped[:, start * head_dim:(start + n) * head_dim]
        part = part.reshape((heads * n * head_dim,) + fused.shape[1:])
        out.append(part.T if part.ndim == 2 else part)
        start += n
    return out


def rotate_half_permutation(head_dim: int, rotary: int, heads: int) -> np.ndarray:
    """Column order that turns an interleaved rotary layout (GPT-J: pairs (0, 1), (2, 3), ...) into
    the rotate-half layout jaxgen applies (first halves, then second halves), per head; dims past
    `rotary` keep their place. Applied to both q and k it leaves q . k unchanged."""
    per_head = np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2), np.arange(rotary, head_dim)])
    return np.concatenate([h * head_dim + per_head for h in range(heads)])


def alibi_slopes(num_heads: int, max_bias: float = 8.0, interleave_extra: bool = True) -> Tuple[float, ...]:
    """ALiBi slopes per head. With a power-of-two head count both conventions give
    2^(-max_bias * (i + 1) / n). Otherwise BLOOM (and Falcon) take the slopes of the closest lower
    power of two followed by every other slope of twice that; MPT (`interleave_extra=False`) takes
    the slopes of the next power of two, odd ones first."""
    if not interleave_extra:  # MPT's gen_slopes
        p = 2 ** math.ceil(math.log2(num_heads))
        m = np.arange(1, p + 1, dtype=np.float64) * (max_bias / p)
        slopes = 1.0 / np.power(2.0, m)
        if p != num_heads:
            slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
        return tuple(float(x) for x in slopes)
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes += [extra_base ** i for i in range(1, 1 + 2 * extra, 2)]
    return tuple(float(x) for x in slopes)


def stack_experts(*arrays: np.ndarray) -> List[np.ndarray]:
    """Per-expert torch weights [out, in] -> one stacked [E, in, out] weight."""
    return [np.stack([a.T for a in arrays])]
