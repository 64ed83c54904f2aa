"""fastai on the same images and the same split as a rescli run: wall time and accuracy, for docs/performance.md.

Runs in an environment with fastai installed (not a rescli dependency), e.g.:

    python3 -m venv /tmp/fastai-venv && /tmp/fastai-venv/bin/pip install fastai
    /tmp/fastai-venv/bin/python bench/fastai_compare.py single DATA_DIR --val-from RUN_DIR --epochs 3 --size 32
    /tmp/fastai-venv/bin/python bench/fastai_compare.py multi labels.csv --epochs 8 --size 64

single: a class-folder DATA_DIR, resnet18 from scratch (`vision_learner(..., pretrained=False)`), `fit_one_cycle`
        with fastai's defaults (batch 64, its own LR default unless --lr), validated on the images that the rescli run
        RUN_DIR held out (the paths in RUN_DIR/predictions.csv), so both tools score the same images.
multi:  a table with `path`, `labels` (space-separated) and `is_valid` columns (scripts/make_multilabel_digits.py
        writes one); micro F1 at fastai's usual threshold 0.5 (`F1ScoreMulti(average='micro')`).
Prints one JSON object: seconds (the whole fit, data loading included), the metric, the settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def single(args: argparse.Namespace) -> dict:
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Resize,
        accuracy,
        get_image_files,
        parent_label,
        resnet18,
        vision_learner,
    )

    held_out = {str(Path(r["path"]).resolve()) for r in csv.DictReader(open(Path(args.val_from) / "predictions.csv"))}
    started = time.perf_counter()
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
        splitter=lambda items: ([i for i, p in enumerate(items) if str(Path(p).resolve()) not in held_out],
                                [i for i, p in enumerate(items) if str(Path(p).resolve()) in held_out]),
        item_tfms=Resize(args.size),
    )
    dls = block.dataloaders(args.data, bs=args.batch, num_workers=args.workers)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    learn.fit_one_cycle(args.epochs, **({"lr_max": args.lr} if args.lr else {}))
    seconds = time.perf_counter() - started
    _, acc = learn.validate()
    return {"task": "single", "seconds": round(seconds, 1), "accuracy": round(float(acc), 4),
            "train": len(dls.train_ds), "valid": len(dls.valid_ds)}


def multi(args: argparse.Namespace) -> dict:
    import pandas as pd
    from fastai.vision.all import (
        ColReader,
        ColSplitter,
        DataBlock,
        F1ScoreMulti,
        ImageBlock,
        MultiCategoryBlock,
        Resize,
        resnet18,
        vision_learner,
    )

    table = Path(args.data)
    frame = pd.read_csv(table)
    frame["is_valid"] = frame["is_valid"].astype(bool)
    started = time.perf_counter()
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader("path", pref=f"{table.parent}/"),
        get_y=ColReader("labels", label_delim=" "), splitter=ColSplitter("is_valid"), item_tfms=Resize(args.size),
    )
    dls = block.dataloaders(frame, bs=args.batch, num_workers=args.workers)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=F1ScoreMulti(thresh=0.5, average="micro"))
    learn.fit_one_cycle(args.epochs, **({"lr_max": args.lr} if args.lr else {}))
    seconds = time.perf_counter() - started
    _, f1 = learn.validate()
    return {"task": "multi", "seconds": round(seconds, 1), "micro_f1": round(float(f1), 4),
            "train": len(dls.train_ds), "valid": len(dls.valid_ds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["single", "multi"])
    parser.add_argument("data")
    parser.add_argument("--val-from",
                        help="single: a rescli run folder whose predictions.csv lists the held-out images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="fastai's default")
    parser.add_argument("--lr", type=float, default=None, help="default: fastai's own")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    _threads(args.threads)
    result = single(args) if args.task == "single" else multi(args)
    print(json.dumps({**result, "epochs": args.epochs, "size": args.size, "batch": args.batch}))


if __name__ == "__main__":
    main()
