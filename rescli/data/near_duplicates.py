"""Near-duplicates: the same picture after resizing, re-encoding or a small crop, which byte-identical matching
(``report.find_duplicates``) cannot see. Found by perceptual hash, by embeddings, or both (a pair either finds),
and reported like exact duplicates: ``label-conflict`` / ``leak`` / ``copy``, with ``near: true``.

The perceptual hash is pHash (imagehash's ``phash`` with hash_size=16): the picture in grey at 64x64, its 2-D DCT,
and one bit per coefficient of the 16x16 lowest frequencies, set where it is above their median. 256 bits, not
imagehash's default 64: on pictures with little detail (digits on noise) different pictures came within 4 of 64
bits of each other, as close as a resized copy, while with 256 bits they stay 30 or more apart and re-encoded or
resized copies within 6. Written here rather than taken from imagehash: it is these few lines with scipy, which
scikit-learn already brings, where imagehash would add PyWavelets for a hash we do not use. Every pair is compared
(XORs and popcounts, in blocks); each file's hash is cached by its content's SHA-1, outside the data folder.
A crop moves every low frequency a little, so the hash finds only crops of a percent or two; embeddings find more.

Embeddings come from a model the caller provides (``embed``: paths -> unit vectors), since a data folder's report
sits below the packages that run models; two pictures are near-duplicates when the cosine of their vectors is at
least MIN_SIMILARITY.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from rescli.core.cpus import available_cpus
from rescli.core.fileio import atomic_write_text
from rescli.data.checks import default_cache_dir
from rescli.data.images import ImageError, load_rgb

METHODS = ("phash", "embeddings", "both", "none")

#: The hash is HASH_SIDE x HASH_SIDE bits, stored as HASH_WORDS uint64 words.
HASH_SIDE = 16
HASH_WORDS = HASH_SIDE * HASH_SIDE // 64

#: Hashes this many bits apart or fewer (of 256) are the same picture: re-encoded and resized copies land at 0-6,
#: different pictures at 30 or more even where they share their layout (docs/insight.md).
MAX_DISTANCE = 24

#: Embeddings at least this similar (cosine) are the same picture: re-encoded copies stay above 0.999, while a
#: model trained on the folder puts different pictures of one class up to 0.997 (docs/insight.md).
MIN_SIMILARITY = 0.995

Embed = Callable[[Sequence[str]], np.ndarray]

_BLOCK = 2048

SPLIT_ORDER = ("train", "val", "test")


def perceptual_hash(path: str) -> np.ndarray:
    """The pHash of the picture at ``path`` (upright, as training sees it) as HASH_WORDS uint64; raises ImageError."""
    from scipy.fft import dctn

    side = 4 * HASH_SIDE
    grey = load_rgb(path, draft_size=side).convert("L").resize((side, side), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=np.float64), type=2)[:HASH_SIDE, :HASH_SIDE]
    return np.packbits((low > np.median(low)).flatten()).view(">u8").astype(np.uint64)


def hash_all(paths: Sequence[str], sha1s: Sequence[str], *, workers: int | None = None) -> list[np.ndarray | None]:
    """The pHash of each path (None where it cannot be read), reusing cached hashes of the same content."""
    cache_file = default_cache_dir() / "phash.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    todo = [i for i, digest in enumerate(sha1s) if not (digest and isinstance(cache.get(digest), str))]

    def one(i: int) -> np.ndarray | None:
        try:
            return perceptual_hash(paths[i])
        except ImageError:
            return None

    with ThreadPoolExecutor(max(1, workers or available_cpus()), thread_name_prefix="rescli-phash") as pool:
        fresh = dict(zip(todo, pool.map(one, todo)))
    for i, value in fresh.items():
        if value is not None and sha1s[i]:
            cache[sha1s[i]] = value.astype(">u8").tobytes().hex()
    if fresh:
        try:
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:  # the cache only saves time; it shares its folder with the image check's, which warns once
            pass
    return [fresh[i] if i in fresh else _from_hex(cache[sha1s[i]]) for i in range(len(paths))]


def _from_hex(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def hash_pairs(hashes: np.ndarray, *, max_distance: int = MAX_DISTANCE) -> list[tuple[int, int, float]]:
    """(i, j, bits apart) for every i < j whose hashes ([N, HASH_WORDS] uint64) differ in at most ``max_distance``
    bits."""
    out: list[tuple[int, int, float]] = []
    block_rows = 256  # [256, N, HASH_WORDS] words at a time: 80 MB for 10,000 images
    for start in range(0, len(hashes), block_rows):
        block = hashes[start:start + block_rows]
        distance = popcount(block[:, None, :] ^ hashes[None, start:, :]).sum(-1, dtype=np.int32)
        rows, cols = np.nonzero(distance <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if start + r < start + c:
                out.append((start + r, start + c, float(distance[r, c])))
    return out


def similar_pairs(vectors: np.ndarray, *, min_similarity: float = MIN_SIMILARITY) -> list[tuple[int, int, float]]:
    """(i, j, 1 - cosine) for every i < j whose unit vectors have a cosine of at least ``min_similarity``."""
    out: list[tuple[int, int, float]] = []
    vectors = np.asarray(vectors, dtype=np.float32)
    for start in range(0, len(vectors), _BLOCK):
        sims = vectors[start:start + _BLOCK] @ vectors[start:].T
        rows, cols = np.nonzero(sims >= min_similarity)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if r < c:
                out.append((start + r, start + c, round(1.0 - float(sims[r, c]), 6)))
    return out


def near_duplicate_groups(
    index: Any, used: list[tuple[str, str, str]], *, method: str = "phash", embed: Embed | None = None,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Groups of usable images that are near-duplicates of each other and not all byte-identical.

    ``index``: the DatasetIndex (its check's SHA-1s and relative paths); ``used``: (path, split, class) of every
    usable image. Each group is {kind, near: True, method, distance (the largest of its pairs: bits apart for
    phash, 1 - cosine for embeddings), paths, classes, splits, label_conflict, leak}.
    """
    if method == "none" or len(used) < 2:
        return []
    copies: dict[str, list[tuple[str, str, str]]] = {}
    for entry in used:  # one representative per content: exact copies are grouped by report.find_duplicates
        copies.setdefault(index.infos[entry[0]].sha1 or entry[0], []).append(entry)
    digests = list(copies)
    firsts = [copies[d][0][0] for d in digests]
    pairs: list[tuple[int, int, float, str]] = []
    if method in ("phash", "both"):
        hashes = hash_all(firsts, digests, workers=workers)
        known = [i for i, h in enumerate(hashes) if h is not None]
        array = np.asarray([hashes[i] for i in known], dtype=np.uint64).reshape(len(known), HASH_WORDS)
        pairs += [(known[i], known[j], d, "phash") for i, j, d in hash_pairs(array)]
    if method in ("embeddings", "both"):
        if embed is None:
            raise ValueError("near-duplicates by embeddings need an embed function (a model)")
        pairs += [(i, j, d, "embeddings") for i, j, d in similar_pairs(embed(firsts))]
    return [_group(members, copies, digests, index) for members in _components(pairs, len(digests))]


