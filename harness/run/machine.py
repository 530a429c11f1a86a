"""Where a point ran, recorded with it: the device's name, the versions that matter, the git
commit, and the GPU's clock and temperature right after timing."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from pathlib import Path

import torch


@functools.cache
def machine_info(device: str) -> dict[str, str]:
    """Device name and the versions that matter, recorded with every point."""
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        name = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    else:
        name = _cpu_name()
    xf = ""
    with contextlib.suppress(Exception):
        import importlib.metadata

        xf = importlib.metadata.version("xformers")
    return dict(
        device_name=name,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        driver_version=_driver_version() if device == "cuda" else "",
        xformers_version=xf,
        git_sha=git_sha(),
        hostname=platform.node(),
    )


def _driver_version() -> str:
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    return ""


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


@functools.cache
def git_sha() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_state(device: str) -> dict[str, float | str]:
    """SM clock (MHz) and temperature (°C) through NVML, right after timing; empty elsewhere.
    Without NVML (pip install attnbench[gpu]) the fields stay NaN and `notes` says why."""
    if device != "cuda":
        return {}
    try:
        return {
            "gpu_clock_mhz": float(torch.cuda.clock_rate()),
            "gpu_temp_c": float(torch.cuda.temperature()),
        }
    except Exception as exc:  # no pynvml / NVML
        return {"notes": f"no GPU clock/temperature: NVML unavailable ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]}; pip install attnbench[gpu])"}
