"""The measured choice of each CPU matrix product's formulation (issue 18).

Which formulation of y = x @ W is fastest on XLA:CPU depends on the CPU (AVX2, AVX-512, VNNI,
AMX, NEON; its cores and caches) and on the shape, by factors of 2-10. Measured on an AMD EPYC
(Zen 3, AVX2, no VNNI): uint8 x int8 through YNNPACK, the fastest int8 product on an AVX-512 VNNI
Xeon, runs 3-10x slower than a plain int8 x int8 -> int32 dot; float32 and int8 products of 16 rows
run up to 2x faster with the weight stored [N, K] than [K, N]. So nothing is assumed: the first
time a weight shape is met on a machine, the candidates are timed on random data of that shape (a
few ms each, alternating), and the choice is cached on disk per machine.

Candidates, named "kind/layout" (layout: the stored weight "kn" = [K, N] or "nk" = [N, K]):
  f32   float32 weights (for int8 weights: dequantized once at load, the fallback when no int8
        product beats float32 on this CPU)
  a8    int8 x int8 -> int32 (activations quantized per row)          } exact, identical results
  u8    uint8 x int8 -> int32 with a ones row (YNNPACK)               } (`jaxgen.model.int8`)
  a8t   int8 x int8 -> int32 with the weight as the left operand      }
  c8    jaxgen's native kernel (`jaxgen.model.native`), [N, K] only     }
  c32   jaxgen's native float32 kernel, [N, K] only (float32 results in its own summation order)
  w8    weight-only int8: the weight converted to float32 in blocks of columns (float32
        activations, so its result is the dequantized weight's float32 product)

Decisions:
* At load (`arrange_for_cpu`, single-device CPU): each layer weight's (and each expert's) layout,
  and for int8 weights whether to dequantize it to float32 (when float32 beats every int8
  candidate), by the summed time of decode-sized products (1 and 16 rows). A tied head (the embedding, [V, D]) keeps its layout.
* At trace time (`int8_kind`, from `decoder.linear`): the int8 formulation for the product's row
  class (1 row; 2-64 rows; more), within the stored layout.
* `compute_type="auto"` on CPU (`int8_pays`): int8 only when the model's int8 products beat its
  float32 ones at 1 and at 16 rows.

The cache: `<jaxgen cache dir>/cpu_kernels.json` (beside the compilation cache `<...>/xla`), keyed
by a fingerprint of the machine (CPU model and ISA flags, usable cores, jax/jaxlib versions,
XLA_FLAGS): another CPU, or a new jax, measures again. `JAXGEN_CPU_KERNEL_CACHE=0` keeps the
measurements in memory only. Weights under 2**16 elements are not measured (layout as stored,
kind a8): their products take microseconds either way.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import re
import tempfile
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

CACHE_ENV = "JAXGEN_CPU_KERNEL_CACHE"
CACHE_FILE = "cpu_kernels.json"
CACHE_VERSION = 2  # 2: up to 25 timing rounds (was 9: too few for 0.1 ms products on a noisy machine)
ROW_CLASSES = {"1": 1, "16": 16, "512": 512}  # class -> rows measured
DECODE_CLASSES = ("1", "16")
MIN_ELEMENTS = 1 << 16
MAX_MEASURED_COLUMNS = 1 << 16  # wider weights are timed on this many columns (still past the L3 cache)


def _is_layer_product(decl) -> bool:
    """A layer weight that runs as one [K, N] product (a 2-D weight quantized over its input axis,
    per the parameter table): not norms, routers or per-expert stacks."""
    return decl.reduce_axis == 0 and len(decl.shape) == 2


def _is_expert_product(decl) -> bool:
    """A per-expert stack [E, K, N] whose experts each run as one [K, N] product (held as a list of
    E arrays, see checkpoint.nest_params)."""
    return decl.reduce_axis == 1 and len(decl.shape) == 3
INT8_KINDS = {"kn": ("a8", "u8", "w8"), "nk": ("a8", "a8t", "u8", "w8")}  # a8t/kn: 2-4x slower everywhere seen
NATIVE_KINDS = {"kn": (), "nk": ("c8",)}  # where jaxgen.model.native compiles on this machine
FLOAT_KINDS = {"kn": ("f32",), "nk": ("f32",)}
NATIVE_FLOAT_KINDS = {"kn": (), "nk": ("c32",)}
PRUNE = 2.5  # int8 candidates slower than this x the fastest at 16 rows are not timed at 1 and 512 rows

Timer = Callable[[Sequence[str], int, int, int], Dict[str, float]]


def row_class(rows: int) -> str:
    """The row class of a product of `rows` rows: "1" (batch-1 decode), "16" (2-64 rows), "512"."""
    return "1" if rows <= 1 else "16" if rows <= 64 else "512"


# ---------------------------------------------------------------------------- the machine
def _cpuinfo() -> Tuple[str, str, List[str]]:
    """(model name, "family F model M stepping S" or an ARM part, ISA flags) of the first CPU."""
    model, flags, ids = "", [], {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = value.split()
                elif key in ("cpu family", "model", "stepping", "cpu implementer", "cpu part") and key not in ids:
                    ids[key] = value.strip()
    except OSError:
        pass
    ident = " ".join(f"{k.replace('cpu ', '')} {v}" for k, v in ids.items())
    return model or platform.processor() or platform.machine(), ident, flags


_ISA = re.compile(r"^(avx.*|fma|f16c|amx.*|sse4_2|asimd.*|sve\d?|sme\d?|i8mm|bf16|asimddp|neon|fphp)$")


def machine_fingerprint() -> Dict[str, object]:
    """What a measurement depends on: CPU model and ISA flags, usable cores, jax/jaxlib versions,
    XLA_FLAGS (e.g. --xla_cpu_max_isa changes the code XLA emits), the native kernel's source."""
    import jax
    import jaxlib

    from jaxgen.model import native

    model, ident, flags = _cpuinfo()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"cpu": model, "id": ident, "machine": platform.machine(), "isa": sorted(f for f in flags if _ISA.match(f)),
            "cores": cores, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "native": native.source_hash()}