def _components(pairs: list[tuple[int, int, float, str]], n: int) -> list[list[tuple[int, int, float, str]]]:
    """The pairs of each connected group (union-find over the representatives)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[tuple[int, int, float, str]]] = {}
    for pair in pairs:
        groups.setdefault(root(pair[0]), []).append(pair)
    return list(groups.values())


def _group(pairs: list[tuple[int, int, float, str]], copies: dict[str, list[tuple[str, str, str]]],
           digests: list[str], index: Any) -> dict[str, Any]:
    members = sorted({k for i, j, _, _ in pairs for k in (i, j)})
    entries = [e for k in members for e in copies[digests[k]]]
    splits = sorted({s for _, s, _ in entries}, key=SPLIT_ORDER.index)
    classes = sorted({c for _, _, c in entries})
    conflict, leak = len(classes) > 1, len(splits) > 1
    methods = sorted({m for *_, m in pairs})
    return {
        "kind": "label-conflict" if conflict else "leak" if leak else "copy",
        "near": True,
        "method": "+".join(methods),
        "distance": max(d for _, _, d, _ in pairs),
        "paths": sorted(index.rel(p) for p, _, _ in entries),
        "classes": classes,
        "splits": splits,
        "label_conflict": conflict,
        "leak": leak,
    }


def with_near_duplicates(exact: list[dict[str, Any]], near: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact groups (marked ``near: false``) and near ones in one list, worst kind first, exact before near."""
    rank = {"label-conflict": 0, "leak": 1, "copy": 2}
    groups = [{**g, "near": False} for g in exact] + near
    return sorted(groups, key=lambda g: (rank[g["kind"]], g["near"], g["paths"]))
