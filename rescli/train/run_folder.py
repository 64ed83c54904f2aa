"""Run folders: where a run's files go, who may write there, and what a kill left behind.

A run folder is written by one process at a time: ``RunFolderLock`` holds an exclusive ``flock`` on the
folder itself (no lock file to leave behind; the kernel drops the lock when the process dies, even on
SIGKILL). Under the lock, temp files that an earlier, killed writer left (``fileio``'s
``.<name>.<hex>.tmp``) are removed: nobody else can be writing them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import atomic_write_text
from rescli.core.paths import refuse_inside_data
from rescli.data.layout import data_folder
from rescli.data.scan import DatasetIndex
from rescli.data.splits import Sample
from rescli.models.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)

#: What fileio.atomic_path names its temp files: ``.<target name>.<12 hex digits>.tmp``.
STALE_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


#: Files a run (finetune, evaluate, degradation) writes into its folder; a folder holding others is not ours.
RUN_FILE_MARKERS = ("run.json", "last.pt", "best.pt", "degradation.json")


def new_run_dir(base: str | os.PathLike = "runs") -> Path:
    """runs/run1, runs/run2, …: mkdir is atomic, so two runs started together never share a folder."""
    base = Path(base)
    _mkdir(base, parents=True, exist_ok=True)
    taken = [int(p.name[3:]) for p in base.glob("run*") if p.name[3:].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        candidate = base / f"run{n}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise _cannot_create(candidate, exc) from None


def _mkdir(path: Path, **kwargs: bool) -> None:
    try:
        path.mkdir(**kwargs)
    except FileExistsError:
        raise UsageError(f"{path}: exists and is not a folder") from None
    except OSError as exc:
        raise _cannot_create(path, exc) from None


def _cannot_create(path: Path, exc: OSError) -> RescliError:
    return RescliError(
        f"cannot create run folder {path}: {exc.strerror or exc}; choose a writable place with --output DIR"
    )


def check_output_dir(out: Path) -> None:
    """An existing --output folder must be empty, or hold only what an earlier, killed writer left behind."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if any((out / name).exists() for name in RUN_FILE_MARKERS) or any(out.glob("*.pt")):
        raise UsageError(
            f"--output {out}: already holds a run; choose a new folder, or continue it with --resume {out}"
        )
    others = sorted(p.name for p in out.iterdir() if not STALE_TEMP.match(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
        raise UsageError(f"--output {out}: not empty (holds {shown}); choose a new or empty folder")


class RunFolderLock:
    """An exclusive lock on a run folder for as long as one run writes it; a second writer is refused at once."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the checks on the folder's contents still apply
            return self
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError as exc:
            raise RescliError(f"cannot open run folder {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RescliError(
                f"{self.folder} is being written by another rescli process; wait for it to finish, "
                "or choose another --output"
            ) from None
        self._fd = fd
        remove_stale_temps(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete the temp files a killed atomic write left in ``folder`` (call only while holding its lock)."""
    removed: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        if STALE_TEMP.match(path.name) and path.is_file():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


# What a new run writes into its folder before training starts (its scan's skipped list, an --lr auto curve).
PREPARATION_FILES = ("skipped.txt", "lr_find.png")


def abandon_unstarted_run(run_dir: Path, *, created: bool) -> None:
    """A new run that failed before training started (weights that cannot be had, a folder with no validation
    image, an interrupt): remove what it wrote, and the folder if this run made it, so that the same command, run
    again once the cause is fixed, is not refused for a folder that holds no run."""
    for name in PREPARATION_FILES:
        try:
            (run_dir / name).unlink()
        except OSError:
            pass
    remove_stale_temps(run_dir)
    if created:
        try:
            run_dir.rmdir()  # only when empty: whatever else is there stays
        except OSError:
            pass


def open_new_run(output: str | os.PathLike | None, *, data_dir: str | os.PathLike) -> tuple[Path, RunFolderLock]:
    """The folder of a new run, locked: --output (new, or empty), else the next runs/runN; never inside ``data_dir``
    (a label table's: the folder holding it).

    The contents are checked after the lock is taken, so a run that finished between a check and the lock is seen.
    """
    data = data_folder(data_dir)
    if output is None:
        refuse_inside_data(Path("runs"), data, what="the run folder")
        out = new_run_dir()
    else:
        out = Path(output).expanduser()
        refuse_inside_data(out, data, what="--output")
        check_output_dir(out)  # before mkdir: a usage error creates nothing
        _mkdir(out, parents=True, exist_ok=True)
    lock = RunFolderLock(out).acquire()
    try:
        check_output_dir(out)
    except RescliError:
        lock.release()
        raise
    return out, lock


HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})
    atomic_write_text(path, buf.getvalue())


def save_checkpoint_file(ckpt: dict[str, Any], path: Path) -> None:
    """save_checkpoint (atomic: temp file + rename), with a disk-full or permission error said plainly."""
    try:
        save_checkpoint(ckpt, path)
    except OSError as exc:
        raise RescliError(
            f"could not write {path}: {exc.strerror or exc}; the previous {path.name}, if any, is intact"
        ) from None


