"""`attnbench pick KEY=VALUE…`: the question asked directly — which attention to use at this
setting, within this error and this memory — planned, measured and answered in one command.

    attnbench pick seq_len=16384 causal=true max_error=0.01 max_memory=2GB
    attnbench pick mode=decode seq_len=32768 +shape=llama3_8b max_memory=4GB
    attnbench pick seq_len=4096 variant=local,linear,performer --dry-run

1. Plan (`plan.plan`: the sweep's own composition, checks and `decide`) every built-in variant
   (the default sweep's set, or the subset `variant=a,b`) at the one setting given. A candidate
   supports the setting and its predicted memory fits max_memory; the others are listed, one line
   per family, with why. The recurrent family replaces softmax, so it has no error against it:
   it is a candidate only with `max_error=none` or `--allow-recurrent`.
2. Measure the candidates and the exact baseline full[sdpa] as one multirun into the sweep folder
   (hydra.sweep.dir=, default results/pick-<timestamp>/) with resume=true: a point already
   measured there is kept. The folder gets its results.csv and report like any sweep.
3. Answer from the measured records: the fastest candidate within max_error and max_memory
   (clean points before noisy or contended ones, as the report's pick), the runner-up and the
   baseline, each with latency, memory and error against softmax; then the families left out.

Memory (`held_bytes`) is what a call allocates beyond q, k, v — the report's peak memory; in
decode, what a deployment holds: the cache or state (`state_bytes`) plus the step's peak. Error
(`softmax_error`) is the relative error against float64 softmax attention.

Exit 0 with an answer; 1 when no variant meets the budget (saying what binds: error, memory, or
nothing supports the setting); 2 on bad input (one line naming the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from attnbench.harness import units
from attnbench.harness.report import columns
from attnbench.harness.report import pick as picks
from attnbench.harness.run.config import ConfigError, RunConfig, fail, parse_bytes
from attnbench.harness.run.plan import SWEEP_OVERHEAD_S, Planned

BASELINE = "full"  # conf/variant/full.yaml: exact attention, its default backend (full[sdpa])
START_S = 5.0  # the sweep's process starting (torch, Hydra) beyond plan's SWEEP_OVERHEAD_S
OWN_KEYS = ("max_error", "max_memory")
RECURRENT = "recurrent"
ALLOW = "allow it with max_error=none or --allow-recurrent"


@dataclass(frozen=True)
class Budget:
    error: float | None  # None: no bound (the recurrent family allowed)
    memory: int  # bytes; 0: no bound
    recurrent: bool  # the recurrent family is a candidate
    memory_text: str = ""  # as given (2GB)


@dataclass
class Entry:
    """One planned point: its variant config, the plan, and what the pick makes of it."""

    option: str  # conf/variant/<option>.yaml
    planned: Planned
    family: str
    candidate: bool  # a subset left this variant out: measured only as the baseline
    why: str = ""  # why it is not a candidate ("" : it is)
    kept: bool = False  # measured already in the folder
    row: dict | None = None  # its record in results.csv, once measured

    @property
    def label(self) -> str:
        return self.planned.label

    @property
    def baseline(self) -> bool:
        return self.option == BASELINE


# -- the quality and memory axes, read in one place -------------------------------------------

def softmax_error(row: dict) -> float:
    """The point's relative error against float64 softmax attention (NaN: not measured; records
    written before that column existed are mapped when read, see records.read_record)."""
    return _num(row.get("softmax_rel_error"))


def held_bytes(row: dict) -> float:
    """Memory against max_memory: the call's peak beyond q, k, v; in decode the state the
    deployment holds plus the step's peak (the report's memory: columns.held_bytes)."""
    return columns.held_bytes(row)


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# -- input -------------------------------------------------------------------------------------

def parse_error(value: str) -> float | None:
    """max_error: a fraction (0.01), a percentage (1%), or none (no bound)."""
    v = str(value).strip().lower()
    if v in ("none", "null", "any"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%?)", v)
    if not m:
        raise ConfigError(f"max_error={value!r}: expected a fraction (0.01), a percentage (1%) "
                          f"or none")
    return float(m.group(1)) / (100 if m.group(2) else 1)


def split_args(args: list[str]) -> tuple[dict[str, str], list[str] | None, list[str]]:
    """(pick's own keys, the variant subset or None, the overrides passed to the sweep); raises
    ConfigError naming a key that asks for more than one setting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from attnbench.harness.run.config import explain_hydra_error

    own: dict[str, str] = {}
    subset = None
    rest = []
    parser = OverridesParser.create()
    for arg in args:
        key, _, value = arg.partition("=")
        if key in OWN_KEYS:
            own[key] = value
            continue
        try:
            o = parser.parse_override(arg)
        except HydraException as exc:
            raise ConfigError(explain_hydra_error(exc)) from None
        key = o.key_or_group
        if key == "variant":
            try:
                subset = [str(v) for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                            else [o.value()])]
            except Exception:  # glob(), range(): the names are needed here
                raise ConfigError(f"{arg}: give the variants by name (variant=local,linear)") \
                    from None
            continue
        if key in ("sweep", "hydra/sweeper", "hydra.mode"):
            raise ConfigError(f"{arg}: pick answers one setting, not a sweep (a preset or "
                              f"sweeper: attnbench -m {arg})")
        if key == "resume":
            raise ConfigError(f"{arg}: pick always resumes in its folder (hydra.sweep.dir=DIR)")
        if o.is_sweep_override():
            raise ConfigError(f"{arg}: pick answers one setting; give one value (a sweep over "
                              f"it: attnbench -m {arg})")
        rest.append(arg)
    return own, subset, rest


