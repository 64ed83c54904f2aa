"""`rescli embed`: the pooled penultimate features of every input (what the fc layer reads), L2-normalised unless
raw, batch by batch in input order, so any number of inputs streams through in constant memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rescli.insight.batches import decoded_batches, picture_loader
from rescli.insight.network import StagedNet


@dataclass
class EmbeddedBatch:
    paths: list[str]  # the inputs that decoded, in input order
    vectors: np.ndarray  # float32 [len(paths), D]
    errors: list[dict[str, Any]]  # {"path", "error"} for the inputs that did not
    order: list[int] = field(default_factory=list)  # per input, in input order: i >= 0 paths[i], -1 - i errors[i]


def embed_batches(
    paths: Iterable[str], *, net: StagedNet, raw: bool = False, batch_size: int = 32, workers: int = 2
) -> Iterator[EmbeddedBatch]:
    """One EmbeddedBatch per batch of inputs; vectors have unit L2 norm unless ``raw``."""
    load = picture_loader(net.img_size, draft=True)
    for items in decoded_batches(paths, load=load, batch_size=batch_size, workers=workers):
        good = [(path, got[1]) for path, got, _ in items if got is not None]
        errors = [{"path": path, "error": error} for path, got, error in items if got is None]
        order, kept, failed = [], 0, 0
        for _, got, _ in items:
            order.append(kept if got is not None else -1 - failed)
            kept, failed = kept + (got is not None), failed + (got is None)
        vectors = np.zeros((0, 0), dtype=np.float32)
        if good:
            vectors = net.features(torch.stack([image for _, image in good])).numpy()
            if not raw:
                vectors = normalised(vectors)
        yield EmbeddedBatch([path for path, _ in good], vectors.astype(np.float32, copy=False), errors, order)


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def embed_all(paths: Iterable[str], *, net: StagedNet, batch_size: int = 32,
              workers: int = 2) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """Every input's unit vector in memory, for the callers that need all of them at once (similar --in FOLDER,
    label-issues, near-duplicates): (paths that decoded, vectors [N, D], error rows)."""
    kept: list[str] = []
    parts: list[np.ndarray] = []
    errors: list[dict[str, Any]] = []
    for batch in embed_batches(paths, net=net, batch_size=batch_size, workers=workers):
        kept += batch.paths
        errors += batch.errors
        if len(batch.paths):
            parts.append(batch.vectors)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return kept, vectors, errors
