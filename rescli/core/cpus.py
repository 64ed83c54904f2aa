"""How many CPUs this process may use, how many other work is using, and the threads to run with.

No torch import: OpenMP reads ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, when torch loads, so the
CLI decides here first. On a shared machine another CPU-bound process takes cores that torch's threads
count on; its OpenMP threads then spin at every barrier waiting for a thread that is not running, and
throughput collapses (docs/performance.md, "Under load"). Fewer threads than free cores, waiting passively,
keep most of the speed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

#: Set to 0 to keep torch's own thread count and wait policy whatever the load.
ADAPT_ENV = "RESCLI_ADAPT_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, containers), capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_limit() -> int | None:
    """The CPU quota of this process's cgroup (v2 cpu.max, v1 cfs files), rounded up; None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int] | None) -> tuple[int, int] | None:
    """(idle, total) jiffies summed over ``cpus`` (all when None), from /proc/stat; None where it is not there."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    idle = total = 0
    for fields in lines:
        name = fields[0]
        wanted = name == "cpu" if cpus is None else (name[3:].isdigit() and int(name[3:]) in cpus)
        if wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle += values[3] + values[4]
            total += sum(values)
    return idle, total


BUSY_FROM = 0.5  # CPUs that other programs keep busy, from which the threads adapt (plan_threads says why)
CONFIRM_SECONDS = 0.3  # the second look's length, taken only when the first saw the machine busy


def busy_cpus(seconds: float = 0.1) -> float | None:
    """How many of this process's CPUs other programs kept busy over the last ``seconds`` (this one sleeps)."""
    try:
        mine: set[int] | None = set(os.sched_getaffinity(0))
    except AttributeError:
        mine = None
    before = _cpu_times(mine)
    if before is None:
        return None
    time.sleep(seconds)
    after = _cpu_times(mine)
    if after is None or after[1] <= before[1]:
        return None
    busy_fraction = 1.0 - (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, busy_fraction) * (len(mine) if mine is not None else (os.cpu_count() or 1))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int | None  # None: leave torch's default
    passive: bool  # OpenMP threads sleep instead of spinning while they wait
    busy: float | None  # CPUs other programs were seen using
    cpus: int

    def describe(self) -> str:
        if self.threads is None:
            return f"{self.cpus} CPU(s) free"
        return (f"CPUs busy with other work (about {self.busy:.1f} of {self.cpus}): {self.threads} thread(s), "
                "waiting passively (set OMP_NUM_THREADS to choose)")


def plan_threads(*, cpus: int, busy: float | None) -> ThreadPlan:
    """Quiet machine: torch's defaults. Busy one: a thread per core left free (at least one), passive waiting.

    Half a core busy is the threshold: less is a background process waking now and then, which spinning
    threads ride out; more is a job that holds a core, and torch's default of one thread per core then
    makes every parallel region wait for the thread that shares its core with that job.
    """
    if busy is None or busy < BUSY_FROM:
        return ThreadPlan(None, False, busy, cpus)
    return ThreadPlan(max(1, int(cpus - busy + 0.5)), True, busy, cpus)


def adapt_to_load(*, sample_seconds: float = 0.1) -> ThreadPlan | None:
    """Before torch loads: measure the load, and set OMP_NUM_THREADS / OMP_WAIT_POLICY to match it.

    Does nothing (returns None) once torch is loaded, when the user has set either variable, or with
    RESCLI_ADAPT_THREADS=0. Child processes (decode workers) inherit the choice.
    """

    if "torch" in sys.modules or os.environ.get(ADAPT_ENV, "1") == "0":
        return None
    if "OMP_NUM_THREADS" in os.environ:
        return None
    busy = busy_cpus(sample_seconds)
    if busy is not None and busy >= BUSY_FROM:
        # A second, longer look: a burst (the kernel writing back a previous step's files, a process exiting) is
        # gone by then, and would otherwise halve this run's threads for its whole length; a job holding a core
        # is still there. The lower reading decides.
        again = busy_cpus(CONFIRM_SECONDS)
        busy = min(busy, again) if again is not None else busy
    plan = plan_threads(cpus=available_cpus(), busy=busy)
    if plan.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(plan.threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return plan


def let_idle_threads_sleep() -> None:
    """Let OpenMP threads sleep, not spin, between the model's parallel regions (unless the user chose).

    predict decodes the next batch in threads while the model works on this one; spinning OpenMP
    threads keep the cores those decode threads need, and sleeping ones give them back (the gain is in
    docs/performance.md, "How rescli is fast"). Not for training, whose many short parallel regions pay
    for each wake-up. Only takes effect before torch is imported: OpenMP reads it when it loads.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
