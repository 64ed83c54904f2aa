"""The training loop for real, on tiny images: strategies, weights, feature caching, mixup, lr-find,
resume, interrupts, the NaN stop, atomic writes and reproducibility.

Most runs use the CIFAR-style resnet20 (same layer names as torchvision's ResNets, 0.27 M parameters)
at 16 px so each takes about a second; the torchvision-format weights test uses resnet18.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAfter, make_class_folder, write_color_images

from rescli.core.errors import RescliError
from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint
from rescli.models.registry import IMAGENET_MEAN, create_model
from rescli.models.weights import torch_hub_checkpoint_dir
from rescli.train import finish as finish_module
from rescli.train import run_folder as run_folder_module
from rescli.train.interrupts import Interrupted, StopFlag
from rescli.train.loop import finetune
from rescli.train.lr_find import suggest, valley
from rescli.train.mixing import mix_batch
from rescli.train.settings import TrainSettings
from rescli.train.state import seed_everything

TINY = {"arch": "resnet20", "weights": "none", "img_size": 16, "batch_size": 4, "workers": 0}
STRAIGHT = {"epochs": 3, "precision": "bf16", "augment": "light"}
STEPS_PER_EPOCH = 4  # 3 classes x 6 images -> 15 train (4 batches of 4) / 3 val




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("train_data") / "data", per_class=6, size=16)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory) -> Path:
    """A resnet20 state_dict standing in for pretrained weights (BN statistics not at their defaults)."""
    torch.manual_seed(123)
    net = create_model("resnet20", 10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100)
    path = tmp_path_factory.mktemp("weights") / "resnet20_start.pth"
    torch.save(net.state_dict(), path)
    return path


def settings(data: Path, **kw) -> TrainSettings:
    return TrainSettings(data_dir=str(data), **{**TINY, "epochs": 2, **kw})


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def initial_head(seed: int, num_classes: int, arch: str = "resnet20") -> dict[str, torch.Tensor]:
    """The head finetune starts from: it seeds everything, then builds the model."""
    seed_everything(seed)
    return {k: v for k, v in create_model(arch, num_classes).state_dict().items() if k.startswith("fc.")}


def history_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def without_seconds(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


# --- strategies ------------------------------------------------------------------------------------------

def test_head_strategy_keeps_backbone_and_bn_statistics_bit_identical(data_dir, start_weights, tmp_path):
    # --augment light: real images through the whole net in train mode, so frozen BN statistics are tested.
    finetune(settings=settings(data_dir, weights=str(start_weights), strategy="head", augment="light"),
             output=tmp_path / "run")
    start = torch.load(start_weights, weights_only=True)
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "run" / name)
        assert_same_tensors(backbone(ckpt["model"]), backbone(start))  # num_batches_tracked included
        init = initial_head(0, 3)
        assert not torch.equal(ckpt["model"]["fc.weight"], init["fc.weight"])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(last["optimizer"]["state"]) == 2  # AdamW kept state for fc.weight and fc.bias only
    assert last["settings"]["strategy_resolved"] == "head"


def test_full_strategy_trains_every_tensor(data_dir, start_weights, tmp_path):
    finetune(settings=settings(data_dir, weights=str(start_weights), strategy="full", epochs=1),
             output=tmp_path / "run")
    start = backbone(torch.load(start_weights, weights_only=True))
    trained = backbone(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert unchanged == []  # weights, BN affine parameters and running statistics all moved
    assert int(trained["bn1.num_batches_tracked"]) == 100 + STEPS_PER_EPOCH


def test_gradual_freezes_backbone_first_then_trains_it_with_lower_lrs_for_earlier_layers(
    data_dir, start_weights, tmp_path, monkeypatch
):
    saved: list[tuple[str, dict]] = []
    real_save = finish_module.save_checkpoint

    def spy(ckpt, path):  # keep a copy of every checkpoint written
        kept = {"epoch": ckpt.get("epoch"), "model": dict(ckpt["model"]), "optimizer": ckpt.get("optimizer")}
        saved.append((Path(path).name, kept))
        return real_save(ckpt, path)

    monkeypatch.setattr(finish_module, "save_checkpoint", spy)
    monkeypatch.setattr(run_folder_module, "save_checkpoint", spy)
    lr = 2e-3
    finetune(settings=settings(data_dir, weights=str(start_weights), strategy="gradual", freeze_epochs=1, lr=lr),
             output=tmp_path / "run")
    start = torch.load(start_weights, weights_only=True)
    last = {c["epoch"]: c for name, c in saved if name == "last.pt"}

    after1 = last[1]["model"]
    assert_same_tensors(backbone(after1), backbone(start))  # epoch 1: frozen, BN statistics too
    assert not torch.equal(after1["fc.weight"], initial_head(0, 3)["fc.weight"])

    after2 = last[2]["model"]
    for k, v in backbone(start).items():
        assert not torch.equal(after2[k], v), f"{k} did not train after unfreezing"

    def mean_step(key):
        return float((after2[key].float() - after1[key].float()).abs().mean())

    assert mean_step("conv1.weight") < mean_step("layer2.0.conv1.weight") / 3 < mean_step("layer3.2.conv2.weight") / 3
    groups = last[2]["optimizer"]["param_groups"]
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales[0] == pytest.approx(0.01) and scales[-1] == 1.0 and len(scales) == 5  # stem, 3 stages, head
    assert min(g["initial_lr"] for g in groups) == pytest.approx(lr * 0.01)


# --- weights from files ----------------------------------------------------------------------------------

def test_transfer_from_an_earlier_run_to_new_classes_reuses_backbone_bit_for_bit(cli, data_dir, tmp_path):
    source = tmp_path / "source"
    res = cli("finetune", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "--epochs", "1",
              "-b", "4", "--workers", "0", "-o", source)
    assert res.code == 0, res.err
    new = tmp_path / "new"
    write_color_images(new / "cyan", (30, 200, 210), 5, size=16, seed=7)
    write_color_images(new / "magenta", (210, 30, 200), 5, size=16, seed=8)
    res = cli("finetune", new, "--weights", source / "best.pt", "--arch", "resnet20", "--strategy", "head",
              "--augment", "none", "--img-size", "16", "--epochs", "2", "-b", "4", "--workers", "0",
              "-o", tmp_path / "target", "--format", "json")
    assert res.code == 0, res.err
    assert "caching backbone features" in res.err
    src, dst = load_checkpoint(source / "best.pt"), load_checkpoint(tmp_path / "target" / "best.pt")
    assert_same_tensors(backbone(dst["model"]), backbone(src["model"]))  # BN statistics included
    assert dst["classes"] == ["cyan", "magenta"] and dst["model"]["fc.weight"].shape == (2, 64)
    assert not torch.equal(dst["model"]["fc.weight"], initial_head(0, 2)["fc.weight"])  # the new head trained
    assert dst["mean"] == src["mean"] and dst["std"] == src["std"]
    model = model_from_checkpoint(dst)  # a normal full model: loads strictly, backbone + head
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
    assert json.loads(res.out)["best_checkpoint"].endswith("best.pt")


def test_torchvision_state_dict_file_via_cli(cli, data_dir, tmp_path):
    from torchvision import models as tvm

    torch.manual_seed(3)
    state = tvm.resnet18().state_dict()  # the format of torchvision's .pth downloads (1000-class head)
    path = tmp_path / "resnet18-custom.pth"
    torch.save(state, path)
    res = cli("finetune", data_dir, "--weights", path, "--strategy", "head", "--augment", "none", "--img-size", "16",
              "--epochs", "1", "-b", "8", "--workers", "0", "-o", tmp_path / "run")
    assert res.code == 0, res.err
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert_same_tensors(backbone(ckpt["model"]), backbone(state))
    assert ckpt["arch"] == "resnet18" and ckpt["model"]["fc.weight"].shape == (3, 512)
    assert ckpt["mean"] == pytest.approx(list(IMAGENET_MEAN))


def test_mismatched_weights_file_fails_listing_what_did_not_fit(cli, data_dir, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_model("resnet32", 10).state_dict(), path)
    res = cli("finetune", data_dir, "--weights", path, "--arch", "resnet20", "--img-size", "16", "--workers", "0",
              "-o", tmp_path / "run")
    assert res.code == 1
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "do not fit this model: unexpected 72: layer1.3.*" in lines[0]
    assert "--arch resnet32" in lines[0]
    assert not (tmp_path / "run" / "best.pt").exists()


def test_imagenet_offline_fails_fast_in_one_line(cli, data_dir, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    t0 = time.perf_counter()
    res = cli("finetune", data_dir, "--img-size", "16", "--workers", "0", "-o", tmp_path / "run")  # default: imagenet
    assert res.code == 1
    assert time.perf_counter() - t0 < 60
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert "could not download ResNet18_Weights.IMAGENET1K_V1" in errors[0] and "Offline?" in errors[0]
    assert str(torch_hub_checkpoint_dir()) in errors[0] and "--weights none" in errors[0]
    assert "Traceback" not in res.err


# --- cached features, mixup/cutmix ------------------------------------------------------------------------

def test_head_on_cached_features_matches_training_through_the_backbone(data_dir, start_weights, tmp_path):
    kw = {"weights": str(start_weights), "strategy": "head", "augment": "none", "precision": "fp32", "epochs": 3}
    cached = finetune(settings=settings(data_dir, **kw), output=tmp_path / "cached")
    direct = finetune(settings=settings(data_dir, cache_features=False, **kw), output=tmp_path / "direct")
    assert "feature_cache" in json.loads((tmp_path / "cached" / "run.json").read_text())
    assert "feature_cache" not in json.loads((tmp_path / "direct" / "run.json").read_text())
    a = load_checkpoint(tmp_path / "cached" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "direct" / "best.pt")["model"]
    assert_same_tensors(backbone(a), backbone(b))
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-3, atol=1e-5)
    assert not torch.equal(a["fc.weight"], initial_head(0, 3)["fc.weight"])
    for ra, rb in zip(cached["history"], direct["history"]):
        assert ra["val_accuracy"] == rb["val_accuracy"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)


def test_mix_batch_mixup_and_cutmix():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = torch.tensor([0, 1])
    same = mix_batch(x, y, mixup=0, cutmix=0, rng=np.random.default_rng(0))
    assert same[0] is x and same[3] == 1.0

    xm, ya, yb, lam = mix_batch(x, y, mixup=0.4, cutmix=0, rng=np.random.default_rng(1))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    perm = [0 if int(v) == 0 else 1 for v in yb]
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    again = mix_batch(x, y, mixup=0.4, cutmix=0, rng=np.random.default_rng(1))
    assert torch.equal(again[0], xm) and again[3] == lam  # same seed, same mix

    for seed in range(20):  # find a cutmix that swapped the pair, then check the pasted box and lam
        xc, ya, yb, lam = mix_batch(x, y, mixup=0, cutmix=1.0, rng=np.random.default_rng(seed))
        if not torch.equal(yb, y) and 0 < lam < 1:
            break
    pasted = (xc[0] != x[0]).any(0)
    assert float(pasted.float().mean()) == pytest.approx(1 - lam)
    assert torch.equal(xc[0][:, pasted], x[1][:, pasted]) and torch.equal(xc[0][:, ~pasted], x[0][:, ~pasted])


def test_mixup_and_cutmix_train_and_are_stored(cli, data_dir, tmp_path):
    res = cli("finetune", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "--epochs", "1",
              "-b", "4", "--workers", "0", "--mixup", "0.4", "--cutmix", "1.0", "-o", tmp_path / "run")
    assert res.code == 0, res.err
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["settings"]["mixup"] == 0.4 and ckpt["settings"]["cutmix"] == 1.0
    bad = cli("finetune", data_dir, "--weights", "none", "--mixup", "-1", "-o", tmp_path / "bad")
    assert bad.code == 2 and "--mixup" in bad.err


# --- lr-find ---------------------------------------------------------------------------------------------

def test_valley_suggestion_sits_where_the_loss_falls():
    lrs = list(np.logspace(-6, 0, 60))
    losses = [2.0 if lr < 1e-4 else 2.0 - 1.5 * (math.log10(lr) + 4) / 3 if lr < 1e-1 else 0.5 + 20 * (lr - 0.1)
              for lr in lrs]
    s, minimum, steepest = suggest(lrs, losses)
    assert 1e-4 < s < 1e-1  # inside the falling stretch, before the minimum
    assert minimum == pytest.approx(lrs[int(np.argmin(losses))] / 10)
    assert valley([3, 2, 1, 2]) in (0, 1, 2)


def test_lr_find_prints_a_rate_and_saves_the_curve(cli, data_dir, tmp_path):
    png = tmp_path / "curve.png"
    res = cli("lr-find", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "-b", "4",
              "--workers", "0", "--steps", "30", "--output", png)
    assert res.code == 0, res.err
    lr = float(res.out.strip())  # stdout: the suggested rate alone
    assert 1e-7 <= lr <= 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = cli("lr-find", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "-b", "4",
              "--workers", "0", "--steps", "30", "--output", png, "--format", "json")
    out = json.loads(res.out)
    assert out["suggested_lr"] == pytest.approx(lr, rel=1e-2) and out["trained"] == "all" and out["steps"] <= 30


def test_lr_auto_runs_the_range_test_first_and_stores_the_rate(cli, data_dir, tmp_path):
    res = cli("finetune", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "--epochs", "1",
              "-b", "4", "--workers", "0", "--lr", "auto", "-o", tmp_path / "run")
    assert res.code == 0, res.err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    lr = info["settings"]["lr"]
    assert isinstance(lr, float) and lr == info["lr_find"]["suggested_lr"]
    assert (tmp_path / "run" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert load_checkpoint(tmp_path / "run" / "last.pt")["settings"]["lr"] == lr  # resume trains with that number
    bad = cli("finetune", data_dir, "--lr", "fast", "-o", tmp_path / "bad")
    assert bad.code == 2 and "--lr" in bad.err


# --- resume, interrupts, reproducibility -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory) -> Path:
    """3 epochs in one go, with bf16 autocast (default on AMX CPUs from 40 px) and random augmentation, so that
    resuming must restore the RNG state exactly to match."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(out.parent / "cache"))
        torch.set_num_threads(1)
        finetune(settings=settings(data_dir, **STRAIGHT), output=out)
    return out