def report_scan(index: DatasetIndex, run_dir: Path | None) -> None:
    """Name every skipped file once on stderr, and list them in run_dir/skipped.txt; warn of what index.warnings holds.

    skipped.txt is a path list: names that are not UTF-8 keep their bytes (fileio), so each line names its file;
    a tab or line break inside a name is written as \\t, \\n or \\r so that a name cannot split its line.
    """
    from rescli.core.fileio import shown_name

    for message in index.warnings:
        events.warn(message)
    for rel, why in index.broken.items():
        events.warn(f"skipped broken image {shown_name(rel)}: {why}")
    if index.empty_classes:
        empty = ", ".join(shown_name(c) for c in sorted(set(index.empty_classes)))
        events.info(f"not a class (no usable images): {empty}")
    if index.ignored:
        shown = ", ".join(map(shown_name, index.ignored[:5]))
        more = f" (+{len(index.ignored) - 5} more)" if len(index.ignored) > 5 else ""
        events.info(f"ignored {len(index.ignored)} file(s) that are not images or not in a class folder: "
                     f"{shown}{more}")
    if run_dir is not None:
        def one_line(text: str) -> str:
            return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

        lines = [f"broken\t{one_line(rel)}\t{one_line(why)}" for rel, why in index.broken.items()]
        lines += [f"ignored\t{one_line(rel)}\t{one_line(index.ignored_reasons.get(rel, 'not an image'))}"
                  for rel in index.ignored]
        lines += [f"empty\t{one_line(rel)}\tno usable images" for rel in sorted(set(index.empty_classes))]
        atomic_write_text(run_dir / "skipped.txt", "".join(line + "\n" for line in lines))


def run_finished(run_dir: Path) -> bool:
    """Whether the run's final evaluation completed (runs from before the marker: when metrics.json exists)."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return bool(info["finished"]) if "finished" in info else (run_dir / "metrics.json").is_file()


def data_record(index: DatasetIndex) -> dict[str, Any]:
    """The resolved data folder (and label table) and the exact files (relative paths, labels: multi-label, the
    class indices of each image) of both splits, plus a short content hash of every training image: evaluate scores
    the held-out images and counts trained-on ones elsewhere; --resume keeps the split file for file."""

    def part(split: str) -> dict[str, list]:
        samples = index.splits.get(split, [])
        return {"paths": [index.rel(p) for p, _ in samples], "labels": [index.task.record(y) for _, y in samples]}

    train_hashes = [
        index.infos[p].sha1[:16] for p, _ in index.splits["train"] if p in index.infos and index.infos[p].sha1
    ]
    return {
        "root": str(Path(index.root).resolve()),
        "layout": index.layout,
        **({"table": str(index.table.resolve())} if index.table is not None else {}),
        "splits": {"train": part("train"), "val": part("val")},
        "train_sha1": train_hashes,
    }


def restore_split(index: DatasetIndex, state: dict[str, Any]) -> DatasetIndex:
    """A resumed run's index: the same classes (else one clear refusal), and the stored split file for file.

    Images added since the run started are left out (they would otherwise land in either split and mix
    validation images into training); images of the split that are gone or broken now are skipped.
    """
    stored = list(state["classes"])
    if index.classes != stored:
        new = sorted(set(index.classes) - set(stored))
        gone = sorted(set(stored) - set(index.classes))
        parts = (f"new: {', '.join(new)}" if new else "", f"gone: {', '.join(gone)}" if gone else "")
        what = "; ".join(part for part in parts if part) or "same names in another order"
        raise RescliError(
            f"--resume: the classes of {index.root} changed since the run started ({what}); a resumed run must keep "
            f"its classes. Restore them, or start a new run"
        )
    if index.task.name != state.get("task", index.task.name):
        raise RescliError(f"--resume: {index.source} reads as {index.task.name} now, but the run is {state['task']}")
    record = state.get("data")
    if not record:  # a last.pt from before stored splits: the split is drawn again from the seed, as it was then
        return index
    root = Path(record["root"])
    usable = {p for split in ("train", "val") for p, _ in index.splits.get(split, [])}
    kept: dict[str, list[Sample]] = {}
    listed: set[str] = set()
    for split in ("train", "val"):
        entries = record["splits"][split]
        paths = [str(root / rel) for rel in entries["paths"]]
        listed.update(paths)
        kept[split] = [(p, index.task.from_record(y)) for p, y in zip(paths, entries["labels"]) if p in usable]
    missing = len(listed) - sum(len(v) for v in kept.values())
    added = len(usable - listed)
    if added:
        events.info(
            f"resume: {added} image(s) added to {root} since the run started are left out; the run keeps its split"
        )
    if missing:
        events.warn(
            f"resume: {missing} image(s) of the run's split are gone or unreadable now; training goes on without them"
        )
    index.splits = {**kept, **({"test": index.splits["test"]} if "test" in index.splits else {})}
    return index


def load_resume(resume: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UsageError(f"--resume {path}: holds no training state (resume from last.pt, not best.pt)")
    return path.parent, ckpt
