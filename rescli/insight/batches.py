"""Inputs to decoded batches for explain and embed: predict's inputs (files, folders, globs, '-', @lists), decoded
by a few threads at most two batches ahead of the model, so memory stays bounded however many paths come in."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from PIL import Image

from rescli.core.errors import UsageError
from rescli.data.images import load_rgb
from rescli.data.transforms import build_transform
from rescli.inference.inputs import BadInput, load_failure

#: (path, what was decoded or None, why it failed or None)
Item = tuple[str, Any, "str | None"]


def decoded_batches(
    paths: Iterable[str], *, load: Callable[[str], Item], batch_size: int, workers: int
) -> Iterator[list[Item]]:
    """Batches of ``load(path)`` results in input order; at most two batches are decoded ahead of the consumer."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rescli-decode")
    pending: deque[Future] = deque()
    batch: list[Item] = []
    try:
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) >= 2 * batch_size:
                batch.append(pending.popleft().result())
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        while pending:
            batch.append(pending.popleft().result())
            if len(batch) == batch_size or not pending:
                yield batch
                batch = []
    finally:  # a consumer that stops early (a closed pipe) leaves nothing decoding behind it
        pool.shutdown(wait=False, cancel_futures=True)


def picture_loader(img_size: int, *, draft: bool) -> Callable[[str], Item]:
    """``load(path)`` -> (path, (upright picture, uint8 model input), None), or (path, None, why); never raises.

    ``draft``: JPEGs may decode at a reduced scale (embeddings need only the model's input); explanations keep
    the full picture, since their overlay and peak_xy are in its pixels.
    """
    transform = build_transform(img_size=img_size, train=False)

    def load(path: str) -> Item:
        if isinstance(path, BadInput):
            return str(path), None, path.reason
        try:
            picture = load_rgb(path, draft_size=img_size if draft else None)
            return path, (picture, transform(picture)), None
        except Exception as exc:  # one odd file must not stop a pipeline over thousands
            return path, None, load_failure(exc)

    return load


def decoded(items: list[Item]) -> list[tuple[str, Image.Image, Any]]:
    """(path, picture, model input) of the items that decoded."""
    return [(path, got[0], got[1]) for path, got, _ in items if got is not None]
