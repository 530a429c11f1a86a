"""One flat record per measured point: a frozen dataclass, saved as JSON, gathered into CSV.

Records are strict JSON (null, never NaN), written atomically (temp file + rename) the moment a
point is measured, each into a folder named by what the point measures (`point_folder`), so a
sweep killed at any moment loses at most the point in progress and no point overwrites another.
No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from attnbench.harness import units
from attnbench.variants.base import IMPL_TOL

Status = Literal["ok", "oom", "unsupported", "invalid", "error", "skipped"]
STATUSES = ("ok", "oom", "unsupported", "invalid", "error", "skipped")
RECORD_FILE = "result.json"
NAN = float("nan")


@dataclass(frozen=True)
class Record:
    # what was run
    variant: str
    label: str
    family: str
    params: str  # JSON of the variant's parameters
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    device: str
    causal: bool
    mode: str
    inputs: str
    seed: int
    # outcome
    status: Status
    reason: str = ""
    kv_heads: int = 0  # heads of k and v (0: as many as q)
    q_len: int = 0  # query positions (0: seq_len)
    model: str = ""  # model-shape preset
    latency_ms: float = NAN
    latency_p10_ms: float = NAN
    latency_p90_ms: float = NAN
    reps: int = 0
    noisy: bool = False
    # share of the machine's CPU time that other processes took during the timed window (steal
    # included), and this process's CPU time / (wall × threads); contended: others took a real
    # share (harness.contention.CONTENDED_SHARE), so the latency may be inflated
    contended: bool = False
    others_cpu: float = NAN
    own_cpu: float = NAN
    # minor page faults per timed call (the process's, getrusage): pages the allocator mapped
    # afresh, a cost of its state rather than of the variant (NaN where not readable)
    page_faults: float = NAN
    setup_s: float = NAN  # first call: compilation, block masks, caches; never in latency
    peak_mem_bytes: float = NAN
    predicted_mem_bytes: float = NAN
    state_bytes: float = NAN  # decode: bytes held by the cache or state at context seq_len
    flops: float = NAN  # executed FLOPs (= executed_flops), kept for older readers
    tflops: float = NAN  # flops / latency
    # the method's minimal FLOPs (Variant.algorithm_flops; fwd_bwd: 3× forward, the backward
    # counted as twice the forward), and what the engine executed (padding, recomputation)
    algo_flops: float = NAN
    executed_flops: float = NAN
    # the least bytes the method moves (Variant.algorithm_bytes: q, k, v in and the output
    # out; fwd_bwd 3×; decode: algorithm_decode_bytes, the keys read or the state rewritten)
    algo_bytes: float = NAN
    # the machine's limits: its matmul rate in the point's dtype (the CPU's float32 for half
    # inputs), measured once per process, and its read rate for a warm working set of
    # algo_bytes (harness/run/rate.py); limit_fraction = the larger of executed_flops at the
    # one and algo_bytes at the other, over the latency; limit_bound: which (matmul | memory)
    matmul_gflops: float = NAN
    read_gbps: float = NAN
    limit_bound: str = ""
    limit_fraction: float = NAN
    density: float = NAN
    # the implementation check: relative error against the variant's own float64 definition
    # (error_ref: softmax | masked softmax | own definition; "": none, impl_error NaN), and its
    # max |error|; impl_ok: within the variant's tolerance for the dtype (Variant.impl_tol)
    impl_error: float = NAN
    max_abs_error: float = NAN
    entropy: float = NAN
    error_ref: str = ""
    # how far from exact: relative error against float64 full softmax attention on the same
    # q, k, v (NaN for the recurrent family, or where no reference was computed: quality_note)
    softmax_rel_error: float = NAN
    impl_ok: bool = True  # False: the implementation check failed (never picked)
    head_error_median: float = NAN  # softmax_rel_error per (batch, head): median and max
    head_error_max: float = NAN
    recall_mean: float = NAN  # share of the float64 softmax mass on the keys it attends
    recall_p10: float = NAN  # (over sampled rows and heads): mean and 10th percentile
    quality_note: str = ""  # why a quality field is NaN (recurrent, no reference, no key set)
    # query rows the errors are measured on: a seeded sample (decode: the new token); the float64
    # reference runs on these rows only, in tiles of REFERENCE_BYTES (variants/reference.py),
    # after the measured call and outside predicted_mem_bytes
    error_rows: int = 0
    notes: str = ""  # caveats of an ok point (a CUDA graph that fell back, NVML missing)
    kernel: str = ""  # the kernel that actually ran (SDPA backend, flex compiled, engine path)
    compute_dtype: str = ""  # dtype of the matmuls ("" where not recorded)
    ops_per_call: float = NAN  # ATen ops one call dispatches (counted once, outside timing)
    host_syncs: float = NAN  # device-to-host synchronisations one call makes
    # declared growth in n (the variant's): latency and peak; in decode, one step's time and
    # what the deployment holds (Variant.decode_time_exponent, decode_memory_exponent)
    time_exponent: float = NAN
    memory_exponent: float = NAN
    # where and when
    device_name: str = ""
    threads: int = 0
    allocator: str = ""  # CPU: how freed memory is kept between calls (harness/run/allocator.py)
    gpu_clock_mhz: float = NAN  # SM clock and temperature after the point (NVML, when present)
    gpu_temp_c: float = NAN
    torch_version: str = ""
    cuda_version: str = ""
    driver_version: str = ""
    xformers_version: str = ""
    git_sha: str = ""
    hostname: str = ""
    timestamp: str = ""
    point_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One readable line: label n=… → median ms (p10–p90), peak MB, GFLOP/s, status (the
        units' formatters of harness/units.py; a value not measured is left out)."""
        causal = " causal" if self.causal else ""
        head = f"{self.label} n={self.seq_len} {self.dtype} {self.mode}{causal}"
        if self.status != "ok":
            return f"{head} → {self.status}: {self.reason}"
        spread = f"{units.number(self.latency_p10_ms)}–{units.number(self.latency_p90_ms)}"
        parts = [f"{units.ms(self.latency_ms)} ({spread})",
                 units.mb(units.to_mb(self.peak_mem_bytes)), units.gflops(self.tflops * 1e3)]
        err = "".join(f", {name} {value:.2e}" for name, value in (
            ("softmax_err", self.softmax_rel_error), ("impl_err", self.impl_error))
            if not math.isnan(value))
        failed = ", implementation check FAILED" if not self.impl_ok else ""
        return (f"{head} → {', '.join(p for p in parts if p)}{err}{failed}, "
                f"ok{' (noisy)' if self.noisy else ''}")


