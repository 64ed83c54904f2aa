"""rescli degradation: plain vs residual nets with one recipe (tiny: 8 px images, depths 8 and 20, 1-2 epochs)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_class_folder
from PIL import Image

from rescli.core.errors import RescliError
from rescli.data.loading import ImageSamples, collate
from rescli.data.scan import scan_dataset
from rescli.data.transforms import to_model_input
from rescli.experiments import degradation as degradation_module
from rescli.experiments.degradation import (
    STAGES,
    display_name,
    parse_depths,
    stage_gradient_norms,
    summarize,
)
from rescli.experiments.degradation_figure import degradation_figure
from rescli.models.cifar import cifar_resnet
from rescli.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model
from rescli.train import loop as loop_module

SMALL = ("--img-size", "8", "--batch-size", "8", "--workers", "0", "--threads", "1")




@pytest.fixture(scope="module")
def deg_run(tmp_path_factory):
    """One finished run (depths 8 and 20, 2 epochs) shared by the read-only tests below, plus the
    initial weights each model was built with (models.create_model is wrapped to record them)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("deg")
    folder = make_class_folder(root / "data", per_class=10, size=8)
    created: list[tuple[str, dict]] = []
    real_create = create_model

    def recording_create(arch, num_classes, arch_kwargs=None):
        m = real_create(arch, num_classes, arch_kwargs)
        created.append((arch, {k: v.clone() for k, v in m.state_dict().items()}))
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        mp.setattr(degradation_module, "create_model", recording_create)  # the gradient-norm models
        mp.setattr(loop_module, "create_model", recording_create)  # the trained ones
        res = run_cli("degradation", folder, "--depths", "20,8", "--epochs", "2", *SMALL,
                      "--output", root / "out", "--format", "json")
    assert res.code == 0, res.err
    return {"root": root, "data": folder, "out": root / "out", "res": res, "created": created}


def test_json_on_stdout_matches_file_and_has_every_model(deg_run):
    printed = json.loads(deg_run["res"].out)
    on_disk = json.loads((deg_run["out"] / "degradation.json").read_text())
    assert printed == on_disk
    assert on_disk["depths"] == [8, 20] and on_disk["shortcut"] == "A"
    names = [m["name"] for m in on_disk["models"]]
    assert names == ["plain-8", "ResNet-8", "plain-20", "ResNet-20"]
    assert on_disk["recipe"]["augment"] == "none" and on_disk["recipe"]["label_smoothing"] == 0.0
    assert on_disk["recipe"]["train_images"] + on_disk["recipe"]["val_images"] == 30
    for m in on_disk["models"]:
        assert m["epochs"] == [1, 2]
        for key in ("train_error", "val_error", "train_error_running", "train_loss", "val_loss"):
            assert len(m[key]) == 2, key
        assert all(0 <= v <= 1 for key in ("train_error", "val_error", "train_error_running") for v in m[key])
        assert m["final_train_error"] == m["train_error"][-1] and m["final_val_error"] == m["val_error"][-1]
        assert m["best_val_error"] == min(m["val_error"])
        assert set(m["grad_norms"]) == set(STAGES) and all(v > 0 for v in m["grad_norms"].values())
        net = cifar_resnet(m["depth"], 3, residual=m["kind"] == "resnet")
        assert m["params"] == sum(p.numel() for p in net.parameters())
        run = deg_run["out"] / m["arch"]
        assert (run / "best.pt").is_file() and (run / "last.pt").is_file() and (run / "history.csv").is_file()
        assert m["checkpoint"] == str(run / "last.pt")
        assert m["runtime"] and m["runtime"] == json.loads((run / "run.json").read_text())["runtime"]
    assert on_disk["recipe"]["runtime"] == on_disk["models"][0]["runtime"]
    from rescli.core.runtime import select_runtime

    # --precision auto means the device's fast type here (bf16 on AMX CPUs), even for small images.
    assert on_disk["recipe"]["runtime"].split()[1] == select_runtime().precision
    assert set(on_disk["summary"]) == {"plain", "resnet"}
    plain8, plain20 = on_disk["models"][0], on_disk["models"][2]
    expected_change = plain20["final_train_error"] - plain8["final_train_error"]
    assert on_disk["summary"]["plain"]["train_error_change"] == pytest.approx(expected_change)


