"""Shared fixtures: tiny learnable image folders, an in-process CLI runner, isolated caches."""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rescli.train.interrupts import StopFlag

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `from hostile import ...`

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: tiny convolutions gain nothing from a second one, runs repeat
    bit for bit, and on a busy machine OpenMP threads spin-waiting for each other made steps ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches or runs/ folder."""
    monkeypatch.setenv("RESCLI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("RESCLI_MODEL", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


def write_color_images(
    folder: Path, color: tuple[int, int, int], n: int, *, size: int = 24, seed: int = 0, fmt: str = "png"
) -> list[Path]:
    """Noisy images dominated by one colour: a model learns them in a few steps."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = np.array(color, dtype=np.float32)
        img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:03d}.{fmt}"
        Image.fromarray(img, "RGB").save(path)
        paths.append(path)
    return paths


def make_class_folder(
    root: Path, *, per_class: int = 12, size: int = 24, classes=("red", "green", "blue"), seed: int = 0
) -> Path:
    for k, name in enumerate(classes):
        write_color_images(root / name, COLORS[name], per_class, size=size, seed=seed + k)
    return root


def make_split_folder(root: Path, *, val_name: str = "val", with_test: bool = True, size: int = 24) -> Path:
    make_class_folder(root / "train", per_class=10, size=size, seed=1)
    make_class_folder(root / val_name, per_class=4, size=size, seed=2)
    if with_test:
        make_class_folder(root / "test", per_class=4, size=size, seed=3)
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "data")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_split_folder(tmp_path / "split")


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*args: str, cwd: Path | None = None, stdin: str | None = None) -> Result:
    """Run `rescli ARGS` in-process through the real entry point (exit codes included)."""
    from rescli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd, old_stdin = sys.argv, os.getcwd(), sys.stdin
    sys.argv = ["rescli", *map(str, args)]
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
        os.chdir(old_cwd)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished run shared by tests that only read it (resnet18, 24 px, 2 epochs)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_class_folder(root / "data")
    with pytest.MonkeyPatch.context() as mp:  # session scope: the autouse fixture does not apply here
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        res = run_cli("finetune", data, "--weights", "none", "--img-size", "24", "--epochs", "2", "--batch-size", "8",
                      "--workers", "0", "--output", root / "run", "--augment", "none")
    assert res.code == 0, res.err
    return root / "run"


class StopAfter(StopFlag):
    """Acts like a Ctrl-C arriving during optimiser step number ``n`` (counted from this call's first step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.steps = n, 0

    def check(self) -> bool:
        self.steps += 1
        if self.steps >= self.n and self.signal_name is None:
            self.signal_name = "SIGINT"
        return bool(self)
