"""Weights (none / imagenet / file / rescli checkpoint), freezing and parameter groups, without training."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
import torch
from torchvision import models as tvm

from rescli.core.errors import RescliError, UsageError
from rescli.models.checkpoint import make_checkpoint, save_checkpoint
from rescli.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model
from rescli.models.weights import load_pretrained, torch_hub_checkpoint_dir
from rescli.train.params import (
    freeze_batchnorm_stats,
    param_groups,
    set_backbone_trainable,
)
from rescli.train.schedule import Plan
from rescli.train.settings import resolve_strategy


def _randomised_resnet18_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state_dict whose BN statistics are not the defaults, so copying them is visible."""
    torch.manual_seed(seed)
    net = tvm.resnet18(num_classes=1000)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(77)
    return net.state_dict()


def _assert_backbone_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    keys = [k for k in own if not k.startswith("fc.")]
    assert keys and all(k in state for k in keys)
    for k in keys:
        assert torch.equal(own[k], state[k]), k


def test_torchvision_state_dict_loads_backbone_and_keeps_new_head(tmp_path):
    state = _randomised_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = create_model("resnet18", 3)
    info = load_pretrained(model, arch="resnet18", weights=str(path))
    _assert_backbone_equal(model, state)
    assert model.fc.weight.shape == (3, 512)  # the 1000-class head of the file is not used
    assert info.pretrained and tuple(info.mean) == IMAGENET_MEAN and tuple(info.std) == IMAGENET_STD


@pytest.mark.parametrize("wrap", ["ddp", "timm_nested", "lightning"])
def test_prefixed_and_nested_state_dicts_load(tmp_path, wrap):
    state = _randomised_resnet18_state(seed=2)
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "timm_nested":  # timm's train script saves {'state_dict': ..., 'epoch': ...}
        obj = {"state_dict": dict(state), "epoch": 3, "arch": "resnet18"}
    else:
        obj = {"state_dict": {f"model.{k}": v for k, v in state.items()}}
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    model = create_model("resnet18", 4)
    load_pretrained(model, arch="resnet18", weights=str(path))
    _assert_backbone_equal(model, state)


def test_mismatched_state_dict_lists_what_did_not_fit(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(create_model("resnet32", 10).state_dict(), path)  # 5 blocks per stage instead of 3
    with pytest.raises(RescliError) as exc:
        load_pretrained(create_model("resnet20", 2), arch="resnet20", weights=str(path))
    msg = exc.value.message
    assert "do not fit this model" in msg and "unexpected 72: layer1.3.*, layer1.4.*, layer2.3.*" in msg
    assert "looks like a resnet32: pass --arch resnet32" in msg
    assert "\n" not in msg

    state = _randomised_resnet18_state()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    del state["layer4.1.bn2.running_var"]  # and a partial file
    torch.save(state, path)
    with pytest.raises(RescliError) as exc:
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(path))
    msg = exc.value.message
    assert "wrong shape 1: conv1.weight (64, 1, 7, 7) vs (64, 3, 7, 7)" in msg
    assert "missing 1: layer4.1.bn2.running_var" in msg


def test_weights_file_problems_are_clear(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(RescliError, match="not a readable weights file"):
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(junk))
    lists = tmp_path / "list.pth"
    torch.save({"a": 1}, lists)
    with pytest.raises(RescliError, match="expected a state_dict"):
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(lists))


def test_rescli_checkpoint_of_other_arch_names_the_fix(tmp_path):
    src = create_model("resnet20", 3)
    ckpt = make_checkpoint(model_state=src.state_dict(), arch="resnet20", classes=["a", "b", "c"], img_size=32,
                           mean=[0.5] * 3, std=[0.25] * 3)
    path = save_checkpoint(ckpt, tmp_path / "best.pt")
    with pytest.raises(UsageError, match="--arch resnet20"):
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(path))
    # Same arch, other classes: backbone reused, head new, normalisation follows the checkpoint.
    model = create_model("resnet20", 5)
    info = load_pretrained(model, arch="resnet20", weights=str(path))
    _assert_backbone_equal(model, ckpt["model"])
    assert model.fc.out_features == 5
    assert list(info.mean) == [0.5] * 3 and list(info.std) == [0.25] * 3 and info.from_checkpoint is not None


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)


