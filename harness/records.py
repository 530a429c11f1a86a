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
    setup_s: float = NAN  # first call: compilation, block masks, caches; never in latency
    peak_mem_bytes: float = NAN
    predicted_mem_bytes: float = NAN
    state_bytes: float = NAN  # decode: bytes held by the cache or state at context seq_len
    flops: float = NAN
    tflops: float = NAN
    density: float = NAN
    rel_error: float = NAN
    max_abs_error: float = NAN
    entropy: float = NAN
    error_ref: str = ""  # what rel_error is against: softmax | masked softmax | own definition
    softmax_rel_error: float = NAN  # own-definition approximations (moba, nsa): vs full softmax
    # query rows the errors are measured on: a seeded sample (decode: the new token); the float64
    # reference runs on these rows only, in tiles of REFERENCE_BYTES (variants/reference.py),
    # after the measured call and outside predicted_mem_bytes
    error_rows: int = 0
    notes: str = ""  # caveats of an ok point (a CUDA graph that fell back, NVML missing)
    kernel: str = ""  # the kernel that actually ran (SDPA backend, flex compiled, engine path)
    compute_dtype: str = ""  # dtype of the matmuls ("" where not recorded)
    ops_per_call: float = NAN  # ATen ops one call dispatches (counted once, outside timing)
    host_syncs: float = NAN  # device-to-host synchronisations one call makes
    time_exponent: float = NAN
    memory_exponent: float = NAN
    # where and when
    device_name: str = ""
    threads: int = 0
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
        err = f", rel_err {self.rel_error:.2e}" if not math.isnan(self.rel_error) else ""
        return (f"{head} → {', '.join(p for p in parts if p)}{err}, "
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


def read_record(path: str | os.PathLike) -> Record:
    """Read and check one record; raises ValueError saying what is wrong."""
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
    for key in ("batch", "heads", "seq_len", "head_dim"):
        if clean[key] <= 0:
            raise ValueError(f"field {key} has an absurd value {clean[key]!r}")
    for key in ("latency_ms", "peak_mem_bytes"):
        if key in clean and clean[key] < 0:
            raise ValueError(f"field {key} has an absurd value {clean[key]!r}")
    return Record(**clean)


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every result.json below `root`, in a stable order."""
    return sorted(Path(root).rglob(RECORD_FILE))


def load_records(root: str | os.PathLike) -> list[Record]:
    """Every valid record below `root`; a bad one is skipped with a warning naming its file."""
    records, skipped = [], 0
    for path in find_records(root):
        try:
            records.append(read_record(path))
        except ValueError as exc:
            skipped += 1
            warnings.warn(f"attnbench: skipping record {path}: {exc}", stacklevel=2)
    return records
