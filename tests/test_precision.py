"""Every precision mode gives a working model, and bf16 stays close to fp32 (issue 5's correctness guard)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_class_folder

from rescli.core.runtime import cpu_has_fast_bf16, resolve_precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_precision_trains_predicts_and_records_itself(precision, tmp_path, cli):
    data = make_class_folder(tmp_path / "d", per_class=10)
    run = tmp_path / "run"
    res = cli("finetune", data, "--weights", "none", "--img-size", "48", "--epochs", "5", "--batch-size", "10",
              "--workers", "0", "--augment", "none", "--precision", precision, "--output", run)
    assert res.code == 0, res.err
    assert json.loads((run / "run.json").read_text())["runtime"].split()[1] == precision
    # colour classes, 6 validation images: well above chance (1/3)
    assert json.loads((run / "metrics.json").read_text())["accuracy"] >= 0.6
    # The same checkpoint predicted in fp32 and bf16 agrees on labels and, closely, on scores.
    rows = {}
    for p in ("fp32", "bf16"):
        out = cli("predict", data, "--model", run / "best.pt", "--format", "jsonl", "--precision", p, "--raw-scores")
        assert out.code == 0, out.err
        rows[p] = [json.loads(line) for line in out.out.splitlines()]
    assert [r["label"] for r in rows["fp32"]] == [r["label"] for r in rows["bf16"]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(rows["fp32"], rows["bf16"])) < 0.05


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"


def test_fp16_on_cpu_is_a_usage_error(class_folder, tmp_path, cli):
    res = cli("finetune", class_folder, "--weights", "none", "--precision", "fp16", cwd=tmp_path)
    assert res.code == 2 and "fp16" in res.err
