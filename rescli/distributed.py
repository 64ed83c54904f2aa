"""torch.distributed for finetune: one process per GPU (or per CPU slot with gloo), launched by torchrun.

Semantics, the same whatever the number of processes:
- ``--batch-size`` is the global batch: each of N processes takes batch/N images per step,
  so the optimisation (and the learning rate) means the same thing as in a single process;
  no LR scaling is needed or applied.
- Every process walks the same seeded epoch order and takes every N-th batch slot of it,
  so the union of what the processes see in an epoch is exactly the single-process epoch.
- Validation is split across processes and the logits are gathered with their indices:
  each validation image is counted exactly once.
- Only rank 0 prints and writes files; every rank computes the same metrics from the
  gathered results, so all ranks agree on best epoch and early stopping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from rescli.errors import RescliError, UsageError


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


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device_spec: str) -> tuple[DistContext, str]:
    """Join the process group torchrun set up; returns the context and the device this rank uses."""
    if not launched_by_torchrun():
        return SINGLE, device_spec
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_spec in ("auto", "cuda") and torch.cuda.is_available()
    if device_spec.startswith("cuda:"):
        raise UsageError("--device cuda:N does not apply to distributed runs; each process uses the GPU of its LOCAL_RANK")
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
        device_spec = f"cuda:{ctx.local_rank}"
    elif device_spec == "auto":
        device_spec = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ctx, device_spec


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def rank_batches(order: Sequence[int], *, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's share of each global batch of ``order`` (per-rank batches of batch_size / N)."""
    if not ctx.enabled:
        return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {batch_size} must be divisible by the number of processes ({ctx.world_size})")
    out = []
    for start in range(0, len(order), batch_size):
        chunk = list(order[start : start + batch_size])
        out.append(chunk[ctx.rank :: ctx.world_size])
    return out


def shard(items: Sequence[Any], ctx: DistContext) -> list[Any]:
    return list(items[ctx.rank :: ctx.world_size]) if ctx.enabled else list(items)


def gather_arrays(ctx: DistContext, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Concatenate same-named arrays from every rank (rank order)."""
    if not ctx.enabled:
        return arrays
    gathered: list[dict[str, np.ndarray]] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, arrays)
    return {k: np.concatenate([g[k] for g in gathered]) for k in arrays}


def all_reduce_sum(ctx: DistContext, *values: float) -> list[float]:
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True if ``flag`` is set on any rank (a Ctrl-C seen by one process stops all of them together)."""
    return bool(all_reduce_sum(ctx, float(flag))[0]) if ctx.enabled else flag


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`rescli finetune ... --gpus N`: re-run the same command under torchrun on this machine."""
    if nproc < 1:
        raise UsageError("--gpus/--nproc must be at least 1")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"--gpus {nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rescli", *argv]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        raise RescliError(f"could not start torchrun: {exc}") from None
