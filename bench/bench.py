"""rescli speed benchmark: images/s and peak memory, with ratios against baselines from the same run.

    python bench/bench.py                    # resnet18, 224 px, batch 32 (rescli's default), this machine's device
    python bench/bench.py --depth 50 --images 256
    python bench/bench.py --data ./images              # your own JPEG folder instead of generated photos

Phases (each in its own child process, so peak memory is per phase):
  model_train    model-only bound: train steps on in-memory tensors (rescli's precision + channels_last)
  model_infer    model-only bound: forward passes on in-memory tensors
  finetune       rescli finetune end to end from image files, 3 epochs: the first decodes every file, the
                 later ones (timed) read validation images, and with --augment none (the default) the
                 training images too, from the decoded-image cache
  predict        rescli predict end to end from image files (decode + forward, streamed; OpenMP set as the CLI sets it)
  predict_x4     the same over 4x as many inputs: peak memory must not grow with the input count
  baseline       a plain fp32 torchvision loop on the same files (ImageFolder, ToTensor, NCHW, fp32)
  head_cached    --strategy head --augment none on cached backbone features vs the same run without the cache
  finetune_busy, predict_busy
                 finetune / predict with one competing CPU-bound process on the machine, threads chosen as the
                 CLI chooses them for the load it sees (rescli.cpus); *_busy_default: the same with torch's
                 own threads and wait policy (RESCLI_ADAPT_THREADS=0), what rescli did before
With --compile, the model-only bounds, finetune and predict all use torch.compile (the baseline stays plain).
This is a script, not a test: it prints figures; nothing asserts a wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_mem(device) -> dict:
    import torch

    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_photos(folder: Path, n: int, *, classes: int = 4, size=(500, 375)) -> Path:
    """JPEGs of ImageNet's typical size, with smooth structure so they compress like photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for i in range(n):
        cls = folder / f"class{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.stack([np.sin(xx * fx + phase + c) * np.cos(yy * fy + c) for c in range(3)], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(cls / f"img{i:05d}.jpg", quality=90)
    return folder


# --- phases (run in a child process) ------------------------------------------------------------

def phase_model(args, *, train: bool) -> dict:
    import torch
    from torch import nn

    from rescli.core.runtime import select_runtime
    from rescli.models.registry import create_model

    rt = select_runtime(device=args.device, precision=args.precision)
    model = create_model(f"resnet{args.depth}", 1000).to(rt.device, memory_format=rt.memory_format)
    net = torch.compile(model) if args.compile else model  # compiled during the warm-up steps
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=rt.device)
    x = x.contiguous(memory_format=rt.memory_format)
    y = torch.randint(0, 1000, (args.batch,), device=rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as finetune's
    loss_fn = nn.CrossEntropyLoss()

    def step():
        if train:
            with rt.autocast():
                loss = loss_fn(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), rt.autocast():
                net(x)

    model.train(train)
    for _ in range(args.warmup):
        step()
    sync(rt.device)
    t0 = time.perf_counter()
    steps = args.steps if train else 3 * args.steps  # a forward pass is ~3x shorter: time about as long
    for _ in range(steps):
        step()
    sync(rt.device)
    dt = time.perf_counter() - t0
    return {"images_per_s": args.batch * steps / dt, "runtime": rt.describe(), **peak_mem(rt.device)}


def phase_finetune(args) -> dict:
    from rescli.core.runtime import resolve_device
    from rescli.train.loop import finetune
    from rescli.train.settings import TrainSettings

    out = Path(tempfile.mkdtemp(prefix="rescli-bench-run-"))
    settings = TrainSettings(
        data_dir=args.data, arch=f"resnet{args.depth}", weights="none", strategy="full", epochs=3,
        batch_size=args.batch, img_size=args.img_size, val_split=0.05, workers=args.workers,
        device=args.device, precision=args.precision, augment=args.augment, compile=args.compile,
    )
    result = finetune(settings=settings, output=out / "run", show_progress=False)
    n_train = _count(out / "run")
    seconds = [float(row["train_seconds"]) for row in result["history"]]
    later = sum(seconds[1:]) / len(seconds[1:])  # workers, oneDNN kernels and caches are warm
    return {"images_per_s": n_train / later, "first_epoch_images_per_s": n_train / seconds[0], "train_images": n_train,
            "epoch_train_seconds": seconds,
            "timed": f"epochs 2-3; epoch 1 (decoding every file): {n_train / seconds[0]:.1f} img/s",
            **peak_mem(resolve_device(args.device))}


def _count(run: Path) -> int:
    return int(json.loads((run / "run.json").read_text())["settings"]["train_images"])


def phase_predict(args, *, repeat: int = 1) -> dict:
    from rescli.core.runtime import resolve_device
    from rescli.inference.inputs import iter_input_paths
    from rescli.inference.load import load_predictor
    from rescli.inference.stream import predict_stream
    from rescli.models.checkpoint import make_checkpoint, save_checkpoint
    from rescli.models.registry import create_model

    ckpt_path = Path(tempfile.mkdtemp(prefix="rescli-bench-")) / "m.pt"
    model = create_model(f"resnet{args.depth}", 4)
    save_checkpoint(make_checkpoint(model_state=model.state_dict(), arch=f"resnet{args.depth}",
                                    classes=[f"class{i}" for i in range(4)], img_size=args.img_size,
                                    mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), ckpt_path)
    predictor = load_predictor(ckpt_path, device=args.device, precision=args.precision, compile=args.compile)
    paths = list(iter_input_paths([args.data]))
    # Warm-up batch (thread pool, allocator, oneDNN kernels) is not timed.
    list(predict_stream(paths[: args.batch], predictor=predictor, batch_size=args.batch, workers=args.workers or 2))
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for row in predict_stream(paths, predictor=predictor, batch_size=args.batch, workers=args.workers or 2):
            n += "label" in row
    dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "images": n, **peak_mem(resolve_device(args.device))}