def budget_of(own: dict[str, str], allow_recurrent: bool) -> Budget:
    error = parse_error(own.get("max_error", "0.01"))
    text = own.get("max_memory", "0") or "0"
    memory = parse_bytes(text, "max_memory")
    return Budget(error, memory, allow_recurrent or error is None, text)


def candidate_options() -> list[str]:
    """The default sweep's variants: every variant config but full's other backends and
    `custom` (your own function)."""
    from attnbench.harness.run.compose import hydra_loader

    with hydra_loader() as loader:
        options = loader.get_group_options("variant")
    return [o for o in options if not o.startswith("full_") and o != "custom"]


# -- plan --------------------------------------------------------------------------------------

def planned_entries(subset: list[str] | None, rest: list[str], folder: str,
                    budget: Budget) -> list[Entry]:
    """Every variant's point at the setting, with why it is not a candidate (exit 2 on bad
    input, as the sweep would)."""
    from attnbench import variants
    from attnbench.harness.run.plan import plan
    from attnbench.harness.run.point import input_bytes

    options = list(dict.fromkeys([*(subset or candidate_options()), BASELINE]))
    overrides = [f"variant={','.join(options)}", *rest, f"hydra.sweep.dir={folder}",
                 *_resume(Path(folder))]
    try:
        planned, _ = plan(overrides)
    except ConfigError as exc:
        fail(str(exc))
    _one_setting(planned)
    out = []
    for p in planned:
        option = next(o.split("=", 1)[1] for o in reversed(p.overrides)
                      if o.startswith("variant="))
        try:
            family = variants.build(p.run.variant, **p.run.params).family
        except Exception:
            family = "?"
        e = Entry(option, p, family, candidate=subset is None or option in subset)
        run = p.run
        held = p.predicted - input_bytes(run.shape, run.torch_dtype) if p.predicted >= 0 else -1
        if p.outcome in ("unsupported", "error"):
            e.why = p.reason
        elif p.outcome == "skipped":
            e.why = f"{p.reason} (what this machine can hold)"
        elif family == RECURRENT and not budget.recurrent:
            e.why = f"replaces softmax, so no error against it ({ALLOW})"
        elif budget.memory and held > budget.memory:
            e.why = f"predicted {units.size(held)} > max_memory {_budget_mem(budget)}"
        out.append(e)
    return out