FIELDS = [f.name for f in dataclasses.fields(Record)]
_TYPES = {f.name: f.type for f in dataclasses.fields(Record)}


TMP_SUFFIX = ".tmp"
STALE_TMP_S = 600  # a temp file this old is left over whoever wrote it (a write takes ms)


def point_folder(label: str, seq_len: int, dtype: str, mode: str, causal: bool,
                 point_id: str) -> str:
    """Folder name of a point inside a sweep folder: readable, then its identity (`point_id`),
    so that no other point can ever write there. E.g. ``local_w=256-n4096-float32-fwd-<id>``."""
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")[:80] or "point"
    return f"{slug}-n{seq_len}-{dtype}-{mode}{'-causal' if causal else ''}-{point_id}"


class NotWritten(BaseException):
    """A record could not be written (a full or read-only disk): the sweep stops, keeping what
    was written. A BaseException, so that no per-job `except Exception` (Hydra's) swallows it
    and lets the sweep measure points it cannot keep."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"could not write {path} ({exc.strerror or exc})")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `path` atomically: a temp file beside it (named by host and pid, so that a later
    `remove_stale_temps` knows whether its writer is gone), fsync, rename. The file gets the
    permissions of any new file (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    tmp = path.parent / (f".{path.name}~{socket.gethostname()}~{os.getpid()}~"
                         f"{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_writable_folder(folder: str | os.PathLike) -> str:
    """Create `folder` (and its parents) and check a file can be written in it: "" when it can,
    else why not (the OS's words), for a one-line error naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".attnbench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Remove the temp files below `root` whose writer is gone: written on this host by a
    process that no longer runs (a kill mid-write), or older than STALE_TMP_S (another host's,
    or another tool's). Returns what was removed."""
    removed, host, now = [], socket.gethostname(), time.time()
    for tmp in Path(root).rglob(f".*{TMP_SUFFIX}"):
        parts = tmp.name[: -len(TMP_SUFFIX)].split("~")
        try:
            gone = len(parts) == 4 and parts[1] == host and not _alive(int(parts[2]))
            if gone or now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed.append(tmp)
        except (OSError, ValueError):  # removed meanwhile, or not ours
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _strict(value: Any) -> Any:
    """NaN and ±inf as null: strict JSON, which every parser reads."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_record(record: Record, folder: str | os.PathLike) -> Path:
    """Write `record` as `folder/result.json` (strict JSON, NaN as null) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: _strict(v) for k, v in record.to_dict().items()}
    return atomic_write_text(folder / RECORD_FILE, json.dumps(data, indent=1, allow_nan=False))


# Bounds of a readable record: integers fit int64 (pandas' integer columns); a number no
# measurement reaches, or ±Infinity (strict JSON never holds it), is not data.
MAX_INT = 2**63 - 1
MAX_FLOAT = 1e30
NON_NEGATIVE = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "setup_s", "peak_mem_bytes",
                "predicted_mem_bytes", "state_bytes", "flops", "tflops", "algo_flops",
                "executed_flops", "algo_bytes", "matmul_gflops", "read_gbps", "limit_fraction",
                "density",
                "rel_error", "max_abs_error", "softmax_rel_error", "ops_per_call",
                "host_syncs", "page_faults")


