"""The deployment benchmark of issue #17: every engine side by side, the int8 checks, and predict's peak memory.

    python bench/engines.py                                  # resnet50, 224 px, generated JPEGs
    python bench/engines.py --depth 18
    python bench/engines.py --data ./photos                  # a real folder of class folders (agreement figures)
    python bench/engines.py --model runs/run1 --data ./photos   # an existing run instead of training one
    python bench/engines.py --images 64 --train-images 48 --img-size 64 --depth 18   # a quick smoke run

Steps, each a child process running the rescli CLI as a user would:
  1. the data: --data, or generated 500x375 JPEGs (bench/bench.py's make_photos)
  2. the checkpoint: --model, or `rescli finetune` for --epochs on the data (--weights imagenet where available)
  3. `rescli export --to openvino-int8` and `--to onnx-int8`: the check on the validation split (label agreement,
     accuracy of both, the largest score difference) as the export prints it
  4. `rescli bench MODEL DATA`: img/s per engine end to end from the JPEGs and model-only on in-memory tensors,
     ratios against today's default predict (bf16 where the CPU has it, fp32 elsewhere), from the same run (medians of
     3 rounds each, with the spread)
  5. `rescli predict --model model.int8.xml` over N and 4N inputs: peak memory (max RSS) must stay flat
Then the targets: int8 end to end >= 3x default (resnet50) or >= 2.5x (resnet18), int8 end to end >= 0.85 of its
model-only bound, agreement >= 99 % and accuracy drop <= 0.5 points, peak memory flat. It prints figures and
whether each target is met; nothing asserts a time. The CPU and its features head the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_photos  # noqa: E402  (bench/bench.py, beside this file)

ROOT = Path(__file__).resolve().parent.parent


def rescli(*args: Any, measure_memory: bool = False) -> tuple[str, float | None]:
    """Run ``rescli ARGS``; its stdout, and with ``measure_memory`` its peak RSS in MiB (a wrapper reads it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "rescli", *map(str, args)]
    if measure_memory:  # the child's own peak, read in a wrapper process that runs only it
        cmd = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, file=sys.stderr); "
               "sys.exit(r.returncode)", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rescli {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    peak = float(proc.stderr.strip().splitlines()[-1]) if measure_memory else None
    return proc.stdout, peak


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--data", type=Path, help="A folder of class folders [default: generated JPEGs].")
    p.add_argument("--model", type=Path, help="A checkpoint or run folder [default: train one on the data].")
    p.add_argument("--train-images", type=int, default=400, help="Generated images to train on.")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--weights", default="imagenet", help="Starting weights when training (imagenet or none).")
    p.add_argument("--images", type=int, default=512, help="Images bench times on.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", type=Path, help="Keep the work here [default: a temporary folder].")
    return p.parse_args()


def _checkpoint(args: argparse.Namespace, work: Path, data: Path) -> Path:
    if args.model is not None:
        return args.model
    run = work / "run"
    weights = args.weights
    try:
        rescli("finetune", data, "--depth", args.depth, "--img-size", args.img_size, "--epochs", args.epochs,
               "--weights", weights, "--output", run)
    except SystemExit:
        if weights == "none":
            raise
        print("(ImageNet weights not available here: training from scratch, --weights none)", file=sys.stderr)
        rescli("finetune", data, "--depth", args.depth, "--img-size", args.img_size, "--epochs", args.epochs,
               "--weights", "none", "--output", run)
    return run


def _checks(model: Path, work: Path) -> dict[str, Any]:
    """What export's check found for each int8 format (on the checkpoint's validation split)."""
    found = {}
    for fmt, name in (("openvino-int8", "model.int8.xml"), ("onnx-int8", "model.int8.onnx")):
        out, _ = rescli("export", model, "--to", fmt, "--output", work / name, "--print", "json",
                        "--min-agreement", "0", "--max-drop", "100")  # report the figures, whatever they are
        found[fmt] = json.loads(out)["deployment"]["check"]
    return found


def _memory(model_file: Path, data: Path, work: Path) -> tuple[float, float, int]:
    """predict's peak RSS over the data's images, and over 4x as many inputs (the same files, listed 4 times)."""
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    once, four = work / "once.txt", work / "four.txt"
    once.write_text("\n".join(paths) + "\n")
    four.write_text("\n".join(paths * 4) + "\n")
    peaks = []
    for listing in (once, four):
        _, peak = rescli("predict", f"@{listing}", "--model", model_file, "--format", "jsonl", "-q",
                         measure_memory=True)
        peaks.append(peak or 0.0)
    return peaks[0], peaks[1], len(paths)


def _report(args: argparse.Namespace, benched: dict[str, Any], checks: dict[str, Any],
            memory: tuple[float, float, int]) -> None:
    cpu = benched["cpu"]
    print(f"{cpu['name']} ({', '.join(cpu['features'])}), {cpu['cpus']} CPU(s), {cpu['threads']} thread(s); "
          f"{benched['arch']}, {benched['img_size']} px, {benched['images']} images, batch {benched['batch_size']}")
    print(f"{'engine':<26}{'e2e img/s':>11}{'(spread)':>14}{'x default':>11}{'model img/s':>13}{'e2e/model':>11}"
          f"{'agree':>8}")
    rows = {row["engine"]: row for row in benched["rows"]}
    for row in benched["rows"]:
        name = row["engine"] + (f" ({row['precision']})" if "precision" in row else "")
        if "skipped" in row:
            print(f"{name:<26}skipped: {row['skipped']}")
            continue
        low, high = row["end_to_end_spread"]
        spread = f"({low:.0f}-{high:.0f})"
        print(f"{name:<26}{row['end_to_end_img_s']:>11.1f}{spread:>14}{row['vs_default']:>11.2f}"
              f"{row['model_only_img_s']:>13.1f}"
              f"{row['of_model_bound']:>11.2f}{100 * row['agreement']:>7.1f}%")
    print("\nexport checks on the validation split:")
    for fmt, check in checks.items():
        drop = check.get("accuracy_drop_points")
        drop_text = "n/a" if drop is None else f"{drop:.2f}"
        print(f"  {fmt:<14} agreement {100 * check['agreement']:.2f}% on {check['images']} images; accuracy "
              f"{100 * check.get('accuracy_checkpoint', float('nan')):.2f}% -> "
              f"{100 * check.get('accuracy_export', float('nan')):.2f}% (drop {drop_text} points); "
              f"largest score difference {check['max_score_difference']:.4f}")
    once, four, n = memory
    print(f"\npredict --model model.int8.xml peak memory: {once:.0f} MiB over {n} inputs, {four:.0f} MiB over {4 * n}")
    _targets(args, rows, checks, once, four)


def _targets(args: argparse.Namespace, rows: dict[str, Any], checks: dict[str, Any], once: float,
             four: float) -> None:
    want = 3.0 if args.depth >= 50 else 2.5
    print("\ntargets:")
    for name in ("openvino-int8", "onnxruntime-int8"):
        row = rows.get(name, {})
        if "vs_default" in row:
            print(f"  {name}: {row['vs_default']:.2f}x default predict (target >= {want}): "
                  f"{'met' if row['vs_default'] >= want else 'NOT met'}; {row['of_model_bound']:.2f} of its model-only "
                  f"bound (target >= 0.85): {'met' if row['of_model_bound'] >= 0.85 else 'NOT met'}")
    for fmt, check in checks.items():
        drop = check.get("accuracy_drop_points")
        ok = check["agreement"] >= 0.99 and (drop is None or drop <= 0.5)
        print(f"  {fmt}: agreement >= 99% and drop <= 0.5 points: {'met' if ok else 'NOT met'}")
    print(f"  peak memory flat (4x inputs within 10%): {'met' if four <= 1.1 * once else 'NOT met'}")


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory(prefix="rescli-engines-") as tmp:
        work = args.output or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data or make_photos(work / "photos", args.train_images)
        model = _checkpoint(args, work, data)
        checks = _checks(model, work)
        out, _ = rescli("bench", model, data, "--images", args.images, "--batch-size", args.batch_size,
                        "--format", "json")
        memory = _memory(work / "model.int8.xml", data, work)
        _report(args, json.loads(out), checks, memory)


if __name__ == "__main__":
    main()
