"""`jaxgen chat` and the tokenizer's chat pieces: the model directory's template and end-of-turn
tokens (a ChatML model without Gemma markers, the Gemma-like CLI model), and a clear error for a
model without a template. The CLI runs in-process with `Generator.generate_tokens` recorded."""

from __future__ import annotations

import io
import sys

import pytest

from jaxgen.results import GenerationStepResult


def test_end_of_turn_tokens(cli_chatml_model, cli_tiny_model):
    from jaxgen.tokenizer import load_tokenizer

    chatml = load_tokenizer(cli_chatml_model)
    assert "<end_of_turn>" not in chatml.vocabulary and "<start_of_turn>" not in chatml.vocabulary
    assert chatml.end_of_turn_tokens() == ["<|im_end|>", "<eos>"]  # template, then generation_config + EOS
    assert load_tokenizer(cli_tiny_model).end_of_turn_tokens() == ["<end_of_turn>", "<eos>"]


def test_apply_chat_template_without_template(cli_base_model):
    from jaxgen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cli_base_model)
    with pytest.raises(ValueError, match="has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tokenizer.end_of_turn_tokens() == ["<eos>"]


class _Recorder:
    """Stands in for Generator.generate_tokens: records each call, then streams `reply` ids."""

    def __init__(self, reply_tokens):
        self.calls = []
        self.reply_tokens = reply_tokens

    def __call__(self, generator, prompt, **kwargs):
        self.calls.append((list(prompt), kwargs))
        ids = [generator.vocabulary.id_of(t) for t in self.reply_tokens]
        return iter([GenerationStepResult(step=i, batch_id=0, token_id=t, hypothesis_id=0,
                                          token=generator.vocabulary.tokens[t], log_prob=None,
                                          is_last=i == len(ids) - 1) for i, t in enumerate(ids)])


def _chat(monkeypatch, capsys, model: str, stdin: str, reply_tokens):
    from jaxgen import cli
    from jaxgen.generator import Generator

    recorder = _Recorder(reply_tokens)
    monkeypatch.setattr(Generator, "generate_tokens", lambda self, prompt, **kwargs: recorder(self, prompt, **kwargs))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = cli.main(["chat", "--model", model, "--max-length", "7"])
    out = capsys.readouterr()
    return status, out, recorder.calls


def test_chat_uses_the_models_template_and_turn_end(monkeypatch, capsys, cli_chatml_model):
    """Each turn is the ChatML rendering of the conversation so far (the common start cached as a
    static prompt when there is one), the reply stops at <|im_end|>, which is not printed, and goes into the history."""
    from jaxgen.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cli_chatml_model)
    reply = tokenizer.encode("hello world") + ["<|im_end|>"]
    status, out, calls = _chat(monkeypatch, capsys, cli_chatml_model, "the fox\njax runs\n", reply)
    assert status == 0, out.err
    assert [line.strip() for line in out.out.splitlines()] == ["hello world", "hello world"]  # no <|im_end|>
    assert len(calls) == 2
    history = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "hello world"},
               {"role": "user", "content": "jax runs"}]
    for (prompt, kwargs), n in zip(calls, (1, 3)):
        expected = tokenizer.encode(tokenizer.apply_chat_template(history[:n]), parse_special=True)
        assert expected[0] == "<|im_start|>" and expected.count("<|im_end|>") == n
        assert (kwargs.get("static_prompt") or []) + prompt == expected
        assert kwargs["end_token"] == ["<|im_end|>", "<eos>"]
        assert kwargs["max_length"] == 7


def test_chat_without_template_is_an_error(monkeypatch, capsys, cli_base_model):
    status, out, calls = _chat(monkeypatch, capsys, cli_base_model, "hello\n", ["<eos>"])
    assert status == 2 and not calls
    assert out.err.startswith("jaxgen: error: the model in ") and "has no chat template" in out.err
    assert len(out.err.strip().splitlines()) == 1
