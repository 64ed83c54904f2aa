"""rescli explain: heatmaps that localise, the CAM methods against their definitions, peak_xy in the original
picture's pixels, TorchScript and CIFAR-style nets, and the failures (ONNX, broken files, unknown labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from insight_data import quadrant_of, train_squares
from PIL import Image

from rescli.core.errors import RescliError
from rescli.insight.cam import activation_maps, combine, peak_xy
from rescli.insight.explain import OverlayNames
from rescli.insight.network import StagedNet, check_split, open_network


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        return train_squares(root, run_cli)


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_heatmaps_peak_in_the_quadrant_that_holds_the_square(squares, tmp_path):
    data, run, where = squares
    res = run_cli("explain", run, data, "--output", tmp_path / "maps", "--format", "jsonl")
    assert res.code == 0, res.err
    rows = _rows(res.out)
    assert len(rows) == len(where) and {r["path"] for r in rows} == set(where)
    right = [r for r in rows if r["label"] == Path(r["path"]).parent.name]
    assert len(right) >= 0.9 * len(rows)  # the model learnt the squares
    inside = [r for r in right if quadrant_of(*r["peak_xy"], 32) == where[r["path"]]]
    assert len(inside) >= 0.85 * len(right), (len(inside), len(right))
    overlay = Path(rows[0]["overlay"])
    assert overlay.parent == tmp_path / "maps" and Image.open(overlay).size == (32, 32)
    assert 0 < rows[0]["score"] <= 1


def test_a_torchscript_export_is_explained_like_its_checkpoint(squares, tmp_path):
    data, run, _ = squares
    assert run_cli("export", run, "--to", "torchscript", "--output", tmp_path / "m.ts").code == 0
    inputs = sorted(str(p) for p in (data / "red").iterdir())[:6]
    a = run_cli("explain", run, *inputs, "-o", tmp_path / "a", "-f", "jsonl")
    b = run_cli("explain", tmp_path / "m.ts", *inputs, "-o", tmp_path / "b", "-f", "jsonl")
    assert a.code == b.code == 0, b.err
    assert [(r["label"], r["peak_xy"]) for r in _rows(a.out)] == [(r["label"], r["peak_xy"]) for r in _rows(b.out)]


def test_label_asks_why_that_class_and_an_unknown_one_is_a_usage_error(squares, tmp_path):
    data, run, _ = squares
    image = str(sorted((data / "red").iterdir())[0])
    res = run_cli("explain", run, image, "--label", "blue", "--label", "green", "-o", tmp_path, "-f", "jsonl")
    assert res.code == 0, res.err
    rows = _rows(res.out)
    assert [r["label"] for r in rows] == ["blue", "green"] and len({r["overlay"] for r in rows}) == 2
    bad = run_cli("explain", run, image, "--label", "purple", "-o", tmp_path)
    assert bad.code == 2 and "purple" in bad.err and "red" in bad.err


def test_a_broken_file_gets_an_error_row_and_exit_1(squares, tmp_path):
    data, run, _ = squares
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = str(sorted((data / "green").iterdir())[0])
    res = run_cli("explain", run, good, str(broken), "-o", tmp_path / "out", "-f", "jsonl")
    assert res.code == 1
    rows = _rows(res.out)
    assert rows[0]["path"] == good and "peak_xy" in rows[0]
    assert rows[1]["path"] == str(broken) and "error" in rows[1] and "Traceback" not in res.err


def test_an_onnx_export_is_refused_in_one_line(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not read")
    res = run_cli("explain", fake, str(tmp_path), "-o", tmp_path / "out")
    assert res.code == 2 and "no layers to reach" in res.err and len(res.err.strip().splitlines()) == 1


def test_output_inside_an_input_folder_is_refused(squares):
    data, run, _ = squares
    res = run_cli("explain", run, data, "-o", data / "maps")
    assert res.code == 2 and "inside" in res.err and not (data / "maps").exists()


def test_exif_rotated_pictures_give_peaks_and_overlays_in_upright_pixels(squares, tmp_path):
    _, run, _ = squares
    stored = Image.new("RGB", (60, 30), (128, 128, 128))  # stored landscape; orientation 6: upright it is portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes())
    res = run_cli("explain", run, path, "-o", tmp_path / "out", "-f", "jsonl")
    assert res.code == 0, res.err
    row = _rows(res.out)[0]
    assert Image.open(row["overlay"]).size == (30, 60)
    x, y = row["peak_xy"]
    assert 0 <= x < 30 and 15 <= y < 45  # inside the central square the model saw


def test_peak_xy_maps_the_input_square_back_to_the_picture():
    cam = torch.zeros(4, 4)
    cam[0, 3] = 1.0  # top-right cell of the model's input
    # A 200x100 picture: the model saw its central 100x100 square, from x = 50.
    x, y = peak_xy(cam, img_size=32, width=200, height=100)
    assert 125 <= x < 150 and 0 <= y < 25
    cam = torch.zeros(4, 4)
    cam[3, 0] = 1.0
    x, y = peak_xy(cam, img_size=32, width=100, height=300)  # central square from y = 100
    assert 0 <= x < 25 and 175 <= y < 200
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0  # a corner cell: upsampled, its value stays flat out to the border
    assert peak_xy(cam, img_size=32, width=32, height=32) == [2, 2]  # the plateau's centre, not pixel (0, 0)


def test_gradcam_of_a_pooled_linear_head_is_the_class_activation_map():
    torch.manual_seed(0)
    a = torch.rand(2, 5, 3, 3)
    fc = torch.nn.Linear(5, 4)

    def head(maps: torch.Tensor) -> torch.Tensor:
        return fc(maps.mean(dim=(2, 3)))

    maps = activation_maps(a, head, [[1], [3]], method="gradcam")
    for i, k in ((0, 1), (1, 3)):
        cam = torch.relu((fc.weight[k][:, None, None] * a[i]).sum(0)) / 9  # Zhou et al.'s CAM, over h*w
        assert torch.allclose(maps[i][0], cam.detach(), atol=1e-6)


def test_layercam_and_gradcampp_follow_their_definitions():
    torch.manual_seed(1)
    a, g = torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    layer = torch.relu((torch.relu(g) * a).sum(1))
    assert torch.allclose(combine(a, g, method="layercam"), layer)
    weights = []
    for c in range(3):
        gc, ac = g[0, c], a[0, c]
        alpha = gc ** 2 / (2 * gc ** 2 + ac.sum() * gc ** 3)
        weights.append((alpha * torch.relu(gc)).sum())
    plus = torch.relu(sum(w * a[0, c] for c, w in enumerate(weights)))
    assert torch.allclose(combine(a, g, method="gradcam++")[0], plus, atol=1e-6)


def test_several_labels_give_one_map_each():
    torch.manual_seed(2)
    a = torch.rand(2, 4, 3, 3)
    fc = torch.nn.Linear(4, 3)

    def head(maps: torch.Tensor) -> torch.Tensor:
        return fc(maps.mean(dim=(2, 3)))

    maps = activation_maps(a, head, [[0, 2], [1]])
    assert [len(m) for m in maps] == [2, 1]
    assert torch.allclose(maps[0][1], activation_maps(a, head, [[2], [1]])[0][0])


def test_a_net_whose_layers_do_not_give_its_output_is_refused(squares):
    _, run, _ = squares
    net = open_network(run, device="cpu")
    wrapped = _Shifted(net.module)
    broken = StagedNet(**{**net.__dict__, "module": wrapped})
    with pytest.raises(RescliError, match="do not reproduce its output"):
        check_split(broken)


class _Shifted(torch.nn.Module):
    """The same children, but a forward that does something else."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        for name, child in inner.named_children():
            self.add_module(name, child)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1.0


def test_overlay_names_stay_apart_and_repeat_across_runs():
    names = OverlayNames()
    first = [names.next("a/x.png", "cat"), names.next("b/x.png", "cat"), names.next("a/x.png", "dog")]
    assert first == ["x.cat.png", "x-2.cat.png", "x.dog.png"]
    again = OverlayNames()
    assert [again.next("a/x.png", "cat"), again.next("b/x.png", "cat")] == first[:2]
    assert OverlayNames().next("odd/na:me?.png", "a/b") == "na_me_.a_b.png"