def _one_setting(planned: list[Planned]) -> None:
    settings = {json_key(dataclasses.replace(p.run, variant="", params={})) for p in planned}
    if len(settings) > 1:
        fail("pick answers one setting, and these arguments ask for several (a preset or a "
             "sweep): give one value per key")


def json_key(run: RunConfig) -> str:
    import json

    return json.dumps(dataclasses.asdict(run), sort_keys=True, default=str)


def measured(entries: list[Entry]) -> list[Entry]:
    """What the answer needs measured: the candidates and the baseline, where they can run."""
    return [e for e in entries if e.planned.outcome == "run" and
            ((e.candidate and not e.why) or e.baseline)]


def mark_kept(entries: Iterable[Entry], folder: Path) -> None:
    """The points a resumed sweep keeps (`task.KEPT_ON_RESUME` in their folder)."""
    from attnbench.harness.records import RECORD_FILE, read_record
    from attnbench.harness.run.point import point_id
    from attnbench.harness.run.task import KEPT_ON_RESUME, point_folder_of

    for e in entries:
        path = folder / point_folder_of(e.planned.run) / RECORD_FILE
        try:
            old = read_record(path)
        except (OSError, ValueError):
            continue
        e.kept = old.point_id == point_id(e.planned.run) and old.status in KEPT_ON_RESUME


def _resume(folder: Path) -> list[str]:
    """`resume=true` once the folder holds a sweep (a fresh folder has nothing to resume, and a
    resume of it is refused)."""
    from attnbench.harness.run.compose import holds_sweep

    return ["resume=true"] if holds_sweep(folder) else []


def predicted_seconds(todo: list[Entry]) -> float:
    fresh = [e.planned.seconds for e in todo if not e.kept]
    return sum(fresh) + SWEEP_OVERHEAD_S + START_S


# -- measure -----------------------------------------------------------------------------------

