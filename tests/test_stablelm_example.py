"""The static-prompt example of CTranslate2's text-generation guide (StableLM tuned alpha, a GPT-NeoX
model), run as written on a tiny random GPT-NeoX checkpoint with a byte-level BPE tokenizer that
carries StableLM's special tokens.

The checkpoint is built here: a `tokenizers` byte-level BPE trained in milliseconds on a few
sentences, a GPT-NeoX model of hidden size 64 whose head is nudged towards `<|endoftext|>` (so
that sampled sequences end on an end token well before 512 tokens), converted with jaxgen's
Transformers converter. The guide's call then streams tokens; the test checks where it stops,
that the cached static prompt changes nothing (same seed, cache on and off), and that greedy
decoding equals HF `generate` on system prompt + prompt.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgen  # noqa: E402
from jaxgen.converters import TransformersConverter  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>", "<|SYSTEM|>", "<|USER|>", "<|ASSISTANT|>"]
END_TOKENS = ["<|endoftext|>", "<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>"]

# The guide's system prompt and prompt, verbatim.
SYSTEM_PROMPT = """<|SYSTEM|># StableLM Tuned (Alpha version)
- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.
- StableLM is excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- StableLM is more than just an information source, StableLM is also able to write poetry, short stories, and make jokes.
- StableLM will refuse to participate in anything that could harm a human.
"""
PROMPT = "<|USER|>What's your mood today?<|ASSISTANT|>"

CORPUS = [SYSTEM_PROMPT, PROMPT, "The quick brown fox jumps over the lazy dog.",
          "I am doing well today, thank you for asking! How can I help you?",
          "Static prompts are computed once and their state is cached for later calls."]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def stablelm_like(tmp_path_factory):
    """(HF tokenizer, HF model, jaxgen Generator) of a tiny GPT-NeoX "StableLM tuned alpha"."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    hf_dir = str(tmp_path_factory.mktemp("stablelm-hf"))
    tok = _train_tokenizer()
    tok.save(os.path.join(hf_dir, "tokenizer.json"))
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|padding|>",
                   "add_bos_token": False, "model_max_length": 4096}, f)
    end_id = tok.token_to_id("<|endoftext|>")
    cfg = GPTNeoXConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=4096, rotary_pct=0.25,
                        use_parallel_residual=True,
                        bos_token_id=end_id, eos_token_id=end_id, pad_token_id=tok.token_to_id("<|padding|>"),
                        initializer_range=0.1)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        # The final norm's bias points the hidden state along one direction; the <|endoftext|>
        # row of the head reads it, which keeps that token among the likely ones at every step.
        bias = model.gpt_neox.final_layer_norm.bias
        model.lm_head.weight[end_id] = bias / bias.norm() ** 2 * 2.0
    model.save_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    path = TransformersConverter(hf_dir).convert(str(tmp_path_factory.mktemp("stablelm-jaxgen") / "model"))
    return tokenizer, model, jaxgen.Generator(path)


def _guide_tokens(tokenizer):
    # As the guide writes them: token strings of the encoded texts.
    system_prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(SYSTEM_PROMPT))
    prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(PROMPT))
    return system_prompt_tokens, prompt_tokens


def test_tokenizer_carries_stablelm_specials(stablelm_like):
    tokenizer, _, generator = stablelm_like
    system_prompt_tokens, prompt_tokens = _guide_tokens(tokenizer)
    assert system_prompt_tokens[0] == "<|SYSTEM|>" and len(system_prompt_tokens) > 20
    assert prompt_tokens[0] == "<|USER|>" and prompt_tokens[-1] == "<|ASSISTANT|>"
    assert any(t.startswith("Ġ") for t in prompt_tokens)  # byte-level BPE: a space is "Ġ"
    for token in SPECIAL_TOKENS:  # the converted vocabulary has them at the tokenizer's ids
        assert generator.vocabulary.id_of(token) == tokenizer.convert_tokens_to_ids(token)


def test_guide_static_prompt_call_runs_as_written(stablelm_like):
    tokenizer, _, generator = stablelm_like
    system_prompt_tokens, prompt_tokens = _guide_tokens(tokenizer)

    step_results = generator.generate_tokens(
        prompt=prompt_tokens,
        static_prompt=system_prompt_tokens,
        max_length=512,
        sampling_topk=10,
        sampling_temperature=0.7,
        end_token=["<|endoftext|>", "<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>"],
    )
    steps = list(step_results)
    tokens = [step.token for step in steps]
    assert 1 <= len(steps) < 512, f"{len(steps)} steps: the nudged model should reach an end token well before 512"
    # The end token is yielded as the last step (spec §3.1), and only there.
    assert tokens[-1] in END_TOKENS and steps[-1].is_last
    assert not any(t in END_TOKENS for t in tokens[:-1])
    assert [s.step for s in steps] == list(range(len(steps)))
    assert all(0 <= s.token_id < len(tokenizer) for s in steps)
    # The text decodes (what the guide prints, word by word).
    assert isinstance(tokenizer.decode([s.token_id for s in steps[:-1]]), str)


def test_cached_static_prompt_changes_nothing(stablelm_like):
    """Same seed: the call with the static prompt cached (first call fills the cache, second reads
    it) yields the tokens of the call that recomputes it, and of system + prompt as one prompt."""
    tokenizer, _, generator = stablelm_like
    system_prompt_tokens, prompt_tokens = _guide_tokens(tokenizer)
    kwargs = dict(max_length=512, sampling_topk=10, sampling_temperature=0.7, end_token=END_TOKENS, random_seed=7)

    def run(**extra):
        return [s.token_id for s in generator.generate_tokens(**dict(kwargs, **extra))]

    uncached = run(prompt=prompt_tokens, static_prompt=system_prompt_tokens, cache_static_prompt=False)
    first = run(prompt=prompt_tokens, static_prompt=system_prompt_tokens)
    second = run(prompt=prompt_tokens, static_prompt=system_prompt_tokens)
    assert len(uncached) >= 2
    assert first == uncached and second == uncached


def test_greedy_equals_hf_generate_on_system_and_prompt(stablelm_like):
    tokenizer, model, generator = stablelm_like
    system_prompt_tokens, prompt_tokens = _guide_tokens(tokenizer)
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]
    steps = 512  # the guide's length (one compiled program for every test here); it ends much sooner
    got = [s.token_id for s in generator.generate_tokens(prompt=prompt_tokens, static_prompt=system_prompt_tokens,
                                                         max_length=steps, sampling_topk=1, end_token=END_TOKENS)]
    ids = tokenizer.encode(SYSTEM_PROMPT) + tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, eos_token_id=end_ids,
                             pad_token_id=tokenizer.pad_token_id)
    reference = out[0, len(ids):].tolist()
    assert len(reference) >= 3, "the greedy continuation should not end at once"
    assert got == reference
    assert np.isin(got[:-1], end_ids).sum() == 0
