"""Writes the example notebooks of this directory (without outputs) from the cells below.

Edit the cells here, then run `python notebooks/build_notebooks.py`. tests/test_notebooks.py
executes every notebook on the default model.
"""

from __future__ import annotations

import os
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


SETUP = code("""
    import jaxgen
    from jaxgen.tokenizer import load_tokenizer

    model_dir = jaxgen.default_model_path()  # Gemma 3 270M, converted into the cache on first use
    generator = jaxgen.Generator(model_dir)
    tokenizer = load_tokenizer(model_dir)
    print(model_dir)
    print(tokenizer)
""")

NOTEBOOKS = {
    # ------------------------------------------------------------------------------------------
    "01_quickstart.ipynb": [
        md("""
            # jaxgen quickstart: generate, stream, score

            jaxgen runs decoder-only language models with JAX behind CTranslate2's `Generator` API.
            The `Generator` takes **token strings** (like CTranslate2); `jaxgen.tokenizer` turns text into
            the model's tokens and back. This notebook uses the default model, Gemma 3 270M (a small
            *base* model: it continues text, it does not follow instructions).
        """),
        SETUP,
        md("""
            ## Generate

            The API adds no special tokens: Gemma expects a `<bos>` token first, so we add it.
            `max_length` counts generated tokens.
        """),
        code("""
            prompt = "The three most important inventions in history are"
            tokens = [tokenizer.bos_token] + tokenizer.encode(prompt)
            print(tokens)

            results = generator.generate_batch([tokens], max_length=24)  # the result includes the prompt
            print(tokenizer.decode(results[0].sequences_ids[0]))
        """),
        md("""
            ## Stream tokens as they are produced

            `generate_tokens` yields one `GenerationStepResult` per token. An incremental decoder turns
            them into text pieces (SentencePiece marks spaces with `▁`, so tokens cannot be decoded one by
            one). The end token, when produced, is the last step.
        """),
        code("""
            decoder = tokenizer.incremental_decoder(context=tokens)
            print(prompt, end="")
            for step in generator.generate_tokens(tokens, max_length=24):
                if step.is_last and step.token == tokenizer.eos_token:
                    break
                print(decoder.push(step.token_id), end="", flush=True)
            print(decoder.flush())
        """),
        md("""
            ## Score

            `score_batch` returns the log-probability of each token given the tokens before it.
        """),
        code("""
            import math

            texts = ["The capital of France is Paris.", "The capital of France is a banana."]
            batch = [[tokenizer.bos_token] + tokenizer.encode(text) for text in texts]
            for text, result in zip(texts, generator.score_batch(batch)):
                total = sum(result.log_probs)
                print(f"{text!r:40} log-likelihood {total:8.2f}  perplexity {math.exp(-total / len(result.log_probs)):8.2f}")
        """),
    ],
    # ------------------------------------------------------------------------------------------
    "02_perplexity.ipynb": [
        md("""
            # Perplexity and per-token log-probabilities

            Perplexity is `exp(-mean log p(token | previous tokens))`: lower means the model finds the text
            more predictable. We score three texts and plot where the model is surprised.
        """),
        SETUP,
        code("""
            import math

            texts = {
                "natural": "The sun rises in the east and sets in the west every day.",
                "shuffled": "east the day sets The in and every rises west the sun in.",
                "random": "Zq8 vlorp x7 mugwa teek 42 plonf brizzle quan.",
            }
            scored = {}
            for name, text in texts.items():
                tokens = [tokenizer.bos_token] + tokenizer.encode(text)
                result = generator.score_batch([tokens])[0]
                scored[name] = result
                ppl = math.exp(-sum(result.log_probs) / len(result.log_probs))
                print(f"{name:9} {len(result.log_probs):3} tokens  perplexity {ppl:10.2f}")
        """),
        code("""
            import io

            import matplotlib
            matplotlib.use("Agg")  # no display needed; the figure is embedded below as a PNG
            import matplotlib.pyplot as plt
            from IPython.display import Image, display

            fig, axes = plt.subplots(len(scored), 1, figsize=(10, 7), sharey=True)
            for ax, (name, result) in zip(axes, scored.items()):
                ax.bar(range(len(result.log_probs)), result.log_probs, color="tab:blue")
                ax.set_xticks(range(len(result.tokens)))
                ax.set_xticklabels([t.replace("\\u2581", " ") for t in result.tokens], rotation=60, fontsize=8)
                ax.set_title(name)
                ax.set_ylabel("log p")
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            plt.close(fig)
            display(Image(buffer.getvalue()))
        """),
    ],
    # ------------------------------------------------------------------------------------------
    "03_static_prompt.ipynb": [
        md("""
            # Static prompts: compute a shared prefix once

            A `static_prompt` (e.g. a long system prompt) is put before every prompt. jaxgen computes its
            attention state once and caches it (a bounded LRU cache per device), so later calls skip it.
            We time three calls: a first call (which also compiles), a call with a *new* static prompt of
            the same length (compiled, but not cached), and a call that hits the cache.
        """),
        SETUP,
        code("""
            import time

            system = ("You are a careful assistant that answers questions about geography. "
                      "Answers are one short sentence. ") * 12
            static_prompt = [tokenizer.bos_token] + tokenizer.encode(system)
            other_static_prompt = static_prompt[:-1] + tokenizer.encode(" Thanks.")[-1:]  # same length
            prompt = tokenizer.encode("Question: What is the capital of France?\\nAnswer:")
            print(len(static_prompt), "static-prompt tokens,", len(prompt), "prompt tokens")

            def timed(static, **kwargs):
                start = time.perf_counter()
                result = generator.generate_batch([prompt], max_length=8, static_prompt=static,
                                                  include_prompt_in_result=False, **kwargs)[0]
                return time.perf_counter() - start, tokenizer.decode(result.sequences_ids[0])

            first, _ = timed(other_static_prompt)            # compiles, computes and caches
            uncached, text = timed(static_prompt)            # compiled; computes and caches
            cached, cached_text = timed(static_prompt)       # cache hit
            recomputed, _ = timed(static_prompt, cache_static_prompt=False)
            assert cached_text == text
            print(f"first call (compiles):        {first * 1000:8.1f} ms")
            print(f"new static prompt:            {uncached * 1000:8.1f} ms")
            print(f"cached static prompt:         {cached * 1000:8.1f} ms")
            print(f"cache_static_prompt=False:    {recomputed * 1000:8.1f} ms")
            print("answer:", text)
        """),
        md("""
            The cache keeps the most recent static prompts (`static_prompt_cache_size`, 16 by default);
            `clear_static_prompt_cache()` frees them.
        """),
        code("""
            generator.clear_static_prompt_cache()
            after_clear, _ = timed(static_prompt)
            print(f"after clear_static_prompt_cache(): {after_clear * 1000:8.1f} ms")
        """),
    ],
    # ------------------------------------------------------------------------------------------
    "04_multi_device.ipynb": [
        md("""
            # Several devices

            Like CTranslate2, `device_index` takes a list: the model is loaded on each device and
            sub-batches run on them in parallel. Without accelerators we can try this on the CPU by
            asking XLA for 4 host devices. This must be set **before JAX is imported**, so run this
            notebook in a fresh kernel.
        """),
        code("""
            import os

            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

            import jax

            print(jax.devices())
            assert len(jax.devices("cpu")) == 4, "restart the kernel: JAX was imported before XLA_FLAGS was set"
        """),
        code("""
            import jaxgen
            from jaxgen.tokenizer import load_tokenizer

            model_dir = jaxgen.default_model_path()
            tokenizer = load_tokenizer(model_dir)
            generator = jaxgen.Generator(model_dir, device="cpu", device_index=[0, 1, 2, 3])
            print("devices:", generator.device, generator.device_index)
        """),
        code("""
            import time

            subjects = ["The ocean", "A good book", "Mountains", "The river",
                        "Coffee", "An old bridge", "Winter", "The library"]
            batch = [[tokenizer.bos_token] + tokenizer.encode(s) for s in subjects]
            start = time.perf_counter()
            results = generator.generate_batch(batch, max_batch_size=2, max_length=12)  # 4 sub-batches of 2
            print(f"{len(batch)} prompts in {time.perf_counter() - start:.2f} s")
            for result in results:
                print(repr(tokenizer.decode(result.sequences_ids[0])))
        """),
    ],
    # ------------------------------------------------------------------------------------------
    "05_research.ipynb": [
        md("""
            # jaxgen for research: pure functions, custom processors, prompt lookup

            `jaxgen.functional` exposes the model as pure JAX functions (`forward`, `embed`, `log_probs`)
            that you can `jit`, `grad` and `vmap`; the `Generator` runs the same ones. This notebook
            computes a token-level attribution with gradients, steers generation with a logits processor
            written in JAX, and measures prompt-lookup speculative decoding on a copy/edit task.
        """),
        SETUP,
        md("""
            ## Which prompt tokens drive a continuation? Gradient x input

            The attribution of prompt token t to a continuation is `sum_d grad_d * embedding_d`, the
            gradient of the continuation's log-likelihood with respect to the input embeddings, times
            those embeddings.
        """),
        code("""
            import jax
            import jax.numpy as jnp
            import numpy as np

            from jaxgen import functional as F

            model = F.from_generator(generator)  # the generator's weights as pure-function inputs (no copy)
            ids_of = {token: i for i, token in enumerate(model.vocabulary)}

            prompt = [tokenizer.bos_token] + tokenizer.encode("The Eiffel Tower is located in the city of")
            continuation = tokenizer.encode(" Paris")
            tokens = jnp.asarray([[ids_of[t] for t in prompt + continuation]], jnp.int32)
            lengths = jnp.asarray([tokens.shape[1]], jnp.int32)
            n_prompt = len(prompt)


            def continuation_log_likelihood(embeddings):
                logits = F.forward(model.params, model.config, None, lengths, embeddings=embeddings)
                log_probs = jax.nn.log_softmax(logits[0, n_prompt - 1:-1], axis=-1)  # predicting the continuation
                return jnp.take_along_axis(log_probs, tokens[0, n_prompt:, None], axis=-1).sum()


            embeddings = F.embed(model.params, model.config, tokens)
            value, grads = jax.jit(jax.value_and_grad(continuation_log_likelihood))(embeddings)
            attribution = np.asarray((grads * embeddings).sum(-1)[0, :n_prompt])
            print(f"log p({''.join(continuation)!r} | prompt) = {float(value):.3f}")
            for token, score in sorted(zip(prompt, attribution), key=lambda x: -abs(x[1]))[:5]:
                print(f"attribution {score:+.3f}  {token!r}")
        """),
        code("""
            import io

            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from IPython.display import Image, display

            fig, ax = plt.subplots(figsize=(10, 1.8))
            limit = float(np.abs(attribution).max())
            ax.imshow(attribution[None, :], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(n_prompt))
            ax.set_xticklabels([t.replace("\\u2581", " ") for t in prompt], rotation=45, fontsize=9)
            ax.set_yticks([])
            ax.set_title(f"gradient x input for the continuation {''.join(continuation)!r}")
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            plt.close(fig)
            display(Image(buffer.getvalue()))
        """),
        md("""
            ## A custom logits processor: no digits

            A processor is a JAX function `fn(logits [B, V], generated [B, N], step) -> logits`, traced
            into the decoding loop (no host round trip per token). It runs after CTranslate2's processors
            (penalties, bans) and before the greedy / sampling / beam choice.
        """),
        code("""
            has_digit = jnp.asarray([any(c.isdigit() for c in token) for token in model.vocabulary])


            def no_digits(logits, generated, step):
                return jnp.where(has_digit[None, :], -jnp.inf, logits)


            question = [tokenizer.bos_token] + tokenizer.encode("The first person walked on the Moon in the year")
            for processors in ([], [no_digits]):
                result = generator.generate_batch([question], max_length=12, include_prompt_in_result=False,
                                                  logits_processors=processors)[0]
                text = tokenizer.decode(result.sequences_ids[0])
                print(f"{'no digits' if processors else 'plain':9}: {text!r}")
            assert not any(c.isdigit() for c in text)
        """),
        md("""
            ## Prompt-lookup speculative decoding on a copy/edit task

            When the output repeats the prompt (restating a list or code with a small change), drafting
            the next tokens from an earlier occurrence of the last few tokens and verifying them in one
            pass emits several tokens per pass. The output is exactly greedy search's.
        """),
        code("""
            import time

            text = ("Shopping list:\\n- 2 pounds of apples\\n- 1 loaf of bread\\n- 12 eggs\\n- 1 gallon of milk\\n"
                    "- 3 cans of soup\\n- 1 bag of rice\\n\\nThe same list with 24 eggs instead of 12:\\n- 2 pounds of")
            copy_prompt = [tokenizer.bos_token] + tokenizer.encode(text)


            def timed(**kwargs):
                generator.generate_batch([copy_prompt], max_length=48, include_prompt_in_result=False, **kwargs)
                start = time.perf_counter()
                result = generator.generate_batch([copy_prompt], max_length=48, include_prompt_in_result=False,
                                                  **kwargs)[0]
                return time.perf_counter() - start, result.sequences_ids[0]


            greedy_s, greedy_ids = timed()
            lookup_s, lookup_ids = timed(prompt_lookup_tokens=8)
            assert lookup_ids == greedy_ids
            print(tokenizer.decode(greedy_ids))
            print(f"greedy {len(greedy_ids) / greedy_s:.1f} tok/s, "
                  f"prompt lookup {len(lookup_ids) / lookup_s:.1f} tok/s: speed-up {greedy_s / lookup_s:.2f}x")
        """),
    ],
    # ------------------------------------------------------------------------------------------
    "06_structured_output.ipynb": [
        md("""
            # Structured output: records that parse

            `constraint=` makes the generated text keep to a JSON Schema, a regular expression, a list of
            choices or a grammar, token by token inside the decoding loop (`jaxgen.constraints`, on
            llguidance: `pip install 'jaxgen[constraints]'`). This notebook extracts records from short
            texts into a schema, labels texts with a choice list, and measures what a constraint costs
            against free decoding.
        """),
        SETUP,
        md("""
            ## Extracting records into a JSON Schema

            Every output is one compact JSON value valid under the schema. The end token is allowed only
            once the value is complete; `constraint_complete` says whether it was (False: cut by
            `max_length`).
        """),
        code("""
            import json

            from jaxgen.constraints import Choice, JsonSchema, Regex

            schema = {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 30},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string", "maxLength": 20},
                    "job": {"enum": ["scientist", "artist", "engineer", "other"]},
                },
                "required": ["name", "age", "city", "job"],
                "additionalProperties": False,
            }
            texts = [
                "Marie Curie, 66, was a physicist who lived in Paris.",
                "Frida Kahlo, a painter from Mexico City, died at 47.",
                "At 41, Alan Turing worked as a mathematician in Manchester.",
            ]
            prompts = [[tokenizer.bos_token] + tokenizer.encode(f"Text: {t}\\nRecord as JSON: ") for t in texts]
            results = generator.generate_batch(prompts, max_length=80, include_prompt_in_result=False,
                                               constraint=JsonSchema(schema))
            for text, result in zip(texts, results):
                out = tokenizer.decode(result.sequences_ids[0])
                record = json.loads(out) if result.constraint_complete[0] else None
                print(text, "->", record if record is not None else f"(cut) {out!r}")
        """),
        md("""
            ## Labels and patterns

            A choice list for classification, a regular expression for a formatted field; a list of
            constraints gives each prompt its own (`None` decodes freely).
        """),
        code("""
            reviews = ["The food was cold and the waiter rude.", "A wonderful evening, we will come back!"]
            label_prompts = [[tokenizer.bos_token] + tokenizer.encode(f"Review: {r}\\nSentiment:") for r in reviews]
            date_prompt = [tokenizer.bos_token] + tokenizer.encode("The Apollo 11 landing date (YYYY-MM-DD):")
            results = generator.generate_batch(
                label_prompts + [date_prompt, date_prompt], max_length=16, include_prompt_in_result=False,
                constraint=[Choice([" positive", " negative"])] * 2 + [Regex(r" [0-9]{4}-[0-9]{2}-[0-9]{2}"), None])
            for result in results:
                print(repr(tokenizer.decode(result.sequences_ids[0])), result.constraint_complete)
        """),
        md("""
            ## What a constraint costs

            Sampling exactly 32 new tokens per row, free and under a JSON Schema that cannot complete that
            soon (an array of at least 20 records), at batch 1 and 4, after a warm-up call each. The host
            advances each row's matcher and computes its token mask while the device runs the step.
        """),
        code("""
            import io
            import time

            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from IPython.display import Image, display

            long_schema = JsonSchema({"type": "array", "items": schema, "minItems": 20})
            options = dict(max_length=32, min_length=32, include_prompt_in_result=False, sampling_topk=40,
                           sampling_temperature=0.8, random_seed=0)
            speed = {}
            for batch in (1, 4):
                for name, constraint in (("free", None), ("JSON Schema", long_schema)):
                    rows = [prompts[i % len(prompts)] for i in range(batch)]
                    generator.generate_batch(rows, constraint=constraint, **options)  # warm-up (compiles)
                    start = time.perf_counter()
                    out = generator.generate_batch(rows, constraint=constraint, **options)
                    seconds = time.perf_counter() - start
                    speed[(batch, name)] = sum(len(r.sequences_ids[0]) for r in out) / seconds
                    print(f"batch {batch}, {name}: {speed[(batch, name)]:.1f} tok/s")

            fig, ax = plt.subplots(figsize=(6, 3))
            for j, name in enumerate(("free", "JSON Schema")):
                ax.bar([b + 0.35 * j for b in range(2)], [speed[(b, name)] for b in (1, 4)], width=0.35, label=name)
            ax.set_xticks([0.175, 1.175])
            ax.set_xticklabels(["batch 1", "batch 4"])
            ax.set_ylabel("tokens / s")
            ax.legend()
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            plt.close(fig)
            display(Image(buffer.getvalue()))
        """),
    ],
}


def build(directory: str = HERE) -> list:
    """Writes every notebook (no outputs); returns their paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
            cell["id"] = f"{name.split('_')[0]}-{i:02d}"
        nbformat.validate(nb)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", os.path.relpath(p))
