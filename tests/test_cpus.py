"""Threads for the load the machine is under: quiet -> torch's defaults; busy -> fewer threads, passive waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rescli.core.cpus import available_cpus, busy_cpus, plan_threads


@pytest.fixture
def competitor():
    """One CPU-bound process, as in the issue's measurement (a second job on the same cores)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    yield proc
    proc.kill()
    proc.wait()


def test_a_quiet_machine_keeps_torchs_defaults():
    assert plan_threads(cpus=2, busy=0.1).threads is None
    assert plan_threads(cpus=2, busy=None).threads is None  # no /proc/stat: nothing to go on, nothing changed


@pytest.mark.parametrize(
    ("cpus", "busy", "threads"), [(2, 1.0, 1), (2, 1.9, 1), (2, 4.0, 1), (16, 3.6, 12), (4, 0.6, 3)]
)
def test_a_busy_machine_gets_a_thread_per_free_core_waiting_passively(cpus, busy, threads):
    plan = plan_threads(cpus=cpus, busy=busy)
    assert plan.threads == threads and plan.passive
    assert "OMP_NUM_THREADS" in plan.describe()


def test_another_cpu_bound_process_is_seen(competitor):
    assert busy_cpus(0.3) >= 0.5


def test_a_burst_of_load_gone_at_the_second_look_changes_nothing(monkeypatch):
    import rescli.core.cpus as cpus

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", cpus.ADAPT_ENV)}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(sys, "modules", {k: v for k, v in sys.modules.items() if k != "torch"})
    monkeypatch.setattr(cpus, "available_cpus", lambda: 2)
    readings = iter([1.2, 0.1])  # busy at the first look, quiet at the second
    monkeypatch.setattr(cpus, "busy_cpus", lambda seconds: next(readings))
    assert cpus.adapt_to_load().threads is None and "OMP_NUM_THREADS" not in env
    readings = iter([1.2, 0.9])  # a job still holding a core
    monkeypatch.setattr(cpus, "busy_cpus", lambda seconds: next(readings))
    plan = cpus.adapt_to_load()
    assert plan.threads == 1 and plan.busy == 0.9 and env["OMP_NUM_THREADS"] == "1"


def _adapt_in_a_fresh_process(env: dict) -> list[str]:
    code = ("import os; from rescli.core.cpus import adapt_to_load; p = adapt_to_load(); "
            "print(os.environ.get('OMP_NUM_THREADS')); print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_adapt_sets_openmp_before_torch_loads_unless_the_user_chose(competitor):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    threads, policy = _adapt_in_a_fresh_process(env)
    assert 1 <= int(threads) < max(2, available_cpus()) and policy == "PASSIVE"
    assert _adapt_in_a_fresh_process({**env, "OMP_NUM_THREADS": "2"}) == ["2", "None"]
    assert _adapt_in_a_fresh_process({**env, "RESCLI_ADAPT_THREADS": "0"}) == ["None", "None"]


def test_predict_says_how_it_adapted_to_the_load(competitor, trained_run, class_folder):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-m", "rescli", "predict", str(class_folder / "red"), "--model", str(trained_run)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "CPUs busy with other work" in out.stderr and "thread(s), waiting passively" in out.stderr
