"""The pieces of the training loop on their own: what best.pt and last.pt hold (TrainingState), how often a step
waits for the device, the objective's loss and hits, --lr parsing, and last.pt files from older versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_class_folder

from rescli.core.errors import RescliError, UsageError
from rescli.models.checkpoint import load_checkpoint
from rescli.train import step as step_module
from rescli.train.loop import finetune
from rescli.train.settings import LR_AUTO, TrainSettings, peak_lr, validate_settings
from rescli.train.state import TrainingState
from rescli.train.step import SoftmaxObjective

TINY = {"arch": "resnet20", "weights": "none", "img_size": 16, "batch_size": 4, "workers": 0, "epochs": 1,
        "augment": "none", "precision": "fp32"}
STEPS_PER_EPOCH = 4  # 3 classes x 6 images -> 15 train (4 batches of 4) / 3 val

# Both files: what best.pt and last.pt hold (files written by earlier versions load, and so do these in them).
BEST_KEYS = {"format", "format_version", "arch", "arch_kwargs", "classes", "img_size", "mean", "std", "temperature",
             "model", "settings", "metrics", "versions", "created", "data", "task"}
LAST_KEYS = BEST_KEYS | {"epoch_partial", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch",
                         "best_accuracy", "best_loss", "best_epoch", "bad_epochs", "history", "rng",
                         "settings_pretrained"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("loop_data") / "data", per_class=6, size=16)


@pytest.fixture(scope="module")
def one_epoch_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(out.parent / "cache"))
        finetune(settings=TrainSettings(data_dir=str(data_dir), **TINY), output=out)
    return out


def test_best_and_last_hold_exactly_these_keys(one_epoch_run):
    assert set(load_checkpoint(one_epoch_run / "best.pt")) == BEST_KEYS
    assert set(load_checkpoint(one_epoch_run / "last.pt")) == LAST_KEYS


def test_training_state_is_what_last_pt_holds_beside_model_and_optimiser(one_epoch_run):
    last = load_checkpoint(one_epoch_run / "last.pt")
    fields = TrainingState.from_checkpoint(last).checkpoint_fields()
    assert fields == {k: last[k] for k in fields}
    assert (fields["epoch"], fields["step_in_epoch"], fields["best_epoch"]) == (1, 0, 0)
    assert fields["epoch_partial"] == [0.0, 0, 0]  # saved at the end of an epoch: nothing partial


def test_a_last_pt_without_the_keys_added_later_still_resumes(one_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    last = load_checkpoint(run / "last.pt")
    for key in ("step_in_epoch", "bad_epochs", "epoch_partial", "data"):  # what the first last.pt files lacked
        del last[key]
    torch.save(last, run / "last.pt")
    out = finetune(resume=run, epochs=2)
    assert [row["epoch"] for row in out["history"]] == [1, 2]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def _count_host_syncs(monkeypatch) -> list[int]:
    """Wait-for-the-device calls (item, bool, int, float of a tensor) made inside each optimiser step."""
    per_step: list[int] = []
    inside = [False]
    for name in ("item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if inside[0]:
                per_step[-1] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = step_module.Trainer.step

    def step(self, *args, **kwargs):
        per_step.append(0)
        inside[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(step_module.Trainer, "step", step)
    return per_step


@pytest.mark.parametrize("mixup, syncs", [(0.0, 3), (0.4, 4)])
def test_a_step_waits_for_the_device_only_for_the_loss_check_and_the_epoch_sums(
    data_dir, tmp_path, monkeypatch, mixup, syncs
):
    # One check that the loss is finite, the loss for the running mean, the count of hits (a mixed batch counts
    # its second labels too). More would stall a GPU once a step for nothing.
    per_step = _count_host_syncs(monkeypatch)
    finetune(settings=TrainSettings(data_dir=str(data_dir), **{**TINY, "mixup": mixup}), output=tmp_path / "run")
    assert per_step == [syncs] * STEPS_PER_EPOCH


def test_objective_counts_both_labels_of_a_mixed_batch_by_their_share():
    objective = SoftmaxObjective(class_weights=None, label_smoothing=0.0, summed=False)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    y_a, y_b = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])  # predicted: 0, 1, 0
    assert objective.correct(logits, y_a, y_a, 1.0) == 2
    assert objective.correct(logits, y_a, y_b, 0.75) == pytest.approx(0.75 * 2 + 0.25 * 1)
    mean = torch.nn.functional.cross_entropy
    assert torch.allclose(objective.loss(logits, y_a, y_b, 0.75), 0.75 * mean(logits, y_a) + 0.25 * mean(logits, y_b))
    summed = SoftmaxObjective(class_weights=torch.tensor([1.0, 3.0]), label_smoothing=0.0, summed=True)
    assert summed.weight(y_a) == 7.0  # 1 + 3 + 3: the batch's share of a weighted mean


def test_lr_is_a_number_or_auto_after_validation_and_training_needs_the_number(data_dir):
    given = TrainSettings(data_dir=str(data_dir), lr="3e-3")
    validate_settings(given)
    assert given.lr == 0.003 and peak_lr(given) == 0.003
    auto = TrainSettings(data_dir=str(data_dir), lr=" Auto ")
    validate_settings(auto)
    assert auto.lr == LR_AUTO
    with pytest.raises(RescliError, match="not turned into a number"):
        peak_lr(auto)  # the range test sets the number before anything trains
    with pytest.raises(UsageError, match="--lr 'fast'"):
        validate_settings(TrainSettings(data_dir=str(data_dir), lr="fast"))
