"""GGUF (llama.cpp) checkpoints -> jaxgen model directories.

    GGUFConverter("model.gguf").convert("out_dir")             # float32 weights
    GGUFConverter("model.gguf").convert("out_dir", quantization="int8")

Supported `general.architecture` values: `llama`, `qwen2`, `qwen3`, `gemma`, `gemma2`, `gemma3`,
`gptneox`, `falcon`, `phi2`, `starcoder`, `bloom`, `mpt`, `qwen2moe`, `qwen3moe` (and Mixtral, which
llama.cpp writes as `llama` with experts); any other is a
ValueError naming it.
The key/values and tensor directory are parsed by `GGUFFile` (the layout `gguf.GGUFReader` reads,
without its ~10 s of per-element overhead on a 262k-token vocabulary). Every tensor is dequantized
to float32 with `gguf.quants.dequantize`, one tensor at a time (large ones in row blocks), and
stored in jaxgen's canonical [in, out] layout (GGUF lists dimensions innermost first, so a
linear weight's numpy array is [out, in] and gets transposed; the embedding is [vocab, hidden]).
What llama.cpp's converter changed on the way in is undone here, as transformers' GGUF loader
does:

  * llama: Q and K projection rows are permuted for llama.cpp's interleaved rope
    (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py); we apply the inverse, giving the
    rotate-half layout the decoder uses.
  * gemma, gemma2, gemma3: every norm weight (`*norm.weight`, q/k norms included) is stored as
    1 + w; we store w, and the config says norm_offset = 1.
  * gptneox, falcon, starcoder, bloom, mpt, phi2 (older files): q, k and v are one `attn_qkv`
    tensor whose rows llama.cpp lays out as all query heads, then the key heads, then the value
    heads (it regroups GPT-NeoX's/BLOOM's per-head and Falcon's per-KV-group layouts); we split it
    in three.
  * bloom and mpt use ALiBi: BLOOM's slopes with a maximum bias of 8 (llama.cpp hard-codes it),
    MPT's with `attention.max_alibi_bias`. For a head count that is not a power of two MPT's
    slopes are MPT's own (as transformers and MosaicML compute them), where llama.cpp would use
    BLOOM's. MPT files with `attention.clamp_kqv` are refused.
  * qwen2moe, qwen3moe, and llama with `expert_count` (Mixtral): the experts are stacked
    ([E, out, in] in numpy order) and transposed to jaxgen's [E, in, out]; the router is `ffn_gate_inp`, Qwen2-MoE's shared expert `*_shexp`
    with its gate `ffn_gate_inp_shexp` (stored squeezed, [D]). llama.cpp renormalises the top-k
    routing weights for qwen3moe and Mixtral, not for qwen2moe (`expert_weights_norm` overrides).
  * Activations llama.cpp hard-codes per architecture: GELU for gptneox and falcon (exact, as
    their transformers models), tanh-approximated GELU for phi2, starcoder and bloom, exact GELU
    for mpt, SiLU-gated MLPs for the rest.

Values llama.cpp hard-codes instead of writing to the file, used when the file has no key:
Gemma 3 sliding layers use rope theta 10000 and every 6th layer is global; Gemma 2 alternates
sliding (even layers) and global; the 27B Gemmas scale queries by (hidden/heads) ** -0.5, the
others by head_dim ** -0.5.

Llama 3.1+ files carry their rope scaling as a `rope_freqs` tensor; the llama3 `rope_scaling`
parameters that reproduce it are recovered (transformers' GGUF loader ignores the tensor).

Tokenizer: a SentencePiece vocabulary (`tokenizer.ggml.model` = "llama") is rebuilt into a
`tokenizer.model` that encodes like transformers' tokenizer for the same GGUF (see
`sentencepiece_model.py`, which also says how control and user-defined tokens behave).
`vocabulary.json` holds the same pieces (Gemma's whitespace-run tokens, stored with real spaces
in the GGUF, are spelled with "\u2581" as transformers and CTranslate2 spell them). A byte-level
BPE vocabulary (`tokenizer.ggml.model` = "gpt2": Llama 3, Qwen2, ...) is rebuilt into a
`tokenizer.json` from its tokens, merges, token types and pre-tokenizer name (see
`bpe_tokenizer.py`). Other tokenizer types get the vocabulary only. A `tokenizer.chat_template`
is written to `tokenizer_config.json`. Special tokens: bos, eos,
unk and pad from `tokenizer.ggml.*_token_id`, `add_bos_token` from `tokenizer.ggml.add_bos_token`.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from jaxgen.converters.base import ConvertedModel, Converter
from jaxgen.converters.bpe_tokenizer import build_bpe_tokenizer
from jaxgen.converters.hf_loader import alibi_slopes
from jaxgen.converters.sentencepiece_model import build_sentencepiece_model, gemma_pieces, text_matched_types
from jaxgen.model.config import ModelConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gptneox", "falcon", "phi2",
                           "starcoder", "bloom", "mpt", "qwen2moe", "qwen3moe")
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
LAYER_NORM_ARCHITECTURES = ("gptneox", "falcon", "phi2", "starcoder", "bloom", "mpt")  # LayerNorm, plain MLP
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
ROW_BLOCK_BYTES = 64 << 20  # dequantize large tensors this many source bytes at a time

# llama.cpp tensor name (after "blk.N.") -> canonical module, and whether it is a linear weight
_LAYER_TENSORS = {
    "attn_norm": ("attn_norm", False),
    "attn_q": ("q", True),
    "attn_k": ("k", True),
    "attn_v": ("v", True),
    "attn_output": ("o", True),
    "attn_qkv": ("qkv", True),  # split into q, k, v
    "attn_norm_2": ("mlp_norm", False),  # Falcon's ln_mlp
    "ffn_gate_inp": ("router", True),
    "ffn_gate_exps": ("expert_gate", True),
    "ffn_up_exps": ("expert_up", True),
    "ffn_down_exps": ("expert_down", True),
    "ffn_gate_shexp": ("shared_gate", True),
    "ffn_up_shexp": ("shared_up", True),
    "ffn_down_shexp": ("shared_down", True),
    "ffn_gate_inp_shexp": ("shared_expert_gate", True),
    "attn_q_norm": ("q_norm", False),
    "attn_k_norm": ("k_norm", False),
    "post_attention_norm": ("post_attn_norm", False),
    "ffn_norm": ("mlp_norm", False),
    "ffn_gate": ("gate", True),
    "ffn_up": ("up", True),
    "ffn_down": ("down", True),
    "post_ffw_norm": ("post_mlp_norm", False),
}
_TOP_TENSORS = {
    "token_embd": ("embed", False),
    "position_embd": ("pos_embed", False),
    "token_embd_norm": ("embed_norm", False),
    "output_norm": ("final_norm", False),
    "output": ("lm_head", True),
}
_IGNORED_TENSORS = ("rope_freqs.weight",)  # turned into config.rope_scaling


class GGUFConverter(Converter):
    """Converts a llama.cpp GGUF file (see the module docstring for what is supported).

    Args:
      model_path: path of the .gguf file.
      progress: optional `progress(done, total)` callback, called after each tensor.
    """

    def __init__(self, model_path: str, progress: Optional[Callable[[int, int], None]] = None):
        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a path string, got {type(model_path).__name__}")
        self._path = os.fspath(model_path)
        self._progress = progress

    # ------------------------------------------------------------------ entry point
    def load(self) -> ConvertedModel:
        reader = open_gguf(self._path)
        meta = GGUFMetadata(reader)
        arch = meta.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {arch!r} is not supported by the jaxgen GGUF converter; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        tensors = {t.name: t for t in reader.tensors}
        vocab, tokenizer_files, special = _tokenizer(meta)
        config = _config(meta, tensors, vocab, special)
        if len(vocab) < config.vocab_size:  # embedding rows padded past the tokenizer's vocabulary
            taken = set(vocab)
            vocab = vocab + [_filler(i, taken) for i in range(len(vocab), config.vocab_size)]
        elif len(vocab) > config.vocab_size:
            raise ValueError(f"the GGUF vocabulary has {len(vocab)} tokens but the embedding only "
                             f"{config.vocab_size} rows")
        flat = _weights(tensors, config, arch, self._progress)
        return ConvertedModel(config=config, flat=flat, vocabulary=vocab, tokenizer_files=tokenizer_files,
                              extra_json=_tokenizer_config(meta, special))


# ---------------------------------------------------------------------------- reading the file
class GGUFTensor(NamedTuple):
    name: str
    shape: Tuple[int, ...]  # GGUF order: ne0 (the contiguous axis) first, as gguf.GGUFReader gives
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw data as gguf.GGUFReader shapes it (numpy order; quantized: uint8 rows)


class GGUFFile:
    """The key/values and tensor directory of a GGUF file (versions 2 and 3, little-endian).

    Parses the same layout as `gguf.GGUFReader`, whose per-element views make it take ~10 s on
    a 262k-token vocabulary; this takes well under a second. Tensor data stays memory-mapped.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
    _ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                     11: "<i8", 12: "<f8"}

    def __init__(self, path: str):
        import gguf

        self.path = path
        self._mm = np.memmap(path, mode="r", dtype=np.uint8)
        buf = memoryview(self._mm)
        self._buf, self._pos = buf, 0
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (only 2 and 3, little-endian)")
        tensor_count, kv_count = self._scalar("<Q"), self._scalar("<Q")
        self.fields: Dict[str, object] = {}
        for _ in range(kv_count):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._scalar("<I")
            dims = tuple(self._scalar("<Q") for _ in range(n_dims))
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment}")
        start = -(-self._pos // alignment) * alignment
        self.tensors: List[GGUFTensor] = []
        for name, dims, raw_type, offset in infos:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            np_shape = tuple(reversed(dims))
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            begin = start + offset
            if begin + n_bytes > len(self._mm):
                raise ValueError(f"tensor {name} extends past the end of the file (truncated?)")
            raw = self._mm[begin:begin + n_bytes]
            plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
            if qtype in plain:
                data = raw.view(plain[qtype]).reshape(np_shape)
            else:
                data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(np_shape, qtype))
            self.tensors.append(GGUFTensor(name, dims, qtype, data))
        self._buf = None  # the memoryview pins the memmap; tensors keep their own views

    def _scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("<Q")
        value = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return value

    def _value(self, kind: int):
        if kind in self._SCALARS:
            return self._scalar(self._SCALARS[kind])
        if kind == 8:
            return self._string()
        if kind == 9:
            sub, n = self._scalar("<I"), self._scalar("<Q")
            if sub in self._ARRAY_DTYPES:
                dtype = np.dtype(self._ARRAY_DTYPES[sub])
                arr = np.frombuffer(self._buf, dtype=dtype, count=n, offset=self._pos)
                self._pos += n * dtype.itemsize
                return arr.tolist()
            return [self._value(sub) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {kind}")


def open_gguf(path: str) -> GGUFFile:
    """Parses the GGUF file at `path`; ValueError when it is not a readable GGUF file."""
    if not os.path.exists(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file (the GGUF converter takes a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, IndexError, OverflowError) as exc:
        raise ValueError(f"{path!r} is not a readable GGUF file: {exc}") from None


class GGUFMetadata:
    """Access to the key/value metadata; `arch.` keys via `arch_value`."""

    def __init__(self, gguf_file: GGUFFile):
        self._fields = gguf_file.fields
        arch = self._fields.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError("the GGUF file has no general.architecture")
        self.architecture = arch

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def value(self, key: str, default=None):
        return self._fields.get(key, default)

    def arch_value(self, key: str, default=None):
        return self.value(f"{self.architecture}.{key}", default)

    def require(self, key: str):
        value = self.arch_value(key)
        if value is None:
            raise ValueError(f"the GGUF file has no {self.architecture}.{key}")
        return value


# ---------------------------------------------------------------------------- tokenizer
def _tokenizer(meta: GGUFMetadata) -> Tuple[List[str], List[Tuple[str, bytes]], Dict[str, object]]:
    """(vocabulary, tokenizer files, special-token settings) from the tokenizer.ggml.* keys."""
    tokens = meta.value("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens (a vocabulary is required)")
    kind = meta.value("tokenizer.ggml.model", "llama")
    scores = meta.value("tokenizer.ggml.scores")
    types = meta.value("tokenizer.ggml.token_type")
    ids = {name: meta.value(f"tokenizer.ggml.{key}") for name, key in (
        ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    ids = {k: (v if isinstance(v, int) and 0 <= v < len(tokens) else None) for k, v in ids.items()}

    files: List[Tuple[str, bytes]] = []
    pieces = list(tokens)
    if kind == "llama":  # a SentencePiece vocabulary
        if meta.architecture in GEMMA_ARCHITECTURES:
            pieces, scores, types = gemma_pieces(tokens, scores, types)
        add_prefix = meta.value("tokenizer.ggml.add_space_prefix",
                                meta.architecture not in GEMMA_ARCHITECTURES)
        unk = ids["unk"]
        if unk is None and "<unk>" in pieces:
            unk = pieces.index("<unk>")
        try:
            if types is not None:
                types = text_matched_types(types, (unk, ids["bos"], ids["eos"], ids["pad"]))
            data = build_sentencepiece_model(pieces, scores, types, model_type="bpe", add_dummy_prefix=add_prefix,
                                             unk_id=unk, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])
        except ValueError as exc:  # the model still converts; only the text tokenizer is missing
            warnings.warn(f"no tokenizer.model written: {exc}", stacklevel=3)
        else:
            files.append(("tokenizer.model", data))
        ids["unk"] = unk
    elif kind == "gpt2":  # byte-level BPE
        try:
            data = build_bpe_tokenizer(tokens, meta.value("tokenizer.ggml.merges"), types,
                                       meta.value("tokenizer.ggml.pre"), list(ids.values()))
        except ValueError as exc:
            warnings.warn(f"no tokenizer.json written: {exc}", stacklevel=3)
        else:
            files.append(("tokenizer.json", data))
    add_bos = meta.value("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS
        add_bos = kind == "llama"
    special = {f"{k}_token": (pieces[v] if v is not None else None) for k, v in ids.items()}
    special["add_bos_token"] = bool(add_bos) and ids["bos"] is not None
    return pieces, files, special


def _tokenizer_config(meta: GGUFMetadata, special: Dict[str, object]) -> Dict[str, dict]:
    """{"tokenizer_config.json": {...}} with the GGUF's chat template and special tokens, or {}
    when the file has no `tokenizer.chat_template` (ValueError when it is not a string)."""
    template = meta.value("tokenizer.chat_template")
    if template is None:
        return {}
    if not isinstance(template, str):
        raise ValueError(f"tokenizer.chat_template is a {type(template).__name__}, not a string")
    config = {k: v for k, v in special.items() if k.endswith("_token") and isinstance(v, str)}
    config["chat_template"] = template
    return {"tokenizer_config.json": config}


def _filler(index: int, taken: set) -> str:
    name = f"<gguf_extra_{index}>"
    while name in taken:
        name = "<" + name + ">"
    return name


# ---------------------------------------------------------------------------- config
def _config(meta: GGUFMetadata, tensors: dict, vocab: List[str], special: Dict[str, object]) -> ModelConfig:
    arch = meta.architecture
    if meta.arch_value("expert_count", 0) and arch not in MOE_ARCHITECTURES + ("llama",):
        raise ValueError(f"mixture-of-experts GGUF models ({arch}.expert_count > 0) are not supported "
                         f"for architecture {arch!r}")
    hidden = int(meta.require("embedding_length"))
    layers = int(meta.require("block_count"))
    heads = int(meta.require("attention.head_count"))
    kv_heads = meta.arch_value("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise ValueError(f"per-layer head counts ({arch}.attention.head_count_kv = {kv_heads}) are not supported")
        kv_heads = kv_heads[0]
    if isinstance(heads, list):
        heads = heads[0]
    head_dim = int(meta.arch_value("attention.key_length", hidden // heads))
    value_dim = int(meta.arch_value("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"key length {head_dim} != value length {value_dim} is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError("the GGUF file has no token_embd.weight tensor")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    ffn = meta.arch_value("feed_forward_length")
    if ffn is None and "blk.0.ffn_up.weight" in tensors:  # a linear weight's GGUF shape is [in, out]
        ffn = int(tensors["blk.0.ffn_up.weight"].shape[-1])
    if ffn is None:
        ffn = meta.require("feed_forward_length")
    if isinstance(ffn, list):
        if len(set(ffn)) != 1:
            raise ValueError(f"per-layer feed-forward sizes ({arch}.feed_forward_length) are not supported")
        ffn = ffn[0]

    fields = dict(
        architecture=arch, vocab_size=vocab_size, hidden_size=hidden, num_layers=layers,
        num_heads=int(heads), num_kv_heads=int(kv_heads), head_dim=head_dim, intermediate_size=int(ffn),
        norm_eps=float(meta.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta.arch_value("context_length", 8192)),
        rope_theta=float(meta.arch_value("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        weight_dtype="float32",
        **special,
    )
    rotary = meta.arch_value("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        fields["rotary_dim"] = int(rotary)
    scale = meta.arch_value("attention.scale")
    if scale:
        fields["attention_scale"] = float(scale)
    scaling = _rope_scaling(meta, tensors, head_dim if not rotary else int(rotary), fields["rope_theta"])
    if scaling:
        fields["rope_scaling"] = scaling

    if arch in ("llama", "qwen2", "qwen3"):
        fields.update(activation="silu", mlp="gated",
                      qk_norm="head" if "blk.0.attn_q_norm.weight" in tensors else "none")
        if meta.arch_value("expert_count", 0):  # Mixtral: llama with experts
            fields.update(_moe_fields(meta, tensors, arch, layers))
    elif arch in LAYER_NORM_ARCHITECTURES:
        fields.update(_layer_norm_fields(meta, tensors, arch))
    elif arch in MOE_ARCHITECTURES:
        fields.update(_moe_fields(meta, tensors, arch, layers))
    else:  # the Gemma family
        fields.update(norm_offset=1.0, activation="gelu_tanh", mlp="gated",
                      embedding_scale=math.sqrt(hidden))
        big = (arch == "gemma2" and layers == 46) or (arch == "gemma3" and layers == 62)  # the 27B models
        if big and not scale:
            fields["attention_scale"] = (hidden // heads) ** -0.5
    if arch in ("gemma2", "gemma3"):
        fields.update(norm_placement="sandwich")
        window = meta.arch_value("attention.sliding_window")
        if window:
            fields["sliding_window"] = int(window)
            fields["layer_types"] = _gemma_layer_types(meta, layers, 2 if arch == "gemma2" else 6)
    if arch == "gemma2":
        attn_cap = meta.arch_value("attn_logit_softcapping")
        final_cap = meta.arch_value("final_logit_softcapping")
        fields["attn_logit_softcapping"] = float(attn_cap) if attn_cap else None
        fields["final_logit_softcapping"] = float(final_cap) if final_cap else None
    if arch == "gemma3":
        fields["qk_norm"] = "head"
        fields["rope_local_theta"] = float(meta.arch_value("rope.freq_base_swa", 10000.0))
    return ModelConfig(**fields)


def _layer_norm_fields(meta: GGUFMetadata, tensors: dict, arch: str) -> dict:
    """The config of the LayerNorm architectures: GPT-NeoX (parallel or sequential residual,
    partial rotary), Falcon (parallel; one shared norm unless the file has attn_norm_2), Phi-2
    (parallel, one shared norm, partial rotary, a head with a bias) and StarCoder (sequential,
    learned positions, multi-query)."""
    fields = dict(norm_type="layer", norm_eps=float(meta.arch_value("attention.layer_norm_epsilon", 1e-5)),
                  norm_bias="blk.0.attn_norm.bias" in tensors, mlp="plain",
                  activation="gelu" if arch in ("gptneox", "falcon", "mpt") else "gelu_tanh",
                  lm_head_bias="output.bias" in tensors)
    if arch == "gptneox":
        fields["block"] = "parallel" if meta.arch_value("use_parallel_residual", True) else "sequential"
    elif arch == "falcon":
        fields.update(block="parallel", shared_block_norm="blk.0.attn_norm_2.weight" not in tensors)
    elif arch == "phi2":
        fields.update(block="parallel", shared_block_norm=True)
    elif arch in ("bloom", "mpt"):
        heads = meta.require("attention.head_count")
        heads = int(heads[0] if isinstance(heads, list) else heads)
        if arch == "mpt" and meta.arch_value("attention.clamp_kqv"):
            raise ValueError("mpt GGUF files with attention.clamp_kqv (clipped q, k, v) are not supported")
        if arch == "mpt" and "position_embd.weight" in tensors:
            raise ValueError("mpt GGUF files with learned positions (position_embd) are not supported")
        max_bias = 8.0 if arch == "bloom" else float(meta.arch_value("attention.max_alibi_bias", 8.0))
        fields.update(position_embedding="alibi", embedding_norm=arch == "bloom",
                      alibi_slopes=alibi_slopes(heads, max_bias, interleave_extra=arch == "bloom"))
    else:  # starcoder
        if "position_embd.weight" not in tensors:
            raise ValueError("the starcoder GGUF file has no position_embd.weight tensor")
        fields.update(position_embedding="learned",
                      max_position_embeddings=int(tensors["position_embd.weight"].shape[-1]))
    return fields


def _moe_fields(meta: GGUFMetadata, tensors: dict, arch: str, layers: int) -> dict:
    """The config of Qwen2-MoE / Qwen3-MoE / Mixtral (llama with experts): RMSNorm, SiLU-gated
    experts; layers without a router (`ffn_gate_inp`) are dense."""
    experts = int(meta.require("expert_count"))
    used = int(meta.require("expert_used_count"))
    width = meta.arch_value("expert_feed_forward_length")
    if width is None:
        first = next((t for n, t in tensors.items() if n.endswith(".ffn_gate_exps.weight")), None)
        if first is None:
            raise ValueError(f"the {arch} GGUF file has no expert_feed_forward_length and no expert tensors")
        width = int(first.shape[1])  # GGUF shape [D, F, E]
    shared = meta.arch_value("expert_shared_feed_forward_length")
    if shared is None and "blk.0.ffn_up_shexp.weight" in tensors:
        shared = int(tensors["blk.0.ffn_up_shexp.weight"].shape[-1])
    if arch != "qwen2moe" and shared:
        raise ValueError(f"{arch} GGUF files with a shared expert are not supported")
    return dict(activation="silu", mlp="experts", num_experts=experts, experts_per_token=used,
                expert_intermediate_size=int(width), shared_expert_intermediate_size=int(shared or 0),
                normalize_expert_weights=bool(meta.arch_value("expert_weights_norm", arch != "qwen2moe")),
                dense_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors),
                qk_norm="head" if "blk.0.attn_q_norm.weight" in tensors else "none")


def _gemma_layer_types(meta: GGUFMetadata, layers: int, default_period: int) -> tuple:
    """Sliding/global pattern: an explicit per-layer bool list or period, else llama.cpp's default
    (layer i is global when (i + 1) % period == 0)."""
    pattern = meta.arch_value("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return tuple("sliding" if bool(p) else "full" for p in pattern)
    if pattern is not None and int(pattern) == 0:  # llama.cpp: 0 means every layer slides
        return ("sliding",) * layers
    period = int(pattern) if pattern else default_period
    return tuple("full" if (i + 1) % period == 0 else "sliding" for i in range(layers))


def _rope_scaling(meta: GGUFMetadata, tensors: dict, rotary: int, theta: float) -> Optional[dict]:
    kind = meta.arch_value("rope.scaling.type")
    if kind in (None, "none"):
        if "rope_freqs.weight" in tensors:
            return _llama3_scaling(meta, tensors["rope_freqs.weight"], rotary, theta)
        return None
    if kind == "linear":
        factor = float(meta.arch_value("rope.scaling.factor", 1.0))
        return {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported")


def _llama3_scaling(meta: GGUFMetadata, tensor, rotary: int, theta: float) -> dict:
    """Llama 3.1+ files store the per-frequency divisors (`rope_freqs`) computed from the HF
    `rope_scaling` dict instead of the dict itself; find the llama3 parameters reproducing them."""
    import gguf

    freqs = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    if freqs.shape[0] != rotary // 2:
        raise ValueError(f"rope_freqs has {freqs.shape[0]} entries, expected {rotary // 2}")
    if np.allclose(freqs, 1.0):
        return None
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary, 2, dtype=np.float64) / rotary))
    factor = float(np.round(freqs.max(), 4))
    context = meta.arch_value("rope.scaling.original_context_length")
    for old in ([int(context)] if context else [8192, 4096, 16384, 32768, 131072]):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            low_wl, high_wl = old / low, old / high
            wavelen = 2 * math.pi / inv_freq
            smooth = (old / wavelen - low) / (high - low)
            divisor = np.where(wavelen < high_wl, 1.0,
                               np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if np.allclose(divisor, freqs, rtol=1e-3, atol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old}
    raise ValueError("the GGUF rope_freqs tensor matches no llama3 rope scaling; it is not supported")


# ---------------------------------------------------------------------------- weights
def dequantize(tensor) -> np.ndarray:
    """float32 numpy array of a GGUF tensor in numpy order (GGUF's shape reversed): for a linear
    weight [out, in], for the embedding [vocab, hidden]. Large tensors go in row blocks so that
    the dequantizer's temporaries stay small."""
    from gguf import quants

    data = tensor.data
    shape = tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))
    if data.ndim >= 2 and data.nbytes > ROW_BLOCK_BYTES:
        rows = max(1, ROW_BLOCK_BYTES // (data.nbytes // data.shape[0]))
        first = np.asarray(quants.dequantize(data[:rows], tensor.tensor_type), dtype=np.float32)
        out = np.empty((data.shape[0],) + first.shape[1:], np.float32)
        out[:rows] = first
        for start in range(rows, data.shape[0], rows):
            out[start:start + rows] = quants.dequantize(data[start:start + rows], tensor.tensor_type)
    else:
        out = np.array(quants.dequantize(data, tensor.tensor_type), dtype=np.float32)  # own copy
    if out.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name} dequantized to {out.size} values, expected shape {shape}")
    return out.reshape(shape)


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the output rows of a Q or K weight/bias
    ([out, in] or [out]): per head, rows (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)."""
    half = w.shape[0] // heads // 2
    return np.ascontiguousarray(w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _weights(tensors: dict, config: ModelConfig, arch: str,
             progress: Optional[Callable[[int, int], None]]) -> Dict[str, np.ndarray]:
    gemma = arch in GEMMA_ARCHITECTURES
    flat: Dict[str, np.ndarray] = {}
    names = [n for n in tensors if n not in _IGNORED_TENSORS]
    for done, name in enumerate(names, 1):
        canonical, linear = _canonical_name(name)
        w = dequantize(tensors[name])
        module = canonical.split(".")[-2]
        kind = canonical.split(".")[-1]
        if gemma and module.endswith("norm") and kind == "weight":
            w -= 1.0  # llama.cpp stores 1 + w
        if arch == "llama" and module in ("q", "k"):
            w = unpermute_rope_rows(w, config.num_heads if module == "q" else config.num_kv_heads)
        if module == "shared_expert_gate":  # stored squeezed: [D] (or [1, D])
            w = w.reshape(1, -1)
        if linear and kind == "weight":
            # [out, in] -> [in, out] (lm_head: [V, D] -> [D, V]); experts [E, out, in] -> [E, in, out]
            w = np.ascontiguousarray(np.swapaxes(w, -1, -2))
        if module == "qkv":
            q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            if w.shape[-1] != q_out + 2 * kv_out:
                raise ValueError(f"tensor {name} has {w.shape[-1]} outputs, expected {q_out + 2 * kv_out}")
            prefix = canonical[:-len("qkv." + kind)]
            for part, piece in zip("qkv", np.split(w, [q_out, q_out + kv_out], axis=-1)):
                flat[f"{prefix}{part}.{kind}"] = np.ascontiguousarray(piece)
        else:
            flat[canonical] = w
        if progress is not None:
            progress(done, len(names))
    return flat


def _canonical_name(name: str) -> Tuple[str, bool]:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        module, linear = _LAYER_TENSORS[parts[2]]
        return f"layers.{int(parts[1])}.{module}.{parts[3]}", linear
    if len(parts) == 2 and parts[0] in _TOP_TENSORS:
        module, linear = _TOP_TENSORS[parts[0]]
        return f"{module}.{parts[1]}", linear
    raise ValueError(f"GGUF tensor {name!r} is not supported by the jaxgen GGUF converter")
