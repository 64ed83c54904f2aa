"""Near-duplicates in rescli dataset: re-encoded and resized copies found, marked like exact duplicates with a
near flag; different pictures left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from rescli.data.near_duplicates import MAX_DISTANCE, hash_pairs, perceptual_hash, popcount
from rescli.data.report import describe_dataset


def _photo(path, seed: int, size: int = 64) -> None:
    """A picture with detail at every scale (octaves of smooth noise, amplitude halving with each), as photos have."""
    rng = np.random.default_rng(seed)
    picture = np.zeros((size, size, 3), dtype=np.float32)
    for octave, cells in enumerate((2, 4, 8, 16, 32)):
        grid = rng.normal(0, 60 / 2 ** octave, (cells, cells, 3)).astype(np.float32)
        layers = [np.asarray(Image.fromarray(grid[..., c], mode="F").resize((size, size), Image.Resampling.BICUBIC))
                  for c in range(3)]
        picture += np.stack(layers, axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(128 + picture, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for cls, seeds in (("cat", range(0, 6)), ("dog", range(10, 16))):
        for s in seeds:
            _photo(root / cls / f"{cls}_{s}.png", s)
    return root


def test_a_reencoded_copy_in_another_class_is_a_near_label_conflict(folder):
    Image.open(folder / "cat" / "cat_0.png").save(folder / "dog" / "copy.jpg", quality=70)
    report = describe_dataset(folder)
    near = [g for g in report["duplicates"] if g["near"]]
    assert len(near) == 1
    assert near[0]["kind"] == "label-conflict" and near[0]["paths"] == ["cat/cat_0.png", "dog/copy.jpg"]
    assert near[0]["method"] == "phash" and near[0]["distance"] <= 24 and near[0]["label_conflict"]


def test_a_resized_copy_in_the_validation_split_is_a_near_leak(tmp_path):
    root = tmp_path / "split"
    for split, offset in (("train", 0), ("val", 100)):
        for cls, base in (("cat", 0), ("dog", 50)):
            for s in range(4):
                _photo(root / split / cls / f"{s}.png", offset + base + s)
    Image.open(root / "train" / "cat" / "1.png").resize((40, 40)).save(root / "val" / "cat" / "small.png")
    groups = [g for g in describe_dataset(root)["duplicates"] if g["near"]]
    assert [(g["kind"], g["paths"], g["splits"]) for g in groups] == [
        ("leak", ["train/cat/1.png", "val/cat/small.png"], ["train", "val"])]


def test_different_pictures_and_exact_copies_are_not_near_duplicates(folder):
    (folder / "cat" / "same.png").write_bytes((folder / "cat" / "cat_1.png").read_bytes())
    groups = describe_dataset(folder)["duplicates"]
    assert [(g["kind"], g["near"]) for g in groups] == [("copy", False)]
    assert describe_dataset(folder, near_duplicates="none")["duplicates"] == [
        {**groups[0], "near": False}]


def test_the_dataset_table_and_json_mark_near_groups(folder):
    Image.open(folder / "cat" / "cat_2.png").save(folder / "cat" / "again.webp", quality=80)
    table = run_cli("dataset", folder)
    assert table.code == 0, table.err
    assert "copy (near)" in table.out and "again.webp" in table.out
    as_json = json.loads(run_cli("dataset", folder, "--format", "json").out)
    assert [g["near"] for g in as_json["duplicates"]] == [True]
    none = json.loads(run_cli("dataset", folder, "--format", "json", "--near-duplicates", "none").out)
    assert none["duplicates"] == []


def test_embeddings_need_a_model(folder):
    res = run_cli("dataset", folder, "--near-duplicates", "embeddings")
    assert res.code == 2 and "--model" in res.err


def test_near_duplicates_by_embeddings(folder, trained_run):
    Image.open(folder / "dog" / "dog_12.png").save(folder / "cat" / "copy.jpg", quality=90)
    res = run_cli("dataset", folder, "--format", "json", "--near-duplicates", "embeddings", "--model", trained_run)
    assert res.code == 0, res.err
    conflicts = [g for g in json.loads(res.out)["duplicates"] if g["near"] and g["kind"] == "label-conflict"]
    assert any(g["paths"] == ["cat/copy.jpg", "dog/dog_12.png"] and g["method"] == "embeddings" for g in conflicts)


def test_hash_distances_are_bit_counts():
    a = np.array([[0, 0, 0, 0b1011]], dtype=np.uint64)
    b = np.array([[1 << 63, 0, 0, 0]], dtype=np.uint64)
    assert popcount(a).sum() == 3
    pairs = hash_pairs(np.concatenate([a, a, b]), max_distance=3)
    assert pairs == [(0, 1, 0.0)]
    assert hash_pairs(np.concatenate([a, b]), max_distance=4) == [(0, 1, 4.0)]


def test_the_hash_ignores_resizing_and_reencoding(tmp_path):
    _photo(tmp_path / "a.png", 3, size=128)
    Image.open(tmp_path / "a.png").resize((70, 70)).save(tmp_path / "b.jpg", quality=60)
    _photo(tmp_path / "c.png", 4, size=128)
    a, b, c = (perceptual_hash(str(tmp_path / n)) for n in ("a.png", "b.jpg", "c.png"))
    assert int(popcount(a ^ b).sum()) <= MAX_DISTANCE < 2 * MAX_DISTANCE <= int(popcount(a ^ c).sum())
