"""Tiny, randomly initialised Hugging Face checkpoints for converter parity tests.

`build(arch, directory)` creates a torch model of the given architecture (hidden 64, 2-4 layers,
4 query / 2 key-value heads, head_dim 16, a few hundred tokens), perturbs every parameter (norm
weights included, so that norm offsets matter), saves it with `save_pretrained` (safetensors)
together with a tokenizer, and returns a `TinyModel` that can compute reference logits.

Each configuration exercises its family's specifics with values small enough to matter on
12-token sequences: sliding windows of 4, soft-capping, llama3 / linear / longrope rope scaling,
partial rotary, per-layer-type rope thetas, tied and untied heads, biases.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Callable, Dict, List

import numpy as np
import torch

torch.set_num_threads(2)

# Special token ids shared by every tiny model (Gemma's convention).
PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIALS = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK}

# Mixed lengths: the longest exceeds every sliding window, the shortest is shorter than one.
BATCH_LENGTHS = (12, 7, 3, 10)


@dataclasses.dataclass
class TinyModel:
    arch: str
    path: str
    model: torch.nn.Module
    vocab_size: int
    tokenizer_vocab_size: int  # tokens the tokenizer defines; the rest are <extra_id_N> fillers

    def batch(self, seed: int = 0) -> List[List[int]]:
        """A fixed mixed-length batch of token ids."""
        rng = np.random.default_rng(seed)
        return [rng.integers(4, self.vocab_size, size=n).tolist() for n in BATCH_LENGTHS]

    def logits(self, batch: List[List[int]]) -> np.ndarray:
        """HF float32 logits [B, T, V] of a right-padded batch (attention_mask masks padding)."""
        t = max(len(s) for s in batch)
        ids = torch.full((len(batch), t), PAD, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask)
        return out.logits.float().numpy()


# ---------------------------------------------------------------------------- configurations
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, initializer_range=0.1, pad_token_id=PAD, bos_token_id=BOS,
             eos_token_id=EOS)


def greedy_reference(model: torch.nn.Module, prompt: List[int], steps: int) -> List[int]:
    """HF `generate`'s greedy continuation of one prompt: exactly `steps` new token ids (the end
    token is forbidden before that)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, min_new_tokens=steps, eos_token_id=EOS,
                             pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
                     initializer_range=0.1, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel, cfg


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = LlamaConfig(vocab_size=288, num_hidden_layers=2, rope_parameters=rope, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, **SMALL)
    return LlamaForCausalLM, cfg


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=300, num_hidden_layers=2, sliding_window=4, **SMALL)
    return MistralForCausalLM, cfg


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Layer 0 full, layers 1-2 sliding (max_window_layers); q/k/v biases; tied embeddings.
    cfg = Qwen2Config(vocab_size=300, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1, tie_word_embeddings=True, **SMALL)
    return Qwen2ForCausalLM, cfg


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=300, num_hidden_layers=2, tie_word_embeddings=False, **SMALL)
    return Qwen3ForCausalLM, cfg


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=300, num_hidden_layers=2, hidden_act="gelu_pytorch_tanh", **SMALL)
    return GemmaForCausalLM, cfg


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=300, num_hidden_layers=4, sliding_window=4, query_pre_attn_scalar=24,
                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **SMALL)
    return Gemma2ForCausalLM, cfg


def _gemma3_text_config(cls):
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    return cls(vocab_size=300, num_hidden_layers=4, sliding_window=4, query_pre_attn_scalar=20,
               layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
               rope_parameters=rope, **SMALL)


