"""torch.distributed for finetune: one process per GPU (or per CPU slot with gloo), launched by torchrun.

Semantics, the same whatever the number of processes:
- ``--batch-size`` is the global batch: each of N processes takes batch/N images per step,
  so the optimisation (and the learning rate) means the same thing as in a single process;
  no LR scaling is needed or applied. The loss of each process is scaled so that DDP's
  gradient average equals the gradient of the mean loss over the whole global batch, also
  when the last batch of an epoch does not split evenly (a process may even get no image).
- Every process walks the same seeded epoch order and takes every N-th batch slot of it,
  so the union of what the processes see in an epoch is exactly the single-process epoch
  (and a resumed epoch skips exactly the global steps already done, whatever N was before).
- Validation is split across processes and the logits are gathered with their indices:
  each validation image is counted exactly once.
- Only rank 0 prints and writes files; every rank computes the same metrics from the
  gathered results, so all ranks agree on best epoch and early stopping. Stop requests
  (Ctrl-C / SIGTERM seen by any process) are combined with ``any_rank`` every step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rescli.cpus import available_cpus
from rescli.errors import RescliError, UsageError

T = TypeVar("T")

#: Set by ``launch`` for the processes it starts: rank 0 writes its exit status there (torchrun itself
#: exits 1 on any failure, which would turn a usage error (2) or an interrupt (130) into 1).
STATUS_FILE_ENV = "RESCLI_LAUNCH_STATUS_FILE"

#: How long a process waits in a collective: the others wait while rank 0 alone scans and checks the data folder
#: (first run: every image is decoded), runs --lr auto's range test, or writes the evaluation files. torch's
#: defaults (10 min for nccl, 30 for gloo) are too short for a first scan of a large folder.
WAIT_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()

# What init_from_env set up, so that shutdown undoes exactly that (and nothing a caller set up itself).
_created_group = False
_quieted: list[Any] = []


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_main_process() -> bool:
    """False only in a process that torchrun started with RANK > 0 (the CLI prints results on rank 0 alone)."""
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0


def init_from_env(device_spec: str) -> tuple[DistContext, str]:
    """Join the process group torchrun set up; returns the context and the device this rank uses.

    nccl when this rank trains on a GPU, gloo on CPU. Ranks other than 0 have their consoles silenced
    until ``shutdown`` (their errors are still raised, and the CLI shows those rank 0 did not).
    """
    global _created_group
    if not launched_by_torchrun():
        return SINGLE, device_spec
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    spec = (device_spec or "auto").strip().lower()
    if spec.startswith("cuda:"):
        raise UsageError("--device cuda:N does not apply to distributed runs; each process uses the GPU of its LOCAL_RANK")
    use_cuda = spec in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"process with LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"start at most {torch.cuda.device_count()} processes per node"
            )
        torch.cuda.set_device(ctx.local_rank)
        spec = f"cuda:{ctx.local_rank}"
    elif spec == "auto":
        spec = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=WAIT_TIMEOUT)
        _created_group = True
    if not ctx.is_main:
        from rescli import console

        for c in (console.err, console.out):
            if not c.quiet:
                c.quiet = True
                _quieted.append(c)
    return ctx, spec


def shutdown(ctx: DistContext | None = None) -> None:
    """Undo init_from_env: consoles back on, and the process group destroyed if init_from_env created it."""
    global _created_group
    while _quieted:
        _quieted.pop().quiet = False
    if _created_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_group = False


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def _comm_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier(device_ids=[torch.cuda.current_device()]) if backend() == "nccl" else dist.barrier()


# --- who takes what ----------------------------------------------------------------------------------------

def rank_batches(order: Sequence[int], *, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's share of each global batch of ``order`` (per-rank batches of batch_size / N).

    Always one entry per global batch (ceil(len(order) / batch_size) of them), so every rank takes
    the same number of steps; an entry is shorter (or empty) only in a last global batch that does not split.
    """
    if not ctx.enabled:
        return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    check_batch_size(batch_size, ctx.world_size)
    out = []
    for start in range(0, len(order), batch_size):
        chunk = list(order[start : start + batch_size])
        out.append(chunk[ctx.rank :: ctx.world_size])
    return out


