"""One tiny real sweep per test session, shared by the report and compare tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARGS = ["-m", "variant=full", "variant.backend=naive,sdpa", "seq_len=64,128,256", "batch=1",
        "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0", "timing.warmup=1"]


def tiny_sweep(tmp_path_factory) -> tuple[Path, str]:
    """(sweep folder, the sweep's stdout); run once, reused by later calls in the session."""
    root = tmp_path_factory.getbasetemp() / "tiny-sweep"
    out = root / "sweep"
    log = root / "stdout.txt"
    if not log.exists():
        root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "attnbench.harness.cli", *ARGS, f"hydra.sweep.dir={out}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        log.write_text(proc.stdout)
    return out, log.read_text()
