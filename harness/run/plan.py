"""`attnbench plan ARGS`: what `attnbench ARGS` would do, without doing it.

    attnbench plan                                   # the default sweep
    attnbench plan -m variant=full,local seq_len=1024,2048,4096 max_memory=1GB

Every point is composed and checked by the sweeper's own code (`checked_points`: the same
composition, variant-parameter fitting, checks and de-duplication a sweep runs), then listed with
its label, shape, predicted peak memory (`point.predicted_bytes`), and what it would
become: `run`, `skipped` (predicted above max_memory) or `unsupported` (the variant's own
`not_supported_reasons`). Nothing is measured, no folder is created. A bad point exits 2 with
one line, as the sweep would.

The time estimate is rough, and says so: each point's FLOPs (the variant's own models) over a
matmul rate measured here in a fraction of a second, so a memory- or overhead-bound point takes
longer than estimated; times the calls a point makes (warm-up, then repeats until timing.min_reps
and timing.min_time_s are met, at most timing.max_reps / timing.max_time_s, plus the first call,
the dispatch count and the memory measurement), plus a fixed overhead per point (the job, its
inputs, the float64 error, the record), a compile allowance for FlexAttention points, and a
fixed cost for start-up and the report. It assumes a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass

import torch

from attnbench.harness.run.config import (
    ConfigError,
    RunConfig,
    fail,
    resolve_device,
)
from attnbench.harness.run.rate import matmul_rate
from attnbench.harness.units import duration as _seconds
from attnbench.harness.units import size as _bytes

SWEEP_OVERHEAD_S = 10.0  # start-up, composing every point, gathering and the report
POINT_OVERHEAD_S = 0.5  # Hydra job, inputs, float64 error, dispatch count, record
COMPILE_S = {"cpu": 30.0, "cuda": 15.0}  # torch.compile of a FlexAttention point (first call)
EXTRA_CALLS = 3  # first call (setup), the dispatch count, the memory measurement


@dataclass(frozen=True)
class Planned:
    label: str
    run: RunConfig
    predicted: int  # bytes; -1 when the variant could not be built
    outcome: str  # run | skipped | unsupported | error
    reason: str
    seconds: float
    overrides: tuple[str, ...] = ()  # what the sweep launches the point's job with


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="attnbench plan",
        description="What `attnbench ARGS` would do: every point checked as the sweep checks "
                    "it, its predicted peak memory, which would be skipped or unsupported and "
                    "why, and a rough time. Runs nothing, creates no folder.",
        epilog="ARGS are a sweep's arguments (-m optional); none: the default sweep.")
    p.add_argument("-m", "--multirun", action="store_true", help="accepted; plan is a sweep")
    p.add_argument("overrides", nargs="*", metavar="ARGS", help="KEY=VALUE overrides")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # what composing leaves out
    from attnbench.harness.run.compose import default_sweep

    overrides = args.overrides or [f"+sweep={default_sweep()}"]
    try:
        planned, sweep_dir = plan(overrides)
    except ConfigError as exc:
        fail(str(exc))
    print(render(planned, sweep_dir, overrides, single=bool(args.overrides) and
                 not args.multirun))
    return 0


def plan(overrides: list[str]) -> tuple[list[Planned], str]:
    """The sweep's points, checked by the sweeper's code, each with its predicted memory,
    outcome and estimated seconds; and the sweep folder (not created)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from attnbench.harness.run.compose import (
        check_sweep_folder,
        checked_points,
        hydra_loader,
        precheck,
        sweep_argv,
    )

    precheck(overrides, multirun=True)  # what the real command checks before Hydra starts
    overrides = sweep_argv(overrides)
    with hydra_loader() as loader:
        # the sweep's master config, composed as Hydra composes it for a multirun
        config = loader.load_configuration("config", overrides, RunMode.MULTIRUN)
        # what Hydra hands the sweeper: its params (presets set them), then the task overrides
        params = config.hydra.sweeper.params
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        arguments = [*(f"{k}={v}" for k, v in params.items()),
                     *OmegaConf.to_container(config.hydra.overrides.task)]
        points = checked_points(config, loader, arguments)
        sweep_dir = check_sweep_folder(config, create=False)
    from attnbench.harness.run.job import point_threads

    rates: dict[tuple[str, str, int], float] = {}
    out = []
    for point in points:
        run = point.run
        key = (resolve_device(run.device), run.dtype, point_threads(run))
        if key not in rates:
            torch.set_num_threads(key[2])  # the threads the sweep's points will compute with
            rates[key] = matmul_rate(*key[:2])
        out.append(dataclasses.replace(assess(run, rates[key]),
                                       overrides=tuple(point.overrides)))
    return out, str(sweep_dir)


def assess(run: RunConfig, rate: float) -> Planned:
    """What the sweep would do with this point: the job's own decision (`decide`)."""
    from attnbench import variants
    from attnbench.harness.run.point import decide

    try:
        att = variants.build(run.variant, **run.params)
        d = decide(att, run)
        seconds = point_seconds(att, run, rate) if d.outcome == "run" else 0.0
        return Planned(att.label, run, d.predicted, d.outcome, d.reason, seconds)
    except Exception as exc:  # the sweep would record an error row
        return Planned(run.variant, run, -1, "error", f"{type(exc).__name__}: {exc}", 0.0)