def phase_baseline(args) -> dict:
    """What a user writes from the PyTorch tutorial: fp32, NCHW, ImageFolder + ToTensor + Normalize."""
    import torch
    from torch import nn
    from torchvision import datasets, models
    from torchvision import transforms as T

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    tf = T.Compose([T.RandomResizedCrop(args.img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(args.data, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers or 1,
                                         drop_last=True, persistent_workers=True)
    model = getattr(models, f"resnet{args.depth}")(num_classes=len(ds.classes)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    timed_images, t0 = 0, None
    for epoch in range(2):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == 1:
                timed_images += len(y)
        if epoch == 0:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return {"images_per_s": timed_images / (time.perf_counter() - t0), **peak_mem(device)}


def phase_head_cached(args) -> dict:
    from rescli.train.loop import finetune
    from rescli.train.settings import TrainSettings

    out = {}
    for label, cache in (("cached", True), ("uncached", False)):
        run = Path(tempfile.mkdtemp(prefix="rescli-bench-head-")) / "run"
        settings = TrainSettings(data_dir=args.data, arch=f"resnet{args.depth}", weights="none", strategy="head",
                                 epochs=3, batch_size=args.batch, img_size=args.img_size, workers=args.workers,
                                 device=args.device, precision=args.precision, augment="none", cache_features=cache)
        t0 = time.perf_counter()
        result = finetune(settings=settings, output=run, show_progress=False)
        out[f"{label}_total_s"] = time.perf_counter() - t0
        out[f"{label}_epoch_s"] = [float(r["seconds"]) for r in result["history"]]
    return out


PHASES = {
    "model_train": lambda a: phase_model(a, train=True),
    "model_infer": lambda a: phase_model(a, train=False),
    "finetune": phase_finetune,
    "predict": phase_predict,
    "predict_x4": lambda a: phase_predict(a, repeat=4),
    "baseline": phase_baseline,
    "head_cached": phase_head_cached,
    "finetune_busy": phase_finetune,
    "predict_busy": phase_predict,
    "finetune_busy_default": phase_finetune,
    "predict_busy_default": phase_predict,
}
LOAD_PHASES = ("finetune_busy", "predict_busy", "finetune_busy_default", "predict_busy_default")


def start_competitor() -> subprocess.Popen:
    """One CPU-bound process beside the phase (a pure-Python loop: one core, no threads), running before torch loads."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1.0)  # scheduled and spinning before the phase looks at the load
    return proc


def run_child(phase: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_round(runs: list[dict]) -> dict:
    """The round with the median images/s (its own peak memory and notes), plus every round's figure."""
    good = [r for r in runs if "images_per_s" in r]
    if not good:
        return runs[0]
    good.sort(key=lambda r: r["images_per_s"])
    every = [r["images_per_s"] for r in runs if "images_per_s" in r]
    return {**good[(len(good) - 1) // 2], "rounds_images_per_s": every}


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=192, help="generated photos (ignored with --data)")
    p.add_argument("--data", default=None, help="a class-folder directory of images to use instead")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--augment", default="none", help="finetune's --augment (none is its default)")
    p.add_argument("--compile", action="store_true", help="torch.compile in every rescli phase and model-only bound")
    p.add_argument("--phases", default=",".join(k for k in PHASES if k != "head_cached" and k not in LOAD_PHASES),
                   help=f"comma-separated, from: {', '.join(PHASES)}")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds over all phases; each phase reports its median round (shared machines vary by "
                        "10%% run to run)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args()


def _child(args: argparse.Namespace) -> None:
    """One phase, in this process: the threads chosen as the CLI chooses them (before torch loads), a competing
    process beside it for the *_busy phases."""
    competitor = start_competitor() if "_busy" in args.phase else None
    try:
        plan = None
        if args.phase.startswith(("finetune", "predict")) and not args.phase.endswith("_default"):
            from rescli.core.cpus import adapt_to_load

            plan = adapt_to_load()
        if args.phase.startswith("predict"):
            from rescli.core.cpus import let_idle_threads_sleep

            let_idle_threads_sleep()
        result = PHASES[args.phase](args)
        if plan is not None:
            result["threads"] = plan.describe()
    finally:
        if competitor is not None:
            competitor.kill()
    print(json.dumps(result))


def _child_argv(args: argparse.Namespace) -> list[str]:
    """This command line for the children: everything but --phases and --json, and the data folder."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--phases":
            skip = True
        elif not a.startswith("--phases=") and a != "--json":
            argv.append(a)
    return argv if "--data" in argv else [*argv, "--data", args.data]


def _ratios(results: dict[str, dict]) -> dict[str, float]:
    ratios = {}

    def ratio(name: str, a: str, b: str) -> None:
        if "images_per_s" in results.get(a, {}) and "images_per_s" in results.get(b, {}):
            ratios[name] = results[a]["images_per_s"] / results[b]["images_per_s"]

    ratio("finetune / baseline (target >= 3.0)", "finetune", "baseline")
    ratio("finetune / model_train (target >= 0.85)", "finetune", "model_train")
    ratio("predict / model_infer (target >= 0.80)", "predict", "model_infer")
    for name in ("finetune", "predict"):
        ratio(f"{name}_busy / {name} (target >= 0.40)", f"{name}_busy", name)
        ratio(f"{name}_busy_default / {name} (before)", f"{name}_busy_default", name)
    if "peak_rss_mib" in results.get("predict", {}) and "peak_rss_mib" in results.get("predict_x4", {}):
        ratios["predict_x4 / predict peak RSS (flat = ~1.0)"] = (
            results["predict_x4"]["peak_rss_mib"] / results["predict"]["peak_rss_mib"])
    return ratios


def _print_table(args: argparse.Namespace, results: dict[str, dict], ratios: dict[str, float]) -> None:
    print(f"rescli bench: resnet{args.depth}, {args.img_size} px, batch {args.batch}, data {args.data}")
    print(f"{'phase':<22} {'images/s':>10} {'peak RSS MiB':>13} {'peak GPU MiB':>13}  notes")
    for phase, r in results.items():
        if "error" in r:
            print(f"{phase:<22} {'error':>10}  {r['error']}")
            continue
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        notes = r.get("runtime", "") or r.get("timed", "")
        if r.get("threads"):
            notes = f"{notes}; {r['threads']}"
        if len(r.get("rounds_images_per_s", [])) > 1:
            notes = f"median of {' / '.join(f'{v:.1f}' for v in r['rounds_images_per_s'])}; {notes}"
        if phase == "head_cached":
            notes = f"cached epochs {r['cached_epoch_s']} s vs uncached {r['uncached_epoch_s']} s"
        print(f"{phase:<22} {ips:>10} {r.get('peak_rss_mib', '-'):>13} {r.get('peak_gpu_mib', '-'):>13}  {notes}")
    for name, value in ratios.items():
        print(f"{name:<48} {value:.2f}")


def main() -> None:
    args = _arguments()
    if args.phase:
        _child(args)
        return
    if args.data is None:
        args.data = str(make_photos(Path(tempfile.mkdtemp(prefix="rescli-bench-data-")), args.images))
    argv = _child_argv(args)
    phases = args.phases.split(",")
    rounds: dict[str, list[dict]] = {phase: [] for phase in phases}
    # Rounds, not phase after phase: a slow spell of the machine hits every phase alike.
    for k in range(max(1, args.repeat)):
        for phase in phases:
            print(f"round {k + 1}/{max(1, args.repeat)}: {phase} …", file=sys.stderr, flush=True)
            rounds[phase].append(run_child(phase, argv))
    results = {phase: _median_round(runs) for phase, runs in rounds.items()}
    ratios = _ratios(results)
    if args.json:
        print(json.dumps({"config": vars(args), "results": results, "ratios": ratios}, indent=2))
        return
    _print_table(args, results, ratios)


if __name__ == "__main__":
    main()
