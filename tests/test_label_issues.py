"""rescli label-issues: planted wrong labels come first, judged out of sample, by confident learning."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import COLORS, make_class_folder, make_split_folder, run_cli, write_color_images

from rescli.insight.label_issues import out_of_sample_probabilities, rank_label_issues


def test_planted_wrong_labels_rank_first(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=12, seed=5)
    planted = []
    for i in range(2):  # red pictures filed as green
        source = data / "red" / f"img_{i:03d}.png"
        target = data / "green" / f"planted_{i}.png"
        shutil.move(source, target)
        planted.append(str(target))
    res = run_cli("label-issues", data, "--model", trained_run, "--format", "jsonl")
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert sorted(r["path"] for r in rows[:2]) == sorted(planted)
    assert all(r["given"] == "green" and r["suggested"] == "red" for r in rows[:2])
    assert rows[0]["score"] >= rows[-1]["score"] and "flagged" in res.err


def test_all_ranks_every_image_and_top_limits(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6, seed=7)
    every = run_cli("label-issues", data, "--model", trained_run, "--all", "--format", "csv")
    assert every.code == 0, every.err
    assert every.out.splitlines()[0] == "score,given,suggested,path,error" and len(every.out.splitlines()) == 19
    top = run_cli("label-issues", data, "--model", trained_run, "--all", "--top", "3", "--format", "jsonl")
    assert len(top.out.splitlines()) == 3


def test_split_folders_are_judged_across_every_split(trained_run, tmp_path):
    data = make_split_folder(tmp_path / "split")
    wrong = write_color_images(data / "val" / "blue", COLORS["red"], 1, seed=9)[0]  # a red picture filed as blue
    res = run_cli("label-issues", data, "--model", trained_run, "--format", "jsonl")
    assert res.code == 0, res.err
    first = json.loads(res.out.splitlines()[0])
    assert first["path"] == str(wrong) and first["suggested"] == "red"


def test_confident_learning_flags_images_counted_under_another_class():
    probs = np.array([
        [0.9, 0.1], [0.8, 0.2], [0.7, 0.3],  # given 0, look like 0
        [0.2, 0.8], [0.1, 0.9],  # given 1, look like 1
        [0.95, 0.05],  # given 1, looks like 0: the issue
        [0.5, 0.5],  # given 0, reaches neither threshold and is not preferred elsewhere
        [0.3, 0.7],  # given 0, counted under 1
    ])
    given = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    ranking = rank_label_issues(probs, given)
    assert ranking.flagged.tolist() == [False, False, False, False, False, True, False, True]
    assert int(ranking.suggested[7]) == 1
    assert int(ranking.order[0]) == 5 and int(ranking.suggested[5]) == 0
    assert np.isclose(ranking.score[5], 0.95)


def test_every_image_is_judged_by_a_head_that_never_saw_it():
    # Random labels on random 512-d features: a head that saw an image's label would fit it (in-sample probability
    # 0.91 here); held out, the given label gets about chance (1/3).
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 512))
    labels = rng.integers(0, 3, 120)
    probs = out_of_sample_probabilities(features, labels, n_classes=3)
    assert probs.shape == (120, 3) and np.allclose(probs.sum(1), 1.0)
    assert probs[np.arange(120), labels].mean() < 0.45
