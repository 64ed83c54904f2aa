"""The fine-tuning loop, ``finetune``: from a data folder to a run folder.

Read top to bottom: ``_prepare`` (settings, run folder, data, model, --lr auto, cached features), ``_train``
(optimiser and state, then one visible epoch loop: train, validate, record, save), and the final evaluation
(rescli.train.finish). What last.pt holds besides the model and the optimiser is one ``TrainingState``.

The run folder holds best.pt (best validation accuracy), last.pt (everything needed to resume), history.csv,
metrics.json, run.json and skipped.txt. Every file is written atomically, so a kill at any moment leaves
usable files behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rescli.core import events
from rescli.core.errors import RescliError
from rescli.core.runtime import resolve_device
from rescli.data.scan import scan_dataset
from rescli.data.tasks import MULTI
from rescli.evaluation.evaluate import EvalResult
from rescli.inference.predictor import torch_logits_fn
from rescli.models.registry import create_model
from rescli.train.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    backend,
    barrier,
    check_batch_size,
    check_in_sync,
    check_sync_bn,
    init_from_env,
    on_main,
    rank_batches,
    shared,
    shutdown,
)
from rescli.train.epoch import (
    FeatureBatches,
    ImageBatches,
    Notes,
    TrainingBatches,
    lone_image_note,
    train_one_epoch,
)
from rescli.train.features import cache_features, use_feature_cache
from rescli.train.finish import finish_run
from rescli.train.interrupts import Interrupted, StopFlag
from rescli.train.lr_find import auto_lr
from rescli.train.prepare import (
    Run,
    RunStart,
    attach_image_caches,
    checked_index,
    describe_run,
    open_run_folder,
    prepare_data,
    resolve_start,
    start_weights,
)
from rescli.train.records import RunRecords
from rescli.train.run_folder import abandon_unstarted_run, data_record, write_history
from rescli.train.schedule import Plan, epoch_order
from rescli.train.settings import (
    LR_AUTO,
    TrainSettings,
    auto_batch_size,
    batch_size_of,
    peak_lr,
    resolve_strategy,
    settings_record,
    table_options,
    training_runtime,
)
from rescli.train.state import EpochTotals, TrainingState, restore_rng, seed_everything
from rescli.train.step import NonFiniteLoss, Trainer, maybe_sync_bn, objective_for
from rescli.train.validation import validate


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
    runs in every process. ``show_progress`` is kept for callers of older versions: progress is always
    reported as events (rescli.core.events), which the CLI shows.

    Started by torchrun (WORLD_SIZE > 1), every process calls this: DistributedDataParallel, each process
    taking its share of every global batch (see rescli.train.distributed); rank 0 alone writes the run
    folder, and every rank returns the same summary.
    """
    stop = _stop if _stop is not None else StopFlag()  # not `_stop or`: an unset flag is falsy
    try:
        with contextlib.ExitStack() as holds:  # releases the run folder's lock however the run ends
            run = _prepare(settings=settings, output=output, resume=resume, epochs=epochs, holds=holds)
            return _train(run, on_epoch_end=on_epoch_end, stop=stop)
    finally:
        shutdown()


def _prepare(
    *, settings: TrainSettings | None, output: str | os.PathLike | None, resume: str | os.PathLike | None,
    epochs: int | None, holds: contextlib.ExitStack,
) -> Run:
    start = resolve_start(settings=settings, resume=resume, epochs=epochs)
    s = start.settings
    ctx, device = init_from_env(s.device)
    if s.batch_size is not None:  # an automatic batch is checked once the data chose it
        check_batch_size(s.batch_size, ctx.world_size)
    if s.sync_bn:
        check_sync_bn(True, resolve_device(device))
    made_here = start.run_dir is None and (output is None or not Path(output).expanduser().exists())
    run_dir = open_run_folder(ctx, start, output=output, holds=holds)
    try:
        return _prepare_in(run_dir, start=start, ctx=ctx, device=device)
    except BaseException:
        if start.run_dir is None and ctx.is_main:  # a new run that never trained leaves no folder to trip over
            abandon_unstarted_run(run_dir, created=made_here)
        raise