def read_record(path: str | os.PathLike) -> Record:
    """Read and check one record; raises ValueError saying what is wrong (bad JSON, a missing
    field, a value of the wrong type, ±Infinity, or a value out of range: see MAX_INT,
    MAX_FLOAT, NON_NEGATIVE)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    required = [f.name for f in dataclasses.fields(Record) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing fields {', '.join(missing)}")
    if data["status"] not in STATUSES:
        raise ValueError(f"unknown status {data['status']!r}")
    data = _legacy_error(data)
    clean: dict[str, Any] = {}
    for key in FIELDS:
        if key not in data:
            continue
        value, kind = data[key], _TYPES[key]
        try:
            if kind == "int":
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError
                clean[key] = int(value)
            elif kind == "float":  # null (strict JSON) and legacy NaN literals read as NaN
                clean[key] = NAN if value is None else float(value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError
                clean[key] = value
            else:
                if not isinstance(value, str):
                    raise ValueError
                clean[key] = value
        except (TypeError, ValueError):
            raise ValueError(f"field {key} has a bad value {value!r}") from None
    for key, value in clean.items():
        if _TYPES[key] == "int" and not 0 <= value <= MAX_INT:
            raise ValueError(f"field {key} has an absurd value {value!r}")
        if _TYPES[key] == "float" and (math.isinf(value) or abs(value) > MAX_FLOAT):
            raise ValueError(f"field {key} has an absurd value {value!r}")
    for key in ("batch", "heads", "seq_len", "head_dim"):
        if clean[key] <= 0:
            raise ValueError(f"field {key} has an absurd value {clean[key]!r}")
    for key in NON_NEGATIVE:
        if key in clean and clean[key] < 0:
            raise ValueError(f"field {key} has an absurd value {clean[key]!r}")
    return Record(**clean)


def _legacy_error(data: dict[str, Any]) -> dict[str, Any]:
    """A record written before impl_error had one `rel_error`, against what `error_ref` says:
    "own definition" and "masked softmax" are the implementation check (full's mask is every
    key: that one is also its softmax error); "softmax" (linear, low-rank) is the softmax error,
    with no implementation check. impl_ok is judged against the default tolerance (IMPL_TOL);
    a pattern's softmax error was not measured then, and its quality_note says so."""
    if "rel_error" not in data or "impl_error" in data:
        return data
    data = dict(data)
    rel, ref = data.pop("rel_error"), data.get("error_ref", "")
    if ref == "softmax":
        data.update(softmax_rel_error=rel, impl_error=None, max_abs_error=None, error_ref="")
    else:
        data["impl_error"] = rel
        if ref == "masked softmax" and data.get("family") == "full":
            data.update(softmax_rel_error=rel, error_ref="softmax")
    if isinstance(rel, int | float) and ref in ("own definition", "masked softmax"):
        data["impl_ok"] = not rel > IMPL_TOL.get(str(data.get("dtype")), IMPL_TOL["float32"])
    if data.get("softmax_rel_error") is None and data["status"] == "ok":
        data["quality_note"] = ("recurrent: replaces softmax, no softmax attention to be close to"
                                if data.get("family") == "recurrent" else
                                "recorded before softmax_rel_error: no softmax reference")
    return data


def find_records(root: str | os.PathLike) -> list[Path]:
    """The records of the sweep folder `root`, in a stable order: `root/<point folder>/
    result.json` (a point folder directly under it), and `root/result.json` (a single run's
    folder). Nothing deeper: a sweep written into a subfolder of `root` is another sweep."""
    root = Path(root)
    own = root / RECORD_FILE
    return ([own] if own.is_file() else []) + sorted(root.glob(f"*/{RECORD_FILE}"))


def load_records(root: str | os.PathLike) -> list[Record]:
    """Every valid record of `root` (`find_records`); a bad one is skipped with a warning
    naming its file."""
    records, skipped = [], 0
    for path in find_records(root):
        try:
            records.append(read_record(path))
        except ValueError as exc:
            skipped += 1
            warnings.warn(f"attnbench: skipping record {path}: {exc}", stacklevel=2)
    return records