def test_same_seed_same_metrics_and_weights(straight_run, data_dir, tmp_path):
    again = finetune(settings=settings(data_dir, **STRAIGHT), output=tmp_path / "again")
    assert without_seconds(history_rows(straight_run)) == without_seconds(history_rows(tmp_path / "again"))
    assert_same_tensors(load_checkpoint(straight_run / "best.pt")["model"],
                        load_checkpoint(tmp_path / "again" / "best.pt")["model"])
    assert again["metrics"]["accuracy"] == json.loads((straight_run / "metrics.json").read_text())["accuracy"]
    other = finetune(settings=settings(data_dir, **STRAIGHT, seed=1), output=tmp_path / "other")
    assert without_seconds(other["history"]) != without_seconds(again["history"])


def test_interrupt_and_resume_give_the_same_run_as_training_straight(straight_run, data_dir, tmp_path):
    run = tmp_path / "run"
    # Interrupted during the last step of epoch 1: the epoch is finished, validated and saved first.
    with pytest.raises(Interrupted) as exc:
        finetune(settings=settings(data_dir, **STRAIGHT), output=run, _stop=StopAfter(STEPS_PER_EPOCH))
    assert exc.value.exit_code == 130 and f"rescli finetune --resume {run}" in exc.value.message
    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step_in_epoch"]) == (1, 0) and len(history_rows(run)) == 1
    # Resumed, then interrupted again in the middle of epoch 2.
    with pytest.raises(Interrupted):
        finetune(resume=run, _stop=StopAfter(2))
    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step_in_epoch"]) == (1, 2)
    finetune(resume=run / "last.pt")
    assert without_seconds(history_rows(run)) == without_seconds(history_rows(straight_run))
    for name in ("best.pt", "last.pt"):
        assert_same_tensors(load_checkpoint(run / name)["model"], load_checkpoint(straight_run / name)["model"])
    a = load_checkpoint(run / "last.pt")["optimizer"]["state"]
    b = load_checkpoint(straight_run / "last.pt")["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_resume_trains_longer_and_refuses_a_finished_run(cli, straight_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    res = cli("finetune", "--resume", run, "--workers", "0")
    assert res.code == 2 and "--epochs N with N > 3" in res.err
    res = cli("finetune", "--resume", run, "--epochs", "4")
    assert res.code == 0, res.err
    assert [r["epoch"] for r in history_rows(run)] == ["1", "2", "3", "4"]
    res = cli("finetune", "--resume", run / "best.pt")
    assert res.code == 2 and "resume from last.pt" in res.err


def test_sigint_after_first_epoch_saves_last_pt_and_resume_completes(data_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rescli", "finetune", str(data_dir), "--weights", "none", "--arch", "resnet20",
           "--img-size", "16", "--epochs", "8", "-b", "1", "--workers", "0", "-o", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "history.csv").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "SIGINT: finishing this step" in err and f"Continue with: rescli finetune --resume {run}" in err
    assert "Traceback" not in err and out == ""
    last = load_checkpoint(run / "last.pt")
    done = len(history_rows(run))
    assert 1 <= done < 8 and last["epoch"] == done
    assert not list(run.glob(".*.tmp"))

    from conftest import run_cli

    res = run_cli("finetune", "--resume", run)
    assert res.code == 0, res.err
    assert [int(r["epoch"]) for r in history_rows(run)] == list(range(1, 9))
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 8


def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    with flag.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert flag and flag.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_patience_stops_early(data_dir, start_weights, tmp_path):
    # An LR too small to move fp32 weights: validation never improves after epoch 1.
    out = finetune(settings=settings(data_dir, weights=str(start_weights), strategy="head", augment="none", lr=1e-12,
                                     epochs=6, patience=2, precision="fp32"), output=tmp_path / "run")
    metrics = out["metrics"]
    assert metrics["stopped_early"] is True and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1


# --- NaN stop, atomic writes -----------------------------------------------------------------------------------

def _nan_loss_from_call(monkeypatch, first_bad: int):
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss.forward

    def forward(self, input, target):
        calls["n"] += 1
        loss = real(self, input, target)
        return loss * float("nan") if calls["n"] >= first_bad else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)


