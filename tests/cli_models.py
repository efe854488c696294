"""A random tiny gemma3-like jaxgen model directory with a small SentencePiece tokenizer (trained
in milliseconds) and a chat template: the CLI tests' model (tests/conftest.py's `cli_tiny_model`)
and the tiny model of `benchmarks/run.py cli_startup`. No torch, no real weights."""

from __future__ import annotations

from typing import Optional

CLI_TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny model",
    "jaxgen runs language models with jax on cpu, gpu and tpu",
    "perplexity is the exponential of the average negative log likelihood",
    "a static prompt is computed once and cached for later calls",
]
CLI_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


CLI_CHATML_TEMPLATE = (  # ChatML (Qwen's turns), for chat tests on a template that is not Gemma's
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_cli_tiny_model(directory: str, chat_template: Optional[str] = CLI_TINY_CHAT_TEMPLATE,
                         turn_markers=("<start_of_turn>", "<end_of_turn>"), extra_json=None) -> str:
    """Writes a random tiny gemma3-like model directory with a SentencePiece tokenizer whose control
    pieces are `turn_markers`, `chat_template` (None: none) and the files of `extra_json`."""
    import io

    import numpy as np
    import sentencepiece as spm

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CLI_TINY_CORPUS * 4), model_writer=buf, vocab_size=100, model_type="bpe",
        unk_id=3, bos_id=2, eos_id=1, pad_id=0, unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>",
        pad_piece="<pad>", control_symbols=list(turn_markers), hard_vocab_limit=False,
        byte_fallback=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocabulary = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    config = ModelConfig(
        architecture="gemma3", vocab_size=len(vocabulary), hidden_size=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=16, intermediate_size=64, norm_offset=1.0, norm_placement="sandwich",
        qk_norm="head", activation="gelu_tanh", layer_types=("sliding", "full"),
        sliding_window=8, max_position_embeddings=512, embedding_scale=32 ** 0.5, bos_token="<bos>",
        eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    rng = np.random.default_rng(0)
    flat = {}
    for name, shape in expected_flat_shapes(config).items():
        if "norm" in name:
            flat[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            flat[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    tokenizer_config = {"bos_token": "<bos>", "eos_token": "<eos>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    save_model_dir(directory, config, flat, vocabulary, [("tokenizer.model", buf.getvalue())],
                   {"tokenizer_config.json": tokenizer_config, **(extra_json or {})})
    return directory
