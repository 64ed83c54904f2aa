"""A process of the 2-process gloo group in test_distributed.

Spawned: it imports only what it needs, so it starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.distributed as dist

from rescli.core.errors import RescliError
from rescli.train.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    gather_by_index,
    on_main,
    shard,
)


def collectives(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank)
    result: dict = {}
    mine = shard(list(range(7)), ctx)  # [0, 2, 4, 6] and [1, 3, 5]
    idx, got = gather_by_index(
        ctx, np.array(mine[::-1]),
        logits=np.array([[i, -i] for i in mine[::-1]], np.float32), y=np.array(mine[::-1]) % 2,
    )
    result["idx"], result["logits"], result["y"] = idx.tolist(), got["logits"].tolist(), got["y"].tolist()
    try:
        gather_by_index(ctx, np.array([3, rank]))  # 3 from both ranks
        result["dup"] = "no error"
    except RescliError as exc:
        result["dup"] = exc.message
    result["any"] = [any_rank(ctx, rank == 1), any_rank(ctx, False)]
    result["sums"] = all_reduce_sum(ctx, rank + 1.0, 10.0)

    def fail():
        raise RescliError("only rank 0 runs this", exit_code=3)

    try:
        on_main(ctx, fail)
    except RescliError as exc:
        result["on_main"] = [exc.message, exc.exit_code, getattr(exc, "shared", False)]
    result["value"] = on_main(ctx, lambda: {"from": rank})
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))