def test_imagenet_offline_fails_fast_with_the_way_out(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(RescliError) as exc:
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights="imagenet")
    msg = exc.value.message
    cache = torch_hub_checkpoint_dir()
    assert "\n" not in msg
    assert "Offline?" in msg and "resnet18-f37072fd.pth" in msg and str(cache) in msg and "--weights none" in msg
    assert str(cache).startswith(os.environ["TORCH_HOME"])  # the autouse fixture's isolated torch home


def test_imagenet_weights_in_the_torch_hub_cache_are_used_without_network(monkeypatch):
    _no_network(monkeypatch)
    url = tvm.ResNet18_Weights.DEFAULT.url
    cache = torch_hub_checkpoint_dir()
    cache.mkdir(parents=True)
    state = _randomised_resnet18_state(seed=5)  # stands in for the real file, which cannot be downloaded here
    torch.save(state, cache / os.path.basename(url))
    model = create_model("resnet18", 3)
    info = load_pretrained(model, arch="resnet18", weights="imagenet")
    _assert_backbone_equal(model, state)
    assert info.source == "imagenet:ResNet18_Weights.IMAGENET1K_V1" and info.pretrained
    assert tuple(info.mean) == IMAGENET_MEAN


def test_imagenet_for_cifar_nets_is_a_usage_error():
    with pytest.raises(UsageError, match="no ImageNet weights for resnet20"):
        load_pretrained(create_model("resnet20", 2), arch="resnet20", weights="imagenet")


def test_freezing_helpers():
    model = create_model("resnet18", 3)
    set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    model.train()
    freeze_batchnorm_stats(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_skip_decay_on_norms_and_biases_and_space_lrs_geometrically():
    model = create_model("resnet18", 3)
    groups = param_groups(model, lr=1e-2, weight_decay=0.05, backbone_lr_ratio=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            seen.add(id(p))
            if p.ndim <= 1:  # biases, BN weights and biases
                assert g["weight_decay"] == 0.0, names[id(p)]
            else:
                assert g["weight_decay"] == 0.05, names[id(p)]
    assert seen == set(names)  # every parameter exactly once
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert lr_of["conv1.weight"] == pytest.approx(1e-4)  # stem: lr * ratio
    assert lr_of["fc.weight"] == pytest.approx(1e-2)
    stages = [lr_of[f"layer{i}.0.conv1.weight"] for i in range(1, 5)]
    ratios = [b / a for a, b in zip([lr_of["conv1.weight"]] + stages, stages + [lr_of["fc.weight"]])]
    assert ratios == pytest.approx([ratios[0]] * 5)  # geometric spacing, 6 groups
    assert ratios[0] == pytest.approx(100 ** (1 / 5))


def test_resolve_strategy_defaults():
    assert resolve_strategy("auto", pretrained=True, epochs=5, freeze_epochs=1) == ("gradual", 1)
    assert resolve_strategy("auto", pretrained=False, epochs=5, freeze_epochs=1) == ("full", 0)
    assert resolve_strategy("head", pretrained=False, epochs=4, freeze_epochs=1) == ("head", 4)
    # leaves one to unfreeze
    assert resolve_strategy("gradual", pretrained=True, epochs=3, freeze_epochs=5) == ("gradual", 2)
    with pytest.raises(UsageError):
        resolve_strategy("partial", pretrained=True, epochs=3, freeze_epochs=1)


def test_plan_gives_the_backbone_no_lr_while_frozen():
    plan = Plan("gradual", frozen_epochs=1, epochs=3, steps_per_epoch=10, warmup_fraction=0.1)
    assert all(plan.lr_factor(s, is_head=False) == 0.0 for s in range(10))
    assert all(plan.lr_factor(s, is_head=True) > 0 for s in range(10))
    after = [plan.lr_factor(s, is_head=False) for s in range(10, 30)]
    assert max(after) == pytest.approx(0.5)  # fastai's halving after unfreezing; warmup then cosine
    assert after[0] < after[2] and after[-1] < after[5]
