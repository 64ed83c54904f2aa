"""Defaults chosen for speed on the machine at hand: the batch for many small images, precision by the kernels torch
really uses. (Speed itself is measured by bench/bench.py, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_class_folder

from rescli.train import settings as settings_module
from rescli.train.loop import finetune
from rescli.train.settings import TrainSettings, auto_batch_size


@pytest.mark.parametrize(("img_size", "train_images", "batch"), [
    (32, 5000, 64), (32, 2000, 64), (32, 1999, 32), (63, 4000, 64), (64, 4000, 32), (224, 100_000, 32), (16, 320, 32),
])
def test_many_small_images_get_the_larger_batch(img_size, train_images, batch):
    assert auto_batch_size(img_size=img_size, train_images=train_images) == batch


def test_a_run_without_a_batch_size_takes_the_automatic_one_and_keeps_it_on_resume(tmp_path, monkeypatch):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    base = {"data_dir": str(data), "arch": "resnet20", "weights": "none", "img_size": 16, "workers": 0, "epochs": 1}
    finetune(settings=TrainSettings(**base), output=tmp_path / "small")
    assert json.loads((tmp_path / "small" / "run.json").read_text())["settings"]["batch_size"] == 32

    monkeypatch.setattr(settings_module, "MANY_IMAGES", 10)  # these 15 training images count as many
    finetune(settings=TrainSettings(**base), output=tmp_path / "many")
    assert json.loads((tmp_path / "many" / "run.json").read_text())["settings"]["batch_size"] == 64

    monkeypatch.setattr(settings_module, "MANY_IMAGES", 10**9)  # a resumed run keeps the batch it was given
    finetune(resume=tmp_path / "many", epochs=2)
    assert json.loads((tmp_path / "many" / "run.json").read_text())["settings"]["batch_size"] == 64
    given = finetune(settings=TrainSettings(**base, batch_size=8), output=tmp_path / "given")
    assert json.loads((tmp_path / "given" / "run.json").read_text())["settings"]["batch_size"] == 8
    assert given["metrics"]["n"] == 3


def test_bf16_only_where_torch_runs_avx512_kernels():
    code = "from rescli.core.runtime import cpu_has_fast_bf16; print(cpu_has_fast_bf16())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}  # as on an AVX2-only CPU: torch's bf16 kernels go unused
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
