"""`rescli similar`: the nearest stored images of each query, by the cosine similarity of their embeddings.

The collection is an embeddings file from `rescli embed` (its images are not read again) or a folder, embedded
on the spot. The search is exact (brute force): scikit-learn's NearestNeighbors, or faiss's flat inner-product
index where faiss is installed and the collection holds at least FAISS_FROM vectors, the size from which it
answers faster (bench/insight.py measures both; the figures are in docs/insight.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.inference.inputs import iter_input_paths
from rescli.insight.embed import embed_all, embed_batches, normalised
from rescli.insight.embeddings_file import SUFFIXES, read_embeddings
from rescli.insight.network import StagedNet

#: From this many stored vectors on, faiss (when installed) searches instead of scikit-learn: it answered faster at
#: every size bench/insight.py measured, the smallest being 1,000 (below it both take well under a millisecond).
FAISS_FROM = 1_000

BACKENDS = ("auto", "sklearn", "faiss")


class VectorIndex:
    """Exact nearest neighbours of unit vectors by cosine similarity (the inner product)."""

    def __init__(self, vectors: np.ndarray, *, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise UsageError(f"index backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.size = len(vectors)
        vectors = np.ascontiguousarray(normalised(vectors), dtype=np.float32)
        self.backend = _chosen_backend(backend, self.size)
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(vectors.shape[1])
            self._faiss.add(vectors)
        else:
            from sklearn.neighbors import NearestNeighbors

            # Euclidean on unit vectors ranks exactly as cosine does (|a-b|^2 = 2 - 2 a.b), and scikit-learn runs
            # it through its fast pairwise-distance reduction, without normalising the collection at every query.
            self._sklearn = NearestNeighbors(algorithm="brute", metric="euclidean").fit(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each [Q, min(k, size)], most similar first."""
        k = max(1, min(int(k), self.size))
        queries = np.ascontiguousarray(normalised(queries), dtype=np.float32)
        if self.backend == "faiss":
            sims, idx = self._faiss.search(queries, k)
            return sims, idx
        dist, idx = self._sklearn.kneighbors(queries, n_neighbors=k)
        return 1.0 - dist.astype(np.float32) ** 2 / 2.0, idx


def _chosen_backend(backend: str, size: int) -> str:
    if backend == "sklearn":
        return "sklearn"
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise RescliError("the faiss index needs faiss: pip install 'rescli[faiss]'") from None
        return "sklearn"
    return "faiss" if backend == "faiss" or size >= FAISS_FROM else "sklearn"


def load_collection(source: str | os.PathLike, *, net: StagedNet, batch_size: int = 32,
                    workers: int = 2) -> tuple[list[str], np.ndarray]:
    """(paths, vectors) to search: an embeddings file as it is (made by ``net``'s weights), or a folder embedded now."""
    src = os.fspath(source)
    if os.path.isdir(src):
        events.info(f"embedding the images under {src} (rescli embed writes them once, for reuse with --in FILE)")
        paths, vectors, errors = embed_all(iter_input_paths([src]), net=net, batch_size=batch_size, workers=workers)
        for row in errors:
            events.warn(f"--in: skipped {row['path']}: {row['error']}")
    elif os.path.splitext(src)[1].lower() in SUFFIXES:
        paths, vectors, meta = read_embeddings(src)
        _check_same_model(src, meta, net)
    else:
        raise UsageError(f"--in {src}: not a folder, nor an embeddings file (.npy, .parquet, .jsonl) from rescli embed")
    if not paths:
        raise RescliError(f"--in {src}: no images to compare with")
    return paths, vectors


def _check_same_model(src: str, meta: dict[str, Any], net: StagedNet) -> None:
    if not meta:
        events.warn(f"--in {src}: no {src}.meta.json beside it, so which model made it is unknown; the similarities "
                    f"mean something only if it was {net.source}")
        return
    if meta.get("model_fingerprint") != net.fingerprint:
        raise UsageError(f"--in {src}: made by another model ({meta.get('model')}); vectors of different models "
                         f"cannot be compared: pass that model, or embed the images again with {net.source}")


def similar_batches(
    queries: Iterable[str], *, net: StagedNet, paths: list[str], index: VectorIndex, k: int = 5,
    batch_size: int = 32, workers: int = 2,
) -> Iterator[list[dict[str, Any]]]:
    """Per batch of queries: k rows for each (query, rank, path, similarity), or (query, error); a query that is
    itself in the collection is not its own neighbour."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    keys = [os.path.abspath(p) for p in paths]
    for batch in embed_batches(queries, net=net, batch_size=batch_size, workers=workers):
        found: list[list[dict[str, Any]]] = []
        if batch.paths:
            sims, idx = index.search(batch.vectors, k + 1)
            found = [_neighbours(query, query_sims, query_idx, paths=paths, keys=keys, k=k)
                     for query, query_sims, query_idx in zip(batch.paths, sims, idx)]
        rows: list[dict[str, Any]] = []
        for at in batch.order:  # in input order, a failed query where it came
            error = batch.errors[-1 - at] if at < 0 else None
            rows += found[at] if error is None else [{"query": error["path"], "error": error["error"]}]
        yield rows


def _neighbours(query: str, sims: np.ndarray, idx: np.ndarray, *, paths: list[str], keys: list[str],
                k: int) -> list[dict[str, Any]]:
    own = os.path.abspath(query)
    found = [(int(i), float(s)) for i, s in zip(idx, sims) if i >= 0 and keys[int(i)] != own][:k]
    return [{"query": query, "rank": rank, "path": paths[i], "similarity": round(s, 6)}
            for rank, (i, s) in enumerate(found, start=1)]
