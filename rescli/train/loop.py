"""The fine-tuning loop: one function, ``finetune``, from a data folder to a run folder.

The run folder holds best.pt (best validation accuracy), last.pt (everything needed to
resume), history.csv, metrics.json, run.json and skipped.txt. Every file is written
atomically, so a kill at any moment leaves usable files behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import atomic_write_json
from rescli.core.runtime import default_workers, resolve_device
from rescli.data.loading import (
    Batch,
    DecodedCache,
    ImageSamples,
    image_cache_budget,
    make_loader,
)
from rescli.data.scan import DatasetIndex, scan_dataset
from rescli.data.transforms import build_transform, draft_size_for, to_model_input
from rescli.evaluation.artefacts import write_evaluation
from rescli.evaluation.evaluate import EvalResult, eval_result, run_eval
from rescli.inference.predictor import torch_logits_fn
from rescli.models.checkpoint import (
    MAX_IMG_SIZE,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    versions,
)
from rescli.models.registry import create_model
from rescli.models.weights import load_pretrained
from rescli.train.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    backend,
    barrier,
    broadcast_buffers,
    check_batch_size,
    check_in_sync,
    check_sync_bn,
    convert_sync_bn,
    gather_by_index,
    gather_objects,
    init_from_env,
    main_first,
    on_main,
    rank_batches,
    shard,
    shared,
    shutdown,
    wrap,
)
from rescli.train.features import eval_features, extract_features, gather_features
from rescli.train.interrupts import Interrupted, StopFlag, interrupt_raises
from rescli.train.mixing import mix_batch, mix_rng
from rescli.train.params import (
    freeze_batchnorm_stats,
    param_groups,
    set_backbone_trainable,
)
from rescli.train.run_folder import (
    RunFolderLock,
    data_record,
    load_resume,
    open_new_run,
    report_scan,
    restore_split,
    run_finished,
    save_checkpoint_file,
    write_history,
)
from rescli.train.schedule import Plan, epoch_order
from rescli.train.settings import (
    TrainSettings,
    resolve_strategy,
    settings_from_dict,
    training_runtime,
    validate_settings,
)
from rescli.train.state import capture_rng, restore_rng, seed_everything


def _attach_image_caches(
    settings: TrainSettings, *, train_ds: ImageSamples, val_ds: ImageSamples, workers: int, processes: int,
    epochs_left: int, features_cached: bool,
) -> dict[str, int]:
    """Decoded-image caches for the datasets whose pixels repeat every epoch; returns how many images each holds.

    Validation always repeats; training only without augmentation (mixup and cutmix act on batches, later).
    Nothing to gain with a single epoch left, or when the backbone's features are cached instead.
    """
    if not settings.cache_images or epochs_left < 2 or features_cached:
        return {}
    shared = workers > 0  # worker processes fill the slots: they must see the same memory as the main process
    budget = image_cache_budget(shared=shared) // max(1, processes)
    held = {}
    for name, ds in (("val", val_ds), ("train", train_ds)):  # validation first: it is smaller and always repeats
        if name == "train" and settings.augment != "none":
            continue
        ds.cache = DecodedCache(len(ds), settings.img_size, budget_bytes=budget, shared=shared)
        budget -= ds.cache.nbytes
        held[name] = ds.cache.capacity
    return held


def _padded(loader, steps: int, *, img_size: int) -> Iterator[Batch]:
    """A process's batches, then empty ones up to ``steps``: in a last global batch smaller than the number of
    processes some get no image, yet every process must take part in every (all-reducing) step."""
    n = 0
    for batch in loader:
        if batch.labels.numel() == 0:  # every image of the slot failed to load: an empty batch of the right shape
            batch.images = torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
        yield batch
        n += 1
    empty = torch.zeros(0, dtype=torch.long)
    for _ in range(n, steps):
        yield Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty, empty, [])


def _without_lone_image(batch: Batch, img_size: int) -> Batch:
    """The batch with its single image left out: an empty batch, which a distributed step still takes part in."""
    empty = torch.zeros(0, dtype=torch.long)
    return Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty, empty, batch.failures)


def _gather_eval(ctx: DistContext, ev: EvalResult, samples, *, n_classes: int) -> EvalResult:
    """Each process's shard of a validation pass -> the whole split's result (dataset order), the same in every process."""
    position = {path: i for i, (path, _) in enumerate(samples)}
    logits = ev.logits if len(ev.y_true) else np.zeros((0, n_classes), np.float32)
    idx, got = gather_by_index(
        ctx, np.array([position[p] for p in ev.paths], dtype=np.int64), logits=logits, y_true=np.asarray(ev.y_true, dtype=np.int64)
    )
    failures = sorted(
        (f for part in gather_objects(ctx, list(ev.failures)) for f in part), key=lambda f: position.get(f[0], -1)
    )
    paths = [samples[i][0] for i in idx]
    if not len(idx):
        return eval_result(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], failures)
    return eval_result(torch.from_numpy(got["logits"]), torch.from_numpy(got["y_true"]), paths, failures)


def finetune(
    *,
    settings: TrainSettings | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    epochs: int | None = None,
    show_progress: bool = True,
    on_epoch_end: Callable[..., dict[str, Any] | None] | None = None,
    _stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Train and return a summary dict (run_dir, best epoch, metrics). Raises RescliError on failure.

    on_epoch_end(epoch=, model=, logits_fn=), if given, runs after each epoch's validation with the model
    in eval mode; the dict it returns is merged into that epoch's history row (returned; history.csv keeps
    its fixed columns). rescli degradation uses it to measure training-set error. In a distributed run it
    runs in every process.

    Started by torchrun (WORLD_SIZE > 1), every process calls this: DistributedDataParallel, each process
    taking its share of every global batch (see rescli.distributed); rank 0 alone writes the run folder,
    and every rank returns the same summary.
    """
    try:
        with contextlib.ExitStack() as stack:  # releases the run folder's lock however the run ends
            return _finetune(
                settings=settings, output=output, resume=resume, epochs=epochs, show_progress=show_progress,
                on_epoch_end=on_epoch_end, _stop=_stop, _stack=stack,
            )
    finally:
        shutdown()


