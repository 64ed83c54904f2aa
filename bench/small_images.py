"""rescli at 32 px against a minimal training loop over the same tensors: what the loop itself costs.

    python bench/small_images.py                                   # 5,000 digits, finetune and degradation
    python bench/small_images.py --phases finetune,minimal --repeat 3
    python bench/small_images.py --data ./my_small_images --epochs 3

The images are scikit-learn's 1,797 UCI digit scans at 32 px, each once, then jittered copies (a shift of up to
2 px and a rotation of up to 10 degrees) up to --images. Phases, each in its own process, in rounds:

  finetune             `rescli finetune DATA --weights none --img-size 32 --epochs E` as a library call (rescli's
                       defaults: batch, precision, cached images), from the files
  minimal              the same network, batch, precision, optimiser, schedule and split, as a bare loop over
                       the images decoded once into one uint8 tensor: a training pass and a validation pass an epoch
  degradation          `rescli degradation DATA --depths 20,56 --epochs E` (four CIFAR-style nets)
  degradation_minimal  the same four nets, recipe and passes (train, validation, training-set error) as bare loops

Both sides are timed from the call to the end, imports and interpreter start-up left out; the minimal loops
include decoding the images once. A script, not a test: it prints figures, nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEGRADATION_NETS = ("plain20", "resnet20", "plain56", "resnet56")


def make_digits(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, rng = load_digits(), np.random.default_rng(0)
    for k in range(n):
        i = k % len(digits.images)
        ink = (255 - digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(ink, "L").resize((32, 32), Image.BICUBIC)
        if k >= len(digits.images):  # a jittered copy of a scan already written
            shift = tuple(int(v) for v in rng.integers(-2, 3, 2))
            img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=255, translate=shift)
        cls = folder / NAMES[digits.target[i]]
        cls.mkdir(parents=True, exist_ok=True)
        img.save(cls / f"{cls.name}_{k:05d}.png")
    return folder


# --- the minimal loop ---------------------------------------------------------------------------------------------

def _tensors(samples):
    import numpy as np
    import torch
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p, _ in samples]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor([y for _, y in samples])


def minimal_train(model, train, val, *, epochs, batch, runtime, lr, weight_decay, label_smoothing, train_error=False):
    """A bare loop: AdamW (fused), warmup + cosine (OneCycleLR), gradient clipping; validation after each epoch."""
    import torch

    mf = runtime.memory_format
    model.to(memory_format=mf)
    (x_tr, y_tr), (x_va, y_va) = train, val
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    steps = epochs * math.ceil(len(x_tr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def accuracy(x, y):
        right = 0
        with torch.inference_mode(), runtime.autocast():
            for i in range(0, len(x), 2 * batch):
                right += int((model(((x[i:i + 2 * batch] - mean) / std).contiguous(memory_format=mf)).argmax(1)
                              == y[i:i + 2 * batch]).sum())
        return right / len(x)

    epoch_seconds, val_acc = [], 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), batch):
            idx = order[i:i + batch]
            with runtime.autocast():
                loss = loss_fn(model(((x_tr[idx] - mean) / std).contiguous(memory_format=mf)).float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
        val_acc = accuracy(x_va, y_va)
        if train_error:
            accuracy(x_tr, y_tr)
        epoch_seconds.append(time.perf_counter() - started)
    return epoch_seconds, val_acc


def _split(args):
    from rescli.data.scan import scan_dataset

    index = scan_dataset(args.data, val_split=0.2, seed=0)
    return index, index.splits["train"], index.splits["val"]


# --- phases (in a child process) ------------------------------------------------------------------------------------

def phase_finetune(args) -> dict:
    from rescli.train.loop import finetune
    from rescli.train.settings import TrainSettings

    out = Path(tempfile.mkdtemp(prefix="rescli-small-")) / "run"
    settings = TrainSettings(data_dir=args.data, weights="none", img_size=32, epochs=args.epochs)
    started = time.perf_counter()
    result = finetune(settings=settings, output=out)
    wall = time.perf_counter() - started
    run = json.loads((out / "run.json").read_text())
    later = [float(r["train_seconds"]) for r in result["history"][1:]]
    n_train = run["settings"]["train_images"]
    return {"wall_s": wall, "images_per_s": n_train / (sum(later) / len(later)),
            "val_accuracy": result["metrics"]["accuracy"], "batch": run["settings"]["batch_size"],
            "runtime": run["runtime"]}


def phase_minimal(args) -> dict:
    import torch

    from rescli.models.registry import create_model
    from rescli.train.settings import TrainSettings, auto_batch_size, training_runtime

    started = time.perf_counter()
    index, train, val = _split(args)
    settings = TrainSettings(data_dir=args.data, weights="none", img_size=32, epochs=args.epochs)
    batch = auto_batch_size(img_size=32, train_images=len(train))
    runtime = training_runtime(settings)
    torch.manual_seed(0)
    model = create_model("resnet18", len(index.classes))
    seconds, acc = minimal_train(model, _tensors(train), _tensors(val), epochs=args.epochs, batch=batch,
                                 runtime=runtime, lr=2e-3, weight_decay=0.05, label_smoothing=0.1)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "images_per_s": len(train) / (sum(seconds[1:]) / len(seconds[1:])), "val_accuracy": acc,
            "batch": batch, "runtime": runtime.describe()}


def phase_degradation(args) -> dict:
    from rescli.experiments.degradation import run_degradation

    out = Path(tempfile.mkdtemp(prefix="rescli-small-deg-")) / "deg"
    started = time.perf_counter()
    result = run_degradation(data_dir=args.data, depths=(20, 56), epochs=args.epochs, output=out)
    return {"wall_s": time.perf_counter() - started, "runtime": result["recipe"]["runtime"],
            "final_val_error": {m["arch"]: m["final_val_error"] for m in result["models"]}}


def phase_degradation_minimal(args) -> dict:
    import torch

    from rescli.core.runtime import select_runtime
    from rescli.models.registry import create_model

    started = time.perf_counter()
    index, train, val = _split(args)
    runtime = select_runtime()  # degradation trains in the device's fast precision, channels_last
    tensors = _tensors(train), _tensors(val)
    errors = {}
    for arch in DEGRADATION_NETS:
        torch.manual_seed(0)
        model = create_model(arch, len(index.classes), {"shortcut": "A"} if arch.startswith("resnet") else {})
        _, acc = minimal_train(model, *tensors, epochs=args.epochs, batch=64, runtime=runtime, lr=2e-3,
                               weight_decay=0.05, label_smoothing=0.0, train_error=True)
        errors[arch] = round(1 - acc, 4)
    return {"wall_s": time.perf_counter() - started, "runtime": runtime.describe(), "final_val_error": errors}


PHASES = {"finetune": phase_finetune, "minimal": phase_minimal, "degradation": phase_degradation,
          "degradation_minimal": phase_degradation_minimal}


def _median(runs: list[dict]) -> dict:
    good = sorted((r for r in runs if "wall_s" in r), key=lambda r: r["wall_s"])
    if not good:
        return runs[0]
    return {**good[(len(good) - 1) // 2], "rounds_wall_s": [round(r["wall_s"], 1) for r in runs if "wall_s" in r]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a folder of class folders of small images (default: generated digits)")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--repeat", type=int, default=1, help="rounds over all phases; each phase reports its median")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    if args.data is None:
        args.data = str(make_digits(Path(tempfile.mkdtemp(prefix="rescli-digits-")), args.images))
    rounds: dict[str, list[dict]] = {name: [] for name in args.phases.split(",")}
    for k in range(max(1, args.repeat)):
        for name in rounds:
            print(f"round {k + 1}/{args.repeat}: {name} …", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--phase", name, "--data", args.data, "--epochs", str(args.epochs)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            rounds[name].append(json.loads(lines[-1]) if proc.returncode == 0 and lines
                                else {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
    results = {name: _median(runs) for name, runs in rounds.items()}
    ratios = {}
    if "wall_s" in results.get("finetune", {}) and "wall_s" in results.get("minimal", {}):
        ratios["finetune speed / minimal loop speed, epochs 2+ (target >= 0.8)"] = (
            results["finetune"]["images_per_s"] / results["minimal"]["images_per_s"])
        ratios["minimal wall / finetune wall"] = results["minimal"]["wall_s"] / results["finetune"]["wall_s"]
    if "wall_s" in results.get("degradation", {}) and "wall_s" in results.get("degradation_minimal", {}):
        ratios["degradation_minimal wall / degradation wall (target >= 0.8)"] = (
            results["degradation_minimal"]["wall_s"] / results["degradation"]["wall_s"])
    if args.json:
        print(json.dumps({"config": vars(args), "results": results, "ratios": ratios}, indent=2))
        return
    for name, r in results.items():
        print(f"{name:<20} {json.dumps(r)}")
    for name, value in ratios.items():
        print(f"{name:<64} {value:.2f}")


if __name__ == "__main__":
    main()
