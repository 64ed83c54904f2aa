"""`rescli finetune --gpus N`: re-run the command under torchrun, and report rank 0's exit status.

No torch import at module level: the CLI asks whether it runs under torchrun before torch loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from rescli.core.cpus import available_cpus
from rescli.core.errors import RescliError, UsageError

#: Set by ``launch`` for the processes it starts: rank 0 writes its exit status there (torchrun itself
#: exits 1 on any failure, which would turn a usage error (2) or an interrupt (130) into 1).
STATUS_FILE_ENV = "RESCLI_LAUNCH_STATUS_FILE"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_main_process() -> bool:
    """False only in a process that torchrun started with RANK > 0 (the CLI prints results on rank 0 alone)."""
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0


def strip_launch_option(argv: Sequence[str], names: Sequence[str] = ("--gpus", "--nproc")) -> list[str]:
    """``argv`` without ``--gpus N`` / ``--gpus=N`` (the launched processes must not launch again)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(n + "=") for n in names):
            continue
        out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`rescli finetune ... --gpus N`: re-run the same command under torchrun on this machine.

    ``argv`` is the command line after ``rescli`` without the --gpus option. Returns the exit status of
    the run (rank 0's own status when torchrun reports a failure, so 2 and 130 keep their meaning).
    """
    if nproc < 1:
        raise UsageError("--gpus/--nproc must be at least 1")
    import torch

    if launched_by_torchrun():
        raise UsageError("--gpus/--nproc starts torchrun itself; under torchrun, use its --nproc-per-node instead")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"--gpus {nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1: share the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // nproc))
    fd, status_file = tempfile.mkstemp(prefix="rescli-launch-", suffix=".status")
    os.close(fd)
    env[STATUS_FILE_ENV] = status_file
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*torchrun, "-m", "rescli", *argv]
    try:
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            raise RescliError(f"could not start torchrun: {exc}") from None
        rc = _wait_forwarding_signals(proc)
        if rc != 0:
            try:
                text = open(status_file).read().strip()
            except OSError:
                text = ""
            if text.lstrip("-").isdigit() and int(text) != 0:
                rc = int(text)
            elif rc < 0:  # torchrun itself died of a signal
                rc = 128 - rc
        return rc
    finally:
        try:
            os.unlink(status_file)
        except OSError:
            pass


def _wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for torchrun; SIGTERM sent to us is passed on, and a Ctrl-C (which the terminal sends to torchrun
    too) does not stop the wait: torchrun hands the signal to the training processes, they save last.pt, and
    their status is what we return."""
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except OSError:
            pass

    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def record_exit_status(code: Any) -> None:
    """Called by the CLI as it exits: rank 0 of a ``launch`` run leaves its status for the launcher."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or not is_main_process():
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    try:
        with open(path, "w") as f:
            f.write(str(status))
    except OSError:
        pass
