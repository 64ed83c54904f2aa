"""The degradation experiment (He et al. 2015, section 4.2 and figure 6) on the user's own images.

Plain and residual CIFAR-style networks at several depths are trained from scratch with one recipe,
one seed, one split and one data order; only the architecture differs. For each model we record:

* per-epoch training and validation error. Training error is measured the way validation error is:
  the model in eval mode over the whole training split, without augmentation, at the end of each
  epoch (a hook in ``train.finetune``). The running error on the training batches (train mode,
  weights changing during the epoch) is kept too, as ``train_error_running``.
* the L2 norm of the gradient per stage (stem, layer1..3, head) of the freshly initialised model,
  from one forward/backward pass on a fixed batch of training images, so the user can see how
  much gradient reaches the early layers of each network before any training.

Everything goes into one folder: a sub-folder (a normal run folder with best.pt/last.pt) per model,
``degradation.json`` and ``degradation.png``. ``run_degradation`` returns the same dict it writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import atomic_write_json
from rescli.core.paths import refuse_inside_data
from rescli.core.runtime import Runtime, default_workers, select_runtime
from rescli.data.loading import ImageSamples, collate, make_loader
from rescli.data.scan import DatasetIndex, scan_dataset
from rescli.data.transforms import build_transform, draft_size_for, to_model_input
from rescli.evaluation.evaluate import run_eval
from rescli.experiments.degradation_figure import KINDS, plot_degradation
from rescli.models.cifar import STAGE_NAMES, stage_of
from rescli.models.registry import TORCHVISION_DEPTHS, arch_spec, check_arch_kwargs, count_parameters, create_model
from rescli.models.weights import load_pretrained
from rescli.train.loop import finetune
from rescli.train.run_folder import new_run_dir
from rescli.train.settings import TrainSettings, batch_size_of

STAGES = ("stem", *STAGE_NAMES, "head")


# The experiment's recipe: finetune's settings, trained from scratch, with two differences, and why:
#   augment none      - the question is how well each net *fits* the training set; random crops and
#                       flips would make "training error" a moving target (and flips change digits).
#   label smoothing 0 - the plain cross-entropy objective of the paper.
# Everything else (AdamW, 10% warmup + cosine, weight decay 0.05, grad clip 1.0) is finetune's recipe.
RECIPE = TrainSettings(data_dir="", weights="none", strategy="full", epochs=12, batch_size=64, img_size=32, lr=2e-3,
                       weight_decay=0.05, label_smoothing=0.0, augment="none")


def parse_depths(spec: str | Sequence[int]) -> list[int]:
    """"20,56" -> [20, 56]: sorted, unique, each 6n+2 (n >= 1) and not a torchvision depth name."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(" ", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--depths {spec!r}: expected comma-separated integers such as 20,56") from None
    else:
        values = [int(v) for v in spec]
    if not values:
        raise UsageError("--depths: give at least one depth, e.g. 20,56")
    for d in values:
        if d in TORCHVISION_DEPTHS:
            raise UsageError(f"--depths: {d} would be torchvision's ImageNet resnet{d}; choose another 6n+2 depth "
                             "(e.g. 44 or 56)")
        try:
            arch_spec(f"plain{d}")  # the registry knows which depths the CIFAR-style nets have
        except UsageError as exc:
            raise UsageError(f"--depths {d}: {exc.message}") from None
    return sorted(set(values))


def arch_names(depth: int) -> dict[str, str]:
    return {kind: f"{kind}{depth}" for kind in KINDS}


def display_name(arch: str) -> str:
    """plain56 -> plain-56, resnet20 -> ResNet-20 (the paper's labels)."""
    for kind, label in (("plain", "plain"), ("resnet", "ResNet")):
        if arch.startswith(kind):
            return f"{label}-{arch[len(kind):]}"
    return arch