def machine_key(fingerprint: Optional[Dict[str, object]] = None) -> str:
    fp = machine_fingerprint() if fingerprint is None else fingerprint
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_path() -> Optional[str]:
    if os.environ.get(CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from jaxgen.default_model import cache_dir

    return os.path.join(cache_dir(), CACHE_FILE)


# ---------------------------------------------------------------------------- measuring
def _candidate_fn(kind: str, layout: str):
    from jax import lax

    from jaxgen.model.int8 import int8_matmul

    nk = layout == "nk"
    if kind == "f32":
        return lambda x, w, s: lax.dot_general(x, w, (((1,), (1 if nk else 0,)), ((), ())))
    if kind == "c32":
        from jaxgen.model.native import float32_matmul_nk

        return lambda x, w, s: float32_matmul_nk(x, w)
    return lambda x, w, s: int8_matmul(x, w, s, nk, kind)


def measure(candidates: Sequence[str], m: int, k: int, n: int, budget_s: float = 0.03,
            max_rounds: int = 25) -> Dict[str, float]:
    """Seconds of each candidate ("kind/layout") on random x [m, k] and a weight of k x n: compiled
    first, then timed in alternating rounds (at least 3, up to max_rounds while a candidate has
    spent under budget_s); the fastest round of each (other processes on the machine only ever
    add time, so the minimum is the steadiest estimate on a shared machine)."""
    import jax

    cpu = jax.devices("cpu")[0]  # committed inputs: the programs run on the CPU whatever the default device
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (k, n), dtype=np.int8)
    scale = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    x = jax.device_put(rng.standard_normal((m, k), dtype=np.float32), cpu)
    s = jax.device_put(scale, cpu)
    weights: Dict[str, jax.Array] = {}

    def weight(kind: str, layout: str):
        is_float = kind in FLOAT_KINDS[layout] + NATIVE_FLOAT_KINDS[layout]
        key = ("f32" if is_float else "i8") + layout
        if key not in weights:
            a = q if not is_float else q.astype(np.float32) * scale
            weights[key] = jax.device_put(np.ascontiguousarray(a.T) if layout == "nk" else a, cpu)
        return weights[key]

    runs = {}
    for cand in candidates:
        kind, layout = cand.split("/")
        args = (x, weight(kind, layout), s)
        runs[cand] = (jax.jit(_candidate_fn(kind, layout)).lower(*args).compile(), args)
        runs[cand][0](*args).block_until_ready()  # first run: page faults, thread pool wake-up
    times: Dict[str, List[float]] = {c: [] for c in candidates}
    for r in range(max_rounds):
        for cand, (fn, args) in runs.items():
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times[cand].append(time.perf_counter() - t0)
        if r >= 2 and all(sum(t) > budget_s for t in times.values()):
            break
    return {c: float(np.min(t)) for c, t in times.items()}


