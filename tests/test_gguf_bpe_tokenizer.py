"""GGUF files with a byte-level BPE tokenizer (`tokenizer.ggml.model` = "gpt2", as Llama 3 and
Qwen2 files have): the converter's `tokenizer.json` against transformers loading the same GGUF.

A tiny llama GGUF is written here with the `gguf` package: a BPE vocabulary trained in
milliseconds with `tokenizers` (plus Llama 3's control tokens and one user-defined token), tiny
random weights. It is converted with jaxgen's GGUF converter, and `jaxgen.tokenizer` must encode a
varied corpus exactly like `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, decode it back,
and `jaxgen generate --model DIR` must run.
"""

from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import pytest

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
CHAT_MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"]
USER_DEFINED = "<think>"
SPECIALS = [BOS, EOS, PAD] + CHAT_MARKERS + [USER_DEFINED]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "In 2024, 3.14159 people counted 1,000,000 stars (roughly) -- or so they said.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Bonjour à tous, ça va? Größe, naïve café. Привет, мир! 日本語のテキスト。",
    "user: What's the weather like?\nassistant: It's sunny, and it'll stay that way.\n",
    "   indented text\twith tabs\t\tand  double  spaces\r\nand windows lines\n\n\n",
    "12 123 1234 12345 123456 2024 1000 100 10 365 24/7 3.14 hi Hi HELLO HelloWorld camelCase",
    "(hello) (hello) \"hello\" IT'S IT'S WE'LL",
]

CORPUS = [
    "", " ", "  ", "\t", "\n", "\n\n\n", "Hello world", "Hello, World!", "  leading spaces", "trailing spaces   ",
    "tabs\tand\t\tmore", "a\nb\n\nc\r\nd", "1234567890 3.14159 1,000,000 2024-01-31 0x1F 1e-10",
    "it's they're we've I'm you'll he'd IT'S", "café naïve résumé Ångström Øre façade",
    "日本語のテキストです。中文字符。한국어", "Привет, мир! Ελληνικά", "مرحبا بالعالم שלום עולם",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 🇫🇷", "\u200b zero\u200dwidth \ufeff bom", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "\x00\x01\x07 \x7f",
    "def add(a, b):\n    return a + b\n", "<html><p class=\"x\">Hi &amp; bye</p></html>", "x" * 200,
    "**bold** _it_ `code` [link](http://example.com)", "!!! ??? ... --- ;;; ((()))",
    # chat markers and the user-defined token: matched whole in text
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "x<|eot_id|>y<|eot_id|><|eot_id|>",
    "<think>reasoning</think> done", "<|reserved_special_token_0|> <|start_header_id|", "<<|eot_id|>>",
]
ROLE_CORPUS = [  # the bos/eos/pad strings: text for a plain encode, tokens with parse_special=True
    "<|begin_of_text|>Hello", "a<|end_of_text|>b", "<|finetune_right_pad_id|>", "<|begin_of_text|><|end_of_text|>",
]


