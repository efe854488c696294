"""Tiny random HF checkpoints of OPT, BLOOM, MPT, Falcon (learned positions with an offset, post-norm, projected embeddings, ALiBi, multi-query and grouped fused projections).

Each builder returns (model class, config) like those of hf_models.py, small enough (hidden 64,
2-3 layers, a few hundred tokens) to run in a second, with every option of the family that the
converter maps set to a value that matters on 12-token sequences. BLOOM and MPT have 6 heads, so
that the two conventions for the slopes of a head count that is not a power of two are both
tested (they differ); Falcon-RW has 8 heads, whose slopes are powers of two: HF multiplies them
by each key's position in bfloat16, which only such slopes survive exactly.
"""

from __future__ import annotations

from typing import Callable, Dict

from hf_models import BOS, EOS, PAD

BUILDERS: Dict[str, Callable] = {}
EXPECTED_CONFIG: Dict[str, dict] = {}

TOKENS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _builder(name: str, **expected):
    def wrap(fn):
        BUILDERS[name] = fn
        EXPECTED_CONFIG[name] = expected
        return fn

    return wrap


@_builder("opt", norm_placement="pre", final_norm=True, position_embedding="learned", max_position_embeddings=64,
          embedding_size=None, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, activation="relu",
          mlp="plain")
def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    # pre-norm with a final norm, no linear biases, an untied head
    cfg = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, enable_bias=False, tie_word_embeddings=False, init_std=0.1, **TOKENS)
    return OPTForCausalLM, cfg


@_builder("opt-350m", norm_placement="post", final_norm=False, position_embedding="learned",
          max_position_embeddings=64, embedding_size=48, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
def _opt_350m():
    from transformers import OPTConfig, OPTForCausalLM

    # opt-350m's layout: post-norm without a final norm, embeddings of 48 projected to 64 and back
    cfg = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, do_layer_norm_before=False, word_embed_proj_dim=48, init_std=0.1,
                    **TOKENS)
    return OPTForCausalLM, cfg


@_builder("bloom", position_embedding="alibi", embedding_norm=True, num_heads=6, head_dim=8,
          alibi_slopes=(2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3), activation="gelu_tanh",
          attention_bias=True)
def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=300, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.1, **TOKENS)
    return BloomForCausalLM, cfg


@_builder("mpt", position_embedding="alibi", norm_bias=False, num_heads=6, head_dim=8, attention_bias=False,
          alibi_slopes=(2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3), activation="gelu",
          max_position_embeddings=64)
def _mpt():
    from transformers import MptConfig, MptForCausalLM

    cfg = MptConfig(vocab_size=300, d_model=48, n_heads=6, n_layers=2, max_seq_len=64, initializer_range=0.1,
                    **TOKENS)
    return MptForCausalLM, cfg


@_builder("falcon", block="parallel", shared_block_norm=False, num_heads=4, num_kv_heads=2, head_dim=16,
          position_embedding="rope", rope_theta=500.0, attention_bias=True)
def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    # the new decoder architecture (Falcon-40B/180B): GQA with q..q|k|v grouped per KV head,
    # ln_attn and ln_mlp; biases; a rope theta that is not the default
    cfg = FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                       new_decoder_architecture=True, bias=True, ffn_hidden_size=96, max_position_embeddings=64,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False,
                       initializer_range=0.1, **TOKENS)
    return FalconForCausalLM, cfg


@_builder("falcon-11b", block="parallel", shared_block_norm=True, num_heads=4, num_kv_heads=2,
          position_embedding="rope")
def _falcon_11b():
    from transformers import FalconConfig, FalconForCausalLM

    # Falcon2-11B: the new decoder architecture with one input_layernorm (num_ln_in_parallel_attn=1)
    cfg = FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                       new_decoder_architecture=True, num_ln_in_parallel_attn=1, max_position_embeddings=64,
                       initializer_range=0.1, **TOKENS)
    return FalconForCausalLM, cfg


@_builder("falcon-7b", block="parallel", shared_block_norm=True, num_heads=4, num_kv_heads=1,
          position_embedding="rope", attention_bias=False)
def _falcon_7b():
    from transformers import FalconConfig, FalconForCausalLM

    # Falcon-7B: multi-query (q heads | k | v), a parallel block with one shared norm, no biases
    cfg = FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       multi_query=True, parallel_attn=True, max_position_embeddings=64, initializer_range=0.1,
                       **TOKENS)
    return FalconForCausalLM, cfg


@_builder("falcon-rw", block="sequential", num_heads=8, num_kv_heads=8, head_dim=8, position_embedding="alibi",
          alibi_slopes=tuple(2.0 ** -(i + 1) * 8 ** -0.5 for i in range(8)), attention_bias=True)
def _falcon_rw():
    from transformers import FalconConfig, FalconForCausalLM

    # Falcon-RW: ALiBi (added before the 1/sqrt(hd) scale), q|k|v fused per head, a sequential block
    cfg = FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, alibi=True,
                       multi_query=False, parallel_attn=False, bias=True, max_position_embeddings=64,
                       initializer_range=0.1, **TOKENS)

    class FalconSdpa(FalconForCausalLM):
        """The reference in the attention a Falcon checkpoint loads with (from_pretrained picks
        sdpa): HF's eager ALiBi path adds the bias a second time through its mask."""

        @classmethod
        def _from_config(cls, config, **kwargs):
            return super()._from_config(config, **dict(kwargs, attn_implementation="sdpa"))

    return FalconSdpa, cfg