def measure(todo: list[Entry], rest: list[str], folder: Path) -> int:
    """One multirun of `todo` into `folder` (resumed), its lines on stderr; its exit code."""
    cmd = [sys.executable, "-m", "attnbench.harness.cli", "-m",
           f"variant={','.join(e.option for e in todo)}", *rest, f"hydra.sweep.dir={folder}",
           *_resume(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # the answer goes to stdout; the sweep's progress to stderr
        sys.stderr.write(line)
        sys.stderr.flush()
    return proc.wait()


def attach_rows(entries: list[Entry], folder: Path) -> None:
    """Each measured entry's row of the folder's results.csv, by point id."""
    from attnbench.harness.report.gather import RESULTS_CSV
    from attnbench.harness.run.point import point_id

    try:
        df = pd.read_csv(folder / RESULTS_CSV, keep_default_na=True)
    except (OSError, pd.errors.EmptyDataError):
        return
    rows = {r["point_id"]: r for r in df.to_dict("records")}
    for e in entries:
        e.row = rows.get(point_id(e.planned.run))


# -- answer ------------------------------------------------------------------------------------

def judge(entries: list[Entry], budget: Budget) -> list[Entry]:
    """The candidates that meet the budget, best first: clean before marked (noisy, contended),
    then by latency, except that a marked one faster beyond its noise (its p90 below the best
    clean one's p10, as in the report's pick) comes first. Candidates that ran and miss it get
    their `why`."""
    ok = []
    for e in entries:
        if not e.candidate or e.why or e.planned.outcome != "run":
            continue
        r = e.row
        if r is None:
            e.why = "not measured (see the sweep's log)"
            continue
        if r["status"] != "ok":
            e.why = f"{r['status']}: {r.get('reason', '')}"
            continue
        if str(r.get("impl_ok", True)).lower() in ("false", "0"):
            e.why = (f"failed its implementation check (error {_num(r.get('impl_error')):.2g} "
                     f"against its own definition): never picked")
            continue
        err, held = softmax_error(r), held_bytes(r)
        recurrent = r.get("family") == RECURRENT
        if budget.error is not None and not recurrent:
            if not math.isfinite(err):
                e.why = "its error against softmax was not measured"
                continue
            if err > budget.error:
                e.why = f"error {_pct(err)} against softmax > max_error {_pct(budget.error)}"
                continue
        if budget.memory and held > budget.memory:
            e.why = f"{_mem_word(r)} {units.size(held)} > max_memory {_budget_mem(budget)}"
            continue
        ok.append(e)
    ranked = sorted(ok, key=lambda e: (_marked(e.row), float(e.row["latency_ms"]), e.label))
    if ranked and not _marked(ranked[0].row):  # a marked one faster beyond its noise comes first
        edge = _num(ranked[0].row.get("latency_p10_ms"))
        sure = [e for e in ranked if _marked(e.row) and _num(e.row.get("latency_p90_ms")) < edge]
        if sure:
            ranked.remove(sure[0])
            ranked.insert(0, sure[0])
    return ranked


def binding(entries: list[Entry], budget: Budget) -> str:
    """Why no candidate meets the budget: nothing supports the setting, or the constraint that
    binds (the closest miss named)."""
    cands = [e for e in entries if e.candidate]
    supported = [e for e in cands if e.planned.outcome not in ("unsupported", "error")]
    if not supported:
        return "nothing supports this setting (every candidate is unsupported: see below)"
    ran = [e for e in supported if e.row is not None and e.row["status"] == "ok"]
    if not ran:
        if all(e.why.startswith("replaces") for e in supported):
            return f"error: only the recurrent family supports this setting ({ALLOW})"
        if any(e.why.startswith("predicted") for e in supported):
            return (f"memory: no candidate's predicted memory fits max_memory "
                    f"{_budget_mem(budget)}")
        return "no candidate could be measured (see below)"
    in_err = [e for e in ran if budget.error is None or e.family == RECURRENT or
              softmax_error(e.row) <= budget.error]
    in_mem = [e for e in ran if not budget.memory or held_bytes(e.row) <= budget.memory]
    if in_err:
        least = min(in_err, key=lambda e: held_bytes(e.row))
        return (f"memory: the candidates within max_error need more than max_memory "
                f"{_budget_mem(budget)} (least: {least.label}, "
                f"{units.size(held_bytes(least.row))})")
    if in_mem:
        least = min(in_mem, key=lambda e: _or_inf(softmax_error(e.row)))
        return (f"error: the candidates within max_memory miss max_error {_pct(budget.error)} "
                f"(least: {least.label}, {_err_words(least.row)})")
    return "error and memory: no candidate that ran meets either"


def _or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _marked(r: dict) -> bool:
    return bool(r.get("noisy")) or bool(r.get("contended"))


def _pct(x: float | None) -> str:
    if x is None:
        return "none"
    return f"{x * 100:.3g}%" if x >= 1e-4 else f"{x:.0e}"


def _mem_word(r: dict) -> str:
    return "holds" if r.get("mode") == "decode" else "peak"


def _err_words(r: dict) -> str:
    """Error against softmax as people read it: exact at rounding level, else a percentage."""
    if r.get("family") in picks.NOT_COMPARABLE:
        return "no error against softmax (replaces it)"
    e = softmax_error(r)
    if not math.isfinite(e):
        return "error against softmax not measured"
    if e <= picks.exact_tol(str(r.get("dtype"))):
        return f"exact (error {e:.0e})"
    return f"error {_pct(e)} against softmax"


def _line(role: str, e: Entry, base: Entry | None) -> list[str]:
    r = e.row or {}
    marks = ("~" if r.get("noisy") else "") + ("!" if r.get("contended") else "")
    lat = units.ms(_num(r.get("latency_ms"))) + marks
    if base is not None and base.row is not None and e is not base and \
            base.row.get("status") == "ok":
        ratio = _num(base.row["latency_ms"]) / _num(r.get("latency_ms"))
        if math.isfinite(ratio) and ratio > 0:
            faster = ratio >= 1
            lat += (f" ({units.times(ratio if faster else 1 / ratio)} "
                    f"{'faster' if faster else 'slower'} than {base.label})")
    mem = f"{_mem_word(r)} {units.size(held_bytes(r))}"
    return [role, e.label, lat, mem, _err_words(r)]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  "
            + row[-1] for row in rows]


def excluded_lines(entries: list[Entry]) -> list[str]:
    """One line per family with variants left out: each label and why (one why said once)."""
    by_family: dict[str, dict[str, list[str]]] = {}
    for e in entries:
        if e.candidate and e.why:
            by_family.setdefault(e.family, {}).setdefault(e.why, []).append(e.label)
    lines = []
    for family, whys in by_family.items():
        parts = [f"{', '.join(labels)}: {why}" for why, labels in whys.items()]
        lines.append(f"  {family}: " + "; ".join(parts))
    return lines


def header(run: RunConfig, budget: Budget) -> str:
    setting = picks.setting_text({"dtype": run.dtype, "mode": run.mode, "causal": run.causal,
                                  "device": _device(run)}, [])
    shape = f"B={run.batch} H={run.heads} D={run.head_dim}"
    shape += f" kv_heads={run.kv_heads}" if run.kv_heads else ""
    shape += f" q_len={run.q_len}" if run.q_len else ""
    shape += f" ({run.model})" if run.model else ""
    mem = _budget_mem(budget)
    what = "held (state + step)" if run.mode == "decode" else "peak beyond q, k, v"
    return (f"attnbench pick: n={run.seq_len}, {setting}, {shape}; max_error "
            f"{_pct(budget.error)} against softmax, max_memory {mem} ({what})")


def _budget_mem(budget: Budget) -> str:
    """max_memory as given, with its binary size where that reads differently (1GB: 953.7
    MiB)."""
    if not budget.memory:
        return "none"
    size = units.size(budget.memory)
    return budget.memory_text if size.replace(" ", "") == budget.memory_text else \
        f"{budget.memory_text} ({size})"


def _device(run: RunConfig) -> str:
    from attnbench.harness.run.config import resolve_device

    return resolve_device(run.device)


# -- the command -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="attnbench pick",
        description="Which attention to use at one setting, within an error and a memory "
                    "budget: plans every variant, measures the candidates and the exact "
                    "baseline full[sdpa] (one sweep into its folder, resumed), and answers: "
                    "the pick, the runner-up, the baseline, and why the others were left out.",
        epilog="KEYS: max_error=0.01 (or 1%%, or none: no bound, the recurrent family allowed; "
               "default 0.01), max_memory=2GB (memory a call allocates beyond q, k, v; in "
               "decode the cache or state plus the step; default: none), variant=a,b (a "
               "subset), and any key of a single run: seq_len=, causal=, mode=, dtype=, "
               "kv_heads=, +shape=, inputs=, timing.*, hydra.sweep.dir= (default "
               "results/pick-<timestamp>/). Exit 0: an answer; 1: no variant meets the "
               "budget; 2: bad input.")
    p.add_argument("--dry-run", action="store_true",
                   help="show the plan and the predicted time; measure nothing")
    p.add_argument("--allow-recurrent", action="store_true",
                   help="the recurrent family (no error against softmax) is a candidate")
    p.add_argument("keys", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)  # flags anywhere among the keys
    t0 = time.monotonic()
    try:
        own, subset, rest = split_args(args.keys)
        budget = budget_of(own, args.allow_recurrent)
    except ConfigError as exc:
        fail(str(exc))
    named = next((a.split("=", 1)[1] for a in rest if a.startswith("hydra.sweep.dir=")), None)
    folder = named or f"results/pick-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    rest = [a for a in rest if not a.startswith("hydra.sweep.dir=")]
    entries = planned_entries(subset, rest, folder, budget)
    todo = measured(entries)
    mark_kept(todo, Path(folder))
    predicted = time.monotonic() - t0 + predicted_seconds(todo)
    run = entries[0].planned.run
    print(header(run, budget))
    if args.dry_run:
        return dry_run(entries, todo, folder, predicted, args.keys)
    if any(e.candidate and not e.why for e in todo):
        attach_rows(todo, Path(folder))
        done = all(e.kept and e.row is not None for e in todo)  # nothing new to measure
        code = 0 if done else measure(todo, rest, Path(folder))
        attach_rows(todo, Path(folder))
    else:  # no candidate to measure: the plan is the answer
        code = 0
    took = time.monotonic() - t0
    if code and not any(e.row is not None for e in todo):
        print(f"attnbench: error: the sweep into {folder} failed (exit {code}) before any "
              f"point was recorded", file=sys.stderr)
        return code
    return answer(entries, budget, folder, took, predicted)