def point_seconds(att, run: RunConfig, rate: float) -> float:
    """Rough wall time of one point: its calls at `rate` FLOP/s plus fixed costs."""
    from attnbench.variants.base import full_flops

    shape = run.shape
    try:
        if run.mode == "decode":
            flops = att.decode_flops(shape)
            if not math.isfinite(flops):
                flops = 4.0 * shape.bh * shape.seq_len * shape.head_dim
        else:
            flops = att.flops(shape, run.causal)
            if run.mode == "fwd_bwd":
                flops += att.backward_flops(shape, run.causal)
    except NotImplementedError:
        flops = full_flops(shape, run.causal) * (3 if run.mode == "fwd_bwd" else 1)
    call = max(flops / rate, 20e-6)  # no call is faster than a few dispatches
    t = run.timing
    reps = max(t.min_reps, math.ceil(t.min_time_s / call))
    timed = min(reps, t.max_reps) * call
    timed = min(timed, t.max_time_s + call)
    seconds = POINT_OVERHEAD_S + (t.warmup + EXTRA_CALLS) * call + timed
    kernel = att.kernel(shape, resolve_device(run.device), run.causal, run.mode == "fwd_bwd")
    if kernel.startswith("flex"):
        seconds += COMPILE_S.get(resolve_device(run.device), 30.0)
    return seconds


def render(planned: list[Planned], sweep_dir: str, overrides: list[str], single: bool) -> str:
    counts = {o: sum(p.outcome == o for p in planned) for o in
              ("run", "skipped", "unsupported", "error")}
    total = sum(p.seconds for p in planned) + SWEEP_OVERHEAD_S * (len(planned) > 1)
    inputs = any(p.run.inputs != "gaussian" for p in planned)  # a column only when it varies
    rows = [("#", "label", "shape B×H×N×D", *(("inputs",) * inputs), "dtype", "mode", "causal",
             "pred. peak", "outcome", "est.", "why")]
    for i, p in enumerate(planned, 1):
        r = p.run
        shape = f"{r.batch}×{r.heads}×{r.seq_len}×{r.head_dim}"
        if r.kv_heads:
            shape += f" kv={r.kv_heads}"
        if r.q_len:
            shape += f" q={r.q_len}"
        rows.append((str(i), p.label, shape, *((r.inputs,) * inputs), r.dtype, r.mode,
                     "yes" if r.causal else "no",
                     _bytes(p.predicted) if p.predicted >= 0 else "-", p.outcome,
                     _seconds(p.seconds) if p.outcome == "run" else "-", p.reason))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = [f"attnbench plan: {len(planned)} point{'s' if len(planned) != 1 else ''}: "
             + ", ".join(f"{n} {o}" for o, n in counts.items() if n)
             + f"; about {_seconds(total)} in all (rough)"]
    if single and len(planned) == 1:
        lines.append("one point: `attnbench ARGS` runs it as a single run (results/runs/…)")
    else:
        lines.append(f"sweep folder: {sweep_dir} (not created by plan)")
    lines.append("")
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  ".join(cells) + ("  " + row[-1] if row[-1] else ""))
    lines += [
        "",
        "Time: each point's FLOPs (the variant's own models) at the matmul rate measured here, "
        "times its calls (warm-up, repeats until timing.min_reps and timing.min_time_s, at most "
        f"timing.max_reps and timing.max_time_s, {EXTRA_CALLS} more), plus "
        f"{POINT_OVERHEAD_S:g} s per point, {COMPILE_S['cpu']:g} s (CPU) / "
        f"{COMPILE_S['cuda']:g} s (GPU) per FlexAttention compile and {SWEEP_OVERHEAD_S:g} s "
        "for start-up and the report. Assumes a quiet machine; memory- or overhead-bound "
        "points take longer.",
        *_capture_note(planned),
        "Run it: " + shlex.join(["attnbench", *([] if single and len(planned) == 1 else ["-m"]),
                                 *overrides]),
    ]
    return "\n".join(lines)


def _capture_note(planned: list[Planned]) -> list[str]:
    """A line when a point would first capture the real sample (not in the estimate)."""
    from attnbench.harness.run.inputs import parse_inputs
    from attnbench.harness.run.real import cache_path

    missing = set()
    for p in planned:
        spec = parse_inputs(p.run.inputs)
        if spec.kind == "real" and p.outcome == "run":
            with contextlib.suppress(ValueError, OSError):
                path = cache_path(p.run.seq_len + (p.run.mode == "decode"), spec.layers)
                if not path.is_file():
                    missing.add(path.name)
    if not missing:
        return []
    return [f"inputs=real: {len(missing)} capture{'s' if len(missing) > 1 else ''} of the real "
            f"sample not cached yet: the first point that needs one loads SmolLM2-135M and runs "
            f"it once (a minute or more on a CPU; not in the estimate)."]


if __name__ == "__main__":
    sys.exit(main())
