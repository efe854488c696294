"""Where a prefill's (or a decode's) time goes: the whole call, then with attention replaced by
zeros, then with every linear layer (the int8 or float32 products, the head included) replaced by a
cheap stand-in, then with the head alone replaced.

    python benchmarks/prefill_breakdown.py                          # default model, int8_float32, 512 tokens
    python benchmarks/prefill_breakdown.py --compute-type float32 --tokens 1024
    python benchmarks/prefill_breakdown.py --decode 16              # greedy decode: 16 rows x 128 new tokens

An ablation, not a profile: each variant is traced and compiled anew (jax.clear_caches) with one
function of jaxgen.model.decoder monkeypatched, and timed as `generate_batch(max_length=1)` on a
random prompt (medians of --reps after a warm-up). The differences to the whole prefill estimate
what attention and the products cost; the outputs of the patched variants are meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a jaxgen model directory (default: the default model)")
    parser.add_argument("--compute-type", default="int8_float32")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--decode", type=int, default=0, metavar="BATCH",
                        help="time greedy decoding of BATCH rows (9-token prompts, --new-tokens each) instead")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    import jax
    import jax.numpy as jnp

    import jaxgen
    import jaxgen.model.decoder as decoder
    from jaxgen import default_model

    generator = jaxgen.Generator(args.model or default_model.default_model_path(progress=False),
                                 compute_type=args.compute_type)
    tokens = generator.vocabulary.tokens
    prompt = harness.random_prompt(tokens, args.tokens)

    def prefill_ms() -> float:
        if args.decode:
            n = args.new_tokens
            return harness.median_ms(lambda: generator.generate_batch(
                [prompt[:9]] * args.decode, max_length=n, min_length=n, include_prompt_in_result=False), args.reps)
        return harness.median_ms(lambda: generator.generate_batch([prompt], max_length=1,
                                                                  include_prompt_in_result=False), args.reps)

    def no_attention(q, k, v, *_, **__):  # [B, T, Hq, hd] -> zeros [B, T, Hq * hd], still reading k
        return jnp.zeros(q.shape[:2] + (q.shape[2] * q.shape[3],), q.dtype) + 0 * jnp.sum(k)

    def cheap_linear(x, p, transposed=False):  # x [..., K] -> [..., N] without the product
        w = p["weight_nk"] if "weight_nk" in p else p["weight"]
        n = w.shape[0] if ("weight_nk" in p or transposed) else w.shape[1]
        return jnp.zeros(x.shape[:-1] + (n,), x.dtype) + 1e-9 * jnp.sum(x, -1, keepdims=True)

    def cheap_head(x, p, transposed=False):  # the head only: the product whose width is the vocabulary
        w = p["weight_nk"] if "weight_nk" in p else p["weight"]
        n = w.shape[0] if ("weight_nk" in p or transposed) else w.shape[1]
        return (cheap_linear if n == generator.config.vocab_size else original_linear)(x, p, transposed)

    original_linear = decoder.linear
    what = (f"greedy decode, {args.decode} rows x {args.new_tokens} new tokens" if args.decode
            else f"{args.tokens}-token prompt")
    print(f"CPU: {' '.join(harness.cpu_name())}; {args.compute_type}, {what}, medians of {args.reps}")
    whole = prefill_ms()
    print(f"whole {'decode' if args.decode else 'prefill'}: {whole:.1f} ms")
    for name, attribute, stand_in in (("attention", "attend", no_attention), ("linear layers", "linear", cheap_linear),
                                      ("the head", "linear", cheap_head)):
        original = getattr(decoder, attribute)
        setattr(decoder, attribute, stand_in)
        jax.clear_caches()
        try:
            ms = prefill_ms()
        finally:
            setattr(decoder, attribute, original)
        print(f"without {name}: {ms:.1f} ms  ({name}: ~{whole - ms:.1f} ms, {(whole - ms) / whole:.0%})")


if __name__ == "__main__":
    main(sys.argv[1:])