def _finetune(
    *,
    settings: TrainSettings | None,
    output: str | os.PathLike | None,
    resume: str | os.PathLike | None,
    epochs: int | None,
    show_progress: bool,
    on_epoch_end: Callable[..., dict[str, Any] | None] | None,
    _stop: StopFlag | None,
    _stack: contextlib.ExitStack,
) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    _compiled_cache: dict[str, Any] = {}
    tail_only = False
    if resume is not None:
        run_dir, state = load_resume(resume)  # every process reads last.pt (multi-node: a folder they all see)
        settings = settings_from_dict(state["settings"])
        if state.get("data"):  # the resolved folder it was trained on, wherever this process was started
            settings.data_dir = state["data"]["root"]
        if epochs is not None:
            settings.epochs = epochs
        done = int(state["epoch"])
        if done >= settings.epochs and run_finished(run_dir):
            raise UsageError(f"{run_dir} already trained {done} epochs; pass --epochs N with N > {done} to continue")
        tail_only = done >= settings.epochs  # every epoch ran, but the final evaluation was interrupted
    elif settings is None:
        raise UsageError("finetune needs settings or --resume")
    else:
        settings.data_dir = os.path.abspath(os.path.expanduser(settings.data_dir))
    if settings.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if settings.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not 8 <= settings.img_size <= MAX_IMG_SIZE:
        raise UsageError(f"--img-size must be from 8 to {MAX_IMG_SIZE} pixels")
    validate_settings(settings)  # before a run folder is made: a usage error leaves nothing behind
    ctx, dist_device = init_from_env(settings.device)
    check_batch_size(settings.batch_size, ctx.world_size)
    if settings.sync_bn:
        check_sync_bn(True, resolve_device(dist_device))
    if resume is None:  # rank 0 picks, makes and locks the run folder; the others learn its name

        def open_run() -> str:
            out, lock = open_new_run(output, data_dir=settings.data_dir)
            _stack.callback(lock.release)
            return str(out)

        run_dir = Path(on_main(ctx, open_run))
    elif ctx.is_main:
        _stack.callback(RunFolderLock(run_dir).acquire().release)
    seed_everything(settings.seed)

    # Data: scan and check every image once (cached), split, report what was left out. Distributed: rank 0
    # scans and hands the index to the others, so every process has the same split. A resumed run keeps the
    # split it started with, file for file.
    def scan() -> DatasetIndex:
        found = scan_dataset(
            settings.data_dir, val_split=settings.val_split, seed=settings.seed, strict=settings.strict, workers=settings.workers
        )
        if state is not None:
            found = restore_split(found, state)
        report_scan(found, run_dir)
        if not found.splits["val"]:
            raise RescliError(f"{settings.data_dir}: no validation images (use --val-split > 0 or add a val/ folder)")
        return found

    index = on_main(ctx, scan)
    classes = index.classes
    train_samples, val_samples = index.splits["train"], index.splits["val"]

    # Model and weights.
    model = create_model(settings.arch, len(classes), settings.arch_kwargs)
    if state is None:
        with main_first(ctx):  # one download of --weights imagenet, then the others read the cache
            winfo = load_pretrained(model, arch=settings.arch, weights=settings.weights, arch_kwargs=settings.arch_kwargs)
        mean, std, pretrained = list(winfo.mean), list(winfo.std), winfo.pretrained
    else:
        model.load_state_dict(state["model"])
        mean, std, pretrained = state["mean"], state["std"], state["settings_pretrained"]
    strategy, frozen_epochs = resolve_strategy(
        settings.strategy, pretrained=pretrained, epochs=settings.epochs, freeze_epochs=settings.freeze_epochs
    )
    runtime = training_runtime(settings, device=dist_device)
    model.to(runtime.device, memory_format=runtime.memory_format)

    workers = default_workers() if settings.workers is None else settings.workers
    pin = runtime.device.type == "cuda"
    train_ds = ImageSamples(
        train_samples,
        build_transform(img_size=settings.img_size, train=True, augment=settings.augment),
        draft_size=draft_size_for(settings.img_size, train=True),
    )
    val_ds = ImageSamples(
        val_samples,
        build_transform(img_size=settings.img_size, train=False),
        draft_size=draft_size_for(settings.img_size, train=False),
    )
    # Distributed: each process evaluates every N-th validation image; the results are gathered by index.
    val_loader = make_loader(
        val_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin,
        sampler=shard(range(len(val_ds)), ctx) if ctx.enabled else None,
    )

    lr_find_info: dict[str, Any] | None = None
    if settings.lr == "auto":  # LR range test on this model and data first (never on resume: last.pt holds a number)
        from rescli.train.lr_find import range_test

        def lr_test() -> dict[str, Any]:  # distributed: on rank 0 alone, with the whole global batch
            events.info("--lr auto: running the learning-rate range test first")
            found = range_test(
                model, train_ds, runtime=runtime, mean=mean, std=std, frozen_backbone=strategy in ("head", "gradual") and frozen_epochs > 0,
                batch_size=settings.batch_size, weight_decay=settings.weight_decay, label_smoothing=settings.label_smoothing,
                workers=workers, seed=settings.seed, show_progress=show_progress,
            )
            found.plot(run_dir / "lr_find.png")
            return {"suggested_lr": found.suggestion, "plot": str(run_dir / "lr_find.png"), "steps": len(found.lrs)}

        lr_find_info = on_main(ctx, lr_test)
        settings.lr = lr_find_info["suggested_lr"]
        events.info(f"--lr auto: using lr {settings.lr:.3g} (curve in {run_dir / 'lr_find.png'})")
        seed_everything(settings.seed)

    # Head only, no augmentation: the backbone's output for an image never changes, so compute it once and
    # train the head on the cached features (each epoch is then one small matrix multiply per batch).
    use_cache = (
        not tail_only and settings.cache_features and strategy == "head" and settings.augment == "none"
        and settings.mixup <= 0 and settings.cutmix <= 0
    )
    train_feats = val_feats = None
    cache_seconds = 0.0
    if use_cache:
        t_cache = time.perf_counter()
        events.info(f"head only, no augmentation: caching backbone features ({len(train_ds)} train + {len(val_ds)} val images, one pass)")
        train_feats = extract_features(
            model, make_loader(
                train_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin,
                sampler=shard(range(len(train_ds)), ctx) if ctx.enabled else None,
            ),
            runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled,
        )
        val_feats = extract_features(model, val_loader, runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled)
        if ctx.enabled:  # each process computed a shard: every process gets all features, in dataset order
            train_feats = gather_features(ctx, train_feats, runtime.device)
            val_feats = gather_features(ctx, val_feats, runtime.device)
        cache_seconds = time.perf_counter() - t_cache
        for _, msg in train_feats.failures + val_feats.failures:
            events.warn(f"skipped: {msg}")
        events.info(f"features cached in {cache_seconds:.1f}s")
    if settings.sync_bn and ctx.enabled and not use_cache:  # after the LR test, which runs on rank 0 alone
        model = convert_sync_bn(model)  # same parameter and buffer tensors, same state_dict keys
    n_train = len(train_feats.indices) if use_cache else len(train_ds)
    steps_per_epoch = max(1, math.ceil(n_train / settings.batch_size))
    plan = Plan(strategy, frozen_epochs, settings.epochs, steps_per_epoch, settings.warmup_fraction)

    ratio = settings.backbone_lr_ratio if strategy == "gradual" else 1.0
    groups = param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay, backbone_lr_ratio=ratio)
    head_ids = {id(p) for p in model.fc.parameters()}
    for g in groups:
        g["is_head"] = all(id(p) in head_ids for p in g["params"])
    # Fused AdamW: one kernel over all tensors; on CPU ~5x faster than the per-tensor default (60 vs 280 ms a step
    # for resnet18), which at small image sizes is a third of the step.
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, fused=runtime.device.type in ("cuda", "cpu") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, h=g["is_head"]: plan.lr_factor(step, is_head=h) for g in groups]
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)

    class_weights = None
    if settings.balance:
        counts = np.bincount([y for _, y in train_samples], minlength=len(classes)).astype(np.float64)
        # Inverse-frequency loss weights, normalised so a balanced set gets weight 1 everywhere.
        class_weights = torch.tensor(counts.sum() / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
        class_weights = class_weights.to(runtime.device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=settings.label_smoothing)
    # Distributed: each process sums its images' losses and divides by the global batch's total (all-reduced),
    # times N: DDP's gradient average is then exactly the gradient of the global batch's mean loss.
    criterion_sum = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=settings.label_smoothing, reduction="sum")
    eval_logits = torch_logits_fn(model, runtime=runtime, mean=mean, std=std)

    start_epoch, start_step, best_acc, best_loss, best_epoch = 0, 0, -1.0, float("inf"), -1
    history: list[dict[str, Any]] = []
    best_eval: EvalResult | None = None
    bad_epochs = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        best_acc, best_loss, best_epoch = float(state["best_accuracy"]), float(state["best_loss"]), int(state["best_epoch"])
        bad_epochs = int(state.get("bad_epochs", 0))
        history = [dict(r) for r in state.get("history", [])]
        restore_rng(state["rng"])
        if tail_only:
            events.info(f"resuming {run_dir}: all {start_epoch} epochs are done; finishing its evaluation of best.pt")
        else:
            events.info(f"resuming {run_dir} at epoch {start_epoch + 1}" + (f", step {start_step + 1}" if start_step else ""))

    image_cache = _attach_image_caches(
        settings, train_ds=train_ds, val_ds=val_ds, workers=workers, processes=ctx.world_size if ctx.enabled else 1,
        epochs_left=settings.epochs - start_epoch, features_cached=use_cache,
    )

    base = dict(
        arch=settings.arch,
        arch_kwargs=settings.arch_kwargs,
        classes=classes,
        img_size=settings.img_size,
        mean=mean,
        std=std,
        data=data_record(index),  # what evaluate needs to score the held-out images, and resume to keep the split
    )
    settings_dict = asdict(settings)
    settings_dict["strategy_resolved"] = strategy
    settings_dict["frozen_epochs"] = frozen_epochs
    settings_dict["train_images"], settings_dict["val_images"] = len(train_samples), len(val_samples)
    run_info = {
        "settings": settings_dict,
        "arch": settings.arch,
        "classes": classes,
        "img_size": settings.img_size,
        "mean": mean,
        "std": std,
        "runtime": runtime.describe(),
        "layout": index.layout,
        "counts": {s: index.counts(s) for s in index.splits},
        "versions": versions(),
    }
    if lr_find_info is not None:
        run_info["lr_find"] = lr_find_info
    if image_cache:
        run_info["image_cache"] = image_cache
    if use_cache:
        run_info["feature_cache"] = {"seconds": round(cache_seconds, 3), "train": n_train, "val": len(val_feats.indices)}
    if ctx.enabled:
        run_info["distributed"] = {
            "world_size": ctx.world_size, "backend": backend(),
            "per_process_batch": settings.batch_size // ctx.world_size, "sync_bn": bool(settings.sync_bn),
        }
    if ctx.is_main:
        atomic_write_json(run_dir / "run.json", run_info)

    partial = [0.0, 0, 0]  # loss sum, images, correct so far in the current epoch (saved on interrupt)

    def training_state(epoch_done: int, step_in_epoch: int) -> dict[str, Any]:
        return dict(
            epoch_partial=list(partial) if step_in_epoch else [0.0, 0, 0],
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else {},
            epoch=epoch_done,
            step_in_epoch=step_in_epoch,
            best_accuracy=best_acc,
            best_loss=best_loss,
            best_epoch=best_epoch,
            bad_epochs=bad_epochs,
            history=history,
            rng=capture_rng(),
            settings_pretrained=pretrained,
        )

    def save_last(epoch_done: int, step_in_epoch: int, metrics: dict[str, Any] | None = None) -> None:
        if not ctx.is_main:
            return
        ckpt = make_checkpoint(
            model_state=model.state_dict(), settings=settings_dict, metrics=metrics or {}, **base,
            **training_state(epoch_done, step_in_epoch),
        )
        save_checkpoint_file(ckpt, run_dir / "last.pt")

    events.info(
        f"{settings.arch} · {len(classes)} classes · {len(train_samples)} train / {len(val_samples)} val images · "
        f"{runtime.describe()} · strategy {strategy}" + (f" ({frozen_epochs} frozen epoch(s))" if strategy == "gradual" else "")
        + (f" · {ctx.world_size} processes ({backend()}), {settings.batch_size // ctx.world_size} images each a step"
           if ctx.enabled else "")
        + f" · run folder {run_dir}"
    )
    stop = _stop if _stop is not None else StopFlag()  # not `_stop or`: an unset flag is falsy
    warned: set[str] = set()
    stopped_early = False
    ddp: nn.Module | None = None  # DistributedDataParallel over the model (or the head, on cached features)
    ddp_frozen: bool | None = None
    stop_all = [False]  # distributed: a stop asked in any process, as agreed at the last step
    with stop.installed():
        for epoch in range(start_epoch, settings.epochs):
            t0 = time.perf_counter()
            frozen = plan.frozen(epoch)
            set_backbone_trainable(model, not frozen)
            model.train()
            if frozen:
                freeze_batchnorm_stats(model)
            bn_training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
            order = epoch_order(n_train, seed=settings.seed, epoch=epoch)
            skip = start_step if epoch == start_epoch else 0
            if skip and state is not None and state.get("epoch_partial") and ctx.is_main:  # saved totals: counted once
                partial[:] = [float(state["epoch_partial"][0]), int(state["epoch_partial"][1]), float(state["epoch_partial"][2])]
            else:
                partial[:] = [0.0, 0, 0]
            trainable = [p for p in model.parameters() if p.requires_grad]
            if ctx.enabled and (ddp is None or ddp_frozen != frozen):
                # DDP registers the parameters that require grad when it is built: rebuild it when the set changes
                # (gradual: after the frozen epochs). Building also copies rank 0's weights and buffers everywhere.
                ddp = None
                ddp = wrap(model.fc if use_cache else model, ctx, runtime.device)
                ddp_frozen = frozen

            # Compiled once per run; the plain `model` still owns the weights, so checkpoints are unchanged.
            compiled = model if not settings.compile or ctx.enabled else _compiled_cache.setdefault("m", torch.compile(model))

            def train_step(inputs: torch.Tensor, y: torch.Tensor, forward, step: int) -> None:
                """One optimiser step on a batch; ``forward`` maps inputs to logits (the whole net, or the head)."""
                inputs, y_a, y_b, lam = mix_batch(
                    inputs, y, mixup=settings.mixup, cutmix=settings.cutmix, rng=mix_rng(settings.seed, epoch, step)
                ) if not use_cache else (inputs, y, y, 1.0)
                crit = criterion_sum if ctx.enabled else criterion
                with runtime.autocast():
                    try:
                        logits = forward(inputs).float()
                    except ValueError as exc:  # BatchNorm in training mode cannot normalise one value per channel
                        if "more than 1 value per channel" not in str(exc):
                            raise
                        raise RescliError(
                            f"a training batch of {len(y)} image(s) reached a 1x1 BatchNorm layer (epoch {epoch + 1}, step {step + 1}), "
                            f"which cannot be normalised in training mode: use a --batch-size that leaves no batch of one image "
                            f"per process (here {n_train} training images), or a larger --img-size"
                        ) from None
                    loss = crit(logits, y_a) if lam == 1.0 else lam * crit(logits, y_a) + (1 - lam) * crit(logits, y_b)
                finite = bool(torch.isfinite(loss))
                scale, weight, total_weight = 1.0, float(len(y)), float(len(y))
                if ctx.enabled:  # one small all-reduce: the global batch's weight, a bad loss anywhere, a stop anywhere
                    weight = float(class_weights[y_a].sum()) if class_weights is not None else float(len(y))
                    total_weight, bad, stops = all_reduce_sum(ctx, weight, float(not finite), float(bool(stop)))
                    finite, stop_all[0] = finite and bad == 0, stops > 0
                    scale = ctx.world_size / total_weight if total_weight > 0 else 0.0
                if not finite:
                    kept = (
                        f"best.pt (epoch {best_epoch + 1}, val accuracy {best_acc:.4f}) is kept in {run_dir}"
                        if best_epoch >= 0 else f"no epoch finished, so there is no best.pt in {run_dir}"
                    )
                    shown = loss.item() if not torch.isfinite(loss) else "non-finite in another process"
                    raise shared(RescliError(
                        f"loss became {shown} at epoch {epoch + 1}, step {step + 1}; training stopped. {kept}. "
                        f"Try a lower --lr (now {settings.lr:.3g}) or rescli lr-find"
                    ), ctx)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * scale if ctx.enabled else loss).backward()  # DDP: gradients all-reduced here
                if total_weight > 0:  # (distributed: not when no process had an image; single: never 0 here)
                    if settings.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                pred = logits.detach().argmax(1)
                partial[0] += (loss.item() * len(y) / weight if weight > 0 else 0.0) if ctx.enabled else loss.item() * len(y)
                partial[2] += lam * int((pred == y_a).sum()) + (1 - lam) * int((pred == y_b).sum())
                partial[1] += len(y)

            step = skip
            # Distributed: this process's slot of every global batch of the same order (one entry per global step).
            mine = rank_batches(order, batch_size=settings.batch_size, ctx=ctx)[skip:] if ctx.enabled else None
            with events.counting(f"epoch {epoch + 1}/{settings.epochs}", steps_per_epoch - skip) as advance:
                if use_cache:
                    while step < steps_per_epoch:
                        if ctx.enabled:
                            idx = torch.tensor(mine[step - skip], dtype=torch.long, device=runtime.device)
                        else:
                            idx = torch.tensor(order[step * settings.batch_size:(step + 1) * settings.batch_size], device=runtime.device)
                        train_step(train_feats.features[idx], train_feats.labels[idx], ddp if ctx.enabled else model.fc, step)
                        scheduler.step()
                        step += 1
                        advance(loss=partial[0] / max(1, partial[1]))
                        if stop_all[0] if ctx.enabled else stop.check():
                            break
                else:
                    if ctx.enabled:  # full slots are batch/N long, so batching the flattened slots gives them back
                        loader = make_loader(
                            train_ds, batch_size=settings.batch_size // ctx.world_size, shuffle=False, workers=workers,
                            pin_memory=pin, sampler=[i for b in mine for i in b], seed=settings.seed + epoch,
                        )
                        batches = _padded(loader, len(mine), img_size=settings.img_size)
                    else:
                        loader = make_loader(
                            train_ds, batch_size=settings.batch_size, shuffle=False, workers=workers, pin_memory=pin,
                            sampler=order[skip * settings.batch_size:], seed=settings.seed + epoch,
                        )
                        batches = loader
                    for batch in batches:
                        for i, msg in batch.failures:
                            if msg not in warned:
                                warned.add(msg)
                                events.warn(f"skipped during training: {msg}")
                        if batch.labels.numel() == 1 and bn_training:
                            batch = _without_lone_image(batch, settings.img_size)
                            if "lone image" not in warned:
                                warned.add("lone image")
                                events.info(
                                    f"a training batch of one image cannot be normalised by BatchNorm in training mode: "
                                    f"such an image sits out its step ({n_train} images, --batch-size {settings.batch_size}"
                                    + (f" over {ctx.world_size} processes" if ctx.enabled else "")
                                    + "; the order changes every epoch, so each time it is another one)"
                                )
                        if batch.labels.numel() > 0 or ctx.enabled:  # every process takes part in every step
                            x = to_model_input(batch.images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
                            train_step(x, batch.labels.to(runtime.device, non_blocking=True), ddp if ctx.enabled else compiled, step)
                        scheduler.step()
                        step += 1
                        advance(loss=partial[0] / max(1, partial[1]))
                        if stop_all[0] if ctx.enabled else stop.check():
                            break
                    del batches, loader
            if ctx.enabled:  # this epoch's training loss and accuracy over every process's images
                partial[:] = all_reduce_sum(ctx, *partial)
                check_in_sync(model, ctx)
            loss_sum, seen, correct = partial
            if (stop_all[0] if ctx.enabled else stop) and step < steps_per_epoch:  # mid-epoch: save where we are
                save_last(epoch, step)  # the resumed run skips the batches done
                barrier(ctx)  # nobody exits (and has torchrun stop the others) before last.pt is written
                raise shared(Interrupted(
                    f"interrupted ({stop.signal_name or 'stop asked in another process'}) in epoch {epoch + 1}, step {step}/{steps_per_epoch}; "
                    f"saved {run_dir / 'last.pt'}. Continue with: rescli finetune --resume {run_dir}"
                ), ctx)

            train_seconds = time.perf_counter() - t0
            model.eval()
            if use_cache:
                ev = eval_features(model.fc, val_feats, val_samples, runtime=runtime)
            elif ctx.enabled:  # every process evaluates rank 0's model (BN statistics included) on its shard
                broadcast_buffers(model, ctx)
                ev = _gather_eval(ctx, run_eval(eval_logits, val_loader), val_samples, n_classes=len(classes))
            else:
                ev = run_eval(eval_logits, val_loader)
            for _, msg in ev.failures:  # a validation file that vanished or broke since the scan: named once, run goes on
                if msg not in warned:
                    warned.add(msg)
                    events.warn(f"skipped during validation: {msg}")
            seconds = time.perf_counter() - t0
            row = {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / max(1, seen), 6),
                "train_accuracy": round(correct / max(1, seen), 6),  # on augmented batches, in train mode
                "val_loss": round(ev.loss, 6),
                "val_accuracy": round(ev.accuracy, 6),
                "lr": float(f"{max(g['lr'] for g in optimizer.param_groups):.3g}"),
                "seconds": round(seconds, 2),
                "train_seconds": round(train_seconds, 3),  # the optimisation steps alone (not in history.csv)
            }
            if on_epoch_end is not None:
                row.update(on_epoch_end(epoch=epoch + 1, model=model, logits_fn=eval_logits) or {})
            history.append(row)
            if ctx.is_main:
                write_history(run_dir / "history.csv", history)
            # Distributed: ev is the same gathered result in every process, so they all take the same decisions.
            improved = ev.accuracy > best_acc or (ev.accuracy == best_acc and ev.loss < best_loss)
            if improved:
                best_acc, best_loss, best_epoch, bad_epochs = ev.accuracy, ev.loss, epoch, 0
                best_eval = ev
                if ctx.is_main:
                    save_checkpoint_file(
                        make_checkpoint(model_state=model.state_dict(), settings=settings_dict,
                                        metrics={"val_accuracy": ev.accuracy, "val_loss": ev.loss, "epoch": epoch + 1}, **base),
                        run_dir / "best.pt",
                    )
            else:
                bad_epochs += 1
            save_last(epoch + 1, 0, {"val_accuracy": ev.accuracy, "val_loss": ev.loss, "epoch": epoch + 1})
            if any_rank(ctx, bool(stop)):  # the signal came during the epoch's last step: complete, evaluated, saved
                # (any_rank waits for rank 0, which has written last.pt by then)
                raise shared(Interrupted(
                    f"interrupted ({stop.signal_name or 'stop asked in another process'}) after epoch {epoch + 1}; "
                    f"saved {run_dir / 'last.pt'}. Continue with: rescli finetune --resume {run_dir}"
                ), ctx)
            events.info(
                f"epoch {epoch + 1}/{settings.epochs}  train loss {row['train_loss']:.4f}  val loss {ev.loss:.4f}  "
                f"val acc {ev.accuracy:.4f}  {seconds:.1f}s" + ("  *" if improved else "")
            )
            if settings.patience is not None and bad_epochs >= settings.patience and epoch + 1 < settings.epochs:
                events.info(f"early stop: no improvement for {bad_epochs} epoch(s); best epoch {best_epoch + 1}")
                stopped_early = True
                break

    def evaluation_files() -> dict[str, Any]:  # distributed: rank 0 alone; the others receive the metrics
        ev = best_eval
        if ev is None:  # resumed after the best epoch: evaluate best.pt once to report its metrics
            best = load_checkpoint(run_dir / "best.pt")
            model.load_state_dict(best["model"])
            model.eval()
            loader = val_loader if not ctx.enabled else make_loader(  # the whole split, not this process's shard
                val_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin
            )
            ev = run_eval(eval_logits, loader)
        # Temperature fitted on the validation split; metrics.json, predictions.csv, the PNGs and report.html.
        metrics = write_evaluation(
            out_dir=run_dir, ev=ev, classes=classes, fit=True, history=history,
            extra=dict(best_epoch=best_epoch + 1, epochs_run=len(history), stopped_early=stopped_early),
        )
        best_ckpt = load_checkpoint(run_dir / "best.pt")
        best_ckpt["metrics"] = metrics
        best_ckpt["temperature"] = float(metrics["temperature"])
        save_checkpoint(best_ckpt, run_dir / "best.pt")
        atomic_write_json(run_dir / "run.json", {**run_info, "finished": True})  # --resume: nothing left to do
        return metrics

    # Every file of the tail is written atomically and best.pt last, so an interrupt here loses nothing:
    # --resume sees that run.json is not marked finished and runs this tail again.
    with interrupt_raises():
        try:
            metrics = on_main(ctx, evaluation_files)
        except KeyboardInterrupt:
            raise shared(Interrupted(
                f"interrupted during the final evaluation; every epoch is saved. Finish it with: "
                f"rescli finetune --resume {run_dir}"
            ), ctx) from None
    return {"run_dir": str(run_dir), "metrics": metrics, "history": history, "classes": classes}


