"""The tail of a run, after its last epoch: best.pt evaluated on the validation split, its temperature fitted (and,
multi-label, each class's threshold tuned), and metrics.json, predictions.csv, the figures and report.html written;
run.json then marks the run finished.

Every file of the tail is written atomically and best.pt last, so an interrupt here loses nothing: --resume
sees that run.json is not marked finished and runs the tail again."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rescli.data.tasks import MULTI
from rescli.evaluation.artefacts import write_evaluation
from rescli.evaluation.evaluate import run_eval
from rescli.insight.reports import heatmaps_for_model, validation_suspects
from rescli.models.checkpoint import load_checkpoint, save_checkpoint
from rescli.train.distributed import DistContext, on_main, shared
from rescli.train.interrupts import Interrupted, interrupt_raises
from rescli.train.prepare import RunData
from rescli.train.records import RunRecords
from rescli.train.state import TrainingState


def finish_run(
    *, ctx: DistContext, model: nn.Module, state: TrainingState, records: RunRecords, data: RunData,
    eval_logits: Callable[[torch.Tensor], torch.Tensor], run_info: dict[str, Any],
) -> dict[str, Any]:
    """The final evaluation of best.pt and its files (distributed: by rank 0; every process gets the metrics)."""

    def evaluation_files() -> dict[str, Any]:
        return write_final_evaluation(model=model, state=state, records=records, data=data, ctx=ctx,
                                      eval_logits=eval_logits, run_info=run_info)

    with interrupt_raises():
        try:
            return on_main(ctx, evaluation_files)
        except KeyboardInterrupt:
            raise shared(Interrupted(
                f"interrupted during the final evaluation; every epoch is saved. Finish it with: "
                f"rescli finetune --resume {records.run_dir}"
            ), ctx) from None


def write_final_evaluation(
    *, model: nn.Module, state: TrainingState, records: RunRecords, data: RunData, ctx: DistContext,
    eval_logits: Callable[[torch.Tensor], torch.Tensor], run_info: dict[str, Any],
) -> dict[str, Any]:
    run_dir: Path = records.run_dir
    ev = state.best_eval
    if ev is None:  # resumed after the best epoch: evaluate best.pt once to report its metrics
        model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
        model.eval()
        ev = run_eval(eval_logits, data.whole_val_loader() if ctx.enabled else data.val_loader)
    # Temperature fitted on the validation split; metrics.json, predictions.csv, the PNGs and report.html.
    metrics = write_evaluation(
        out_dir=run_dir, ev=ev, classes=records.classes, fit=True, history=state.history,
        extra={
            "best_epoch": state.best_epoch + 1, "epochs_run": len(state.history), "stopped_early": state.stopped_early,
            # Issue #16: the validation images whose label best.pt doubts most (rescli.insight.reports); confident
            # learning ranks one given label per image, so a multi-label run has none.
            **({} if ev.task is MULTI else
               {"label_issues": validation_suspects(ev.logits, ev.y_true, ev.paths, records.classes)}),
        },
        heatmaps=heatmaps_for_model(run_dir / "best.pt"),  # issue #16: top_losses.png shows where it looked
    )
    best = load_checkpoint(run_dir / "best.pt")
    best["metrics"] = metrics
    best["temperature"] = float(metrics["temperature"])
    if "thresholds" in metrics:  # multi-label: what predict decides each class by
        best["thresholds"] = [float(t) for t in metrics["thresholds"]]
    save_checkpoint(best, run_dir / "best.pt")
    records.write_run_info({**run_info, "finished": True})  # --resume: nothing left to do
    return metrics
