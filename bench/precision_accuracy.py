"""rescli precision check: does bf16 autocast training reach fp32's validation accuracy, within seed noise?

    python bench/precision_accuracy.py                         # seeds 0,1,2; 3 epochs; 64 px; resnet18 from scratch
    python bench/precision_accuracy.py --seeds 0,1,2,3,4 --epochs 2
    python bench/precision_accuracy.py --json

Writes scikit-learn's full digits set (1,797 real scans) as class folders in a temp dir, then for every seed
trains resnet18 (weights none, strategy full) once in fp32 and once in bf16 on the CPU. The same seed gives
the same split and the same initial weights in both precisions, so the comparison is paired: the table shows
each seed's final-epoch validation accuracy in both precisions and their difference, then mean ± sample std
of each column, so the bf16 - fp32 difference can be read against the seed-to-seed spread.
Each run's runtime (from its run.json) is printed, so an explicit bf16 run is seen to train in bf16.
This is a script, not a test: it prints figures; nothing asserts an accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16")


def load_write_digits():
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_digits


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def run_one(args, data_dir: Path, run_dir: Path, *, seed: int, precision: str) -> dict:
    from rescli.train.loop import finetune
    from rescli.train.settings import TrainSettings

    settings = TrainSettings(
        data_dir=str(data_dir), arch="resnet18", weights="none", strategy="full", epochs=args.epochs,
        batch_size=32, img_size=args.img_size, val_split=0.2, seed=seed, precision=precision,
        device="cpu", workers=0,
    )
    t0 = time.perf_counter()
    result = finetune(settings=settings, output=run_dir, show_progress=False)
    seconds = time.perf_counter() - t0
    run_info = json.loads((run_dir / "run.json").read_text())
    runtime = run_info["runtime"]  # e.g. "cpu bf16 channels_last"
    used = runtime.split()[1]
    if used != precision:
        raise SystemExit(f"seed {seed}: asked for --precision {precision}, but the run trained in {runtime!r}")
    last = result["history"][-1]
    return {
        "seed": seed,
        "precision": precision,
        "runtime": runtime,
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "epochs": last["epoch"],
        "best_val_accuracy": result["metrics"]["accuracy"],
        "train_images": run_info["settings"]["train_images"],
        "val_images": run_info["settings"]["val_images"],
        "seconds": round(seconds, 2),
        "run_dir": str(run_dir),
    }


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    by = {(r["seed"], r["precision"]): r for r in runs}
    summary = {}
    for key in ("val_accuracy", "val_loss"):
        cols = {p: [by[s, p][key] for s in seeds] for p in PRECISIONS}
        diff = [b - f for f, b in zip(cols["fp32"], cols["bf16"])]
        summary[key] = {p: mean_std(v) for p, v in cols.items()} | {"bf16-fp32": mean_std(diff)}
    summary["seconds"] = {p: statistics.fmean(by[s, p]["seconds"] for s in seeds) for p in PRECISIONS}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--source-size", type=int, default=64,
                   help="px of the generated digit PNGs (the 8x8 scans upscaled)")
    p.add_argument("--keep", default=None,
                   help="write the data and run folders here instead of a temp dir that is removed")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="rescli-precision-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RESCLI_CACHE_DIR", str(work / "cache"))  # image-check cache: keep it out of ~/.cache
        data_dir = work / "digits"
        n = load_write_digits()(data_dir, size=args.source_size)
        print(f"wrote {n} digit images ({args.source_size} px) to {data_dir}", file=sys.stderr, flush=True)

        runs = []
        t_all = time.perf_counter()
        for seed in seeds:
            for precision in PRECISIONS:
                print(f"seed {seed} {precision} …", file=sys.stderr, flush=True)
                r = run_one(args, data_dir, work / f"runs/seed{seed}-{precision}", seed=seed, precision=precision)
                print(f"  {r['runtime']}: val acc {r['val_accuracy']:.4f}, val loss {r['val_loss']:.4f}, "
                      f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
                runs.append(r)
        total = time.perf_counter() - t_all
    summary = summarize(runs, seeds)

    if args.json:
        report = {"config": vars(args), "runs": runs, "summary": summary, "total_seconds": round(total, 1)}
        print(json.dumps(report, indent=2))
        return

    by = {(r["seed"], r["precision"]): r for r in runs}
    r0 = runs[0]
    print(f"rescli precision check: resnet18 from scratch, full digits ({r0['train_images']} train / "
          f"{r0['val_images']} val), {args.img_size} px, {args.epochs} epochs, batch 32; final-epoch validation")
    print(f"{'seed':>4} {'fp32 acc':>9} {'bf16 acc':>9} {'diff':>8} {'fp32 loss':>10} {'bf16 loss':>10} {'diff':>8}  "
          "runtimes")
    for s in seeds:
        f, b = by[s, "fp32"], by[s, "bf16"]
        d_acc, d_loss = b["val_accuracy"] - f["val_accuracy"], b["val_loss"] - f["val_loss"]
        print(f"{s:>4} {f['val_accuracy']:>9.4f} {b['val_accuracy']:>9.4f} {d_acc:>+8.4f} "
              f"{f['val_loss']:>10.4f} {b['val_loss']:>10.4f} {d_loss:>+8.4f}  {f['runtime']} | {b['runtime']}")
    acc, loss = summary["val_accuracy"], summary["val_loss"]

    def ms(pair, sign=""):
        return f"{pair[0]:{sign}.4f}±{pair[1]:.4f}"

    for name, pairs in (("acc", acc), ("loss", loss)):
        print(f"{'mean±sd':>7} {name}: fp32 {ms(pairs['fp32'])}  bf16 {ms(pairs['bf16'])}  "
              f"bf16-fp32 {ms(pairs['bf16-fp32'], '+')}")
    secs = summary["seconds"]
    print(f"seconds per run (mean): fp32 {secs['fp32']:.1f}  bf16 {secs['bf16']:.1f}   total {total:.0f} s")


if __name__ == "__main__":
    main()
