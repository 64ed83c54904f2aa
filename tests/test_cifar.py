"""CIFAR-style ResNet / plain nets (rescli.cifar): sizes, shapes, shortcuts, scripting, export."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from rescli.core.errors import RescliError
from rescli.models.cifar import STAGE_NAMES, PadShortcut, cifar_resnet, stage_of

# Exact trainable-parameter counts (10 classes), measured from this implementation.
# Option A (and plain, which has the same layers): paper table 6 says 0.27M/0.46M/0.66M/0.85M/1.7M.
EXACT_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
PAPER_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}
# Option B adds two 1x1 conv + BN projections (16->32 and 32->64): 576 + 2176 = 2752.
B_EXTRA = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
EXACT_B = {20: 272_474, 32: 466_906, 44: 661_338, 56: 855_770, 110: 1_730_714}
# Option C: a projection on every one of the 3n blocks.
EXACT_C = {20: 283_962, 32: 489_594, 44: 695_226, 56: 900_858, 110: 1_826_202}




def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build(depth: int = 20, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet(depth, **kw)


@pytest.mark.parametrize("depth", sorted(EXACT_A))
def test_parameter_counts(depth):
    a, plain = n_params(build(depth)), n_params(build(depth, residual=False))
    b, c = n_params(build(depth, shortcut="B")), n_params(build(depth, shortcut="C"))
    assert a == EXACT_A[depth]
    assert abs(a - PAPER_M[depth] * 1e6) / a < 0.02
    assert plain == a  # option A is parameter-free, so the comparison with plain is fair
    assert b == EXACT_B[depth] == a + B_EXTRA
    assert c == EXACT_C[depth] > b
    assert n_params(build(depth, residual=False, shortcut="C")) == a  # shortcut ignored when plain


def test_structure_is_torchvision_like():
    m = build(32)
    assert isinstance(m.conv1, nn.Conv2d) and m.conv1.out_channels == 16
    assert isinstance(m.bn1, nn.BatchNorm2d) and isinstance(m.relu, nn.ReLU)
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(m.fc, nn.Linear) and (m.fc.in_features, m.fc.out_features) == (64, 10)
    assert cifar_resnet(20, 7).fc.out_features == 7
    for name, width in zip(STAGE_NAMES, (16, 32, 64)):
        stage = getattr(m, name)
        assert isinstance(stage, nn.Sequential) and len(stage) == 5  # n = (32 - 2) / 6
        assert all(block.conv2.out_channels == width for block in stage)
    assert not hasattr(m, "layer4")
    # 6n+2 weighted layers: every conv/linear except 1x1 projections.
    layers = [x for x in build(56, residual=False).modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 56


def test_init_follows_paper():
    m = build(20, shortcut="C")
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    # kaiming_normal fan_out: std = sqrt(2 / (out_channels * k * k))
    w = m.layer2[0].conv1.weight  # 16 -> 32 channels, so fan_out != fan_in
    assert w.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)


def test_shortcut_kinds():
    a, b, c = build(20), build(20, shortcut="b"), build(20, shortcut="c")  # lower case accepted
    assert isinstance(a.layer1[0].shortcut, nn.Identity)
    assert isinstance(a.layer2[0].shortcut, PadShortcut) and isinstance(a.layer3[0].shortcut, PadShortcut)
    assert isinstance(a.layer2[1].shortcut, nn.Identity)
    assert isinstance(b.layer2[0].shortcut, nn.Sequential) and isinstance(b.layer2[1].shortcut, nn.Identity)
    assert isinstance(b.layer1[0].shortcut, nn.Identity)
    assert all(isinstance(blk.shortcut, nn.Sequential) for s in STAGE_NAMES for blk in getattr(c, s))
    assert set(build(20, residual=False).state_dict()) == set(a.state_dict())


def test_option_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)  # odd size: must match the stride-2 conv's ceil(7/2) = 4
    y = PadShortcut(16)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.all(y[:, 16:] == 0)


@pytest.mark.parametrize("size", [32, 20, 8])
@pytest.mark.parametrize("kw", [{}, {"residual": False}, {"shortcut": "B"}])
def test_output_shapes(size, kw):
    m = build(20, **kw).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_stage_resolutions_at_32px():
    m, shapes = build(20).eval(), {}
    for name in STAGE_NAMES:
        getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, o))
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    assert all(o.min() >= 0 for o in shapes.values())  # every block ends with a ReLU
    shapes = {k: o.shape for k, o in shapes.items()}
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


def test_residual_differs_from_plain():
    res, plain = build(20, seed=1).eval(), build(20, seed=1, residual=False).eval()
    res.load_state_dict(plain.state_dict())  # identical weights, option A adds none
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(res(x), plain(x), atol=1e-3)
        # With every block's convs zeroed, a plain net forgets its input; a residual one still
        # carries it through the shortcuts.
        for m in (res, plain):
            for s in STAGE_NAMES:
                for blk in getattr(m, s):
                    blk.conv1.weight.zero_()
                    blk.conv2.weight.zero_()
        p = plain(x)
        torch.testing.assert_close(p[0], p[1])
        r = res(x)
        assert (r[0] - r[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{}, {"residual": False}, {"shortcut": "B"}, {"shortcut": "C"}])
def test_gradients_reach_every_parameter(kw):
    m = build(20, **kw).train()
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("kw", [{}, {"residual": False}, {"shortcut": "B"}])
def test_torchscript_matches_eager(kw):
    m = build(20, **kw).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
        s = torch.jit.script(m)
    with torch.no_grad():
        for size in (32, 21):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(s(x), m(x))


def test_channels_last_and_bf16_autocast():
    m = build(20).eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        ref = m(x)
        m = m.to(memory_format=torch.channels_last)
        torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.to(memory_format=torch.channels_last))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 10)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_onnx_export_matches_eager(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = build(20).eval()
    path = tmp_path / "r20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in (32, 21):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = m(x).numpy()
        out = sess.run(None, {"x": x.numpy()})[0]
        assert abs(out - ref).max() < 1e-4


@pytest.mark.parametrize("depth", [0, 2, 6, 7, 9, 19, 21, 56.0, "20", True, None])
def test_bad_depth(depth):
    with pytest.raises(RescliError, match="6n\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("shortcut", ["D", "", "AB", "identity", None])
def test_bad_shortcut(shortcut):
    with pytest.raises(RescliError, match="shortcut"):
        cifar_resnet(20, shortcut=shortcut)


def test_bad_num_classes():
    with pytest.raises(RescliError):
        cifar_resnet(20, 0)


def test_smallest_depth_ok():
    assert len(build(8).layer1) == 1


@pytest.mark.parametrize(
    "name, stage",
    [
        ("conv1.weight", "stem"),
        ("bn1.bias", "stem"),
        ("layer1.0.conv1.weight", "layer1"),
        ("layer2.0.shortcut.0.weight", "layer2"),
        ("layer3.2.bn2.weight", "layer3"),
        ("fc.weight", "head"),
        ("fc.bias", "head"),
        ("module.layer2.1.conv2.weight", "layer2"),
        ("_orig_mod.fc.bias", "head"),
    ],
)
def test_stage_of(name, stage):
    assert stage_of(name) == stage


def test_stage_of_covers_every_parameter():
    m = build(20, shortcut="C")
    counts: dict[str, int] = {}
    for name, p in m.named_parameters():
        counts[stage_of(name)] = counts.get(stage_of(name), 0) + p.numel()
    assert set(counts) == {"stem", *STAGE_NAMES, "head"}
    assert counts["stem"] == 3 * 16 * 9 + 2 * 16 and counts["head"] == 64 * 10 + 10
    assert sum(counts.values()) == n_params(m)


@pytest.mark.parametrize("name", ["", "weight", "avgpool.x", "layerX.0.weight", "conv1"])
def test_stage_of_unknown(name):
    with pytest.raises(RescliError):
        stage_of(name)


# --- end to end through the CLI: a CIFAR net works everywhere a torchvision ResNet does --------------------

def test_cifar_net_finetune_evaluate_predict_export(cli, tmp_path):
    """resnet20 with option B (so the checkpoint must remember arch_kwargs to rebuild the projections)."""
    import json

    from conftest import make_class_folder

    from rescli.models.checkpoint import load_checkpoint

    folder = make_class_folder(tmp_path / "data", per_class=6, size=8)
    run = tmp_path / "run"
    res = cli("finetune", folder, "--arch", "resnet20", "--shortcut", "b", "--weights", "none", "--img-size", "8",
              "--epochs", "1", "--batch-size", "8", "--workers", "0", "--augment", "none", "--output", run,
              "--format", "json")
    assert res.code == 0, res.err
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["arch"] == "resnet20" and ckpt["arch_kwargs"] == {"shortcut": "B"} and ckpt["img_size"] == 8
    assert "layer2.0.shortcut.0.weight" in ckpt["model"]  # the projection is there, and must be rebuilt

    ev = cli("evaluate", run / "best.pt", folder, "--split", "all", "--workers", "0", "--format", "json")
    assert ev.code == 0, ev.err
    assert json.loads(ev.out)["n"] == 18

    image = next((folder / "green").iterdir())
    pred = cli("predict", image, "--model", run / "best.pt", "--format", "jsonl", "--workers", "0")
    assert pred.code == 0, pred.err
    row = json.loads(pred.out.splitlines()[0])
    assert row["label"] in ("red", "green", "blue")

    formats = [("torchscript", "m.ts")]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        formats.append(("onnx", "m.onnx"))
    except ImportError:
        pass
    for fmt, name in formats:
        out = cli("export", run / "best.pt", "--format", fmt, "--output", tmp_path / name, "--print", "json")
        assert out.code == 0, out.err
        info = json.loads(out.out)
        assert info["max_abs_diff_real"] < 1e-3  # checked against PyTorch on the training images
        again = cli("predict", image, "--model", tmp_path / name, "--format", "jsonl", "--workers", "0")
        assert again.code == 0, again.err
        exported = json.loads(again.out.splitlines()[0])
        assert exported["label"] == row["label"] and exported["score"] == pytest.approx(row["score"], abs=2e-2)


@pytest.mark.parametrize("arch", ["plain20", "resnet20"])
def test_cifar_net_with_imagenet_weights_is_a_clear_usage_error(cli, tmp_path, arch):
    from conftest import make_class_folder

    folder = make_class_folder(tmp_path / "data", per_class=2, size=8)
    res = cli("finetune", folder, "--arch", arch, "--weights", "imagenet", "--img-size", "8", "--epochs", "1",
              "--workers", "0", "--output", tmp_path / "run")
    assert res.code == 2
    assert f"no ImageNet weights for {arch}" in res.err and "--weights none" in res.err
    assert res.out == "" and not list((tmp_path / "run").glob("*.pt"))


def test_unknown_cifar_arch_and_bad_shortcut_are_usage_errors(cli, tmp_path):
    from conftest import make_class_folder

    folder = make_class_folder(tmp_path / "data", per_class=2, size=8)
    for args, message in (
        (("--arch", "plain21"), "6n+2"),
        (("--arch", "resnet20", "--shortcut", "D"), "--shortcut 'D'"),
        # torchvision's nets have no such option
        (("--arch", "resnet18", "--shortcut", "A"), "only for CIFAR-style nets"),
        (("--depth", "56"), "--depth 56"),  # --depth keeps meaning torchvision's resnetN; resnet56 needs --arch
    ):
        res = cli("finetune", folder, *args, "--weights", "none", "--img-size", "8", "--epochs", "1", "--workers", "0",
                  "--output", tmp_path / "run")
        assert res.code == 2, (args, res.err)
        assert message in res.err and res.out == ""
        assert not (tmp_path / "run").exists()  # refused before any work


def test_check_arch_kwargs_normalises():
    from rescli.models.registry import check_arch_kwargs, create_model

    assert check_arch_kwargs("resnet56", {"shortcut": "b"}) == {"shortcut": "B"}
    assert check_arch_kwargs("plain20", {}) == {} and check_arch_kwargs("resnext50_32x4d", None) == {}
    with pytest.raises(RescliError, match="unknown option"):
        check_arch_kwargs("resnet20", {"width": 2})
    assert n_params(create_model("resnet20", 10, {"shortcut": "c"})) == EXACT_C[20]