def _prepare_in(run_dir: Path, *, start: RunStart, ctx: DistContext, device: Any) -> Run:
    s = start.settings
    seed_everything(s.seed)

    # Data: scan and check every image once (cached), split, report what was left out. Distributed: rank 0
    # scans and hands the index to the others, so every process has the same split. A resumed run keeps the
    # split it started with, file for file.
    def scan():
        found = scan_dataset(s.data_dir, val_split=s.val_split, seed=s.seed, strict=s.strict, workers=s.workers,
                             table=table_options(s))
        return checked_index(found, start=start, run_dir=run_dir)

    index = on_main(ctx, scan)
    if s.batch_size is None:  # a resumed run has its number: this happens once, for a new run
        s.batch_size = auto_batch_size(img_size=s.img_size, train_images=len(index.splits["train"]))
        check_batch_size(s.batch_size, ctx.world_size)

    # The model and the weights it starts from; where and how precisely it trains.
    model = create_model(s.arch, len(index.classes), s.arch_kwargs)
    weights = start_weights(model, settings=s, resumed=start.resumed, ctx=ctx)
    strategy, frozen_epochs = resolve_strategy(
        s.strategy, pretrained=weights.pretrained, epochs=s.epochs, freeze_epochs=s.freeze_epochs
    )
    runtime = training_runtime(s, device=device)
    model.to(runtime.device).to(memory_format=runtime.memory_format)  # two calls: torch's stubs type no call with both
    data = prepare_data(s, index, ctx=ctx, runtime=runtime)

    lr_find = None
    if s.lr == LR_AUTO:  # never on resume: last.pt holds a number
        lr_find = auto_lr(
            model, data.train_ds, settings=s, ctx=ctx, runtime=runtime, mean=weights.mean, std=weights.std,
            frozen_backbone=strategy in ("head", "gradual") and frozen_epochs > 0, workers=data.workers,
            run_dir=run_dir,
        )
    features = None
    if use_feature_cache(s, strategy=strategy, tail_only=start.tail_only):
        features = cache_features(
            model, train_ds=data.train_ds, val_loader=data.val_loader, ctx=ctx, runtime=runtime, mean=weights.mean,
            std=weights.std, batch_size=batch_size_of(s) * 2, workers=data.workers, pin_memory=data.pin_memory,
        )
    model = maybe_sync_bn(model, settings=s, ctx=ctx, on_features=features is not None)  # after the LR test
    return Run(
        settings=s, ctx=ctx, run_dir=run_dir, index=index, model=model, weights=weights, strategy=strategy,
        frozen_epochs=frozen_epochs, runtime=runtime, data=data, features=features, resumed=start.resumed,
        tail_only=start.tail_only, lr_find=lr_find,
    )


@dataclass
class _Loop:
    """The parts of a run the epoch loop works with."""

    run: Run
    trainer: Trainer
    state: TrainingState
    records: RunRecords
    batches: TrainingBatches
    eval_logits: Callable[[torch.Tensor], torch.Tensor]
    notes: Notes

    def save_last(self, metrics: dict[str, Any] | None = None) -> None:
        t = self.trainer
        self.records.save_last(self.run.model, self.state, optimizer=t.optimizer, scheduler=t.scheduler,
                               scaler=t.scaler, pretrained=self.run.weights.pretrained, metrics=metrics)


def _train(run: Run, *, on_epoch_end: Callable[..., dict[str, Any] | None] | None, stop: StopFlag) -> dict[str, Any]:
    trainer = _trainer(run)
    eval_logits = torch_logits_fn(run.model, runtime=run.runtime, mean=run.weights.mean, std=run.weights.std)
    state = TrainingState()
    if run.resumed is not None:
        trainer.load_state(run.resumed)
        state = TrainingState.from_checkpoint(run.resumed)
        restore_rng(run.resumed["rng"])
        events.info(_resuming(run, state))
    records, run_info = _records(run, epochs_left=run.settings.epochs - state.epoch)
    events.info(_describe_start(run))

    notes = Notes()
    loop = _Loop(run, trainer, state, records, _training_batches(run, notes), eval_logits, notes)
    with stop.installed():
        _epochs(loop, stop=stop, on_epoch_end=on_epoch_end)
    metrics = finish_run(ctx=run.ctx, model=run.model, state=state, records=records, data=run.data,
                         eval_logits=eval_logits, run_info=run_info)
    return {"run_dir": str(run.run_dir), "metrics": metrics, "history": state.history, "classes": run.classes}


def _trainer(run: Run) -> Trainer:
    s = run.settings
    steps_per_epoch = max(1, math.ceil(run.train_images / batch_size_of(s)))
    plan = Plan(run.strategy, run.frozen_epochs, s.epochs, steps_per_epoch, s.warmup_fraction)
    objective = objective_for(
        run.index.task, samples=run.index.splits["train"], n_classes=len(run.classes), balance=s.balance,
        label_smoothing=s.label_smoothing, summed=run.ctx.enabled, device=run.runtime.device,
    )
    return Trainer(run.model, settings=s, plan=plan, runtime=run.runtime, ctx=run.ctx, objective=objective,
                   on_features=run.features is not None, train_images=run.train_images)