def test_stderr_has_progress_and_stdout_only_results(deg_run):
    err = deg_run["res"].err
    assert "[1/4] plain-8" in err and "[4/4] ResNet-20" in err and "epoch 2/2" in err


def test_figure_on_disk_is_the_figure_of_the_json(deg_run):
    """Re-drawing degradation.json gives exactly the pixels of degradation.png, and the lines carry its numbers."""
    result = json.loads((deg_run["out"] / "degradation.json").read_text())
    fig = degradation_figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Title": "rescli degradation", "Software": "rescli"})
    drawn = np.asarray(Image.open(buf).convert("RGB"))
    with Image.open(deg_run["out"] / "degradation.png") as im:
        assert im.text.get("Title") == "rescli degradation"
        on_disk = np.asarray(im.convert("RGB"))
    assert drawn.shape == on_disk.shape and np.array_equal(drawn, on_disk)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    assert len(lines) == 8
    for m in result["models"]:
        train, val = lines[f"{m['arch']}:train"], lines[f"{m['arch']}:val"]
        assert list(train.get_xdata()) == m["epochs"]
        np.testing.assert_allclose(train.get_ydata(), [100 * e for e in m["train_error"]])
        np.testing.assert_allclose(val.get_ydata(), [100 * e for e in m["val_error"]])
        assert val.get_linewidth() > 2 * train.get_linewidth()  # validation bold, training thin
        assert train.get_color() == val.get_color()  # one colour per depth...
    plain_ax, res_ax = fig.axes[:2]
    assert {ln.get_gid().split(":")[0] for ln in plain_ax.get_lines() if ln.get_gid()} == {"plain8", "plain20"}
    assert {ln.get_gid().split(":")[0] for ln in res_ax.get_lines() if ln.get_gid()} == {"resnet8", "resnet20"}
    assert lines["plain8:val"].get_color() == lines["resnet8:val"].get_color() != lines["plain20:val"].get_color()


def test_training_error_is_eval_mode_error_on_the_training_split(deg_run):
    """The JSON's training error equals what the final weights (last.pt) score on the training split."""
    from rescli.inference.load import load_predictor

    result = json.loads((deg_run["out"] / "degradation.json").read_text())
    index = scan_dataset(deg_run["data"], val_split=0.2, seed=0)
    samples = index.splits["train"]
    for m in result["models"]:
        pred = load_predictor(m["checkpoint"])
        batch = collate([ImageSamples(samples, pred.transform())[i] for i in range(len(samples))])
        acc = float((pred.logits(batch.images).argmax(1) == batch.labels).float().mean())
        assert abs((1 - acc) - m["final_train_error"]) <= 1 / len(samples) + 1e-9, m["name"]


def test_gradient_norms_come_from_the_model_that_is_trained(deg_run):
    """Each model is created twice (once for the gradient measurement, once by finetune): same weights.
    With option A, plain-d and ResNet-d even start from identical weights (same parameters, same seed)."""
    created = deg_run["created"]
    by_arch: dict[str, list[dict]] = {}
    for arch, state in created:
        by_arch.setdefault(arch, []).append(state)
    assert sorted(by_arch) == ["plain20", "plain8", "resnet20", "resnet8"]
    for arch, states in by_arch.items():
        assert len(states) == 2, arch
        first, second = states
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), arch
    for d in ("8", "20"):
        p, r = by_arch[f"plain{d}"][0], by_arch[f"resnet{d}"][0]
        assert p.keys() == r.keys() and all(torch.equal(p[k], r[k]) for k in p)


def test_table_output_and_existing_output_refused(deg_run, cli, tmp_path):
    res = cli("degradation", deg_run["data"], "--depths", "8", "--epochs", "1", *SMALL, "--shortcut", "b",
              "--output", tmp_path / "o")
    assert res.code == 0, res.err
    assert "plain-8" in res.out and "ResNet-8" in res.out and "train error" in res.out and "layer1" in res.out
    result = json.loads((tmp_path / "o" / "degradation.json").read_text())
    assert result["shortcut"] == "B" and result["models"][1]["arch_kwargs"] == {"shortcut": "B"}
    assert result["models"][1]["params"] > result["models"][0]["params"]  # option B adds projections
    assert "summary" in result and result["summary"] == {}  # one depth: nothing to compare across depths
    again = cli("degradation", deg_run["data"], "--depths", "8", "--epochs", "1", *SMALL, "--output", tmp_path / "o")
    assert again.code == 2 and "already holds" in again.err and again.out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (("--depths", "50"), "torchvision"),
        (("--depths", "21"), "6n+2"),
        (("--depths", "20,x"), "integers"),
        (("--depths", ""), "at least one"),
        (("--shortcut", "D"), "shortcut"),
        (("--augment", "wild"), "augment"),
        (("--epochs", "0"), "epochs"),
        (("--threads", "0"), "threads"),
    ],
)
def test_usage_errors(cli, tmp_path, args, message):
    folder = make_class_folder(tmp_path / "d", per_class=2, size=8)
    res = cli("degradation", folder, *args, "--output", tmp_path / "out", "--workers", "0")
    assert res.code == 2, res.err
    assert message in res.err and res.out == ""
    assert not (tmp_path / "out").exists()  # nothing written before the options are checked


