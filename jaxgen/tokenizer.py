"""Text <-> tokens for a jaxgen model directory.

jaxgen's `Generator` works on token strings, like CTranslate2's; this module is the tokenizer
that goes with a model directory, for the CLI, the notebooks and your own code:

    tokenizer = load_tokenizer(model_dir)
    tokens = tokenizer.encode("Hello world")          # ['Hello', '▁world'] (no special tokens)
    tokenizer.decode(tokens) == "Hello world"

It is backed by the directory's SentencePiece `tokenizer.model` (preferred) or its
`tokenizer.json` (the `tokenizers` package). Token strings are those of the model's vocabulary.

Special tokens: `encode` adds none unless asked (`add_special_tokens=True`), and then only the
BOS token, only when the model's tokenizer adds one (`ModelConfig.add_bos_token`). The Python
API of `Generator` never adds any: pass them in the token lists yourself.

Special tokens written in the text: the tokenizer's own bos/eos/pad/unk tokens (the control
pieces of a SentencePiece model, the special added tokens of a tokenizer.json) are read as
ordinary text unless `parse_special=True`; tokens the tokenizer matches in text by itself (a
SentencePiece model's user-defined pieces, a tokenizer.json's non-special added tokens) are
always matched. The converters give chat markers (Gemma's `<start_of_turn>`, Llama 3's
`<|start_header_id|>`) the second role, so `encode` reads a chat prompt as the model's own
tokenizer does, and `parse_special=True` encodes like transformers' tokenizer with its defaults.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Union

from jaxgen.model.checkpoint import check_model_dir, load_vocabulary
from jaxgen.model.config import ModelConfig
from jaxgen.vocabulary import Vocabulary

GEMMA_START_OF_TURN = "<start_of_turn>"
GEMMA_END_OF_TURN = "<end_of_turn>"


class Tokenizer:
    """Tokenizer of a model directory (see the module docstring). Use `load_tokenizer`."""

    def __init__(self, model_dir: str, config: ModelConfig, vocabulary: List[str], backend: "_Backend",
                 chat_template: Optional[str]):
        self.model_dir = model_dir
        self.config = config
        self.vocabulary = vocabulary
        self._vocab = Vocabulary(vocabulary, config.unk_token)  # token -> first id, unk fallback
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token: Optional[str] = config.bos_token or backend.bos_token
        self.eos_token: Optional[str] = config.eos_token or backend.eos_token
        self.unk_token: Optional[str] = config.unk_token
        self.pad_token: Optional[str] = config.pad_token
        self.add_bos_token: bool = bool(config.add_bos_token and self.bos_token)
        self._special_re: Optional[re.Pattern] = None

    # ------------------------------------------------------------------ info
    @property
    def backend(self) -> str:
        """"sentencepiece" or "tokenizers"."""
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def special_tokens(self) -> List[str]:
        """Special tokens read from text only with `parse_special=True`, e.g. '<bos>', '<eos>'."""
        return list(self._backend.special_tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_dir!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
                f"bos_token={self.bos_token!r}, eos_token={self.eos_token!r})")

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = False) -> List[str]:
        """Text -> token strings of the model's vocabulary.

        add_special_tokens: prepend the BOS token when the model's tokenizer does so.
        parse_special: also read the special tokens (`special_tokens`, e.g. "<bos>" in a
        rendered chat template) written in the text as those tokens; by default they are
        ordinary text. Chat markers that the tokenizer matches by itself are always read.
        """
        return self.convert_ids_to_tokens(self.encode_ids(text, add_special_tokens, parse_special))

    def encode_ids(self, text: str, add_special_tokens: bool = False, parse_special: bool = False) -> List[int]:
        """Like `encode`, but returns token ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: List[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token in self._vocab:
            ids.append(self._vocab.id_of(self.bos_token))
        if parse_special:
            for piece, is_special in self._split_special(text):
                if is_special:
                    ids.append(self._backend.special_ids[piece])
                elif piece:
                    ids.extend(self._backend.encode(piece))
        elif text:
            ids.extend(self._backend.encode(text))
        return ids

    def _split_special(self, text: str):
        specials = self._backend.special_ids
        if not specials:
            yield text, False
            return
        if self._special_re is None:
            names = sorted(specials, key=len, reverse=True)
            self._special_re = re.compile("|".join(re.escape(n) for n in names))
        start = 0
        for match in self._special_re.finditer(text):
            yield text[start:match.start()], False
            yield match.group(0), True
            start = match.end()
        yield text[start:], False

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: Sequence[Union[int, str]], skip_special_tokens: bool = True) -> str:
        """Token ids or token strings -> text. Special tokens decode to "" unless
        `skip_special_tokens=False` (tokenizer.json models only)."""
        ids = self._to_ids(tokens)
        return self._backend.decode([i for i in ids if i < self._backend.size], skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return self._vocab.lenient_ids(tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return self._vocab.to_tokens(ids)

    def _to_ids(self, tokens) -> List[int]:
        tokens = list(tokens)
        if all(isinstance(t, str) for t in tokens):
            return self.convert_tokens_to_ids(tokens)
        try:
            return [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise TypeError("decode expects a list of token ids or of token strings") from None

    def incremental_decoder(self, context: Sequence[Union[int, str]] = ()) -> "IncrementalDecoder":
        """A decoder for streaming; `context` (e.g. the prompt's last tokens) makes the first
        generated token's leading space come out right."""
        return IncrementalDecoder(self, self._to_ids(context))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders a conversation ([{"role": "system"|"user"|"assistant", "content": ...}]) to text
        with the model directory's chat template (jinja2, as transformers renders it). The text
        contains special tokens: encode it with `parse_special=True`. ValueError when the model
        has no template (a base model; `gemma_chat_format` writes Gemma's turns by hand).
        """
        if not self.chat_template:
            raise ValueError(f"the model in {self.model_dir} has no chat template (no chat_template.jinja, and no "
                             f"chat_template in tokenizer_config.json or chat_template.json): it is probably a "
                             f"base model, not instruction-tuned")
        return _render_jinja(self.chat_template, messages, add_generation_prompt,
                             bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def end_of_turn_tokens(self) -> List[str]:
        """Tokens that end the assistant's turn, for `end_token`: the token the chat template
        writes right after an assistant message (Gemma's '<end_of_turn>', ChatML's '<|im_end|>',
        Llama 3's '<|eot_id|>'), the eos ids of the directory's generation_config.json, and the
        EOS token; each once, in that order, only those of the vocabulary."""
        tokens: List[str] = []
        if self.chat_template:
            tokens.extend(self._template_turn_end())
        generation = _read_json(os.path.join(self.model_dir, "generation_config.json"))
        eos_ids = generation.get("eos_token_id") if isinstance(generation, dict) else None
        for i in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(self.vocabulary):
                tokens.append(self.vocabulary[i])
        if self.eos_token:
            tokens.append(self.eos_token)
        return [t for t in dict.fromkeys(tokens) if t in self._vocab]

    def _template_turn_end(self) -> List[str]:
        """The first token after an assistant message's text in the rendered template, when it is
        a special or marker token (not text such as a newline)."""
        reply = "jaxgen-reply-7"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": reply}], add_generation_prompt=False)
        except ValueError:
            return []
        after = text[text.rfind(reply) + len(reply):] if reply in text else ""
        ids = self.encode_ids(after, parse_special=True)
        if not ids:
            return []
        first = self.vocabulary[ids[0]]
        return [first] if self._backend.is_marker(ids[0], first) else []


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is the decoded text.

    Each new token is decoded together with a few preceding ones and only the new suffix is
    returned, so that SentencePiece's leading spaces ("▁") and multi-byte characters split over
    several byte tokens come out right. Cost per token is constant.
    """

    _CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._context: List[int] = list(context)[-self._CONTEXT:]
        self._pending: List[int] = []

    def push(self, token: Union[int, str]) -> str:
        """Adds one token; returns the text it completes ("" while a character is incomplete)."""
        self._pending.extend(self._tokenizer._to_ids([token]))
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not self._pending:
            return ""
        decode = self._tokenizer.decode
        before = decode(self._context)
        text = decode(self._context + self._pending)
        if text.endswith("\ufffd") and not final:
            return ""
        new = text[len(before):] if text.startswith(before) else text
        self._context = (self._context + self._pending)[-self._CONTEXT:]
        self._pending = []
        return new


def gemma_chat_format(messages: List[Dict[str, str]], add_generation_prompt: bool = True, bos: str = "") -> str:
    """Gemma's turn format: '<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n'.
    A system message is put at the start of the first user turn, as Gemma's template does."""
    out = [bos]
    system = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system = content + "\n\n"
            continue
        if role == "assistant":
            role = "model"
        out.append(f"{GEMMA_START_OF_TURN}{role}\n{system}{content.strip()}{GEMMA_END_OF_TURN}\n")
        system = ""
    if add_generation_prompt:
        out.append(f"{GEMMA_START_OF_TURN}model\n")
    return "".join(out)


def _render_jinja(template: str, messages, add_generation_prompt: bool, **variables) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables)
    except jinja2.TemplateError as exc:
        raise ValueError(f"cannot render the model's chat template: {exc}") from None


# ---------------------------------------------------------------------------- backends
_MARKER = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")


class _Backend:
    name = ""
    size = 0
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    special_ids: Dict[str, int] = {}

    @property
    def special_tokens(self) -> List[str]:
        return list(self.special_ids)

    def is_marker(self, token_id: int, token: str) -> bool:
        """A special token, or a token written like a marker ('<end_of_turn>', '[INST]'), which a
        SentencePiece model holds as a user-defined piece."""
        return token_id in self.special_ids.values() or bool(_MARKER.fullmatch(token))

    def encode(self, text: str) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class _SentencePieceBackend(_Backend):
    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot read the SentencePiece model {path}: {exc}") from None
        sp = self._sp
        self.size = sp.get_piece_size()
        self.bos_token = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.eos_token = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        self._special_ids: Optional[Dict[str, int]] = None

    @property
    def special_ids(self) -> Dict[str, int]:
        """Control and unknown pieces, found on first use (a 262K-piece model takes ~0.5 s)."""
        if self._special_ids is None:
            sp = self._sp
            self._special_ids = {sp.id_to_piece(i): i for i in range(self.size)
                                 if sp.is_control(i) or sp.is_unknown(i)}
        return self._special_ids

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self._sp.decode(ids)


class _TokenizersBackend(_Backend):
    name = "tokenizers"

    def __init__(self, path: str, model_dir: str):
        try:
            import tokenizers
        except ImportError:
            raise ValueError(f"{path} needs the 'tokenizers' package: pip install tokenizers") from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises a plain Exception
            raise ValueError(f"cannot read {path}: {exc}") from None
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True  # special tokens in text are ordinary text
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder() if hasattr(self._tok, "get_added_tokens_decoder") else {}
        self.special_ids = {tok.content: i for i, tok in added.items() if getattr(tok, "special", False)}
        self._added = set(added)
        config = _read_json(os.path.join(model_dir, "tokenizer_config.json")) or {}
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def is_marker(self, token_id: int, token: str) -> bool:
        return super().is_marker(token_id, token) or token_id in self._added


    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------- loading
def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a jaxgen model directory (ValueError when it has none or it is broken)."""
    model_dir = check_model_dir(model_dir)
    config = ModelConfig.load(model_dir)
    vocabulary = load_vocabulary(model_dir)
    sp_path = os.path.join(model_dir, "tokenizer.model")
    json_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(sp_path):
        backend: _Backend = _SentencePieceBackend(sp_path)
    elif os.path.isfile(json_path):
        backend = _TokenizersBackend(json_path, model_dir)
    else:
        raise ValueError(f"model directory {model_dir!r} has no tokenizer.model or tokenizer.json")
    return Tokenizer(model_dir, config, vocabulary, backend, find_chat_template(model_dir))


def find_chat_template(model_dir: str) -> Optional[str]:
    """The chat template of a model directory: `chat_template.jinja`, `chat_template.json` or
    the `chat_template` of `tokenizer_config.json` (the "default" one when there are several)."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _read_json(os.path.join(model_dir, name))
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
