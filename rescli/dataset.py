"""`rescli dataset`: what a data folder holds, seen exactly as `finetune` would see it.

The report comes from the same scan, check and split as training (``data.scan_dataset``), so its classes, counts
and broken files are the ones `finetune` would use and skip. Exact duplicates are found by the SHA-1 of each file's
bytes, which the image check computes anyway (and caches), so no file is read twice.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from rescli import data
from rescli.fileio import shown_name

SPLIT_ORDER = ("train", "val", "test")


def describe_dataset(
    data_dir: str | os.PathLike,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """A JSON-able report of ``data_dir``; raises RescliError where `finetune` would refuse the folder.

    Keys: root, layout, classes (name -> usable images over all splits), splits (split -> name -> count), images,
    broken (relative paths), broken_reasons, ignored, ignored_reasons, empty_classes, sizes, imbalance_ratio,
    duplicates, warnings (what finetune would warn of: a class that no validation image measures).
    """
    index = data.scan_dataset(data_dir, val_split=val_split, seed=seed, workers=workers, progress=progress)
    splits = {s: index.counts(s) for s in SPLIT_ORDER if s in index.splits}
    classes = {c: sum(counts[c] for counts in splits.values()) for c in index.classes}
    used = [(path, split, index.classes[label]) for split in splits for path, label in index.splits[split]]

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
    present = [n for n in classes.values() if n > 0]
    imbalance = round(max(present) / min(present), 3) if present else None

    return {
        "root": str(index.root),
        "layout": index.layout,
        **({"val_split": val_split, "seed": seed} if index.layout == "class-folders" else {}),
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
        "duplicates": find_duplicates(index, used),
        "warnings": list(index.warnings),
    }


def _size_entry(index: data.DatasetIndex, path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    info = index.infos[path]
    return {"path": index.rel(path), "width": info.width, "height": info.height}


def find_duplicates(index: data.DatasetIndex, used: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Groups of usable images with identical bytes, worst first.

    kind: "label-conflict" (the same picture in two classes: one label is wrong), "leak" (the same picture in two
    splits: validation scores are inflated), or "copy" (repeated within one class and split: harmless but counted twice).
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


def tables(report: dict[str, Any]) -> list[Any]:
    """The report as rich tables for people (the CLI prints them; programs use the JSON)."""
    from rich.table import Table
    from rich.text import Text

    def shown(name: str) -> Text:  # file and class names as they are (never rich markup); bytes not UTF-8 as \xNN
        return Text(shown_name(name))

    splits = list(report["splits"])
    counts = Table(title=shown(f"{report['root']} ({report['layout']})"))
    counts.add_column("class")
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_column("total", justify="right")
    for name, total in report["classes"].items():
        counts.add_row(shown(name), *(str(report["splits"][s][name]) for s in splits), str(total))
    counts.add_row("all", *(str(sum(report["splits"][s].values())) for s in splits), str(report["images"]), style="bold")

    summary = Table(show_header=False, title="summary")
    sizes = report["sizes"]
    summary.add_row("usable images", str(report["images"]))
    summary.add_row("broken images (skipped)", str(len(report["broken"])))
    summary.add_row("ignored files", str(len(report["ignored"])))
    if report["empty_classes"]:
        summary.add_row("not classes (no usable images)", shown(", ".join(report["empty_classes"])))
    summary.add_row("width range (px)", "{} - {}".format(*sizes["width"]))
    summary.add_row("height range (px)", "{} - {}".format(*sizes["height"]))
    summary.add_row("smallest image", shown("{path} ({width}x{height})".format(**sizes["smallest"])))
    summary.add_row("class imbalance (largest / smallest)", f"{report['imbalance_ratio']:.2f}")
    kinds = [g["kind"] for g in report["duplicates"]]
    summary.add_row(
        "duplicate groups",
        f"{len(kinds)} ({kinds.count('label-conflict')} label conflict(s), {kinds.count('leak')} split leak(s), "
        f"{kinds.count('copy')} copy(ies))",
    )
    out: list[Any] = [counts, summary]

    if report.get("warnings"):
        warnings = Table(title="warnings (finetune shows them too)", show_header=False)
        warnings.add_column(overflow="fold")
        for message in report["warnings"]:
            warnings.add_row(shown(message))
        out.append(warnings)

    if report["broken"]:
        broken = Table(title="broken images (finetune skips them; --strict stops on them)")
        broken.add_column("path")
        broken.add_column("problem")
        for path, why in report["broken_reasons"].items():
            broken.add_row(shown(path), shown(why))
        out.append(broken)
    if report["ignored"]:
        ignored = Table(title="ignored (not images or not regular files, hidden, outside any class folder, or counted "
                              "elsewhere)")
        ignored.add_column("path")
        ignored.add_column("why")
        for path, why in report["ignored_reasons"].items():
            ignored.add_row(shown(path), shown(why))
        out.append(ignored)
    if report["duplicates"]:
        dups = Table(title="identical files")
        for col in ("kind", "files", "classes", "splits"):
            dups.add_column(col)
        for g in report["duplicates"]:
            dups.add_row(g["kind"], shown("\n".join(g["paths"])), shown(", ".join(g["classes"])),
                         ", ".join(g["splits"]))
        out.append(dups)
    return out
