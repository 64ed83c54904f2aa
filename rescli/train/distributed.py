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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.train.launch import launched_by_torchrun

T = TypeVar("T")


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


_muted: list[bool] = []


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
        raise UsageError(
            "--device cuda:N does not apply to distributed runs; each process uses the GPU of its LOCAL_RANK"
        )
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
    if not ctx.is_main and not _muted:  # rank 0 speaks for every process
        events.set_muted(True)
        _muted.append(True)
    return ctx, spec


def shutdown(ctx: DistContext | None = None) -> None:
    """Undo init_from_env: events back on, and the process group destroyed if init_from_env created it."""
    global _created_group
    while _muted:
        _muted.pop()
        events.set_muted(False)
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


def gather_by_index(
    ctx: DistContext, index: np.ndarray, **arrays: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gather sharded per-item arrays and put them in ``index`` order (ascending), as one process would have them.

    Raises RescliError if an index came from two ranks: each item must be counted exactly once.
    """
    got = gather_arrays(ctx, __index__=np.asarray(index, dtype=np.int64), **arrays)
    idx = got.pop("__index__")
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    if len(idx) > 1 and (np.diff(idx) == 0).any():
        twice = int((np.diff(idx) == 0).sum())
        raise RescliError(f"distributed gather: {twice} item(s) came from more than one process")
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
        total = sum(
            float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in module.parameters()
        )
    sums = gather_objects(ctx, total)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise shared_error(f"distributed: model parameters differ across processes (checksums {sums})")
