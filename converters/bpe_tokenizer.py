"""Builds a `tokenizer.json` from a GGUF file's byte-level BPE vocabulary.

llama.cpp stores a byte-level BPE tokenizer (GPT-2's scheme, used by Llama 3, Qwen2, Mistral
Nemo, ...: `tokenizer.ggml.model` = "gpt2") as metadata: the tokens (`tokenizer.ggml.tokens`,
index = id), the merges (`tokenizer.ggml.merges`, "left right" strings, highest priority first),
the token types (`tokenizer.ggml.token_type`) and the name of the pre-tokenizer
(`tokenizer.ggml.pre`), which stands for the regular expression that splits text into words
before the merges apply. `build_bpe_tokenizer` turns them into a `tokenizers.Tokenizer` (saved as
`tokenizer.json`) that encodes like the tokenizer transformers builds from the same GGUF:

  * model: BPE over the vocabulary and merges as stored (no unknown token, no dropout); tokens
    spelled with characters outside the byte-level alphabet are respelled byte by byte, as
    transformers does;
  * pre-tokenizer: the split regex named by `tokenizer.ggml.pre` (`PRE_TOKENIZER_SPLITS`), then
    the byte-level mapping; "default"/"gpt-2" (or no name) is GPT-2's own regex. An unknown name is
    a ValueError (the GGUF converter then writes no tokenizer and says why): guessing a regex
    would give a tokenizer that encodes some text differently from the model's;
  * decoder: byte level (bytes back to text).

Special tokens (token types as in GGUF: 3 control, 4 user-defined):
  * the bos, eos, unk and pad tokens are special added tokens: read as text by a plain encode
    (`jaxgen.tokenizer` encodes with `encode_special_tokens=True`), matched only when asked
    (`Tokenizer.encode(..., parse_special=True)`), dropped by `decode` unless
    `skip_special_tokens=False`;
  * every other control token (chat markers such as `<|start_header_id|>`, `<|im_start|>`) and
    every user-defined token is a non-special added token: matched whole in text, as
    transformers matches them, and decoded back to its text. This is the rule the rebuilt
    SentencePiece models follow too (see `sentencepiece_model.py`).
So a plain encode equals transformers' default encoding on text that does not contain the
bos/eos/unk/pad strings, and `parse_special=True` equals it on all text.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

CONTROL, USER_DEFINED = 3, 4

_GPT2_NAMES = ("default", "gpt-2", "gpt2")

# `tokenizer.ggml.pre` -> the split regex of the tokenizer.json the GGUF was made from.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: Dict[str, str] = {
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "tekken": _TEKKEN,
}


def byte_level_alphabet() -> Dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes map to themselves, the others to
    the characters from U+0100 on, in byte order."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def respell_tokens(tokens: Sequence[str]) -> List[str]:
    """Tokens with a character outside the byte-level alphabet spelled as their UTF-8 bytes
    (what transformers does with such tokens); ValueError when two tokens end up the same."""
    table = byte_level_alphabet()
    alphabet = set(table.values())
    out, seen = [], {}
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"GGUF token {i} is {token!r}, not a string")
        spelled = token if set(token) <= alphabet else "".join(table[b] for b in token.encode("utf-8"))
        if spelled in seen:
            raise ValueError(f"GGUF vocabulary repeats the token {spelled!r} (ids {seen[spelled]} and {i})")
        seen[spelled] = i
        out.append(spelled)
    return out


def parse_merges(merges: Sequence[str], vocab: Dict[str, int]) -> List[Tuple[str, str]]:
    """"left right" strings -> (left, right) pairs; ValueError naming a malformed merge or one
    whose parts or result are not in the vocabulary."""
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"GGUF merge {i} is {merge!r}, not two tokens separated by one space")
        for part in (parts[0], parts[1], parts[0] + parts[1]):
            if part not in vocab:
                raise ValueError(f"GGUF merge {i} ({merge!r}) uses {part!r}, which is not in the vocabulary")
        pairs.append((parts[0], parts[1]))
    return pairs


def pre_tokenizer(name: Optional[str]):
    """The `tokenizers` pre-tokenizer for a `tokenizer.ggml.pre` name (ValueError when unknown)."""
    from tokenizers import Regex, pre_tokenizers

    if name is None or name in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(set(PRE_TOKENIZER_SPLITS) | set(_GPT2_NAMES)))
        raise ValueError(f"GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; supported: {known}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[name]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def added_tokens(tokens: Sequence[str], spelled: Sequence[str], token_types: Optional[Sequence[int]],
                 special_ids: Sequence[Optional[int]]) -> Tuple[list, list]:
    """(special, non-special) `AddedToken`s: the bos/eos/unk/pad tokens are special; the other
    control tokens written in the byte-level alphabet and the user-defined tokens are not (see
    the module docstring)."""
    from tokenizers import AddedToken

    alphabet = set(byte_level_alphabet().values())
    roles = sorted({int(i) for i in special_ids if i is not None})
    special = [AddedToken(spelled[i], special=True, normalized=False) for i in roles]
    vocab = set(spelled)
    plain = []
    for i, kind in enumerate(token_types or ()):
        if i in roles:
            continue
        if (kind == CONTROL and set(tokens[i]) <= alphabet) or (kind == USER_DEFINED and tokens[i] in vocab):
            plain.append(AddedToken(tokens[i], special=False, normalized=False))
    return special, plain


def build_bpe_tokenizer(tokens: Sequence[str], merges: Optional[Sequence[str]],
                        token_types: Optional[Sequence[int]], pre: Optional[str],
                        special_ids: Sequence[Optional[int]] = ()) -> bytes:
    """Serialized `tokenizer.json` (UTF-8) for a GGUF byte-level BPE vocabulary.

    tokens, merges, token_types, pre: `tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`.
    special_ids: the bos/eos/unk/pad ids (None for those the file does not name).
    Raises ValueError on a vocabulary these cannot describe (see the helpers).
    """
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    if not tokens:
        raise ValueError("cannot build a BPE tokenizer from an empty vocabulary")
    if not merges:
        raise ValueError("the GGUF file has no tokenizer.ggml.merges, which a BPE tokenizer needs")
    if token_types is not None and len(token_types) != len(tokens):
        raise ValueError(f"GGUF tokenizer arrays differ in length: {len(tokens)} tokens, "
                         f"{len(token_types)} token types")
    for i in special_ids:
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"special token id {i} is outside the vocabulary of {len(tokens)} tokens")
    spelled = respell_tokens(tokens)
    vocab = {token: i for i, token in enumerate(spelled)}
    model = BPE(vocab=vocab, merges=parse_merges(merges, vocab), dropout=None, continuing_subword_prefix="",
                end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    special, plain = added_tokens(tokens, spelled, token_types, special_ids)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"the BPE tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                         f"the GGUF vocabulary {len(tokens)}")
    return tokenizer.to_str().encode("utf-8")
