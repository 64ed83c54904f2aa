"""Multi-label figures for docs/multilabel.md: rescli (and fastai, where it is installed) on the composite-digits set,
and the time rescli takes to read a large label table whose images are already in the check cache.

    python bench/multilabel.py                                  # 2,000 pictures, 64 px, resnet18 from scratch, 8 epochs
    python bench/multilabel.py --fastai-python /work/fastai-venv/bin/python --threads 2
    python bench/multilabel.py --images 300 --epochs 1 --no-fastai          # a quick check that the script runs
    python bench/multilabel.py --phases table --table-rows 100000           # reading a 100,000-row table

Phases (--phases, comma-separated; each runs in its own process):

  rescli   `rescli finetune labels.csv --multi-label --weights none --img-size 64 --epochs 8` as a library call,
           rescli's other defaults, the split of the table's is_valid column; prints the wall time of the call (data
           checks, training and the final evaluation; imports and interpreter start-up left out), micro F1 at the
           thresholds finetune tuned on the validation rows, and micro F1 at 0.5 (fastai's usual threshold)
  fastai   bench/fastai_compare.py multi on the same table (same images, split, epochs, size), in the Python given by
           --fastai-python (fastai is not a rescli dependency); skipped where that Python is missing
  table    a table of --table-rows rows, one tiny image a row: one scan fills the check cache, then the time of a
           second scan (reading the table, every image's cached check, the split) is printed

The set is scripts/make_multilabel_digits.py's: 1-3 distinct digits per picture, labels.csv with path, labels and
is_valid. A script, not a test: it prints one JSON object a phase, nothing asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASTAI_PYTHON = "/work/fastai-venv/bin/python"


def make_set(out: Path, *, images: int, size: int) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_multilabel_digits import write_set

    if not (out / "labels.csv").is_file():
        write_set(out, images=images, size=size, valid=0.2, seed=0)
    return out / "labels.csv"


def rescli_phase(table: Path, run_dir: Path, *, epochs: int, size: int, threads: int | None) -> dict:
    import torch

    from rescli.train.loop import finetune
    from rescli.train.settings import TrainSettings

    if threads:
        torch.set_num_threads(threads)
    settings = TrainSettings(data_dir=str(table), weights="none", img_size=size, epochs=epochs, multi_label=True)
    started = time.perf_counter()
    result = finetune(settings=settings, output=run_dir)
    seconds = time.perf_counter() - started
    metrics = result["metrics"]
    return {"tool": "rescli", "seconds": round(seconds, 1), "micro_f1": round(metrics["micro_f1"], 4),
            "micro_f1_at_0.5": round(_micro_f1_at_half(run_dir / "predictions.csv"), 4),
            "mean_average_precision": round(metrics["mean_average_precision"], 4),
            "valid": metrics["n"], "batch_size": _batch(run_dir)}


def _batch(run_dir: Path) -> int:
    return int(json.loads((run_dir / "run.json").read_text())["settings"]["batch_size"])


def _micro_f1_at_half(predictions: Path) -> float:
    """Micro F1 of predictions.csv's probabilities at 0.5: the temperature does not move a decision at 0.5."""
    tp = fp = fn = 0
    with open(predictions, newline="") as f:
        for row in csv.DictReader(f):
            true = set(row["true"].split())
            for column, value in row.items():
                if column.startswith("score:"):
                    label, predicted = column[len("score:"):], float(value) >= 0.5
                    tp += predicted and label in true
                    fp += predicted and label not in true
                    fn += (not predicted) and label in true
    return 2 * tp / max(1, 2 * tp + fp + fn)


def fastai_phase(table: Path, *, python: str, epochs: int, size: int, threads: int | None) -> dict:
    if not Path(python).exists():
        return {"tool": "fastai", "skipped": f"{python} not found (pass --fastai-python)"}
    cmd = [python, str(ROOT / "bench" / "fastai_compare.py"), "multi", str(table), "--epochs", str(epochs),
           "--size", str(size)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"tool": "fastai", **json.loads(done.stdout.strip().splitlines()[-1])}


def table_phase(folder: Path, *, rows: int) -> dict:
    import numpy as np
    from PIL import Image

    from rescli.data.scan import scan_dataset
    from rescli.data.tables import TableOptions

    table = folder / "labels.csv"
    if not table.is_file():
        rng = np.random.default_rng(0)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "labels"])
            for i in range(rows):
                name = f"images/{i:06d}.png"
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / name)
                writer.writerow([name, " ".join(sorted({f"l{int(k)}" for k in rng.integers(0, 10, 2)}))])
    options = TableOptions(multi_label=True)
    first = time.perf_counter()
    scan_dataset(table, table=options)  # every image checked once, the results cached
    filled = time.perf_counter() - first
    started = time.perf_counter()
    index = scan_dataset(table, table=options)
    seconds = time.perf_counter() - started
    return {"phase": "table", "rows": rows, "seconds_with_cache": round(seconds, 2),
            "seconds_first_scan": round(filled, 1), "train": len(index.splits["train"]),
            "val": len(index.splits["val"])}


def _child(args: argparse.Namespace, phase: str, work: Path) -> dict:
    """Run one phase in a fresh process (no state shared between the tools), and read its JSON line."""
    cmd = [sys.executable, __file__, "--child", phase, "--work", str(work), "--epochs", str(args.epochs),
           "--size", str(args.size), "--images", str(args.images), "--table-rows", str(args.table_rows)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"phase": phase, "failed": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="rescli,fastai")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both tools [default: torch's]")
    parser.add_argument("--fastai-python", default=FASTAI_PYTHON)
    parser.add_argument("--no-fastai", action="store_true")
    parser.add_argument("--table-rows", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=None, help="where the sets and runs go [default: a temp folder]")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rescli-multilabel-"))
    if args.child == "rescli":
        table = make_set(work / f"digits-{args.images}-{args.size}", images=args.images, size=args.size)
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
        os.rmdir(run_dir)  # finetune makes it
        print(json.dumps(rescli_phase(table, run_dir, epochs=args.epochs, size=args.size, threads=args.threads)))
        return
    if args.child == "table":
        print(json.dumps(table_phase(work / f"table-{args.table_rows}", rows=args.table_rows)))
        return
    os.environ.setdefault("RESCLI_CACHE_DIR", str(work / "cache"))
    for phase in args.phases.split(","):
        if phase == "fastai":
            if args.no_fastai:
                continue
            table = make_set(work / f"digits-{args.images}-{args.size}", images=args.images, size=args.size)
            print(json.dumps(fastai_phase(table, python=args.fastai_python, epochs=args.epochs, size=args.size,
                                          threads=args.threads)), flush=True)
        else:
            print(json.dumps(_child(args, phase, work)), flush=True)


if __name__ == "__main__":
    main()
