"""`rescli dataset`: what a data folder or a label table holds, seen exactly as `finetune` would see it.

The report comes from the same scan, check and split as training (``data.scan_dataset``), so its classes, counts
and broken files are the ones `finetune` would use and skip. Exact duplicates are found by the SHA-1 of each file's
bytes, which the image check computes anyway (and caches), so no file is read twice.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from rescli.data.near_duplicates import Embed, near_duplicate_groups, with_near_duplicates
from rescli.data.scan import DatasetIndex, scan_dataset
from rescli.data.tables import TableOptions
from rescli.data.tasks import label_text

SPLIT_ORDER = ("train", "val", "test")


def describe_dataset(
    data_dir: str | os.PathLike,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    table: TableOptions | None = None,
    near_duplicates: str = "phash",
    embed: Embed | None = None,
) -> dict[str, Any]:
    """A JSON-able report of ``data_dir`` (a folder, or a label table read as ``table`` says); raises RescliError
    where `finetune` would refuse it.

    Keys: root, layout, task, (table,) classes (name -> usable images over all splits; multi-label: images with that
    label), splits (split -> name -> count), images, broken (relative paths), broken_reasons, ignored,
    ignored_reasons, empty_classes, sizes, imbalance_ratio, duplicates, warnings (what finetune would warn of: a
    class that no validation image measures).

    ``near_duplicates``: phash, embeddings (``embed``: paths -> unit vectors), both, or none (exact ones only).
    """
    index = scan_dataset(data_dir, val_split=val_split, seed=seed, workers=workers, progress=progress, table=table)
    splits = {s: index.counts(s) for s in SPLIT_ORDER if s in index.splits}
    classes = {c: sum(counts[c] for counts in splits.values()) for c in index.classes}
    used = [(path, split, label_text(index.task, label, index.classes))
            for split in splits for path, label in index.splits[split]]

    widths = [index.infos[p].width for p, _, _ in used]
    heights = [index.infos[p].height for p, _, _ in used]
    smallest = min(used, key=lambda u: index.infos[u[0]].width * index.infos[u[0]].height)[0] if used else None
    largest = max(used, key=lambda u: index.infos[u[0]].width * index.infos[u[0]].height)[0] if used else None
    sizes = {
        "width": [min(widths), max(widths)] if widths else None,
        "height": [min(heights), max(heights)] if heights else None,
        "smallest": _size_entry(index, smallest),
        "largest": _size_entry(index, largest),
    }
    # Issue #16: near-duplicates (resized, re-encoded, cropped) beside the exact ones; rescli.data.near_duplicates.
    duplicates = with_near_duplicates(find_duplicates(index, used), near_duplicate_groups(
        index, used, method=near_duplicates, embed=embed, workers=workers))
    present = [n for n in classes.values() if n > 0]
    imbalance = round(max(present) / min(present), 3) if present else None

    return {
        "root": str(index.root),
        "layout": index.layout,
        "task": index.task.name,
        **({"table": str(index.table)} if index.table is not None else {}),
        **({"val_split": val_split, "seed": seed} if index.val_drawn else {}),
        "classes": classes,
        "splits": splits,
        "images": len(used),
        "broken": sorted(index.broken),
        "broken_reasons": dict(sorted(index.broken.items())),
        "ignored": list(index.ignored),
        "ignored_reasons": {p: index.ignored_reasons.get(p, "not an image") for p in index.ignored},
        "empty_classes": sorted(set(index.empty_classes)),
        "sizes": sizes,
        "imbalance_ratio": imbalance,
        "duplicates": duplicates,
        "warnings": list(index.warnings),
    }


def _size_entry(index: DatasetIndex, path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    info = index.infos[path]
    return {"path": index.rel(path), "width": info.width, "height": info.height}


def find_duplicates(index: DatasetIndex, used: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Groups of usable images with identical bytes, worst first.

    kind: "label-conflict" (the same picture in two classes, or multi-label with two sets of labels: one is wrong),
    "leak" (the same picture in two splits: validation scores are inflated), or "copy" (repeated within one class
    and split: harmless but counted twice). A table that lists one file twice gives such a group too.
    A group can be both a label conflict and a leak; ``leak`` and ``label_conflict`` say so separately.
    """
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for path, split, cls in used:
        digest = index.infos[path].sha1
        if digest:
            groups.setdefault(digest, []).append((path, split, cls))
    out = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        split_names = sorted({s for _, s, _ in members}, key=SPLIT_ORDER.index)
        class_names = sorted({c for _, _, c in members})
        conflict, leak = len(class_names) > 1, len(split_names) > 1
        out.append({
            "kind": "label-conflict" if conflict else "leak" if leak else "copy",
            "sha1": digest,
            "paths": sorted(index.rel(p) for p, _, _ in members),
            "classes": class_names,
            "splits": split_names,
            "label_conflict": conflict,
            "leak": leak,
        })
    rank = {"label-conflict": 0, "leak": 1, "copy": 2}
    return sorted(out, key=lambda g: (rank[g["kind"]], g["paths"]))