def _gemma3_text():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM, _gemma3_text_config(Gemma3TextConfig)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = _gemma3_text_config(Gemma3TextConfig)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=299, boi_token_index=298, eoi_token_index=297,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return Gemma3ForConditionalGeneration, cfg


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    # Partial rotary (half of head_dim) with longrope short factors and an attention factor > 1.
    rotary_half = 16 // 2 // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + 0.5 * i for i in range(rotary_half)],
            "long_factor": [2.0 + i for i in range(rotary_half)], "original_max_position_embeddings": 16}
    small = dict(SMALL)
    small.pop("head_dim")
    cfg = Phi3Config(vocab_size=300, num_hidden_layers=2, rope_parameters=rope, original_max_position_embeddings=16,
                     sliding_window=6, tie_word_embeddings=False, **small)
    return Phi3ForCausalLM, cfg


ARCHITECTURES: Dict[str, Callable] = {
    "gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma": _gemma,
    "gemma2": _gemma2, "gemma3_text": _gemma3_text, "gemma3": _gemma3, "phi3": _phi3,
}

# The families added as declarations (issue 17), one builder module per group; each module's
# BUILDERS maps a name (a model_type, or model_type_variant) to a builder like those above, and its
# EXPECTED_CONFIG the ModelConfig values its conversion must give. tests/test_architectures.py
# runs every one against HF transformers.
import hf_families_alibi  # noqa: E402
import hf_families_gemma4  # noqa: E402
import hf_families_moe  # noqa: E402
import hf_families_parallel  # noqa: E402

FAMILY_MODULES = (hf_families_parallel, hf_families_alibi, hf_families_moe, hf_families_gemma4)
FAMILIES: Dict[str, Callable] = {name: fn for module in FAMILY_MODULES for name, fn in module.BUILDERS.items()}
FAMILY_EXPECTED_CONFIG: Dict[str, dict] = {name: values for module in FAMILY_MODULES
                                           for name, values in module.EXPECTED_CONFIG.items()}

# Which tokenizer each checkpoint ships: most a tokenizer.json, llama a sentencepiece model.
SENTENCEPIECE_ARCHS = ("llama",)


# ---------------------------------------------------------------------------- building
def build(arch: str, directory: str, seed: int = 0, dtype: torch.dtype = torch.float32,
          max_shard_size=None) -> TinyModel:
    """Builds, perturbs and saves one tiny checkpoint into `directory`."""
    if arch not in ARCHITECTURES and arch not in FAMILIES:
        raise ValueError(f"no tiny-model builder for {arch!r}")
    cls, cfg = (ARCHITECTURES.get(arch) or FAMILIES[arch])()
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if dtype != torch.float32:
        # Round the parameters only (not buffers such as rotary inv_freq, which `.to()` would round
        # too): the float32 reference then holds exactly the saved weights.
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.copy_(p.to(dtype).float())
        copy.deepcopy(model).to(dtype).save_pretrained(directory, **kwargs)
    else:
        model.save_pretrained(directory, **kwargs)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if arch in SENTENCEPIECE_ARCHS:
        n_tokens = write_sentencepiece_tokenizer(directory, seed)
    else:
        n_tokens = vocab_size - 20  # leaves holes that the converter fills with <extra_id_N>
        write_tokenizer_json(directory, n_tokens)
    write_tokenizer_config(directory, add_bos_token=arch != "gpt2")
    return TinyModel(arch, os.fspath(directory), model, vocab_size, n_tokens)


def write_tokenizer_json(directory: str, n_tokens: int) -> None:
    """A WordLevel tokenizer.json with the 4 specials and words `w4` ... `w{n_tokens-1}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = dict(SPECIALS)
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), n_tokens)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.save(os.path.join(directory, "tokenizer.json"))


def write_sentencepiece_tokenizer(directory: str, seed: int) -> int:
    """Trains a tiny sentencepiece BPE model -> tokenizer.model; returns its number of pieces."""
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnop")
    sentences = [" ".join("".join(rng.choice(letters, size=rng.integers(2, 6))) for _ in range(8))
                 for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=200, model_type="bpe",
        pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp.GetPieceSize()


def write_tokenizer_config(directory: str, add_bos_token: bool) -> None:
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>", "__type": "AddedToken"},
              "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": add_bos_token,
              "model_max_length": 64}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}, f)
