"""How much of the machine other processes took while a point was timed.

Linux's /proc/stat counts, per machine, the CPU time spent busy (user, nice, system, irq,
softirq) and stolen by the hypervisor (steal). Busy + steal over the timed window, minus this
process's own CPU time, is what others took; divided by wall time × CPUs it is their share of
the machine (`others_cpu`, 0…1). This process's CPU time over wall time × its threads is
`own_cpu`: near 1 when every thread computed the whole window, lower when threads waited, were
descheduled or the work is single-threaded.

A point is `contended` when others took more than CONTENDED_SHARE of the machine: on the 2-core
VMs this was written on, an idle machine reads 0.00–0.03 and one busy core from another process
reads ≈0.5, so a tenth of the machine separates the two with margin. Its latency is then not a
measurement of the variant alone. Elsewhere (no /proc/stat) both shares are NaN and nothing is
flagged.

The same reader chooses the thread count of `threads=0` (`free_cores`): the cores other processes
leave free when a process starts, so that torch's threads do not share cores with someone else's
(an OpenMP team whose threads wait for a descheduled one can run 100x slower or worse).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

try:  # POSIX: the process's page faults (getrusage)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

CONTENDED_SHARE = 0.10
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float  # perf_counter seconds
    own: float  # this process's CPU seconds (all threads, user + system)
    busy: float  # machine busy + steal seconds (NaN where /proc/stat is missing)
    cpus: int
    faults: float = math.nan  # this process's minor page faults so far (NaN: not readable)


@dataclass(frozen=True)
class Contention:
    others_cpu: float  # share of the machine's CPU time others took (0…1, NaN if unknown)
    own_cpu: float  # own CPU time / (wall × threads)

    @classmethod
    def unknown(cls) -> Contention:
        return cls(math.nan, math.nan)

    @property
    def contended(self) -> bool:
        return math.isfinite(self.others_cpu) and self.others_cpu > CONTENDED_SHARE


def snapshot() -> CpuSnapshot:
    return CpuSnapshot(time.perf_counter(), time.process_time(), _machine_busy(),
                       os.cpu_count() or 1, _minor_faults())


def _minor_faults() -> float:
    """Minor page faults of this process (all threads) since it started: fresh pages mapped on
    first touch, e.g. a large temporary the allocator took from (or gave back to) the OS."""
    if resource is None:
        return math.nan
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def contention(before: CpuSnapshot, after: CpuSnapshot, threads: int) -> Contention:
    """Shares over the window between two snapshots (`threads`: the threads this process
    computes with)."""
    wall = after.wall - before.wall
    own = after.own - before.own
    if wall <= 0:
        return Contention.unknown()
    others = (after.busy - before.busy) - own
    # /proc/stat ticks are 1/CLK_TCK s and own time is exact: clamp rounding below zero
    share = max(0.0, others) / (wall * before.cpus) if math.isfinite(others) else math.nan
    return Contention(min(1.0, share), own / (wall * max(1, threads)))


def _machine_busy() -> float:
    """Busy + steal CPU seconds of the whole machine since boot, from /proc/stat's cpu line."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return math.nan
    if not fields or fields[0] != "cpu":
        return math.nan
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    t = [int(x) for x in fields[1:9]] + [0] * max(0, 9 - len(fields))
    busy = t[0] + t[1] + t[2] + t[5] + t[6] + t[7]
    return busy / _TICK


# A core that others keep busy more than this share of is taken: an idle machine's background
# (0.00-0.06 of a core on the 2-core VMs this was written on) leaves every core free.
TAKEN_CORE = 0.25


def free_cores(cores: int, window_s: float = 0.25) -> int:
    """The cores other processes leave free: `cores` less the CPUs they kept busy (busy + steal
    in /proc/stat, this process's own time removed) over `window_s`, a core used more than
    TAKEN_CORE counting as taken; at least 1. `cores` where /proc/stat is missing."""
    before = snapshot()
    time.sleep(window_s)
    load = contention(before, snapshot(), 1)
    return others_leave(cores, load.others_cpu * before.cpus)


def others_leave(cores: int, busy: float) -> int:
    """`cores` less `busy` CPUs that others use (rounded up past TAKEN_CORE), at least 1."""
    if not math.isfinite(busy):
        return max(1, cores)
    return max(1, cores - max(0, math.ceil(busy - TAKEN_CORE)))
