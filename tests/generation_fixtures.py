"""Tiny random checkpoints for the generation tests (test_generation_*.py), converted with both
jaxgen's and CTranslate2's TransformersConverter, and helpers shared by those tests.

The models use configurations that CTranslate2 4.x converts faithfully with transformers 5
(CTranslate2's loaders read the transformers-4 attribute names: a non-default `rope_parameters`
or Gemma 3's `query_pre_attn_scalar` != head_dim would make CTranslate2 compute another model):

* llama:  default RoPE (theta 10000), GQA 4/2 heads, untied head.
* gemma3: Gemma3 text with layers [sliding, sliding, full, sliding], sliding_window 4 (shorter than
          most prompts here), default RoPE per layer type (1e6 full / 1e4 local), qk-norm.
* gpt2:   learned positions (128), tied head; used for the suppress_sequences example.

Every token is a vocabulary word (`<pad> <eos> <bos> <unk> t4 … t{V-1}`), so both converters
produce the same vocabulary. Weights are perturbed (SCALE) so that next-token distributions are
peaked (entropy ~1.5-2.5 nats) and argmax near-ties are rare; the <eos> and <unk> output rows are
scaled up so that both are generated now and then (end tokens, min_length, length_penalty and
disable_unk then matter). test_generation_parity.py checks the top-2 margin of every greedy
decision it compares (`top2_margin`, DECISIVE_MARGIN) and fails loudly on a near-tie.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

# Minimal top-1/top-2 logit margin for a greedy decision to be called decisive: the float32
# difference between CTranslate2's and jaxgen's logits is ~1e-5 on these models.
DECISIVE_MARGIN = 2e-3
SCORE_TOLERANCE = 1e-3


def vocabulary(size: int) -> List[str]:
    return SPECIALS + [f"t{i}" for i in range(len(SPECIALS), size)]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD)
    return LlamaForCausalLM, cfg


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    cfg = Gemma3TextConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=4, rope_parameters=rope, max_position_embeddings=256,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"],
                           tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return Gemma3ForCausalLM, cfg


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=160, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     activation_function="gelu_new", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel, cfg


# Perturbation std per architecture (next-token entropy ~1.5-2.5 nats) and <eos> boost.
SCALE = {"llama": 0.5, "gemma3": 0.2, "gpt2": 0.5}
EOS_BOOST = {"llama": 2.0, "gemma3": 1.7, "gpt2": 2.0}
UNK_BOOST = {"llama": 2.0, "gemma3": 1.5, "gpt2": 2.0}  # so that disable_unk changes some outputs

BUILDERS = {"llama": _llama, "gemma3": _gemma3, "gpt2": _gpt2}


def build_hf(arch: str, directory: str, seed: int = 0, scale: Optional[float] = None,
             eos_boost: Optional[float] = None) -> str:
    """A tiny random HF checkpoint + WordLevel tokenizer in `directory`.

    `eos_boost` multiplies the output-embedding row of <eos>: its logit is then large (either
    sign) so that <eos> is produced after a handful of tokens, and rarely near-tied."""
    scale = SCALE[arch] if scale is None else scale
    eos_boost = EOS_BOOST[arch] if eos_boost is None else eos_boost
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cls, cfg = BUILDERS[arch]()
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * scale)
        model.get_output_embeddings().weight[EOS] *= eos_boost
        model.get_output_embeddings().weight[UNK] *= UNK_BOOST[arch]
    model.save_pretrained(directory)
    vocab = {t: i for i, t in enumerate(vocabulary(cfg.vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return directory


@dataclasses.dataclass
class ModelPair:
    """One tiny checkpoint loaded in both engines (one Generator each, reused by all tests)."""

    arch: str
    hf_dir: str
    jaxgen_dir: str
    ct2_dir: str
    jaxgen: object
    ct2: Optional[object]
    tokens: List[str]
    # Longest multi-token prefill (static prompt + prefilled prompt part) on which CTranslate2 is
    # exact: CTranslate2 4.8's sliding-window attention is wrong when a multi-token forward pass
    # runs past the window (Gemma 3 here; jaxgen matches Hugging Face there, see
    # test_generation_parity.py::test_gemma3_prefill_beyond_window_matches_hf).
    max_prefill: Optional[int] = None

    def prompt(self, seed: int, length: int, bos: bool = True) -> List[str]:
        """A random prompt of `length` tokens (starting with <bos> when `bos`), no special tokens after."""
        rng = np.random.default_rng(seed)
        body = rng.integers(len(SPECIALS), len(self.tokens), size=length - int(bos)).tolist()
        return (["<bos>"] if bos else []) + [self.tokens[i] for i in body]


def build_pair(arch: str, root: str, with_ct2: bool = True) -> ModelPair:
    import jaxgen
    from jaxgen.converters import TransformersConverter

    hf_dir = build_hf(arch, os.path.join(root, "hf"))
    jaxgen_dir = os.path.join(root, "jaxgen")
    TransformersConverter(hf_dir).convert(jaxgen_dir)
    ct2_dir = os.path.join(root, "ct2")
    ct2 = None
    if with_ct2:
        import ctranslate2

        ctranslate2.converters.TransformersConverter(hf_dir).convert(ct2_dir, force=True)
        ct2 = ctranslate2.Generator(ct2_dir, device="cpu", intra_threads=1)
    gen = jaxgen.Generator(jaxgen_dir)
    window = gen.config.sliding_window if "sliding" in (gen.config.layer_types or ()) else None
    return ModelPair(arch, hf_dir, jaxgen_dir, ct2_dir, gen, ct2, list(gen.vocabulary.tokens), window)


_PAIRS: Dict[str, ModelPair] = {}


@pytest.fixture(scope="session")
def gen_pair(tmp_path_factory):
    """`gen_pair(arch)` -> the session's ModelPair for "llama", "gemma3" or "gpt2" (built once).

    Test modules import this fixture; the module-level cache makes every module share one build
    and one pair of Generators (so jaxgen's compiled shapes are reused across files)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2")

    def get(arch: str) -> ModelPair:
        if arch not in _PAIRS:
            _PAIRS[arch] = build_pair(arch, str(tmp_path_factory.mktemp(f"gen-{arch}")))
        return _PAIRS[arch]

    yield get
    # Release CTranslate2's generators (and their threads) before interpreter shutdown.
    import gc

    for pair in _PAIRS.values():
        pair.ct2 = None
    _PAIRS.clear()
    gc.collect()


# ---------------------------------------------------------------------------- comparison helpers
def top2_margin(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> top-1 minus top-2 value."""
    part = np.sort(np.asarray(logits, dtype=np.float64), axis=-1)
    return part[..., -1] - part[..., -2]


def assert_same_results(pair: ModelPair, prompts, ct2_results, jaxgen_results, what: str,
                        check_scores: bool = True) -> None:
    """Same ids and tokens per hypothesis, and scores within SCORE_TOLERANCE.

    (Greedy paths are checked to be decisive before, by the caller; for beam search a mismatch
    whose scores agree within the tolerance points to a near-tie between hypotheses.)"""
    assert len(ct2_results) == len(jaxgen_results), what
    for i, (c, j) in enumerate(zip(ct2_results, jaxgen_results)):
        label = f"{pair.arch} {what} example {i} (prompt {prompts[i]})"
        if c.sequences_ids != j.sequences_ids:
            raise AssertionError(f"{label}: ids differ\n ct2:    {c.sequences_ids}\n jaxgen: {j.sequences_ids}"
                                 f"\n scores ct2 {c.scores} jaxgen {j.scores}")
        assert c.sequences == j.sequences, label
        if check_scores:
            assert len(c.scores) == len(j.scores), label
            np.testing.assert_allclose(j.scores, c.scores, atol=SCORE_TOLERANCE, rtol=0, err_msg=label)


def ids_of(pair: ModelPair, tokens: Sequence[str]) -> List[int]:
    return [pair.jaxgen.vocabulary.id_of(t) for t in tokens]


def compile_cache_sizes() -> Dict[str, int]:
    """Number of compiled specialisations of the jitted decode entry points (for recompilation tests)."""
    from jaxgen.decoding import beam, search

    out = {}
    for name, fn in (("decode", search.decode), ("prefill", search.prefill), ("start_cache", search.start_cache),
                     ("beam_decode", beam.beam_decode), ("expand_beams", beam.expand_beams)):
        size = getattr(fn, "_cache_size", None)
        if size is not None:
            out[name] = size()
    return out