def _records(run: Run, *, epochs_left: int) -> tuple[RunRecords, dict[str, Any]]:
    """The run's checkpoint writer, and run.json (written now, marked finished by the final evaluation)."""
    s, ctx = run.settings, run.ctx
    image_cache = attach_image_caches(s, run.data, processes=ctx.world_size, epochs_left=epochs_left,
                                      features_cached=run.features is not None)
    settings = settings_record(s, strategy=run.strategy, frozen_epochs=run.frozen_epochs,
                               train_images=len(run.index.splits["train"]), val_images=len(run.index.splits["val"]))
    records = RunRecords(
        run.run_dir, writes=ctx.is_main, arch=s.arch, arch_kwargs=s.arch_kwargs, classes=run.classes,
        img_size=s.img_size, mean=run.weights.mean, std=run.weights.std, settings=settings,
        data=data_record(run.index), task=run.index.task.name,
    )
    run_info = describe_run(run, settings=settings, image_cache=image_cache)
    records.write_run_info(run_info)
    return records, run_info


def _training_batches(run: Run, notes: Notes) -> TrainingBatches:
    s, ctx = run.settings, run.ctx
    if run.features is not None:
        return FeatureBatches(run.features.train, run.runtime.device)
    return ImageBatches(
        run.data.train_ds, img_size=s.img_size, per_process_batch=batch_size_of(s) // ctx.world_size,
        workers=run.data.workers, pin_memory=run.data.pin_memory, seed=s.seed, runtime=run.runtime,
        mean=run.weights.mean, std=run.weights.std, distributed=ctx.enabled, notes=notes,
        lone_image_note=lone_image_note(train_images=run.train_images, batch_size=batch_size_of(s),
                                        processes=ctx.world_size),
    )


def _epochs(loop: _Loop, *, stop: StopFlag, on_epoch_end: Callable[..., dict[str, Any] | None] | None) -> None:
    """The epoch loop: train, validate, record, save; until the last epoch, a stop, or --patience."""
    run, state, s = loop.run, loop.state, loop.run.settings
    for epoch in range(state.epoch, s.epochs):
        started = time.perf_counter()
        _train_epoch(loop, epoch, stop=stop)  # a stop inside the epoch saves last.pt there and raises
        train_seconds = time.perf_counter() - started
        ev = _validate(loop)
        seconds = time.perf_counter() - started
        row = _history_row(epoch, state.totals, ev, lr=max(g["lr"] for g in loop.trainer.optimizer.param_groups),
                           seconds=seconds, train_seconds=train_seconds)
        if on_epoch_end is not None:
            row.update(on_epoch_end(epoch=epoch + 1, model=run.model, logits_fn=loop.eval_logits) or {})
        state.history.append(row)
        if run.ctx.is_main:
            write_history(run.run_dir / "history.csv", state.history)
        # Distributed: ev is the same gathered result in every process, so they all take the same decisions.
        epoch_metrics = {"val_accuracy": ev.accuracy, "val_loss": ev.loss, "epoch": epoch + 1}
        improved = state.record_validation(ev, epoch=epoch)
        if improved:
            loop.records.save_best(run.model, metrics=epoch_metrics)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        loop.save_last(epoch_metrics)
        if any_rank(run.ctx, bool(stop)):  # the signal came during the epoch's last step: complete, evaluated, saved
            # (any_rank waits for rank 0, which has written last.pt by then)
            raise shared(Interrupted(_interrupted(stop, f"after epoch {epoch + 1}", run)), run.ctx)
        events.info(
            f"epoch {epoch + 1}/{s.epochs}  train loss {row['train_loss']:.4f}  val loss {ev.loss:.4f}  "
            f"val acc {ev.accuracy:.4f}  {seconds:.1f}s" + ("  *" if improved else "")
        )
        if s.patience is not None and state.bad_epochs >= s.patience and epoch + 1 < s.epochs:
            events.info(
                f"early stop: no improvement for {state.bad_epochs} epoch(s); best epoch {state.best_epoch + 1}"
            )
            state.stopped_early = True
            return


