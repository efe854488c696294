"""The one benchmark harness: each engine in its own process, a warm-up, alternating repetitions, medians.

* `Spec`: one engine to load (which engine, which model, its options and environment). Specs of the
  same `group` are loaded together; groups run one after the other (so at most one group's models
  are in memory at once).
* `Case`: one operation of the engine protocol (`benchmarks/engines.py`: generate, prefill, score,
  forward, first_token, close) with its arguments, run on some of the loaded engines.
* `run`: per group, one untimed warm-up run of every (case, engine) (compilation happens there), then
  the repetitions; within a repetition every case runs on its engines one after another, the first
  engine rotating with the repetition, so drift of the machine hits every engine alike.
* `Worker`: the engine process, `python benchmarks/harness.py`, driven by JSON lines on its stdin and
  stdout. Every operation is timed here, the same way for every engine (`perf_counter` around the
  call and a device sync); only `first_token` and `close` time an inner part and report it. The
  process's own peak RSS (`ru_maxrss`) and the programs JAX compiled during each call come back with
  the replies.
* `start_up`: a brand-new engine process timed from its launch to the end of one operation.
* `header`, `markdown_table`, `fmt`: the lines every report starts with (CPU named with its vector
  extensions) and the README's table format.

Nothing heavy (jax, torch, ctranslate2, llama_cpp) is imported here: the orchestrating process stays
lean and every library is imported only in the processes that run it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@dataclasses.dataclass
class Spec:
    """One engine process: `engine` names an entry of `engines.ENGINES`."""

    key: str  # unique label, the column of the tables ("jaxgen float32")
    engine: str
    model: str
    options: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)
    group: int = 0


@dataclasses.dataclass
class Case:
    """One timed operation. rate = work / seconds (tokens per second when work counts tokens)."""

    id: str
    op: str
    args: dict = dataclasses.field(default_factory=dict)
    engines: Optional[Sequence[str]] = None  # keys; None: every engine of the run
    work: float = 1.0
    reps: Optional[int] = None  # None: the run's repetitions; 0: the warm-up run alone
    warmup: Optional[dict] = dataclasses.field(default_factory=dict)  # args changed for the warm-up; None: none


@dataclasses.dataclass
class Result:
    """The replies of one (case, engine): the warm-up's, then one per repetition."""

    first: Optional[dict] = None
    runs: List[dict] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    @property
    def seconds(self) -> List[float]:
        return [r["seconds"] for r in self.runs]


class Results(dict):
    """{(case id, engine key): Result}, plus `workers`: {key: {"info": load reply, "final": last reply}}."""

    def __init__(self):
        super().__init__()
        self.workers: Dict[str, dict] = {}

    def median(self, case: Case, key: str) -> Optional[float]:
        """Median seconds over the repetitions (the warm-up's when the case has none)."""
        r = self.get((case.id, key))
        if r is None or r.error:
            return None
        seconds = r.seconds or ([r.first["seconds"]] if r.first else [])
        return statistics.median(seconds) if seconds else None

    def rate(self, case: Case, key: str) -> Optional[float]:
        s = self.median(case, key)
        return case.work / s if s else None

    def ms(self, case: Case, key: str) -> Optional[float]:
        s = self.median(case, key)
        return None if s is None else 1000 * s


