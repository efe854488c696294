"""The GGUF converter on the default model (Gemma 3 270M, Q4_K_M) and on tiny llama.cpp-style files.

References:
  * transformers loading the same GGUF (float32): weights, logits of a mixed-length batch, a
    sequence longer than the 512-token sliding window, and its GGUF tokenizer;
  * CTranslate2 4.8.5 fed `save_pretrained` of that transformers model: `score_batch`
    log-probs. CTranslate2 raises "Length mask has size ..." on a mixed-length score batch for
    Gemma 3 and "buffer to copy is of size N but current storage size is 512" on sequences past
    the sliding window, so it scores each (<= 512-token) sequence alone and we compare with our
    single mixed batch;
  * tiny random transformers models written as GGUF the way llama.cpp's convert_hf_to_gguf.py
    writes them (llama's rope permutation of Q/K, Gemma's 1 + w norms, F32/F16/Q8_0 tensors).

Artefacts of the default model are session fixtures in conftest.py ("GGUF default model").
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOL = 1e-3  # max abs difference of logits / log-probs (measured: ~1e-4)

PROSE = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press adapted from those used to make "
    "wine. Books became cheaper, literacy spread, and ideas travelled faster than ever before."
)
CODE = (
    "def fibonacci(n: int) -> int:\n"
    "    \"\"\"Returns the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
)
MULTILINGUAL = "Bonjour, comment ça va ? 日本語のテキストも少し。Привет, мир! مرحبا بالعالم"
SHORT = "Paris is the capital of"

# Encoding must match transformers on all of these, and decode back. Plain `sp.encode` matches the
# chat markers as transformers does and reads the bos/eos/pad/unk strings as text (see
# converters/sentencepiece_model.py); `jaxgen.tokenizer` with parse_special=True reads those too.
TOKENIZER_CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "Hello world", "Hello, World!", "  leading spaces", "trailing spaces   ",
    "tabs\tand\t\tmore\t\t\ttabs", "a\nb\n\nc\n\n\n\nd", "\r\n windows line endings \r\n",
    "a  b   c    d     e      f", " " * 40 + "forty spaces", "\n" * 40 + "forty newlines",
    "日本語のテキストです。中文字符。한국어 텍스트", "café naïve résumé Ångström Øre façade",
    "مرحبا بالعالم שלום עולם", "Ελληνικά και русский текст",
    "1234567890 3.14159 1,000,000 2024-01-31 0x1F 1e-10", "v1.2.3-rc4 +49 (0) 123 45 67",
    PROSE, CODE, MULTILINGUAL,
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>", "<table><tr><td>1</td></tr></table>",
    "**bold** _italic_ `code` [link](http://example.com) # Title\n- item",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 🇫🇷", "\u200b zero\u200dwidth \ufeff bom", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ligature and ｶﾀｶﾅ", "𝔹𝕠𝕝𝕕 math 𝑥²", "\x00\x01\x07 control chars \x7f", "x" * 300,
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", "<bos><eos><pad><unk><mask>",
    "[multimodal]<start_of_image><end_of_image>", "<unused0> <unused99>", "<0x41> literal byte token",
]
# Gemma chat prompts: <start_of_turn> (105) and <end_of_turn> (106) are single tokens in text.
CHAT_CORPUS = [
    "<start_of_turn>user\nhi<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nTranslate: «bonjour»<end_of_turn>\n<start_of_turn>model\n",
    "x<start_of_turn>y<end_of_turn>z", "<start_of_turn><end_of_turn><start_of_turn>", "<<start_of_turn>>",
    "<start_of_turn >user", "<start_of_turn\n", " <end_of_turn> \n\n<end_of_turn>\t", "<mask><unused6241>[multimodal]",
]
ROLE_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")  # control pieces: text for a plain sp.encode


def _real_ids(tokenizer, text, bos=True):
    return tokenizer.encode(text, add_special_tokens=bos)


@pytest.fixture(scope="module")
def generator(gguf_jaxgen_dir):
    from jaxgen import Generator

    return Generator(gguf_jaxgen_dir)


# ---------------------------------------------------------------------------- weights and config
def test_config_and_weights_match_transformers(gguf_jaxgen_dir, gguf_hf_model):
    from jaxgen.model.checkpoint import load_model_dir

    config, flat, vocab = load_model_dir(gguf_jaxgen_dir)
    assert config.architecture == "gemma3"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == \
        (18, 640, 4, 1, 256)
    assert config.norm_offset == 1.0 and config.qk_norm == "head" and config.norm_placement == "sandwich"
    assert config.activation == "gelu_tanh" and config.mlp == "gated" and config.tie_word_embeddings
    assert config.embedding_scale == pytest.approx(640 ** 0.5)
    assert config.scale == pytest.approx(256 ** -0.5)
    assert config.sliding_window == 512
    assert config.rope_theta == 1e6 and config.rope_local_theta == 1e4
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    hf_types = ["sliding" if t == "sliding_attention" else "full" for t in gguf_hf_model.config.layer_types]
    assert list(config.layer_types) == hf_types
    assert [i for i, t in enumerate(config.layer_types) if t == "full"] == [5, 11, 17]
    assert (config.bos_token, config.eos_token, config.unk_token, config.pad_token) == \
        ("<bos>", "<eos>", "<unk>", "<pad>")
    assert config.add_bos_token is True
    assert config.weight_dtype == "float32" and len(vocab) == config.vocab_size == 262144

    # Dequantized weights equal transformers' exactly, norms included (both store w, not 1 + w).
    hf = {k: v.detach().numpy() for k, v in gguf_hf_model.state_dict().items()}
    names = {"embed_tokens": "embed", "norm": "final_norm"}
    layer_names = {"self_attn.q_proj": ("q", True), "self_attn.k_proj": ("k", True), "self_attn.v_proj": ("v", True),
                   "self_attn.o_proj": ("o", True), "self_attn.q_norm": ("q_norm", False),
                   "self_attn.k_norm": ("k_norm", False), "mlp.gate_proj": ("gate", True),
                   "mlp.up_proj": ("up", True), "mlp.down_proj": ("down", True),
                   "input_layernorm": ("attn_norm", False), "post_attention_layernorm": ("post_attn_norm", False),
                   "pre_feedforward_layernorm": ("mlp_norm", False),
                   "post_feedforward_layernorm": ("post_mlp_norm", False)}
    checked = 0
    for key, value in hf.items():
        if key == "lm_head.weight":  # tied
            np.testing.assert_array_equal(value, flat["embed.weight"])
            continue
        parts = key.split(".")
        if parts[1] == "layers":
            module, linear = layer_names[".".join(parts[3:-1])]
            ours = flat[f"layers.{parts[2]}.{module}.weight"]
            ours = ours.T if linear else ours
        else:
            ours = flat[f"{names[parts[1]]}.weight"]
        np.testing.assert_array_equal(ours, value, err_msg=key)
        checked += 1
    assert checked == len(flat)


# ---------------------------------------------------------------------------- (a) forward_batch vs transformers
def test_forward_batch_matches_transformers(generator, gguf_hf_model, gguf_hf_tokenizer):
    import torch

    ids = [_real_ids(gguf_hf_tokenizer, PROSE + "\n\n" + CODE), _real_ids(gguf_hf_tokenizer, MULTILINGUAL),
           _real_ids(gguf_hf_tokenizer, SHORT)]
    lengths = [len(x) for x in ids]
    assert len(set(lengths)) == 3 and max(lengths) <= 128
    ours = np.asarray(generator.forward_batch(ids))
    assert ours.shape == (3, max(lengths), 262144)

    width = max(lengths)
    inputs = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        ref = gguf_hf_model(input_ids=inputs, attention_mask=mask).logits.numpy()
    for row, n in enumerate(lengths):  # valid positions only
        diff = np.abs(ours[row, :n] - ref[row, :n]).max()
        assert diff < TOL, f"row {row}: max |logit diff| {diff}"
        assert np.array_equal(ours[row, :n].argmax(-1), ref[row, :n].argmax(-1))


def test_long_sequence_past_sliding_window_matches_transformers(generator, gguf_hf_model, gguf_hf_tokenizer):
    """Positions past 512 see a window of 512 keys on sliding layers (an off-by-one changes
    these log-probs by ~4e-2)."""
    import torch

    text = "\n\n".join([PROSE, CODE, MULTILINGUAL] * 6)
    ids = _real_ids(gguf_hf_tokenizer, text)[:560]
    assert len(ids) == 560
    ours = np.asarray(generator.score_batch([ids])[0].log_probs)
    with torch.no_grad():
        logits = gguf_hf_model(input_ids=torch.tensor([ids])).logits[0]
        ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        del logits
    diff = np.abs(ours - ref)
    assert diff.max() < TOL, f"max |log-prob diff| {diff.max()} (past the window: {diff[511:].max()})"


# ---------------------------------------------------------------------------- (b) score_batch vs CTranslate2
def test_score_batch_matches_ctranslate2(generator, gguf_ct2_dir, gguf_hf_tokenizer):
    import ctranslate2

    texts = [CODE, PROSE, SHORT, MULTILINGUAL]
    tokens = [gguf_hf_tokenizer.convert_ids_to_tokens(_real_ids(gguf_hf_tokenizer, t)) for t in texts]
    assert len({len(t) for t in tokens}) == len(tokens)
    ours = generator.score_batch(tokens)  # one mixed-length batch
    ct2 = ctranslate2.Generator(gguf_ct2_dir, device="cpu", compute_type="float32")
    for i, seq in enumerate(tokens):
        ref = ct2.score_batch([seq])[0]  # alone: CT2 4.8.5 fails on mixed-length Gemma 3 batches
        assert ours[i].tokens == ref.tokens == seq[1:]
        diff = np.abs(np.asarray(ours[i].log_probs) - np.asarray(ref.log_probs)).max()
        assert diff < TOL, f"sequence {i}: max |log-prob diff| {diff}"


def test_vocabulary_matches_transformers_and_ctranslate2(gguf_jaxgen_dir, gguf_ct2_dir, gguf_hf_tokenizer):
    with open(os.path.join(gguf_jaxgen_dir, "vocabulary.json"), encoding="utf-8") as f:
        ours = json.load(f)
    assert ours == gguf_hf_tokenizer.convert_ids_to_tokens(list(range(len(ours))))
    with open(os.path.join(gguf_ct2_dir, "vocabulary.json"), encoding="utf-8") as f:
        assert json.load(f) == ours
    assert ours[138] == "\u2581\u2581"  # Gemma's whitespace-run tokens, stored as real spaces in the GGUF


# ---------------------------------------------------------------------------- (c) tokenizer
@pytest.fixture(scope="module")
def sp_model(gguf_jaxgen_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(gguf_jaxgen_dir, "tokenizer.model"))


def _hf_ids(tokenizer, text, split_special=True):
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special)


def test_tokenizer_matches_transformers_on_corpus(sp_model, gguf_hf_tokenizer):
    controls = [sp_model.id_to_piece(i) for i in range(sp_model.get_piece_size()) if sp_model.is_control(i)]
    assert sorted(controls) == sorted(["<bos>", "<eos>", "<pad>"])
    for text in TOKENIZER_CORPUS + CHAT_CORPUS:
        ids = sp_model.encode(text)
        if not any(c in text for c in ROLE_TOKENS):
            assert ids == _hf_ids(gguf_hf_tokenizer, text, split_special=False), repr(text)
        assert sp_model.decode(ids) == text, repr(text)
        assert sp_model.encode(text, out_type=str) == gguf_hf_tokenizer.convert_ids_to_tokens(ids)


def test_jaxgen_tokenizer_matches_transformers_on_chat_corpus(gguf_jaxgen_dir, sp_model, gguf_hf_tokenizer):
    """`jaxgen.tokenizer`: plain encode is sp.encode; parse_special=True is transformers' default
    encoding on every text, the bos/eos/pad/unk strings included."""
    from jaxgen.tokenizer import gemma_chat_format, load_tokenizer

    tokenizer = load_tokenizer(gguf_jaxgen_dir)
    assert tokenizer.backend == "sentencepiece"
    assert sorted(tokenizer.special_tokens) == sorted(ROLE_TOKENS)
    for text in TOKENIZER_CORPUS + CHAT_CORPUS:
        assert tokenizer.encode_ids(text) == sp_model.encode(text), repr(text)
        assert tokenizer.encode_ids(text, parse_special=True) == _hf_ids(gguf_hf_tokenizer, text, False), repr(text)
    assert tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>") == \
        ["<start_of_turn>", "user", "\n", "hi", "<end_of_turn>"]
    chat = gemma_chat_format([{"role": "user", "content": "hi"}], bos="<bos>")  # the base model has no template
    assert tokenizer.encode_ids(chat, parse_special=True) == _hf_ids(gguf_hf_tokenizer, chat, False)


def test_tokenizer_matches_transformers_on_random_text(sp_model, gguf_hf_tokenizer):
    rng = random.Random(1234)
    vocab = [sp_model.id_to_piece(i).replace("\u2581", " ") for i in range(494, sp_model.get_piece_size(), 37)]
    vocab += ["<start_of_turn>", "<end_of_turn>", "<start_of_turn>user\n", "<end_of_turn>\n", "<unused7>"]
    alphabet = list("aeiou   \n\t.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@0123456789éüßç日本語한مר😀") + ["    ", "\n\n", "\t\t"]
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(0, 25)):
            if rng.random() < 0.6:
                parts.append(rng.choice(vocab))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        text = "".join(parts)
        ids = sp_model.encode(text)
        assert ids == _hf_ids(gguf_hf_tokenizer, text, split_special=False), repr(text)
        assert sp_model.decode(ids) == text, repr(text)


def test_tokenizer_special_token_behaviour(sp_model, gguf_hf_tokenizer):
    # Chat markers are matched in text, as in the original Gemma tokenizer.model and transformers.
    assert sp_model.encode("<start_of_turn>user\nhi<end_of_turn>") == [105, 2364, 107, 2202, 106]
    assert _hf_ids(gguf_hf_tokenizer, "<start_of_turn>", split_special=False) == [105]
    assert not sp_model.is_control(105) and not sp_model.is_control(106)
    # bos/eos/pad keep their control role: never produced from text, passed as ids/token strings.
    assert sp_model.encode("<eos>") != [1] and sp_model.encode("<bos>") != [2]
    assert sp_model.decode([2, 105, 2364, 106, 1]) == "<start_of_turn>user<end_of_turn>"  # controls decode to ""
    # User-defined tokens (newline/tab runs, image markers) are matched whole, like transformers.
    assert sp_model.encode("\n\n") == [108]
    assert sp_model.encode("<start_of_image>") == [255999] == _hf_ids(gguf_hf_tokenizer, "<start_of_image>")
    assert sp_model.bos_id() == 2 and sp_model.eos_id() == 1 and sp_model.unk_id() == 3 and sp_model.pad_id() == 0
    # A literal "\u2581" cannot survive the round trip (it is the space marker), as in transformers.
    assert sp_model.decode(sp_model.encode("a\u2581b")) == "a b"


def test_tokenizer_output_feeds_the_generator(generator, sp_model):
    tokens = sp_model.encode(PROSE, out_type=str)
    ids = sp_model.encode(PROSE)
    assert generator.vocabulary.to_tokens(ids) == tokens
    assert all(t in generator.vocabulary for t in tokens)


# ---------------------------------------------------------------------------- (d) errors
def test_non_gguf_file_is_a_clear_value_error(tmp_path, gguf_default_path):
    from jaxgen.converters import GGUFConverter

    text = tmp_path / "model.gguf"
    text.write_text("this is not a GGUF file\n")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFConverter(str(text)).convert(str(tmp_path / "out1"))
    with pytest.raises(ValueError, match="does not exist"):
        GGUFConverter(str(tmp_path / "missing.gguf")).convert(str(tmp_path / "out2"))
    with pytest.raises(ValueError, match="not a file"):
        GGUFConverter(str(tmp_path)).convert(str(tmp_path / "out3"))
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_default_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        GGUFConverter(str(truncated)).convert(str(tmp_path / "out4"))
    with pytest.raises(TypeError):
        GGUFConverter(123)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_unsupported_architecture_is_a_value_error(tmp_path):
    import gguf

    from jaxgen.converters import GGUFConverter

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        GGUFConverter(path).convert(str(tmp_path / "out"))


# ---------------------------------------------------------------------------- tiny llama.cpp-style files
def _tiny_vocab(gemma: bool):
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    extra = (["  ", "\n\n"] if gemma else []) + ["\u2581"] + list(letters) + ["\u2581" + c for c in letters]
    extra += [a + b for a in "aeiou" for b in "nrst"]
    tokens += extra
    types += [4 if t.strip() == "" else 1 for t in extra]
    return tokens, [0.0 if t != 1 else -float(i) for i, t in enumerate(types)], types


def _llama_permute(w, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _build_tiny(arch: str):
    import torch
    import transformers

    tokens, scores, types = _tiny_vocab(arch != "llama")
    common = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if arch == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "gemma":
        config = transformers.GemmaConfig(num_hidden_layers=2, head_dim=16, **common)
        model = transformers.GemmaForCausalLM(config)
    elif arch == "gemma2":
        config = transformers.Gemma2Config(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **common)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(
            num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **common)
        model = transformers.Gemma3ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), tokens, scores, types


def _write_tiny_gguf(model, arch, path, tokens, scores, types):
    """Writes `model` as llama.cpp would, storing tensors as F32, F16 or Q8_0, and puts the
    quantization round trip back into `model` so that it stays the exact reference."""
    import gguf
    import torch

    cfg = model.config
    gemma = arch != "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if gemma:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    else:
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if arch == "gemma3":
        writer.add_rope_freq_base(1e6)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)
    else:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "gemma2":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    if gemma:
        writer.add_add_space_prefix(False)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "post_attention_norm" if arch != "llama" and arch != "gemma"
                   else "ffn_norm", "pre_feedforward_layernorm": "ffn_norm",
                   "post_feedforward_layernorm": "post_ffw_norm"}
    for key, param in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem = key[:-len(".weight")]
        if stem.startswith("model.layers."):
            index, rest = stem[len("model.layers."):].split(".", 1)
            name = f"blk.{index}.{layer_names[rest]}.weight"
        else:
            name = f"{names[stem]}.weight"
        w = param.detach().numpy().astype(np.float32)
        if gemma and name.endswith("norm.weight"):
            w = w + 1.0
        if arch == "llama" and ".attn_q." in name:
            w = _llama_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            w = _llama_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        if name == "token_embd.weight" or ".attn_v." in name:
            qtype = gguf.GGMLQuantizationType.Q8_0
        elif ".ffn_" in name:
            qtype = gguf.GGMLQuantizationType.F16
        else:
            qtype = gguf.GGMLQuantizationType.F32
        stored = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        back = gguf.quants.dequantize(stored, qtype).reshape(w.shape)
        if gemma and name.endswith("norm.weight"):
            back = back - 1.0
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            back = param.detach().numpy()  # F32: the permutation round trip is exact
        param.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "gemma3"])
def test_tiny_llama_cpp_files_match_transformers(arch, tmp_path):
    pytest.importorskip("transformers")
    import sentencepiece
    import torch

    from jaxgen import Generator
    from jaxgen.converters import GGUFConverter

    model, tokens, scores, types = _build_tiny(arch)
    path = str(tmp_path / f"{arch}.gguf")
    _write_tiny_gguf(model, arch, path, tokens, scores, types)
    out = GGUFConverter(path).convert(str(tmp_path / "jaxgen"))

    rng = np.random.default_rng(0)
    lengths = [12, 7, 3]
    ids = [rng.integers(4, len(tokens), n).tolist() for n in lengths]
    ours = np.asarray(Generator(out).forward_batch(ids))
    for row, seq in enumerate(ids):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits[0].numpy()
        diff = np.abs(ours[row, :len(seq)] - ref).max()
        assert diff < 1e-4, f"{arch} row {row}: max |logit diff| {diff}"

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    text = "a  big\n\nstar tin" if arch != "llama" else "a big star tin"
    pieces = sp.encode(text, out_type=str)
    assert sp.decode(sp.encode(text)) == text
    with open(os.path.join(out, "vocabulary.json"), encoding="utf-8") as f:
        vocabulary = json.load(f)
    assert all(p in vocabulary for p in pieces)
    if arch == "llama":
        assert pieces[0].startswith("\u2581")  # add_space_prefix defaults to True for llama
    else:
        assert "\u2581\u2581" in vocabulary and "  " not in vocabulary


def test_tiny_file_int8_quantization_and_progress(tmp_path):
    """The base class's quantization option applies to GGUF sources; progress is reported."""
    from jaxgen import Generator
    from jaxgen.converters import GGUFConverter

    model, tokens, scores, types = _build_tiny("llama")
    path = str(tmp_path / "llama.gguf")
    _write_tiny_gguf(model, "llama", path, tokens, scores, types)
    calls = []
    out = GGUFConverter(path, progress=lambda done, total: calls.append((done, total))).convert(
        str(tmp_path / "int8"), quantization="int8")
    assert calls and calls[-1][0] == calls[-1][1]
    generator = Generator(out)
    assert generator.config.weight_dtype == "int8"
    f32 = Generator(GGUFConverter(path).convert(str(tmp_path / "f32")))
    seq = [[5, 60, 200, 300, 17]]
    a, b = np.asarray(generator.forward_batch(seq)), np.asarray(f32.forward_batch(seq))
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