def _measure_outside_trace(timer: Timer, candidates, m, k, n) -> Dict[str, float]:
    # Called while jit traces `decoder.linear`: in this thread the computations would be staged
    # into that trace; JAX's trace state is per thread, so a fresh thread runs them for real.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(timer, candidates, m, k, n).result()


# ---------------------------------------------------------------------------- the chooser
class KernelChooser:
    """Times candidates through `timer` (default `measure`), remembers them per machine in the JSON
    file at `path` (None: in memory only), and makes the decisions of the module docstring."""

    def __init__(self, path: Optional[str] = None, timer: Optional[Timer] = None,
                 fingerprint: Optional[Dict[str, object]] = None, native: Optional[bool] = None):
        """native: whether the native kernel is a candidate (None: where it compiles here)."""
        self.path = path
        self._native = native
        self.timer = timer or measure
        self.fingerprint = machine_fingerprint() if fingerprint is None else fingerprint
        self.key = machine_key(self.fingerprint)
        self._lock = threading.RLock()
        self._timings: Optional[Dict[str, float]] = None
        self.read_only = False  # True: a timing not known yet raises KeyError instead of being measured

    # -- storage
    def _load(self) -> Dict[str, float]:
        if self._timings is None:
            self._timings = dict(self._read_file().get("machines", {}).get(self.key, {}).get("timings", {}))
        return self._timings

    def _read_file(self) -> dict:
        if not self.path or not os.path.isfile(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if data.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        if not self.path:
            return
        data = self._read_file() or {"version": CACHE_VERSION, "machines": {}}
        entry = data["machines"].setdefault(self.key, {"machine": self.fingerprint, "timings": {}})
        entry["timings"].update(self._timings or {})
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file
        except OSError:
            pass  # a read-only cache dir: keep the choices in memory

    # -- timings
    def timings(self, rows_class: str, k: int, n: int, candidates: Iterable[str]) -> Dict[str, float]:
        """Seconds per candidate for a product of the row class's rows and a k x n weight (timed on
        at most MAX_MEASURED_COLUMNS columns and scaled to n), measuring those not known yet."""
        candidates = list(candidates)
        m, nm = ROW_CLASSES[rows_class], min(n, MAX_MEASURED_COLUMNS)
        with self._lock:
            known = self._load()
            name = f"{m}x{k}x{nm}"
            missing = [c for c in candidates if f"{name}:{c}" not in known]
            if missing and self.read_only:
                raise KeyError(f"{name}:{missing[0]} not measured")
            if missing:
                got = _measure_outside_trace(self.timer, missing, m, k, nm)
                known.update({f"{name}:{c}": float(got[c]) for c in missing})
                self._save()
            return {c: known[f"{name}:{c}"] * n / nm for c in candidates}

    def native(self) -> bool:
        if self._native is None:
            from jaxgen.model import native

            self._native = native.available()
        return self._native

    def int8_kinds(self, layout: str) -> Tuple[str, ...]:
        """The int8 candidates for a weight stored in `layout`."""
        return INT8_KINDS[layout] + (NATIVE_KINDS[layout] if self.native() else ())

    def float_kinds(self, layout: str) -> Tuple[str, ...]:
        """The float32 candidates for a weight stored in `layout`."""
        return FLOAT_KINDS[layout] + (NATIVE_FLOAT_KINDS[layout] if self.native() else ())

    @staticmethod
    def measured(k: int, n: int) -> bool:
        return k * n >= MIN_ELEMENTS

    def _viable(self, k: int, n: int, cands: List[str]) -> List[str]:
        """The candidates worth timing in other row classes: within PRUNE x the fastest at 16 rows
        (timed first, every candidate of both layouts). The 16-row product separates the
        formulations most (on the AVX2 EPYC uint8 x int8 is 3-10x behind there, and at 1 and 512
        rows too), and pruning saves most of the first load's compilations."""
        every = [f"{kind}/{lay}" for lay in ("kn", "nk") for kind in self.int8_kinds(lay) + self.float_kinds(lay)]
        t16 = self.timings("16", k, n, [c for c in every if c.split("/")[1] in {x.split("/")[1] for x in cands}])
        best = min(t16[c] for c in cands)
        return [c for c in cands if t16[c] <= PRUNE * best]

    def _best(self, rows_class, k, n, layouts, int8: bool) -> Tuple[str, float]:
        cands = [f"{kind}/{lay}" for lay in layouts for kind in (self.int8_kinds(lay) if int8 else self.float_kinds(lay))]
        if rows_class != "16" and int8:
            cands = self._viable(k, n, cands)
        t = self.timings(rows_class, k, n, cands)
        best = min(cands, key=t.__getitem__)
        return best, t[best]

    # -- decisions
    def stored_layout(self, k: int, n: int, int8: bool, layouts: Sequence[str] = ("kn", "nk")) -> Tuple[str, bool]:
        """(layout to store a k x n weight in, whether an int8 weight is dequantized to float32),
        by the summed time of the decode row classes. layouts: those allowed (a tied head: nk)."""
        if not self.measured(k, n):
            return layouts[0], False
        best = {}  # in order of preference on a tie: int8 before float32, the first layout first
        for kind in ("i8", "f32") if int8 else ("f32",):
            for lay in layouts:
                best[(kind, lay)] = sum(self._best(c, k, n, (lay,), kind == "i8")[1] for c in DECODE_CLASSES)
        kind, lay = min(best, key=best.__getitem__)
        return lay, kind == "f32" and int8

    def int8_kind(self, rows: int, k: int, n: int, layout: str) -> str:
        """The int8 formulation (`jaxgen.model.int8.KINDS`) for rows x k times a k x n weight stored
        in `layout`."""
        if not self.measured(k, n):
            return "a8"
        return self._best(row_class(rows), k, n, (layout,), True)[0].split("/")[0]

    def float_kind(self, rows: int, k: int, n: int, layout: str) -> str:
        """The float32 formulation ("f32" or "c32") for rows x k times a float32 k x n weight stored
        in `layout`."""
        if not self.measured(k, n):
            return "f32"
        return self._best(row_class(rows), k, n, (layout,), False)[0].split("/")[0]

    def int8_pays(self, shapes: Sequence[Tuple[int, int, int, Tuple[str, ...]]]) -> bool:
        """Whether int8 products beat float32 ones over a model's weights at 1 and at 16 rows (True
        when none of its weights is large enough to be timed). shapes: (k, n, how many, allowed
        layouts) per weight shape."""
        timed = [s for s in shapes if self.measured(s[0], s[1])]
        for c in DECODE_CLASSES:  # nothing timed (a tiny model): no evidence against int8
            i8 = sum(count * self._best(c, k, n, layouts, True)[1] for k, n, count, layouts in timed)
            f32 = sum(count * self._best(c, k, n, layouts, False)[1] for k, n, count, layouts in timed)
            if timed and i8 >= f32:
                return False
        return True

    def known(self) -> Dict[str, float]:
        with self._lock:
            return dict(self._load())


_default: Optional[KernelChooser] = None
_default_lock = threading.Lock()


def default_chooser() -> KernelChooser:
    """The process's chooser, on `default_cache_path()`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = KernelChooser(default_cache_path())
        return _default


def set_default_chooser(chooser: Optional[KernelChooser]) -> None:
    """Replaces the process's chooser (tests: fake timings); None: a fresh one at the next use.
    Clears JAX's caches: traced programs hold the previous chooser's choices."""
    import jax

    global _default
    with _default_lock:
        _default = chooser
    jax.clear_caches()


# ---------------------------------------------------------------------------- the model
def model_shapes(config) -> List[Tuple[int, int, int, Tuple[str, ...]]]:
    """(k, n, count, allowed layouts) of a model's products: its layer weights and its head."""
    from jaxgen.model.checkpoint import flat_params

    counts: Dict[Tuple[int, int, Tuple[str, ...]], int] = {}
    for name, decl in flat_params(config).items():
        module, kind = name.split(".")[-2:]
        shape = decl.shape
        if kind != "weight":
            continue
        if name.startswith("layers.") and _is_layer_product(decl):
            key = (shape[0], shape[1], ("kn", "nk"))
        elif name.startswith("layers.") and _is_expert_product(decl):
            key = (shape[1], shape[2], ("kn", "nk"))
            counts[key] = counts.get(key, 0) + shape[0] - 1
        elif module == "lm_head" or (module == "embed" and config.tie_word_embeddings):
            key = (shape[1], shape[0], ("nk",)) if module == "embed" else (shape[0], shape[1], ("kn",))
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return [(k, n, c, lays) for (k, n, lays), c in counts.items()]


def int8_pays(config, chooser: Optional[KernelChooser] = None) -> bool:
    """`compute_type="auto"` on CPU: whether this model's int8 products beat float32 on this CPU."""
    return (chooser or default_chooser()).int8_pays(model_shapes(config))


def arrange_for_cpu(params: dict, config, chooser: Optional[KernelChooser] = None) -> dict:
    """Host params -> the same params with each layer weight in its measured layout ("weight" [K, N]
    or "weight_nk" [N, K], which `decoder.linear` reads), and int8 weights that lose to float32 on
    this CPU dequantized to float32 (the tied head: the embedding). Float32 and int8 weights only;
    already arranged weights are left as they are. Single device only (tensor parallelism shards
    "weight" by its [in, out] axes)."""
    chooser = chooser or default_chooser()

    def arrange(p: dict, layouts: Sequence[str], nk_stored: bool) -> dict:
        w = p.get("weight")
        if w is None or np.dtype(w.dtype) not in (np.float32, np.int8) or w.ndim != 2:
            return p
        int8 = np.dtype(w.dtype) == np.int8
        k, n = (w.shape[1], w.shape[0]) if nk_stored else w.shape
        layout, dequantize = chooser.stored_layout(k, n, int8, layouts)
        out = dict(p)
        w = np.asarray(w)
        if dequantize:
            scale = np.asarray(out.pop("weight_scale"), np.float32)
            w = w.astype(np.float32) * (scale[:, None] if nk_stored else scale[None, :])
        if not nk_stored and layout == "nk":
            del out["weight"]
            out["weight_nk"] = np.ascontiguousarray(w.T)
        else:
            out["weight"] = w
        return out

    new = dict(params)
    from jaxgen.model.checkpoint import layer_params

    def arrange_experts(p: dict) -> dict:  # {kind: list of E arrays}: each expert like a layer weight
        parts = [arrange({kind: arrays[e] for kind, arrays in p.items()}, ("kn", "nk"), False)
                 for e in range(len(next(iter(p.values()))))]
        return {kind: [part[kind] for part in parts] for kind in parts[0]}

    def arrange_module(p: dict, decl) -> dict:
        if _is_layer_product(decl):
            return arrange(p, ("kn", "nk"), False)
        if _is_expert_product(decl) and isinstance(p.get("weight"), list):
            return arrange_experts(p)
        return p

    new["layers"] = []
    for index, layer in enumerate(params["layers"]):
        decls = layer_params(config, index)
        new["layers"].append({m: arrange_module(p, decls[m]["weight"]) for m, p in layer.items()})
    if config.tie_word_embeddings and "embed" in params:
        new["embed"] = arrange(params["embed"], ("nk",), True)
    elif "lm_head" in params:
        new["lm_head"] = arrange(params["lm_head"], ("kn",), False)
    return new


def describe(config, int8: bool, chooser: Optional[KernelChooser] = None) -> str:
    """One line for `jaxgen info`: this CPU's measured choice per weight shape of the model (k x n,
    the int8 formulation at 1 / 16 rows or f32, the stored layout), or that it is measured at the
    first load. Measures nothing."""
    base = chooser or default_chooser()
    chooser = KernelChooser(base.path, base.timer, base.fingerprint, base._native)  # its own instance: read-only
    chooser._timings = base.known()
    fp = chooser.fingerprint
    isa = ", ".join(i for i in fp["isa"] if i.startswith(("avx", "amx", "asimd", "sve"))) or "base ISA"
    cpu = f"{fp['cpu']}{' ' + fp['id'] if fp.get('id') else ''} ({isa}; {fp['cores']} cores)"
    parts = []
    chooser.read_only = True
    try:
        for k, n, _, layouts in model_shapes(config):
            if not chooser.measured(k, n):
                continue
            layout, deq = chooser.stored_layout(k, n, int8, layouts)
            pick = chooser.int8_kind if int8 and not deq else chooser.float_kind
            kinds = "/".join(pick(ROW_CLASSES[c], k, n, layout) for c in DECODE_CLASSES)
            parts.append(f"{k}x{n} {kinds} {layout}")
    except KeyError:
        return f"{cpu}: not measured yet (timed at the first load, then kept in {chooser.path or 'memory'})"
    label = "int8 at 1 / 16 rows" if int8 else "float32 at 1 / 16 rows"
    return f"{cpu}: {label}: " + ", ".join(parts)


def info_rows(config, device: str, compute_type: str) -> List[Tuple[str, str]]:
    """`jaxgen info`'s row for this CPU's measured products ([] off CPU)."""
    from jaxgen.model.loading import resolve_compute_type
    from jaxgen.runtime.devices import resolve_devices

    platform, _ = resolve_devices(device, 0)
    if platform != "cpu":
        return []
    ctype = resolve_compute_type(compute_type, config.weight_dtype, platform)
    return [("CPU products", describe(config, ctype.weights == "int8" and ctype.activations == "float32"))]