def test_nan_loss_stops_with_a_clear_message_and_keeps_best(cli, data_dir, tmp_path, monkeypatch):
    _nan_loss_from_call(monkeypatch, STEPS_PER_EPOCH + 2)  # epoch 2, step 2
    run = tmp_path / "run"
    res = cli("finetune", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "--epochs", "3",
              "-b", "4", "--workers", "0", "-o", run)
    assert res.code == 1
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "loss became nan at epoch 2, step 2; training stopped" in errors[0]
    assert "best.pt (epoch 1" in errors[0] and "lower --lr" in errors[0]
    best = load_checkpoint(run / "best.pt")
    assert best["metrics"]["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in best["model"].values())
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(data_dir, tmp_path, monkeypatch):
    _nan_loss_from_call(monkeypatch, 1)
    with pytest.raises(RescliError, match="no epoch finished, so there is no best.pt"):
        finetune(settings=settings(data_dir), output=tmp_path / "run")


def test_absurd_learning_rate_ends_in_the_nan_stop(cli, data_dir, tmp_path):
    res = cli("finetune", data_dir, "--weights", "none", "--arch", "resnet20", "--img-size", "16", "--epochs", "3",
              "-b", "4", "--workers", "0", "--lr", "1e30",
              "-o", tmp_path / "run")
    assert res.code == 1 and "loss became" in res.err and "training stopped" in res.err


def _failing_write_after(monkeypatch, target_name: str):
    """Writing a temp file for ``target_name`` writes half its bytes, then fails like a full disk."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(f".{target_name}.") and self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_failed_write_leaves_previous_checkpoint_intact_and_no_temp_files(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    finetune(settings=settings(data_dir, epochs=1), output=run)
    before = (run / "last.pt").read_bytes()
    _failing_write_after(monkeypatch, "last.pt")
    with pytest.raises(RescliError, match="could not write .*last.pt: No space left on device; the previous last.pt"):
        finetune(resume=run, epochs=2)
    assert (run / "last.pt").read_bytes() == before
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


def test_atomic_write_bytes_keeps_old_content_on_failure(tmp_path, monkeypatch):
    from rescli.core.fileio import atomic_write_bytes

    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old content")
    _failing_write_after(monkeypatch, "metrics.json")
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content that will not fit")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
