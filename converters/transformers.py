"""Hugging Face transformers checkpoints -> jaxgen model directories, without torch.

Reads a checkpoint directory as `save_pretrained` writes it: `config.json`, one or several
`*.safetensors` files (with or without `model.safetensors.index.json`) and the tokenizer
(`tokenizer.json` and/or `tokenizer.model`, `tokenizer_config.json`, ...). Tensors are read straight
from the safetensors files (memory-mapped), so float16/bfloat16 checkpoints keep their type.

Each supported `model_type` has one loader in `jaxgen.converters.loaders` (registered with
`jaxgen.converters.hf_loader.register_loader`) that maps the checkpoint onto the one decoder
through `ModelConfig` values and the canonical parameter names of `jaxgen.model.checkpoint`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import jaxgen.converters.loaders  # noqa: F401  (registers every loader)
from jaxgen.converters.base import ConvertedModel, Converter
from jaxgen.converters.hf_loader import FLOAT_DTYPES, LOADERS, HFConfig, Spec, weight_dtype
from jaxgen.converters.safetensors_reader import SafetensorsReader
from jaxgen.model.checkpoint import flat_params
from jaxgen.model.config import ModelConfig, read_json_file

# Tokenizer-side files copied as they are (bytes) and JSON files copied as objects.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
EXTRA_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def supported_model_types() -> Tuple[str, ...]:
    """The `model_type`s a loader is registered for (see jaxgen.converters.loaders)."""
    return tuple(sorted(LOADERS))


Progress = Callable[[int, int], None]  # (tensors done, tensors in total)


class TransformersConverter(Converter):
    """Converts a Hugging Face transformers checkpoint directory (mirrors CTranslate2's converter).

    Args:
      model_name_or_path: a local checkpoint directory (a model name is looked up in the local
        Hugging Face cache only; nothing is downloaded).
      copy_files: extra files of the checkpoint directory to copy into the output directory.
      progress: optional callable `progress(done, total)` called after each converted tensor.
    """

    def __init__(self, model_name_or_path: str, copy_files: Optional[List[str]] = None,
                 progress: Optional[Progress] = None):
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a path string, got {type(model_name_or_path).__name__}")
        self._model_name_or_path = os.fspath(model_name_or_path)
        self._copy_files = list(copy_files or [])
        self._progress = progress

    # ------------------------------------------------------------------ entry point
    def load(self) -> ConvertedModel:
        directory = _resolve_directory(self._model_name_or_path)
        raw = _read_json(os.path.join(directory, "config.json"))
        model_type = raw.get("model_type")
        if model_type not in LOADERS:
            raise ValueError(
                f"No conversion is registered for the model configuration {model_type or raw.get('architectures')} "
                f"(supported configurations are: {', '.join(supported_model_types())})")
        hf = HFConfig(raw)
        weights = SafetensorsReader(directory)
        try:
            spec = LOADERS[model_type].fn(hf, weights)
            tokenizer_config = _read_json_if_exists(os.path.join(directory, "tokenizer_config.json"))
            special_map = _read_json_if_exists(os.path.join(directory, "special_tokens_map.json"))
            generation_config = _read_json_if_exists(os.path.join(directory, "generation_config.json"))
            vocab_size = spec.config_fields["vocab_size"]
            vocabulary, tokenizer_json = _read_vocabulary(directory, vocab_size, tokenizer_config)
            tokens = _special_tokens(hf, tokenizer_config, special_map, generation_config, vocabulary,
                                     tokenizer_json)
            dtype = weight_dtype(hf, weights, spec.embed_name)
            config = ModelConfig(**spec.config_fields, **tokens, weight_dtype=dtype)
            flat = self._collect(spec, config, FLOAT_DTYPES[dtype])
        finally:
            weights.close()

        tokenizer_files = []
        for name in TOKENIZER_FILES + tuple(self._copy_files):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    tokenizer_files.append((name, f.read()))
            elif name in self._copy_files:
                raise ValueError(f"file {name!r} given in copy_files is not in {directory}")
        extra_json = {}
        for name, obj in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_map),
                          ("generation_config.json", generation_config)):
            if obj is not None and name not in self._copy_files:
                extra_json[name] = obj
        return ConvertedModel(config, flat, vocabulary, tokenizer_files, extra_json)

    def _collect(self, spec: Spec, config: ModelConfig, float_dtype: np.dtype) -> Dict[str, np.ndarray]:
        flat: Dict[str, np.ndarray] = {}
        decls = flat_params(config)
        total = len(spec.tensors)
        for done, (name, getter) in enumerate(spec.tensors.items(), start=1):
            array = np.asarray(getter())
            target = np.float32 if name in decls and decls[name].keep_float32 else float_dtype
            flat[name] = np.ascontiguousarray(array.astype(target, copy=False))
            if self._progress is not None:
                self._progress(done, total)
        spec.check_all_used()
        return flat


# ---------------------------------------------------------------------------- files
def _resolve_directory(name: str) -> str:
    if os.path.isdir(name):
        return name
    try:  # a hub name already in the local cache; never downloads
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    raise ValueError(f"{name!r} is not a checkpoint directory (jaxgen converts local Hugging Face "
                     f"checkpoint directories; it does not download models)")


def _read_json(path: str) -> dict:
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _read_json_if_exists(path: str) -> Optional[dict]:
    return _read_json(path) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------- vocabulary and tokens
def _filler_tokens(vocabulary: List[Optional[str]]) -> List[str]:
    """Fills holes (None) with CTranslate2-style `<extra_id_N>` tokens that do not clash."""
    taken = {t for t in vocabulary if t is not None}
    out, n = [], 0
    for token in vocabulary:
        if token is None:
            while f"<extra_id_{n}>" in taken:
                n += 1
            token = f"<extra_id_{n}>"
            n += 1
        out.append(token)
    return out


def _read_vocabulary(directory: str, vocab_size: int, tokenizer_config: Optional[dict] = None
                     ) -> Tuple[List[str], Optional[dict]]:
    """Token strings ordered by id, padded with fillers or truncated to `vocab_size`.

    From tokenizer.json (model vocabulary + added tokens) or else tokenizer.model (sentencepiece
    pieces + the `added_tokens_decoder` of tokenizer_config.json). Returns the vocabulary and the
    parsed tokenizer.json (None when the vocabulary came from tokenizer.model).
    """
    tokens: Dict[int, str] = {}
    tokenizer_json = None
    json_path = os.path.join(directory, "tokenizer.json")
    sp_path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(json_path):
        tokenizer_json = _read_json(json_path)
        model = tokenizer_json.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece
            for token, i in vocab.items():
                tokens[int(i)] = token
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            for i, entry in enumerate(vocab):
                tokens[i] = entry[0] if isinstance(entry, (list, tuple)) else entry
        else:
            raise ValueError(f"{json_path}: unsupported tokenizer model {model.get('type')!r}")
        for added in tokenizer_json.get("added_tokens") or []:
            tokens[int(added["id"])] = added["content"]
    elif os.path.isfile(sp_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(sp_path)
        tokens = {i: sp.IdToPiece(i) for i in range(sp.GetPieceSize())}
        added = (tokenizer_config or {}).get("added_tokens_decoder")
        if isinstance(added, dict):
            for i, entry in added.items():
                content = _token_string(entry)
                if content is not None and str(i).isdigit():
                    tokens[int(i)] = content
    else:
        raise ValueError(f"{directory} has no tokenizer.json or tokenizer.model to read the vocabulary from")
    vocabulary: List[Optional[str]] = [None] * vocab_size
    for i, token in tokens.items():
        if 0 <= i < vocab_size:
            vocabulary[i] = token
    return _filler_tokens(vocabulary), tokenizer_json


def _token_string(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(hf: HFConfig, tokenizer_config: Optional[dict], special_map: Optional[dict],
                    generation_config: Optional[dict], vocabulary: List[str],
                    tokenizer_json: Optional[dict]) -> dict:
    """bos/eos/unk/pad token strings and add_bos_token for ModelConfig."""
    known = set(vocabulary)

    def by_id(ids: List[int]) -> Optional[str]:
        for i in ids:
            if 0 <= i < len(vocabulary):
                return vocabulary[i]
        return None

    def by_name(key: str) -> Optional[str]:
        for source in (tokenizer_config, special_map):
            if source and _token_string(source.get(key)) is not None:
                return _token_string(source.get(key))
        return None

    def gen_ids(key: str) -> List[int]:
        value = (generation_config or {}).get(key)
        values = value if isinstance(value, list) else [value]
        return [int(v) for v in values if isinstance(v, int)]

    out = {}
    for key in ("bos", "eos", "unk", "pad"):
        ids = hf.ids(f"{key}_token_id") or gen_ids(f"{key}_token_id")
        if key == "eos":  # the model's end token: config ids first
            token = by_id(ids) or by_name("eos_token")
        else:
            token = by_name(f"{key}_token") or by_id(ids)
        out[f"{key}_token"] = token if token in known else None

    add_bos = tokenizer_config.get("add_bos_token") if tokenizer_config else None
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(tokenizer_json, out["bos_token"])
    out["add_bos_token"] = bool(add_bos)
    return out


def _post_processor_adds(tokenizer_json: Optional[dict], bos: Optional[str]) -> bool:
    """Whether tokenizer.json's TemplateProcessing starts single sequences with the bos token."""
    if not tokenizer_json or bos is None:
        return False
    processor = tokenizer_json.get("post_processor") or {}
    candidates = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for proc in candidates:
        if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if single and isinstance(single[0], dict) and single[0].get("SpecialToken", {}).get("id") == bos:
                return True
    return False