def benchmark_feature_cache(
    data_dir: str | os.PathLike,
    *,
    weights: str = "none",
    arch: str = "resnet18",
    img_size: int = 32,
    epochs: int = 3,
    batch_size: int = 32,
    workers: int | None = 0,
    precision: str = "auto",
    seed: int = 0,
    output_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Time ``--strategy head --augment none`` with and without cached backbone features on one folder.

    Returns per-run wall time, mean epoch time, one-off caching time and best validation accuracy, plus the
    speed-ups (per epoch and whole run). A plain function for benchmark scripts; nothing is printed.
    """
    import tempfile

    root = Path(output_root) if output_root is not None else Path(tempfile.mkdtemp(prefix="rescli-cache-bench-"))
    out: dict[str, Any] = {"data_dir": str(data_dir), "arch": arch, "img_size": img_size, "epochs": epochs, "batch_size": batch_size}
    for name, cache in (("cached", True), ("uncached", False)):
        s = TrainSettings(
            data_dir=str(data_dir), arch=arch, weights=weights, strategy="head", augment="none", epochs=epochs,
            batch_size=batch_size, img_size=img_size, workers=workers, precision=precision, seed=seed, cache_features=cache,
        )
        t0 = time.perf_counter()
        result = finetune(settings=s, output=root / name, show_progress=False)
        wall = time.perf_counter() - t0
        run_info = json.loads((root / name / "run.json").read_text())
        secs = [float(r["seconds"]) for r in result["history"]]
        out[name] = {
            "wall_seconds": round(wall, 2),
            "epoch_seconds": secs,
            "mean_epoch_seconds": round(sum(secs) / len(secs), 3),
            "cache_seconds": run_info.get("feature_cache", {}).get("seconds", 0.0),
            "val_accuracy": result["metrics"]["accuracy"],
            "run_dir": str(root / name),
        }
    out["speedup_per_epoch"] = round(out["uncached"]["mean_epoch_seconds"] / max(out["cached"]["mean_epoch_seconds"], 1e-3), 1)
    out["speedup_training"] = round(
        sum(out["uncached"]["epoch_seconds"]) / max(sum(out["cached"]["epoch_seconds"]) + out["cached"]["cache_seconds"], 1e-3), 2
    )
    return out