def _train_vocab():
    """(tokens, merges "a b", token types) of a small byte-level BPE trained on TRAINING_TEXT."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxgen.converters.bpe_tokenizer import PRE_TOKENIZER_SPLITS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS[:-1] else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


def write_bpe_gguf(path: str, pre: str = "llama-bpe", merges_override=None) -> list:
    """Writes a tiny llama GGUF with a byte-level BPE tokenizer; returns its tokens."""
    import gguf

    tokens, merges, types = _train_vocab()
    vocab, hidden, ffn, heads, kv_heads = len(tokens), 32, 64, 2, 1
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges if merges_override is None else merges_override)
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_pad_token_id(tokens.index(PAD))
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (kv_heads * head_dim, hidden), "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        w = 1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name else 0.2 * rng.standard_normal(shape)
        writer.add_tensor(name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def _hf_tokenizer(path: str):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """(gguf path, converted jaxgen model directory) for the default pre-tokenizer name."""
    from jaxgen.converters import GGUFConverter

    directory = tmp_path_factory.mktemp("bpe-gguf")
    path = str(directory / "tiny-bpe.gguf")
    write_bpe_gguf(path)
    return path, GGUFConverter(path).convert(str(directory / "model"))


def _check_parity(jaxgen_tok, hf_tok, texts, role_texts=()):
    for text in texts:
        ids = jaxgen_tok.encode_ids(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), repr(text)
        assert jaxgen_tok.encode_ids(text, parse_special=True) == ids, repr(text)
        assert jaxgen_tok.encode(text) == hf_tok.convert_ids_to_tokens(ids), repr(text)
        assert jaxgen_tok.decode(ids) == text, repr(text)
    for text in role_texts:
        ids = jaxgen_tok.encode_ids(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True), repr(text)
        assert jaxgen_tok.decode(ids) == text, repr(text)
        assert jaxgen_tok.encode_ids(text, parse_special=True) == hf_tok.encode(text, add_special_tokens=False)


def test_converter_writes_tokenizer_json(bpe_model):
    from jaxgen.model.config import ModelConfig
    from jaxgen.tokenizer import load_tokenizer

    _, out = bpe_model
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert not os.path.exists(os.path.join(out, "tokenizer.model"))
    tok = load_tokenizer(out)
    assert tok.backend == "tokenizers"
    config = ModelConfig.load(out)
    assert (config.bos_token, config.eos_token, config.pad_token, config.add_bos_token) == (BOS, EOS, PAD, True)
    assert sorted(tok.special_tokens) == sorted([BOS, EOS, PAD])
    assert tok.encode("hi", add_special_tokens=True)[0] == BOS
    assert tok.chat_template == CHAT_TEMPLATE  # tokenizer.chat_template -> tokenizer_config.json
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f) == {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}


def test_encodes_like_transformers(bpe_model):
    from jaxgen.tokenizer import load_tokenizer

    path, out = bpe_model
    tok, hf = load_tokenizer(out), _hf_tokenizer(path)
    _check_parity(tok, hf, CORPUS, ROLE_CORPUS)
    pytest.importorskip("jinja2")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there, it's 2024!"}])
    assert chat.startswith(BOS + "<|start_header_id|>user<|end_header_id|>\n\nHi there")
    ids = tok.encode_ids(chat, parse_special=True)
    assert ids == hf.encode(chat, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids([BOS])[0] and len(ids) > 10


def test_encodes_random_text_like_transformers(bpe_model):
    from jaxgen.tokenizer import load_tokenizer

    path, out = bpe_model
    tok, hf = load_tokenizer(out), _hf_tokenizer(path)
    rng = random.Random(7)
    pieces = [tok.decode([i]) for i in range(0, tok.vocab_size, 3)] + CHAT_MARKERS + [USER_DEFINED]
    alphabet = list("aeiouAEIOU   \n\t\r.,;:!?'\"()<>|/\\-_=+*&^%$#@0123456789éüßç日本한مר😀") + ["'s", "'ll", "  \n"]
    texts = []
    for _ in range(150):
        parts = [rng.choice(pieces) if rng.random() < 0.5 else "".join(rng.choices(alphabet, k=rng.randint(1, 5)))
                 for _ in range(rng.randint(0, 12))]
        texts.append("".join(parts))
    _check_parity(tok, hf, texts)


@pytest.mark.parametrize("pre", ["qwen2", "default", "tekken"])
def test_other_pre_tokenizers_encode_like_transformers(pre, tmp_path):
    from jaxgen.converters import GGUFConverter
    from jaxgen.tokenizer import load_tokenizer

    path = str(tmp_path / f"{pre}.gguf")
    write_bpe_gguf(path, pre=pre)
    tok = load_tokenizer(GGUFConverter(path).convert(str(tmp_path / "model")))
    hf = _hf_tokenizer(path)
    _check_parity(tok, hf, CORPUS, ROLE_CORPUS)


def test_pre_tokenizer_names_make_a_difference(bpe_model, tmp_path):
    """The vocabulary is rich enough that each split regex encodes some text its own way, so the
    parity tests above would catch a wrong regex."""
    from jaxgen.converters import GGUFConverter
    from jaxgen.tokenizer import load_tokenizer

    text = "123456 HelloWorld camelCase (hello IT'S  \n\n x"
    encodings = {"llama-bpe": tuple(load_tokenizer(bpe_model[1]).encode(text))}
    for pre in ("qwen2", "default", "tekken"):
        path = str(tmp_path / f"{pre}.gguf")
        write_bpe_gguf(path, pre=pre)
        encodings[pre] = tuple(load_tokenizer(GGUFConverter(path).convert(str(tmp_path / pre))).encode(text))
    assert len(set(encodings.values())) == 4, encodings


def test_generate_cli_runs(bpe_model):
    from test_cli import run_cli

    _, out = bpe_model
    proc = run_cli("generate", "--model", out, "--max-length", "6", "--device", "cpu", "Hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello world")
    assert "Traceback" not in proc.stderr


def test_unsupported_pre_tokenizer_converts_without_tokenizer(tmp_path):
    from jaxgen.converters import GGUFConverter

    path = str(tmp_path / "odd.gguf")
    write_bpe_gguf(path, pre="no-such-pre")
    with pytest.warns(UserWarning, match="pre-tokenizer 'no-such-pre'.*not supported"):
        out = GGUFConverter(path).convert(str(tmp_path / "model"))
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    assert os.path.isfile(os.path.join(out, "vocabulary.json"))


def test_bad_bpe_inputs_are_value_errors():
    from jaxgen.converters.bpe_tokenizer import build_bpe_tokenizer

    tokens = ["a", "b", "ab", "<s>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_bpe_tokenizer(tokens, ["a b"], [1, 1, 1, 3], "llama-bpe", [3])
    assert json.loads(data)["model"]["type"] == "BPE"
    with pytest.raises(ValueError, match="no tokenizer.ggml.merges"):
        build_bpe_tokenizer(tokens, [], None, None)
    with pytest.raises(ValueError, match="merge 0 .*'ab c'.* not in the vocabulary"):
        build_bpe_tokenizer(tokens, ["ab c"], None, None)
    with pytest.raises(ValueError, match="merge 0 is 'abc', not two tokens"):
        build_bpe_tokenizer(tokens, ["abc"], None, None)
    with pytest.raises(ValueError, match="repeats the token"):
        build_bpe_tokenizer(["a", "b", "a"], ["a b"], None, None)
    with pytest.raises(ValueError, match="differ in length"):
        build_bpe_tokenizer(tokens, ["a b"], [1], None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_bpe_tokenizer(tokens, ["a b"], None, None, [9])
    with pytest.raises(ValueError, match="empty vocabulary"):
        build_bpe_tokenizer([], ["a b"], None, None)


def test_sentencepiece_rule_is_the_same():
    """The SentencePiece counterpart (converters/sentencepiece_model.py): control tokens other than
    the bos/eos/pad/unk ids become user-defined, i.e. matched in text."""
    from jaxgen.converters.sentencepiece_model import CONTROL, NORMAL, USER_DEFINED, text_matched_types

    types = [CONTROL, CONTROL, CONTROL, 2, CONTROL, USER_DEFINED, NORMAL]
    assert text_matched_types(types, (3, 2, 1, 0)) == [CONTROL] * 3 + [2, USER_DEFINED, USER_DEFINED, NORMAL]
    assert text_matched_types(types, (None, 2, None, None)) == [USER_DEFINED, USER_DEFINED, CONTROL, 2,
                                                                USER_DEFINED, USER_DEFINED, NORMAL]
    with pytest.raises(ValueError, match="token type of token 1 is 'x'"):
        text_matched_types([1, "x"], ())