def dry_run(entries: list[Entry], todo: list[Entry], folder: str, predicted: float,
            keys: list[str]) -> int:
    kept = sum(e.kept for e in todo)
    print(f"would measure {len(todo)} point{'s' if len(todo) != 1 else ''}"
          + (f" ({kept} kept from an earlier run)" if kept else "")
          + f" into {folder}: about {units.duration(predicted)} (rough: plan's estimate)")
    rows = [["role", "label", "pred. memory", "est.", ""]]
    from attnbench.harness.run.point import input_bytes

    for e in todo:
        run = e.planned.run
        held = e.planned.predicted - input_bytes(run.shape, run.torch_dtype)
        role = "baseline" if e.baseline and not e.candidate else "candidate"
        rows.append([role, e.label, units.size(held),
                     "kept" if e.kept else units.duration(e.planned.seconds),
                     "(the exact baseline)" if e.baseline else ""])
    print("\n".join(_table(rows)))
    lines = excluded_lines(entries)
    if lines:
        print("left out:")
        print("\n".join(lines))
    if not any(e.candidate and not e.why for e in todo):
        print("no candidate: nothing would meet the budget")
    print("Run it: " + shlex.join(["attnbench", "pick", *keys]))
    return 0


def answer(entries: list[Entry], budget: Budget, folder: str, took: float,
           predicted: float) -> int:
    best = judge(entries, budget)
    base = next((e for e in entries if e.baseline and e.row is not None), None)
    rows = []
    if best:
        first = "pick (the baseline)" if best[0] is base else "pick"
        rows.append(_line(first, best[0], base))
        if len(best) > 1:
            rows.append(_line("runner-up", best[1], base))
    if base is not None and base.row.get("status") == "ok" and (not best or best[0] is not base):
        rows.append(_line("baseline", base, None))
    code = 0
    if not best:
        print(f"no variant meets the budget; what binds: {binding(entries, budget)}")
        code = 1
    if rows:
        print("\n".join(_table(rows)))
    if len(best) == 1:
        print("  no runner-up: no other candidate meets the budget")
    faster = [e for e in best[1:] if _marked(e.row) and
              float(e.row["latency_ms"]) < float(best[0].row["latency_ms"])] if best else []
    if faster:
        print(f"  (marked ~ noisy / ! contended, and faster than the pick: "
              f"{', '.join(e.label for e in faster)}: measure again on a quiet machine)")
    elif best and _marked(best[0].row):
        print("  (every candidate's timing is marked ~ noisy or ! contended: measure again on "
              "a quiet machine)")
    lines = excluded_lines(entries)
    if lines:
        print("left out:")
        print("\n".join(lines))
    if any(e.row is not None for e in entries):
        print(f"folder: {folder} (results.csv, index.html); took {units.duration(took)}, plan "
              f"predicted {units.duration(predicted)}")
    else:
        print("nothing measured")
    return code


if __name__ == "__main__":
    sys.exit(main())
