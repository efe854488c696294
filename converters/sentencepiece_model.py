"""Rebuilds a SentencePiece `tokenizer.model` from a GGUF file's vocabulary.

llama.cpp copies a SentencePiece vocabulary into GGUF metadata (`tokenizer.ggml.tokens`,
`scores`, `token_type`) and drops the model file. The pieces, their scores and their types are
all SentencePiece needs to encode, so the `ModelProto` written here (an identity normalizer,
spaces escaped as "\u2581", no dummy prefix for Gemma, byte fallback) encodes and decodes like
the tokenizer transformers builds from the same GGUF.

Token types (GGUF and SentencePiece share the numbering): 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte.

How special tokens behave with the rebuilt model (see `text_matched_types`):
  * the bos, eos and pad tokens stay control tokens (and unk the unknown piece): they are never
    produced when encoding text (a literal "<bos>" is tokenized as ordinary characters), exist
    only as ids / token strings passed to the API, and decode to "". This is the role they have
    in the original SentencePiece models (Gemma's, Llama 2's).
  * every other token the GGUF marks as control (Gemma's `<start_of_turn>`, `<end_of_turn>`,
    `<mask>`, `<unusedN>`) becomes user-defined, as it is in the original Gemma `tokenizer.model`
    (llama.cpp writes `special: true` added tokens as control): it is matched whole in the text,
    so a chat prompt encodes `<start_of_turn>` as the single token 105, as transformers'
    tokenizer for the same GGUF does (it matches every control token in text unless
    `split_special_tokens=True`), and it decodes back to its text.
  * user-defined tokens (Gemma's runs of newlines and tabs, `<start_of_image>`, `[multimodal]`,
    ...) are matched whole in the text (longest first), like transformers' non-special added
    tokens. Gemma's runs of spaces are the exception: transformers treats them as ordinary BPE
    tokens, and so do we (see `gemma_pieces`).
  * so plain `encode` equals transformers' default encoding on any text that does not contain the
    bos/eos/pad/unk strings themselves; on those, it equals transformers with
    `split_special_tokens=True` on the bos/eos/pad/unk strings only.
  * a literal "\u2581" in the text is the space marker: it decodes back as a space (transformers
    does the same), the one input on which decode(encode(text)) != text.

Parity with transformers' GGUF tokenizer for the default model (Gemma 3) is tested on a varied
corpus and on random text in tests/test_gguf_default_model.py.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {"unigram": 1, "bpe": 2}
WHITESPACE_MARK = "\u2581"


def respell_whitespace_tokens(tokens: Sequence[str]) -> List[str]:
    """Gemma GGUFs store the tokens made of 2..31 spaces as real spaces; SentencePiece (and the
    tokenizer transformers builds) spell them with "\u2581". Same rule as transformers'
    `gemma_tokenizer`: a whitespace-only token containing a space becomes "\u2581" * len."""
    return [WHITESPACE_MARK * len(t) if " " in t and not t.strip() else t for t in tokens]


def gemma_pieces(tokens: Sequence[str], scores: Optional[Sequence[float]],
                 token_types: Optional[Sequence[int]]) -> Tuple[List[str], List[float], List[int]]:
    """The (pieces, scores, types) that make SentencePiece encode like transformers' tokenizer
    for a Gemma GGUF (`integrations/gguf/gguf_tokenizer_mapping.py: gemma_tokenizer`):

    * whitespace-run tokens are respelled with "\u2581" and become ordinary (NORMAL) pieces:
      transformers merges them by BPE (so a run of 32 spaces is two runs of 16), while a
      user-defined piece would be matched greedily (31 + 1);
    * BPE priority follows the order of the vocabulary: score = -index (Gemma's GGUF scores
      agree with it for normal pieces; this makes the rule explicit).
    """
    n = len(tokens)
    types = list(token_types) if token_types is not None else [NORMAL] * n
    pieces = respell_whitespace_tokens(tokens)
    for i, (old, new) in enumerate(zip(tokens, pieces)):
        if old != new and types[i] == USER_DEFINED:
            types[i] = NORMAL
    return pieces, [-float(i) for i in range(n)], types


def text_matched_types(token_types: Sequence[int], keep_control: Sequence[Optional[int]]) -> List[int]:
    """Token types with every CONTROL token turned USER_DEFINED except the ids in `keep_control`
    (the bos/eos/pad/unk ids), so that SentencePiece matches them in text as transformers does.

    llama.cpp marks a SentencePiece vocabulary's `special: true` added tokens as control, which
    in SentencePiece would mean "never produced from text"; in the original model (and for
    transformers) they are matched in text. Raises ValueError on a type that is not an int.
    (A file whose eos id names a chat marker, as some instruction-tuned GGUFs set eos to
    `<end_of_turn>`, keeps that marker a control token: the rebuilt model then reads it as text.)
    """
    keep = {int(i) for i in keep_control if i is not None}
    out = []
    for i, kind in enumerate(token_types):
        if isinstance(kind, bool) or not isinstance(kind, int):
            raise ValueError(f"GGUF token type of token {i} is {kind!r}, not an integer")
        out.append(USER_DEFINED if kind == CONTROL and i not in keep else kind)
    return out


def build_sentencepiece_model(
    tokens: Sequence[str],
    scores: Optional[Sequence[float]],
    token_types: Optional[Sequence[int]],
    *,
    model_type: str = "bpe",
    add_dummy_prefix: bool = True,
    unk_id: Optional[int] = None,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: Optional[int] = None,
) -> bytes:
    """Serialized `sentencepiece_model_pb2.ModelProto` for this vocabulary.

    `tokens` must already be spelled as SentencePiece pieces (see `respell_whitespace_tokens`).
    Scores are used as given: for BPE, the pair whose merged piece scores highest merges first.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    n = len(tokens)
    if n == 0:
        raise ValueError("cannot build a SentencePiece model from an empty vocabulary")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported SentencePiece model type {model_type!r}")
    scores = list(scores) if scores is not None else [0.0] * n
    types = list(token_types) if token_types is not None else [NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise ValueError(f"GGUF tokenizer arrays differ in length: {n} tokens, {len(scores)} scores, "
                         f"{len(types)} token types")
    seen = {}
    for i, piece in enumerate(tokens):
        if piece in seen:
            raise ValueError(f"GGUF vocabulary repeats the token {piece!r} (ids {seen[piece]} and {i})")
        seen[piece] = i

    # SentencePiece needs exactly one UNKNOWN piece; llama.cpp may mark it as control.
    if unk_id is None:
        unknown = [i for i, t in enumerate(types) if t == UNKNOWN]
        unk_id = unknown[0] if unknown else seen.get("<unk>")
    if unk_id is None:
        raise ValueError("the GGUF vocabulary has no unknown token, which SentencePiece requires")

    model = pb.ModelProto()
    has_bytes = False
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        kind = int(kind)
        if i == unk_id:
            kind = UNKNOWN
        elif kind == UNKNOWN:
            kind = CONTROL  # a second unknown piece: keep it out of the text path
        elif i in (bos_id, eos_id, pad_id):
            kind = CONTROL
        elif kind == BYTE:
            has_bytes = True
        elif kind not in (NORMAL, CONTROL, USER_DEFINED, UNUSED):
            kind = NORMAL
        sp = model.pieces.add()
        sp.piece = piece
        sp.score = float(score)
        sp.type = kind

    spec = model.trainer_spec
    spec.model_type = MODEL_TYPES[model_type]
    spec.vocab_size = n
    spec.byte_fallback = has_bytes
    spec.unk_id = unk_id
    spec.bos_id = -1 if bos_id is None else bos_id
    spec.eos_id = -1 if eos_id is None else eos_id
    spec.pad_id = -1 if pad_id is None else pad_id
    spec.unk_piece = tokens[unk_id]
    if bos_id is not None:
        spec.bos_piece = tokens[bos_id]
    if eos_id is not None:
        spec.eos_piece = tokens[eos_id]
    if pad_id is not None:
        spec.pad_piece = tokens[pad_id]
    # Only used by the trainer; recorded so that the file describes a whitespace-preserving model.
    spec.split_by_whitespace = False
    spec.allow_whitespace_only_pieces = True

    norm = model.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = bool(add_dummy_prefix)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()
