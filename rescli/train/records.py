"""What a run writes about itself: best.pt and last.pt (one shared base, the training state on top of last.pt)
and run.json. Only rank 0 of a distributed run writes; the other processes call the same methods, which then
do nothing, so the loop reads the same in every process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rescli.core.fileio import atomic_write_json
from rescli.data.tasks import SINGLE_LABEL
from rescli.models.checkpoint import make_checkpoint
from rescli.train.run_folder import save_checkpoint_file
from rescli.train.state import TrainingState, capture_rng


@dataclass(frozen=True)
class RunRecords:
    """The run folder's checkpoints and run.json, and what every checkpoint of the run repeats."""

    run_dir: Path
    writes: bool  # rank 0 (or the only process)
    arch: str
    arch_kwargs: dict[str, Any]
    classes: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    settings: dict[str, Any]  # settings_record(): the settings and what they resolved to
    data: dict[str, Any]  # run_folder.data_record(): what evaluate needs to score the held-out images, and resume
    # to keep the split
    task: str = SINGLE_LABEL  # tasks.SINGLE_LABEL | tasks.MULTI_LABEL

    def checkpoint(self, model: nn.Module, *, metrics: dict[str, Any], **training: Any) -> dict[str, Any]:
        return make_checkpoint(
            model_state=model.state_dict(), arch=self.arch, arch_kwargs=self.arch_kwargs, classes=self.classes,
            img_size=self.img_size, mean=self.mean, std=self.std, settings=self.settings, metrics=metrics,
            data=self.data, task=self.task, **training,
        )

    def save_best(self, model: nn.Module, *, metrics: dict[str, Any]) -> None:
        if self.writes:
            save_checkpoint_file(self.checkpoint(model, metrics=metrics), self.run_dir / "best.pt")

    def save_last(
        self, model: nn.Module, state: TrainingState, *, optimizer: Any, scheduler: Any, scaler: Any, pretrained: bool,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """last.pt: best.pt's contents plus everything a resumed run needs to continue exactly where this one is."""
        if not self.writes:
            return
        fields = state.checkpoint_fields()
        training = {
            "epoch_partial": fields.pop("epoch_partial"),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            **fields,
            "rng": capture_rng(),
            "settings_pretrained": pretrained,
        }
        save_checkpoint_file(self.checkpoint(model, metrics=metrics or {}, **training), self.run_dir / "last.pt")

    def write_run_info(self, info: dict[str, Any]) -> None:
        if self.writes:
            atomic_write_json(self.run_dir / "run.json", info)