def check_batch_size(batch_size: int, world_size: int) -> None:
    if world_size > 1 and batch_size % world_size:
        raise UsageError(
            f"--batch-size {batch_size} must be divisible by the number of processes ({world_size}): "
            f"it is the global batch, split evenly across them"
        )


def shard(items: Sequence[Any], ctx: DistContext) -> list[Any]:
    """Every N-th item from this rank's offset: the shards are disjoint and together are ``items``."""
    return list(items[ctx.rank :: ctx.world_size]) if ctx.enabled else list(items)


# --- collectives -------------------------------------------------------------------------------------------

def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (picklable objects)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_arrays(ctx: DistContext, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Concatenate same-named arrays from every rank (rank order)."""
    if not ctx.enabled:
        return arrays
    gathered = gather_objects(ctx, arrays)
    return {k: np.concatenate([g[k] for g in gathered]) for k in arrays}


def gather_by_index(ctx: DistContext, index: np.ndarray, **arrays: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gather sharded per-item arrays and put them in ``index`` order (ascending), as one process would have them.

    Raises RescliError if an index came from two ranks: each item must be counted exactly once.
    """
    got = gather_arrays(ctx, __index__=np.asarray(index, dtype=np.int64), **arrays)
    idx = got.pop("__index__")
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    if len(idx) > 1 and (np.diff(idx) == 0).any():
        raise RescliError(f"distributed gather: {int((np.diff(idx) == 0).sum())} item(s) came from more than one process")
    return idx, {k: v[order] for k, v in got.items()}


def all_reduce_sum(ctx: DistContext, *values: float) -> list[float]:
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True if ``flag`` is set on any rank (a Ctrl-C seen by one process stops all of them together)."""
    return bool(all_reduce_sum(ctx, float(flag))[0]) if ctx.enabled else flag


def broadcast_object(ctx: DistContext, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    A RescliError raised there is raised on every rank (same message and exit code; marked ``shared`` so
    that only rank 0 shows it), instead of leaving the other ranks waiting for a result that never comes.
    """
    if not ctx.enabled:
        return fn()
    result: tuple[bool, Any, int] = (True, None, 0)
    if ctx.is_main:
        try:
            result = (True, fn(), 0)
        except RescliError as exc:
            result = (False, exc.message, exc.exit_code)
            broadcast_object(ctx, result)
            exc.shared = True  # type: ignore[attr-defined]
            raise
    ok, value, code = broadcast_object(ctx, result)
    if not ok:
        raise shared_error(value, code)
    return value


def shared_error(message: str, exit_code: int = 1) -> RescliError:
    """An error every rank raises together (rank 0 shows it; the others stay quiet)."""
    exc = RescliError(message, exit_code=exit_code)
    exc.shared = True  # type: ignore[attr-defined]
    return exc


def shared(exc: RescliError, ctx: DistContext) -> RescliError:
    """Mark an error that every rank raises at the same point (rank 0 shows it; the others stay quiet)."""
    if ctx.enabled:
        exc.shared = True  # type: ignore[attr-defined]
    return exc


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (downloads weights, fills caches), then the others run it.

    If rank 0 fails inside, it never reaches the barrier; torchrun then stops the waiting ranks.
    """
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


# --- the model ---------------------------------------------------------------------------------------------

def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise UsageError(
            f"--sync-bn: PyTorch's SyncBatchNorm runs on CUDA GPUs only, and this run trains on {device.type}; "
            f"drop --sync-bn (each process then normalises over its own part of the batch)"
        )


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm (statistics over the global batch). Same parameters, same state_dict keys."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``module`` (the parameters that require grad *now* are the ones synchronised)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(module)


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) everywhere: every rank then holds the model rank 0 saves."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def check_in_sync(module: nn.Module, ctx: DistContext) -> None:
    """Raise if the ranks' parameters differ (a bug, never expected): a cheap checksum compared across ranks."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in module.parameters())
    sums = gather_objects(ctx, total)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise shared_error(f"distributed: model parameters differ across processes (checksums {sums})")


# --- rescli finetune --gpus N ------------------------------------------------------------------------------

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rescli", *argv]
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