def test_output_inside_data_folder_refused(cli, tmp_path):
    folder = make_class_folder(tmp_path / "d", per_class=2, size=8)
    res = cli("degradation", folder, "--output", folder / "runs", "--workers", "0")
    assert res.code == 2 and "inside the data folder" in res.err
    res = cli("degradation", folder, "--workers", "0", cwd=folder)  # default runs/ under the current folder
    assert res.code == 2 and "inside the data folder" in res.err
    assert sorted(p.name for p in folder.iterdir()) == ["blue", "green", "red"]


def test_missing_data_folder(cli, tmp_path):
    res = cli("degradation", tmp_path / "nope", "--output", tmp_path / "out")
    assert res.code == 2 and "no such folder" in res.err


def test_help_has_examples(cli):
    res = cli("degradation", "--help")
    assert res.code == 0 and "rescli degradation ./images --depths 20,56" in res.out


@pytest.mark.parametrize(
    "spec, expected", [("20,56", [20, 56]), ("56, 20,20", [20, 56]), ("8", [8]), ([110, 32], [32, 110])]
)
def test_parse_depths(spec, expected):
    assert parse_depths(spec) == expected


def test_display_names():
    assert display_name("plain56") == "plain-56" and display_name("resnet110") == "ResNet-110"


def test_stage_gradient_norms_add_up():
    torch.manual_seed(0)
    model = cifar_resnet(8, 3, residual=False)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    g = stage_gradient_norms(model, images, labels, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert list(g["l2"]) == list(STAGES)
    assert all(p.grad is None for p in model.parameters())  # gradients are not left behind
    # Recompute by hand: the stages' squared norms add up to the whole model's.
    torch.manual_seed(0)
    again = cifar_resnet(8, 3, residual=False).train()
    x = to_model_input(images, device=torch.device("cpu"), mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last=False)
    torch.nn.functional.cross_entropy(again(x), labels).backward()
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in again.parameters()))
    assert math.sqrt(sum(v * v for v in g["l2"].values())) == pytest.approx(total, rel=1e-5)
    head = math.sqrt(float(again.fc.weight.grad.double().pow(2).sum() + again.fc.bias.grad.double().pow(2).sum()))
    assert g["l2"]["head"] == pytest.approx(head, rel=1e-5)
    assert g["rms"]["head"] == pytest.approx(head / math.sqrt(64 * 3 + 3), rel=1e-5)


def test_summarize_signs():
    ms = [
        {"kind": "plain", "depth": 20, "name": "plain-20", "final_train_error": 0.01, "final_val_error": 0.03},
        {"kind": "plain", "depth": 56, "name": "plain-56", "final_train_error": 0.20, "final_val_error": 0.25},
        {"kind": "resnet", "depth": 56, "name": "ResNet-56", "final_train_error": 0.0, "final_val_error": 0.02},
        {"kind": "resnet", "depth": 20, "name": "ResNet-20", "final_train_error": 0.0, "final_val_error": 0.03},
    ]
    s = summarize(ms)
    assert s["plain"]["train_error_change"] == pytest.approx(0.19) and s["plain"]["deep"] == "plain-56"
    assert s["resnet"]["val_error_change"] == pytest.approx(-0.01) and s["resnet"]["shallow"] == "ResNet-20"


def test_library_raises_rescli_error_on_empty_training_batch():
    from rescli.experiments.degradation import fixed_batch

    with pytest.raises(RescliError):
        fixed_batch([], img_size=8, size=4, seed=0)