def _train_epoch(loop: _Loop, epoch: int, *, stop: StopFlag) -> None:
    """One epoch's optimiser steps (from where a resumed run stopped). A stop asked before its last step saves
    last.pt at that step and raises Interrupted; the resumed run skips the batches done."""
    run, state, trainer, s = loop.run, loop.state, loop.trainer, loop.run.settings
    ctx = run.ctx
    trainer.begin_epoch(epoch)
    skip = state.step_in_epoch
    if not (skip and ctx.is_main):  # a resumed epoch's saved totals are counted once, by rank 0
        state.totals = EpochTotals()
    # The order depends only on (seed, epoch); distributed, this process's slot of every global batch.
    order = epoch_order(run.train_images, seed=s.seed, epoch=epoch)
    slots = rank_batches(order, batch_size=batch_size_of(s), ctx=ctx)
    batches = loop.batches.epoch(slots[skip:], epoch=epoch, batchnorm_in_training=trainer.batchnorm_in_training)
    try:
        step = train_one_epoch(trainer, batches, epoch=epoch, first_step=skip, steps=len(slots),
                               totals=state.totals, stop=stop, title=f"epoch {epoch + 1}/{s.epochs}")
    except NonFiniteLoss as bad:
        raise shared(_loss_not_finite(bad, loop, epoch=epoch), ctx) from None
    if ctx.enabled:  # this epoch's training loss and accuracy over every process's images
        loss_sum, images, correct = all_reduce_sum(ctx, *state.totals.as_list())
        state.totals = EpochTotals(loss_sum, int(images), correct)
        check_in_sync(run.model, ctx)
    if (trainer.stop_agreed if ctx.enabled else stop) and step < len(slots):  # mid-epoch: save where we are
        state.epoch, state.step_in_epoch = epoch, step
        loop.save_last()
        barrier(ctx)  # nobody exits (and has torchrun stop the others) before last.pt is written
        where = f"in epoch {epoch + 1}, step {step}/{len(slots)}"
        raise shared(Interrupted(_interrupted(stop, where, run)), ctx)


def _validate(loop: _Loop) -> EvalResult:
    run = loop.run
    return validate(
        run.model, val_features=run.features.val if run.features is not None else None, val_loader=run.data.val_loader,
        val_samples=run.index.splits["val"], eval_logits=loop.eval_logits, ctx=run.ctx, runtime=run.runtime,
        n_classes=len(run.classes), notes=loop.notes,
    )


def _history_row(
    epoch: int, totals: EpochTotals, ev: EvalResult, *, lr: float, seconds: float, train_seconds: float
) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        "train_loss": round(totals.mean_loss, 6),
        "train_accuracy": round(totals.accuracy, 6),  # on augmented batches, in train mode
        "val_loss": round(ev.loss, 6),
        "val_accuracy": round(ev.accuracy, 6),
        "lr": float(f"{lr:.3g}"),
        "seconds": round(seconds, 2),
        "train_seconds": round(train_seconds, 3),  # the optimisation steps alone (not in history.csv)
    }


def _describe_start(run: Run) -> str:
    s, ctx = run.settings, run.ctx
    kind = f"{len(run.classes)} labels (multi-label)" if run.index.task is MULTI else f"{len(run.classes)} classes"
    return (
        f"{s.arch} · {kind} · {len(run.index.splits['train'])} train / "
        f"{len(run.index.splits['val'])} val images · {run.runtime.describe()} · strategy {run.strategy}"
        + (f" ({run.frozen_epochs} frozen epoch(s))" if run.strategy == "gradual" else "")
        + (f" · {ctx.world_size} processes ({backend()}), {batch_size_of(s) // ctx.world_size} images each a step"
           if ctx.enabled else "")
        + f" · run folder {run.run_dir}"
    )


def _resuming(run: Run, state: TrainingState) -> str:
    if run.tail_only:
        return f"resuming {run.run_dir}: all {state.epoch} epochs are done; finishing its evaluation of best.pt"
    at_step = f", step {state.step_in_epoch + 1}" if state.step_in_epoch else ""
    return f"resuming {run.run_dir} at epoch {state.epoch + 1}{at_step}"


def _interrupted(stop: StopFlag, where: str, run: Run) -> str:
    return (
        f"interrupted ({stop.signal_name or 'stop asked in another process'}) {where}; "
        f"saved {run.run_dir / 'last.pt'}. Continue with: rescli finetune --resume {run.run_dir}"
    )


def _loss_not_finite(bad: NonFiniteLoss, loop: _Loop, *, epoch: int) -> RescliError:
    state, run_dir = loop.state, loop.run.run_dir
    kept = (
        f"best.pt (epoch {state.best_epoch + 1}, val accuracy {state.best_accuracy:.4f}) is kept in {run_dir}"
        if state.best_epoch >= 0 else f"no epoch finished, so there is no best.pt in {run_dir}"
    )
    return RescliError(
        f"loss became {bad.shown} at epoch {epoch + 1}, step {bad.step + 1}; training stopped. {kept}. "
        f"Try a lower --lr (now {peak_lr(loop.run.settings):.3g}) or rescli lr-find"
    )
