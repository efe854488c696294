"""The engine protocol, implemented for jaxgen, CTranslate2, HF transformers and llama.cpp.

An engine is one model loaded in one process (`harness._serve`); its operations are timed by the
harness around the call, the same way for every engine:

    generate(prompts, batch, new_tokens, exact=True, outputs=False, **options)
        greedy by default; `exact` forces `new_tokens` tokens (min_length); `options` go to the
        engine's generate call (jaxgen and CTranslate2 share the Generator API)
    prefill(prompts)         one prompt, one new token: the time to the first token
    score(prompts, one_by_one=False, outputs=False)
    forward(prompts, log_probs=False)              jaxgen and CTranslate2 only
    first_token(prompts, max_length)               streaming: reports the time to the first token
    close(prompts, read, max_length)               streaming: reports the time of close() alone

`prompts` is the name of a prompt set given to the process at start ({name: [[token, ...], ...]},
token strings of the model's vocabulary) or a list of token lists; `batch` rows cycle through the
set (None: the set as it is). Each returns a dict (token counts, optional outputs) that comes back
with the reply. An operation an engine has not got raises NotImplementedError (the tables show "—").

Spec options (harness.Spec.options): "device", "compute_type"; jaxgen "generator" (Generator
keyword arguments); jaxgen and CTranslate2 "generate_options" / "score_options" (keyword arguments
of every such call, e.g. a layout's max_batch_size); transformers "static"; llama.cpp "vocabulary"
(a vocabulary.json whose ids are the GGUF's), "n_seq" (parallel sequences), "n_ctx" (per sequence),
"repack" (llama.cpp's extra buffer types: its repacked CPU kernels, AMX; default True).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

Prompts = Union[str, List[List[str]]]


class Engine:
    description = "engine"
    imported = 0.0  # time.time() once the engine's library is imported

    def __init__(self, spec: dict, prompts: dict, threads: int):
        self.prompts = prompts
        self.options = spec["options"]
        self.threads = threads

    def rows(self, prompts: Prompts, batch: Optional[int] = None) -> List[List[str]]:
        rows = self.prompts[prompts] if isinstance(prompts, str) else prompts
        return list(rows) if batch is None else [rows[i % len(rows)] for i in range(batch)]

    def prefill(self, prompts: Prompts = "long") -> dict:
        return self.generate(prompts, 1, 1, exact=False)

    def sync(self) -> None:
        pass

    def events(self) -> dict:
        """What happened in the process since the last reply (jaxgen: the programs JAX compiled)."""
        return {}

    def final_stats(self) -> dict:
        return {}


# ============================================================================ jaxgen and CTranslate2
class GeneratorEngine(Engine):
    """jaxgen and CTranslate2 share the Generator API, so the same code drives both."""

    gen = None

    def generate(self, prompts: Prompts = "short", batch: Optional[int] = None, new_tokens: int = 128,
                 exact: bool = True, outputs: bool = False, **options) -> dict:
        options = {**self.options.get("generate_options", {}), **options}
        if exact:
            options["min_length"] = new_tokens
        res = self.gen.generate_batch(self.rows(prompts, batch), max_length=new_tokens,
                                      include_prompt_in_result=False, **options)
        ids = [r.sequences_ids[0] for r in res]
        return {"tokens": sum(map(len, ids)), **({"outputs": ids} if outputs else {})}

    def score(self, prompts: Prompts = "score", one_by_one: bool = False, outputs: bool = False, **options) -> dict:
        rows, options = self.rows(prompts), {**self.options.get("score_options", {}), **options}
        res = [r for row in rows for r in self.gen.score_batch([row], **options)] if one_by_one \
            else self.gen.score_batch(rows, **options)
        lp = [list(map(float, r.log_probs)) for r in res]
        return {"tokens": sum(map(len, lp)), **({"outputs": lp} if outputs else {})}

    def forward(self, prompts: Prompts, log_probs: bool = False) -> dict:
        out = self.gen.forward_batch(self.rows(prompts), return_log_probs=log_probs)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        return {}

    def first_token(self, prompts: Prompts = "short", max_length: int = 128) -> dict:
        t = time.perf_counter()
        stream = self.gen.generate_tokens(self.rows(prompts)[0], max_length=max_length)
        next(iter(stream))
        seconds = time.perf_counter() - t
        stream.close()
        return {"seconds": seconds}

    def close(self, prompts: Prompts = "short", read: int = 4, max_length: int = 512) -> dict:
        stream = self.gen.generate_tokens(self.rows(prompts)[0], max_length=max_length, min_length=max_length)
        it = iter(stream)
        for _ in range(read):
            next(it)
        t = time.perf_counter()
        stream.close()
        return {"seconds": time.perf_counter() - t}


class JaxgenEngine(GeneratorEngine):
    def __init__(self, spec: dict, prompts: dict, threads: int):
        super().__init__(spec, prompts, threads)
        import jax
        import jax.monitoring

        self.compiled: List[list] = []
        self._hit = False
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        import jaxgen

        self.imported = time.time()
        self.jax = jax
        self.gen = jaxgen.Generator(spec["model"], device=self.options.get("device", "cpu"),
                                    compute_type=self.options.get("compute_type", "default"),
                                    **self.options.get("generator", {}))
        self.description = f"jaxgen {self.gen.compute_type} on {self.gen.device}, attention {self.gen.attention}"

    # What JAX compiled, from its own monitoring events: one backend compilation per program (a
    # persistent-cache hit is reported just before the program it loaded).
    def _on_event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self._hit = True

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            name = str(kwargs.get("fun_name", "?"))  # "jit(decode)": the jitted function's name inside
            name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
            self.compiled.append([name, seconds, self._hit])
            self._hit = False

    def events(self) -> dict:
        compiled, self.compiled = self.compiled, []
        return {"compiled": compiled}

    def generate(self, *args, constraint: Optional[dict] = None, **kwargs) -> dict:
        """constraint: {"json_schema": schema} or {"regex": pattern} (jaxgen.constraints), for every row."""
        if constraint is not None:
            kwargs["constraint"] = self._constraint(constraint)
        from jaxgen.runtime import matchers

        before, host = self.gen.scheduler_stats, matchers.stats()
        cpu = time.process_time()
        out = super().generate(*args, **kwargs)
        out["cpu_seconds"] = time.process_time() - cpu  # every thread of the process (XLA's, the callbacks')
        out["matchers"] = {k: v - host[k] for k, v in matchers.stats().items()}  # host time of the constraints
        after = self.gen.scheduler_stats
        out["scheduler"] = {k: after[k] - before.get(k, 0) for k in after
                            if isinstance(after[k], (int, float)) and k != "utilisation"}  # counters only
        return out

    @staticmethod
    def _constraint(spec: dict):
        from jaxgen.constraints import JsonSchema, Regex

        return JsonSchema(spec["json_schema"]) if "json_schema" in spec else Regex(spec["regex"])

    def prepare_constraint(self, constraint: dict, fresh: bool = True) -> dict:
        """Compiles a constraint for the vocabulary (Generator.prepare_constraint); fresh: a variant
        never seen by this process (a new description or regex group), so nothing comes from its cache."""
        if fresh:
            nonce = f"{time.time_ns()}"
            constraint = ({"json_schema": {**constraint["json_schema"], "description": nonce}}
                          if "json_schema" in constraint else {"regex": f"(?:{constraint['regex']})(?:{nonce})?"})
        c = self._constraint(constraint)
        t = time.perf_counter()
        self.gen.prepare_constraint(c)
        return {"seconds": time.perf_counter() - t}

    def final_stats(self) -> dict:
        if self.gen.device == "cpu":
            return {}
        peak = (self.jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        return {"device_peak_mib": peak / 2**20} if peak else {}


class CT2Engine(GeneratorEngine):
    def __init__(self, spec: dict, prompts: dict, threads: int):
        super().__init__(spec, prompts, threads)
        import ctranslate2

        self.imported = time.time()
        self.gen = ctranslate2.Generator(spec["model"], device=self.options.get("device", "cpu"),
                                         compute_type=self.options.get("compute_type", "default"),
                                         intra_threads=threads, inter_threads=1)
        self.description = f"CTranslate2 {self.gen.compute_type} on {self.gen.device}"


# ============================================================================ HF transformers
class HFEngine(Engine):
    """transformers eager (sdpa, dynamic cache), or with options static=True its static cache and
    generate's torch.compile of the decoding step."""

    def __init__(self, spec: dict, prompts: dict, threads: int):
        super().__init__(spec, prompts, threads)
        import torch
        import transformers

        self.imported = time.time()
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if self.options.get("device") == "cuda" else "cpu"
        dtype = getattr(torch, self.options.get("compute_type", "float32"))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model"], dtype=dtype, attn_implementation="sdpa").to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.extra = {}
        if self.options.get("static"):
            self.extra = dict(cache_implementation="static", compile_config=transformers.CompileConfig())
            self.extra["compile_config"]._compile_all_devices = True  # generate() compiles on CPU too when told
        self.description = (f"transformers {dtype} on {self.device}, "
                            + ("static cache + torch.compile" if self.extra else "eager, dynamic cache"))

    def ids(self, prompts: Prompts, batch: Optional[int] = None):
        rows = [self.tokenizer.convert_tokens_to_ids(r) for r in self.rows(prompts, batch)]
        if len({len(r) for r in rows}) > 1:
            raise NotImplementedError("rows of different lengths (this engine runs unpadded batches)")
        return self.torch.tensor(rows, device=self.device)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, prompts: Prompts = "short", batch: Optional[int] = None, new_tokens: int = 128,
                 exact: bool = True, outputs: bool = False, streamer=None) -> dict:
        ids = self.ids(prompts, batch)
        with self.torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else 0,
                                      pad_token_id=self.pad_id, streamer=streamer, top_k=None, top_p=None,
                                      **self.extra)
        new = out[:, ids.shape[1]:].tolist()
        return {"tokens": sum(map(len, new)), **({"outputs": new} if outputs else {})}

    def score(self, prompts: Prompts = "score", one_by_one: bool = False, outputs: bool = False,
              max_input_length: int = 0) -> dict:
        """Decoder forward, then the head + log_softmax + gather in chunks of positions (the [T, V]
        logits never exist at once). Nothing is truncated (max_input_length is the Generator API's)."""
        torch, model = self.torch, self.model
        batches = [self.ids([r]) for r in self.rows(prompts)] if one_by_one else [self.ids(prompts)]
        softcap = getattr(model.config, "final_logit_softcapping", None)
        chunk = max(1, 2**28 // model.config.vocab_size)
        result = []
        with torch.inference_mode():
            for ids in batches:
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                parts = []
                for s in range(0, ids.shape[1] - 1, chunk):
                    logits = model.lm_head(hidden[:, s:s + chunk]).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    parts.append(torch.log_softmax(logits, -1).gather(-1, ids[:, s + 1:s + 1 + chunk, None])[..., 0])
                result += torch.cat(parts, 1).cpu().tolist()
        return {"tokens": sum(map(len, result)), **({"outputs": result} if outputs else {})}

    def first_token(self, prompts: Prompts = "short", max_length: int = 128) -> dict:
        engine, start = self, time.perf_counter()

        class FirstToken:  # the first put() is the prompt, the second the first new token
            calls, at = 0, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    engine.sync()
                    self.at = time.perf_counter()

            def end(self):
                pass

        streamer = FirstToken()
        self.generate(prompts, 1, 1, exact=False, streamer=streamer)
        return {"seconds": (streamer.at or time.perf_counter()) - start}

    def final_stats(self) -> dict:
        return {"device_peak_mib": self.torch.cuda.max_memory_allocated() / 2**20} if self.device == "cuda" else {}


# ============================================================================ llama.cpp
class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python's C API (greedy decoding of up to `n_seq` sequences in one
    batch, as llama.cpp's batched example does). Token strings become ids through the vocabulary of
    a jaxgen conversion of the same GGUF file (options["vocabulary"]): the ids are the GGUF's."""

    def __init__(self, spec: dict, prompts: dict, threads: int):
        super().__init__(spec, prompts, threads)
        import numpy as np

        import llama_cpp as L

        self.imported = time.time()
        self.np, self.L = np, L
        L.llama_backend_init()
        self.n_seq = int(self.options.get("n_seq", 16))
        self.n_ctx = int(self.options.get("n_ctx", 1024))  # per sequence
        model_params = L.llama_model_default_params()
        model_params.use_extra_bufts = bool(self.options.get("repack", True))
        model = L.llama_model_load_from_file(spec["model"].encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        params = L.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.n_seq
        params.n_batch = params.n_ubatch = max(512, self.n_ctx)
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(model, params)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        with open(self.options["vocabulary"], encoding="utf-8") as f:
            vocabulary = json.load(f)
        if len(vocabulary) > self.n_vocab:  # smaller: the tiny model's ids, run on the default model's file
            raise ValueError(f"the vocabulary has {len(vocabulary)} tokens, the GGUF file {self.n_vocab}")
        self.vocab = {t: i for i, t in enumerate(vocabulary)}
        self.batch = L.llama_batch_init(params.n_batch * 1, 0, 1)
        self.capacity = params.n_batch
        self.description = (f"llama.cpp {os.path.basename(spec['model'])}, {threads} threads, "
                            f"up to {self.n_seq} sequences" + ("" if model_params.use_extra_bufts else
                                                               ", without its repacked kernels (--no-repack)"))

    def _ids(self, prompts: Prompts, batch: Optional[int] = None) -> List[List[int]]:
        return [[self.vocab[t] for t in row] for row in self.rows(prompts, batch)]

    def _decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]):
        """One llama_decode over the given tokens; returns the logits rows asked for, [n, V] float32."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n = sum(map(bool, logits))
        return self.np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))

    def _prefill(self, rows: List[List[int]], all_logits: bool = False):
        """Every row into its own sequence, in pieces of at most the batch capacity; returns the last
        position's logits of every row (or every position's, with all_logits and one row)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        items = [(tok, pos, seq, all_logits or pos == len(row) - 1)
                 for seq, row in enumerate(rows) for pos, tok in enumerate(row)]
        out = []
        for start in range(0, len(items), self.capacity):
            part = items[start:start + self.capacity]
            out.append(self._decode(*zip(*part)).copy())
        return self.np.concatenate(out)

    def generate(self, prompts: Prompts = "short", batch: Optional[int] = None, new_tokens: int = 128,
                 exact: bool = True, outputs: bool = False) -> dict:
        rows = self._ids(prompts, batch)
        if len(rows) > self.n_seq:
            raise NotImplementedError(f"{len(rows)} sequences: this context holds {self.n_seq}")
        last = self._prefill(rows).argmax(-1)
        out = [[int(t)] for t in last]
        for step in range(1, new_tokens):  # exact: no end token is checked, as with min_length elsewhere
            last = self._decode(last.tolist(), [len(r) + step - 1 for r in rows], range(len(rows)),
                                [True] * len(rows)).argmax(-1)
            for o, t in zip(out, last):
                o.append(int(t))
        return {"tokens": sum(map(len, out)), **({"outputs": out} if outputs else {})}

    def score(self, prompts: Prompts = "score", one_by_one: bool = True, outputs: bool = False) -> dict:
        """One sequence at a time (every position's logits), log-softmax in numpy."""
        np, result = self.np, []
        for row in self._ids(prompts):
            logits = self._prefill([row], all_logits=True)[:-1]
            top = logits.max(-1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            result.append((logits[np.arange(len(row) - 1), row[1:]] - lse).tolist())
        return {"tokens": sum(map(len, result)), **({"outputs": result} if outputs else {})}

    def first_token(self, prompts: Prompts = "short", max_length: int = 128) -> dict:
        return self.generate(prompts, 1, 1, exact=False)


# ============================================================================ int8 matrix products (XLA)
class Int8ProductsEngine(Engine):
    """Not a text engine: y = x @ (q * scale) in several formulations, for the int8_kernels workload.

    f32: float32 weights (the speed to beat); w8: int8 weights converted to float32 inside the dot;
    a8: activations quantized per row x int8 weights -> int32 (`lax.dot_general`, one row padded to
    two); u8: jaxgen's uint8 x int8 formulation (`jaxgen.model.int8.int8_matmul(kind="u8")`); c8: jaxgen's
    native kernel (`kind="c8"`, weights [N, K] only: `jaxgen.model.native`)."""

    def __init__(self, spec: dict, prompts: dict, threads: int):
        super().__init__(spec, prompts, threads)
        import jax
        import numpy as np

        from jaxgen.model import int8

        self.imported = time.time()
        self.jax, self.np, self.int8 = jax, np, int8
        self.data: dict = {}
        self.description = f"jax {jax.__version__} on {jax.devices()[0].platform}"

    def _function(self, candidate: str, nk: bool):
        jnp, lax, int8 = self.jax.numpy, self.jax.lax, self.int8
        dims = (((1,), (1 if nk else 0,)), ((), ()))

        def f32(x, w, s):
            return lax.dot_general(x, w, dims)

        def w8(x, w, s):
            return lax.dot_general(x, w.astype(jnp.float32), dims) * s

        def a8(x, w, s):
            xq, sx = int8.quantize_rows(jnp.pad(x, ((0, max(0, 2 - x.shape[0])), (0, 0))))
            acc = lax.dot_general(xq, w, dims, preferred_element_type=jnp.int32)
            return (acc.astype(jnp.float32) * sx * s)[:x.shape[0]]

        def u8(x, w, s):  # the uint8 x int8 formulation itself, not the one measured fastest here
            return int8.int8_matmul(x, w, s, nk, kind="u8")

        def c8(x, w, s):  # the native kernel (compiled on this machine at the first use)
            return int8.int8_matmul(x, w, s, nk, kind="c8")

        def c32(x, w, s):  # the native float32 kernel, weight [N, K]
            from jaxgen.model.native import float32_matmul_nk

            return float32_matmul_nk(x, w)

        return self.jax.jit({"f32": f32, "w8": w8, "a8": a8, "u8": u8, "c8": c8, "c32": c32}[candidate])

    def matmul(self, k: int, n: int, m: int, candidate: str, nk: bool, check: bool = False) -> dict:
        np, key = self.np, (k, n, m, candidate, nk)
        if key not in self.data:
            rng = np.random.default_rng(0)
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            scale = np.abs(w).max(axis=0) / 127
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[:, :max(1, k // 64)] *= 8  # a few outlier channels, as in real activations
            float_weight = candidate in ("f32", "c32")
            stored = w if float_weight else q
            args = (x, np.ascontiguousarray(stored.T) if nk else stored, scale.astype(np.float32))
            ref = x.astype(np.float64) @ (w if float_weight else q * scale.astype(np.float64))
            self.data[key] = (self._function(candidate, nk), [self.jax.device_put(a) for a in args], ref)
        fn, args, ref = self.data[key]
        out = fn(*args).block_until_ready()
        if not check:
            return {}
        return {"max_error": float(np.abs(np.asarray(out, np.float64) - ref).max() / np.sqrt(np.mean(ref ** 2)))}


ENGINES: Dict[str, type] = {"jaxgen": JaxgenEngine, "ct2": CT2Engine, "hf": HFEngine, "llama.cpp": LlamaCppEngine,
                            "int8 products": Int8ProductsEngine}
LABELS = {"jaxgen": "jaxgen", "ct2": "CTranslate2", "hf": "transformers", "llama.cpp": "llama.cpp"}


def load(spec: dict, prompts: dict, threads: int) -> Engine:
    return ENGINES[spec["engine"]](spec, prompts, threads)


def llama_cpp_repack_works(gguf: str, threads: int) -> bool:
    """Whether llama.cpp decodes with its extra buffer types (repacked CPU kernels, AMX) on this CPU.
    llama-cpp-python 0.3.36's build died with SIGSEGV at the first llama_decode on an Intel Xeon with
    AMX (2026-12-02) and ran without them (llama.cpp's --no-repack): the probe runs one decode in a
    child process, so that a crash cannot take the harness down."""
    probe = ("import sys, llama_cpp as L\n"
             "L.llama_backend_init(); m = L.llama_model_default_params(); m.use_extra_bufts = True\n"
             "model = L.llama_model_load_from_file(sys.argv[1].encode(), m)\n"
             "c = L.llama_context_default_params(); c.n_threads = c.n_threads_batch = int(sys.argv[2])\n"
             "ctx = L.llama_init_from_model(model, c); b = L.llama_batch_init(8, 0, 1)\n"
             "for i in range(4):\n"
             "    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = 2 + i, i, 1, i == 3; b.seq_id[i][0] = 0\n"
             "b.n_tokens = 4; sys.exit(L.llama_decode(ctx, b))\n")
    try:
        done = subprocess.run([sys.executable, "-c", probe, gguf, str(threads)], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0