# ============================================================================ the engine process
def thread_env(threads: int) -> Dict[str, str]:
    """Environment of every engine process."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


class Worker:
    """One engine in its own process; `call(op, args)` blocks until the operation is done."""

    def __init__(self, spec: Spec, prompts: dict, log_dir: str, threads: int):
        self.spec = spec
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, spec.key.replace(" ", "_").replace("/", "_") + ".log")
        env = {**os.environ, **thread_env(threads), **spec.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.launched = time.time()
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "harness.py")], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, text=True, cwd=REPO)
        self.error: Optional[str] = None
        self.info = self._exchange({"spec": dataclasses.asdict(spec), "prompts": prompts, "threads": threads})
        if not self.info.get("ok"):
            self.error = self.info.get("error", "failed to load")

    def _exchange(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(30)
            return {"ok": False, "error": f"engine process died (exit status {self.proc.returncode}); "
                                          f"see {self.log_path}: {_log_tail(self.log_path)}"}
        return json.loads(line)

    def call(self, op: str, args: dict) -> dict:
        if self.error:
            return {"ok": False, "error": self.error}
        reply = self._exchange({"op": op, "args": args})
        if "died" in reply.get("error", ""):
            self.error = reply["error"]
        return reply

    def finish(self) -> dict:
        final = {} if self.error else self._exchange({"op": None})
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the process this Worker started
            self.proc.wait()
        return final


def _log_tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _serve() -> None:
    """The engine process: loads one engine, then runs the operations it is sent."""
    started = time.time()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the libraries' chatter goes to the log, not into the replies
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        out.write(json.dumps(message, default=float) + "\n")

    first = json.loads(sys.stdin.readline())
    try:
        import engines

        engine = engines.load(first["spec"], first["prompts"], first["threads"])
        reply({"ok": True, "description": engine.description, "started": started, "imported": engine.imported,
               "loaded": time.time(), "rss_mib": peak_rss_mib(), **engine.events()})
    except BaseException:  # noqa: BLE001 - reported to the orchestrator
        reply({"ok": False, "error": traceback.format_exc()})
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] is None:
            reply({"ok": True, "peak_rss_mib": peak_rss_mib(), **engine.final_stats()})
            return
        try:
            method = getattr(engine, request["op"])
            engine.sync()
            t = time.perf_counter()
            result = method(**request["args"]) or {}
            engine.sync()
            seconds = time.perf_counter() - t
            result.setdefault("seconds", seconds)  # first_token and close report an inner interval
            reply({"ok": True, "done": time.time(), **result, **engine.events()})
        except BaseException as exc:  # noqa: BLE001
            text = traceback.format_exc()
            print(text, flush=True)
            reply({"ok": False, "error": text, "unsupported": isinstance(exc, (AttributeError, NotImplementedError)),
                   **engine.events()})


# ============================================================================ running cases
def run(specs: Sequence[Spec], cases: Sequence[Case], prompts: dict, reps: int, log_dir: str, threads: int,
        pause: float = 0.5, log: Callable[[str], None] = print) -> Results:
    """Warm-up, then `reps` alternating repetitions of every case, group by group."""
    results = Results()
    keys = [s.key for s in specs]
    for case in cases:
        for key in case.engines or keys:
            results[(case.id, key)] = Result()
    for group in sorted({s.group for s in specs}):
        members = [s for s in specs if s.group == group]
        workers: Dict[str, Worker] = {}
        try:
            for spec in members:
                log(f"loading {spec.key} ...")
                w = workers[spec.key] = Worker(spec, prompts, log_dir, threads)
                if w.error:
                    log(f"  {spec.key} failed to load:\n{_indent(w.error)}")
                else:
                    log(f"  {w.info['description']}: loaded in {w.info['loaded'] - w.launched:.1f} s")
            mine = [c for c in cases if any(k in workers for k in (c.engines or keys))]

            def one(case: Case, key: str, warm: bool) -> None:
                entry = results[(case.id, key)]
                if entry.error:
                    return
                time.sleep(pause)  # lets the previous engine's threads go idle
                args = {**case.args, **(case.warmup or {})} if warm else case.args
                reply = workers[key].call(case.op, args)
                if not reply.get("ok"):
                    entry.error = "unsupported" if reply.get("unsupported") else reply.get("error", "error")
                    if not reply.get("unsupported"):
                        log(f"  {case.id} / {key}: ERROR\n{_indent(entry.error)}")
                    return
                if warm:
                    entry.first = reply
                else:
                    entry.runs.append(reply)
                log(f"  {'warm-up' if warm else 'rep':<7} {case.id:<34} {key:<24} {reply['seconds']:.3f} s")

            def engines_of(case: Case) -> List[str]:
                return [k for k in (case.engines or keys) if k in workers]

            for case in mine:
                if case.warmup is not None or case.reps == 0:
                    for key in engines_of(case):
                        one(case, key, warm=True)
            for rep in range(max([reps] + [c.reps or 0 for c in mine])):
                log(f"repetition {rep + 1}")
                for case in mine:
                    if rep >= (reps if case.reps is None else case.reps):
                        continue
                    order = engines_of(case)
                    shift = rep % len(order) if order else 0
                    for key in order[shift:] + order[:shift]:
                        one(case, key, warm=False)
        finally:
            for key, w in workers.items():
                results.workers[key] = {"info": w.info, "final": w.finish(), "error": w.error, "log": w.log_path}
    return results


def start_up(spec: Spec, op: str, args: dict, prompts: dict, log_dir: str, threads: int) -> dict:
    """A new engine process from its launch: seconds to imported, loaded, and the end of `op`."""
    w = Worker(spec, prompts, log_dir, threads)
    try:
        if w.error:
            raise RuntimeError(f"{spec.key}: {w.error.strip().splitlines()[-1]}")
        reply = w.call(op, args)
        if not reply.get("ok"):
            raise RuntimeError(f"{spec.key}: {reply.get('error', '').strip().splitlines()[-1:]}")
    finally:
        final = w.finish()
    return {"imported": w.info["imported"] - w.launched, "loaded": w.info["loaded"] - w.launched,
            "done": reply["done"] - w.launched, "peak_rss_mib": final.get("peak_rss_mib"),
            "compiled": len(w.info.get("compiled", [])) + len(reply.get("compiled", []))}


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-12:])


# ============================================================================ reports
def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> Tuple[str, str]:
    """(model name, vector extensions) from /proc/cpuinfo, e.g. ("AMD EPYC 7B13 (family 25 model 1)",
    "AVX2"): the family and model tell CPUs apart whose name is only "AMD EPYC"."""
    name, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if "model name" in fields:
        name = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']} model {fields['model']})"
    return name, cpu_extensions(flags)


def cpu_extensions(flags: set) -> str:
    """The vector extensions that matter to these engines, from the CPU flags."""
    if "avx512f" in flags:
        parts = ["AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") + (" BF16" if "avx512_bf16" in flags else "")]
    elif "avx2" in flags:
        parts = ["AVX2" + (" AVX-VNNI" if "avx_vnni" in flags else "")]
    elif "asimd" in flags:
        parts = ["NEON" + (" SVE" if "sve" in flags else "") + (" i8mm" if "i8mm" in flags else "")]
    else:
        parts = ["no AVX2" if flags else "unknown"]
    if "amx_tile" in flags:
        parts.append("AMX")
    return ", ".join(parts)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"


def header(title: str, threads: int) -> List[str]:
    """The lines a report starts with: command, versions, machine (CPU named), load."""
    name, extensions = cpu_name()
    versions = ", ".join(f"{d} {version_of(d)}" for d in ("jax", "jaxlib", "ctranslate2", "llama_cpp_python",
                                                          "torch", "transformers"))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    load = os.getloadavg()
    return [f"# {title}", "",
            f"- command: `{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; jaxgen revision "
            f"{git_revision()}; python {platform.python_version()}, {versions}",
            f"- CPU: {name} ({extensions}), {cpu_count()} usable cores, {ram:.0f} GiB RAM; every engine on "
            f"{threads} threads (XLA: its own pool over the usable cores)",
            f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]


def median_ms(call: Callable[[], object], reps: int) -> float:
    """Median wall milliseconds of `reps` calls of `call` after one untimed warm-up call, for the
    standalone in-process measuring scripts (moe_floor.py, prefill_breakdown.py, step_profile.py);
    `call` must wait for its own result (e.g. `block_until_ready`)."""
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def random_prompt(tokens: Sequence[str], length: int, seed: int = 0) -> List[str]:
    """A prompt of `length` tokens for the standalone measuring scripts: the vocabulary's token 2
    (BOS in the SentencePiece models here) and random tokens from id 1000 on (no special tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [tokens[2]] + [tokens[int(t)] for t in rng.integers(1000, len(tokens) - 1, length - 1)]


def fmt(value: Optional[float], digits: int = 3) -> str:
    """About `digits` significant digits, thousands separated; "—" for no value."""
    if value is None:
        return "—"
    if value != value:
        return "n/a"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    return f"{value:.{max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))}f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> List[str]:
    align = align or "l" + "r" * (len(head) - 1)
    marks = {"l": ":---", "r": "---:"}
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(marks[a] for a in align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


if __name__ == "__main__":
    _serve()