def fixed_batch(
    samples: Sequence[tuple[str, int]], *, img_size: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images (seeded choice, no augmentation) as a uint8 batch and its labels."""
    if not samples:
        raise RescliError("no training images to measure gradients on")
    chosen = sorted(random.Random(seed).sample(range(len(samples)), min(size, len(samples))))
    ds = ImageSamples([samples[i] for i in chosen], build_transform(img_size=img_size, train=False),
                      draft_size=draft_size_for(img_size, train=False))
    batch = collate([ds[i] for i in range(len(ds))])
    if batch.labels.numel() == 0:
        raise RescliError("none of the images chosen for the gradient measurement could be read")
    return batch.images, batch.labels


def stage_gradient_norms(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """One fp32 forward/backward (train mode, plain cross-entropy); per stage: L2 norm and RMS of the gradient.

    Returns {"loss": float, "l2": {stage: float}, "rms": {stage: float}}; RMS = L2 / sqrt(#parameters),
    which compares stages of different sizes. ``model``'s gradients and BN statistics are changed.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    x = to_model_input(images, device=torch.device("cpu"), mean=mean, std=std, channels_last=False)
    with torch.autocast("cpu", enabled=False):
        loss = nn.functional.cross_entropy(model(x).float(), labels)
    loss.backward()
    sq = dict.fromkeys(STAGES, 0.0)
    count = dict.fromkeys(STAGES, 0)
    for name, p in model.named_parameters():
        stage = stage_of(name)
        if stage not in sq:
            raise RescliError(f"parameter {name} is in stage {stage}, not one of {', '.join(STAGES)}")
        count[stage] += p.numel()
        if p.grad is not None:
            sq[stage] += float(p.grad.detach().double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    return {
        "loss": float(loss.detach()),
        "l2": {s: math.sqrt(sq[s]) for s in STAGES},
        "rms": {s: math.sqrt(sq[s] / count[s]) if count[s] else 0.0 for s in STAGES},
    }


def _prepare_output(output: str | os.PathLike | None, data_dir: Path) -> Path:
    out = Path("runs") if output is None else Path(output).expanduser()
    refuse_inside_data(out, data_dir, what="output folder")
    if output is None:
        return new_run_dir()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if out.exists() and ((out / "degradation.json").exists() or any(out.glob("*/*.pt"))):
        raise UsageError(f"--output {out}: already holds a degradation run; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass(frozen=True)
class _Shared:
    """What every model of one experiment shares: the data, the recipe, and where its results go."""

    run_dir: Path
    base: TrainSettings  # the recipe; each model adds only its arch and arch_kwargs
    num_classes: int
    grad_images: torch.Tensor  # the fixed batch of the gradient measurement
    grad_labels: torch.Tensor
    train_eval_loader: DataLoader  # the whole training split, no augmentation, for the training error
    show_progress: bool


def run_degradation(
    *,
    data_dir: str | os.PathLike,
    depths: str | Sequence[int] = (20, 56),
    output: str | os.PathLike | None = None,
    epochs: int = RECIPE.epochs,
    batch_size: int = batch_size_of(RECIPE),
    img_size: int = RECIPE.img_size,
    shortcut: str = "A",
    lr: float = float(RECIPE.lr),
    weight_decay: float = RECIPE.weight_decay,
    label_smoothing: float = RECIPE.label_smoothing,
    augment: str = RECIPE.augment,
    val_split: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train plain-d and resnet-d for each depth d with one recipe; write and return the results dict."""
    depth_list = parse_depths(depths)
    sc = _checked_shortcut(shortcut, depth_list)
    _check_sizes(epochs=epochs, batch_size=batch_size, img_size=img_size, threads=threads)
    build_transform(img_size=img_size, train=True, augment=augment)  # checks --augment before any work
    runtime = select_runtime(device=device, precision=precision)  # checks --device/--precision early

    # --precision auto: the device's fast type, passed on explicitly. finetune's auto trains small images in fp32 on
    # CPU (right for resnet18); these 16-64-channel nets are the other way round (the step times are in
    # docs/degradation.md, "How to run it").
    base = dataclasses.replace(
        RECIPE, data_dir=str(data_dir), epochs=epochs, batch_size=batch_size, img_size=img_size, lr=lr,
        weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, val_split=val_split, seed=seed,
        workers=workers, device=device, precision=runtime.precision if precision.lower() == "auto" else precision,
    )
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        index = scan_dataset(data_dir, val_split=val_split, seed=seed, workers=workers)
        if not index.splits.get("val"):
            raise RescliError(f"{data_dir}: no validation images (use --val-split > 0 or add a val/ folder)")
        run_dir = _prepare_output(output, Path(data_dir).expanduser())
        shared = _shared(index, run_dir, base, show_progress=show_progress)
        result = _result_header(shared, data_dir=data_dir, depths=depth_list, shortcut=sc, runtime=runtime, index=index)
        plan = [(d, kind) for d in depth_list for kind in KINDS]
        started = time.perf_counter()
        for i, (depth, kind) in enumerate(plan, 1):
            entry = _train_model(shared, arch_names(depth)[kind], kind=kind, depth=depth, shortcut=sc,
                                 place=f"[{i}/{len(plan)}]")
            if entry["runtime"] and i == 1:
                result["recipe"]["runtime"] = entry["runtime"]  # finetune may pick another precision than auto's
            result["models"].append(entry)
            result["summary"] = summarize(result["models"])
            result["seconds"] = round(time.perf_counter() - started, 1)
            atomic_write_json(run_dir / "degradation.json", result)  # after each model: a kill keeps what is done
        plot_degradation(result, run_dir / "degradation.png")
        atomic_write_json(run_dir / "degradation.json", result)
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _shared(index: DatasetIndex, run_dir: Path, base: TrainSettings, *, show_progress: bool) -> _Shared:
    train_samples = index.splits["train"]
    train_eval_loader = make_loader(
        ImageSamples(train_samples, build_transform(img_size=base.img_size, train=False),
                     draft_size=draft_size_for(base.img_size, train=False)),
        batch_size=batch_size_of(base) * 2, shuffle=False,
        workers=default_workers() if base.workers is None else base.workers,
    )
    images, labels = fixed_batch(train_samples, img_size=base.img_size, size=batch_size_of(base), seed=base.seed)
    return _Shared(run_dir, base, len(index.classes), images, labels, train_eval_loader, show_progress)


def _checked_shortcut(shortcut: str, depths: list[int]) -> str:
    """``shortcut`` as the residual nets take it (A, B or C), checked by the registry as for finetune --shortcut."""
    return check_arch_kwargs(arch_names(depths[0])["resnet"], {"shortcut": shortcut})["shortcut"]


def _check_sizes(*, epochs: int, batch_size: int, img_size: int, threads: int | None) -> None:
    if epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if img_size < 8:
        raise UsageError("--img-size must be at least 8")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be at least 1")


def _result_header(shared: _Shared, *, data_dir: str | os.PathLike, depths: list[int], shortcut: str,
                   runtime: Runtime, index: DatasetIndex) -> dict[str, Any]:
    """degradation.json before any model is trained: what is compared, and the one recipe they all get."""
    base, run_dir = shared.base, shared.run_dir
    return {
        "experiment": "degradation",
        "data_dir": str(data_dir),
        "run_dir": str(run_dir),
        "depths": depths,
        "shortcut": shortcut,
        "recipe": {
            "epochs": base.epochs, "batch_size": base.batch_size, "img_size": base.img_size, "lr": base.lr,
            "weight_decay": base.weight_decay, "label_smoothing": base.label_smoothing, "augment": base.augment,
            "optimizer": "AdamW, 10% warmup + cosine", "grad_clip": base.grad_clip, "weights": "none",
            "seed": base.seed, "val_split": base.val_split,
            # runtime: what --device/--precision ask for, replaced by what the first model's training used
            "runtime": runtime.describe(), "threads": torch.get_num_threads(),
            "train_images": len(index.splits["train"]), "val_images": len(index.splits["val"]),
        },
        "training_error": "eval mode, whole training split, no augmentation, after each epoch",
        "gradient_batch": int(shared.grad_labels.numel()),
        "models": [],
        "figure": str(run_dir / "degradation.png"),
    }


def _train_model(shared: _Shared, arch: str, *, kind: str, depth: int, shortcut: str, place: str) -> dict[str, Any]:
    """Measure the initial gradients of ``arch``, train it with the shared recipe, and return its entry."""
    arch_kwargs = {"shortcut": shortcut} if kind == "resnet" else {}
    torch.manual_seed(shared.base.seed)  # finetune seeds the same way before building: this is its initial model
    model = create_model(arch, shared.num_classes, arch_kwargs)
    winfo = load_pretrained(model, arch=arch, weights="none", arch_kwargs=arch_kwargs)
    grads = stage_gradient_norms(model, shared.grad_images, shared.grad_labels, mean=winfo.mean, std=winfo.std)
    params = count_parameters(model)
    del model
    events.info(f"{place} {display_name(arch)}: {params:,} parameters, run folder {shared.run_dir / arch}")

    def measure_train(*, epoch: int, model: nn.Module, logits_fn: Callable) -> dict[str, Any]:
        ev = run_eval(logits_fn, shared.train_eval_loader)
        return {"train_eval_loss": round(ev.loss, 6), "train_eval_accuracy": round(ev.accuracy, 6)}

    t0 = time.perf_counter()
    settings = dataclasses.replace(shared.base, arch=arch, arch_kwargs=arch_kwargs)
    out = finetune(settings=settings, output=shared.run_dir / arch, show_progress=shared.show_progress,
                   on_epoch_end=measure_train)
    hist = out["history"]
    run_dir = Path(out["run_dir"])
    entry = {
        "name": display_name(arch),
        "arch": arch,
        "kind": kind,
        "depth": depth,
        "arch_kwargs": arch_kwargs,
        "params": params,
        "run_dir": out["run_dir"],
        "checkpoint": str(run_dir / "last.pt"),
        "best_checkpoint": str(run_dir / "best.pt"),
        "epochs": [int(r["epoch"]) for r in hist],
        "train_error": [round(1.0 - r["train_eval_accuracy"], 6) for r in hist],
        "val_error": [round(1.0 - r["val_accuracy"], 6) for r in hist],
        "train_error_running": [round(1.0 - r["train_accuracy"], 6) for r in hist],
        "train_loss": [r["train_eval_loss"] for r in hist],
        "val_loss": [r["val_loss"] for r in hist],
        "grad_norms": {k: round(v, 6) for k, v in grads["l2"].items()},
        "grad_rms": {k: float(f"{v:.6g}") for k, v in grads["rms"].items()},
        "init_loss": round(grads["loss"], 6),
        "runtime": _run_json(run_dir).get("runtime"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    entry["final_train_error"] = entry["train_error"][-1]
    entry["final_val_error"] = entry["val_error"][-1]
    entry["best_val_error"] = min(entry["val_error"])
    return entry


def _run_json(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def summarize(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Deepest minus shallowest final training/validation error, per kind (positive = deeper is worse)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        ms = sorted((m for m in entries if m["kind"] == kind), key=lambda m: m["depth"])
        if len(ms) >= 2:
            lo, hi = ms[0], ms[-1]
            out[kind] = {
                "shallow": lo["name"], "deep": hi["name"],
                "train_error_change": round(hi["final_train_error"] - lo["final_train_error"], 6),
                "val_error_change": round(hi["final_val_error"] - lo["final_val_error"], 6),
            }
    return out
