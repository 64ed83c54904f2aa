"""Which model file: --model, $RESCLI_MODEL or the newest run; and how a file is opened, by its name alone."""

from __future__ import annotations

import os
from pathlib import Path

from rescli.core.errors import UsageError


def resolve_model_path(model: str | os.PathLike | None, *, cwd: str | os.PathLike = ".") -> tuple[Path, str]:
    """--model, else $RESCLI_MODEL, else the newest runs/*/best.pt under ``cwd``; says which rule chose it.

    A run folder stands for its best.pt; the word ``latest`` for the newest runs/*/best.pt.
    """
    if model and not (str(model) == "latest" and not Path(model).exists()):
        return run_folder_to_file(Path(model).expanduser()), "--model"
    env = os.environ.get("RESCLI_MODEL")
    if env and not model:  # "latest" means the newest run, whatever RESCLI_MODEL says
        return run_folder_to_file(Path(env).expanduser()), "RESCLI_MODEL"
    candidates = sorted(Path(cwd).glob("runs/*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(
            "no model given: pass --model PATH, set RESCLI_MODEL, or run `rescli finetune DATA` here first "
            "(it writes runs/*/best.pt)"
        )
    return candidates[-1], "newest runs/*/best.pt"


def run_folder_to_file(path: Path) -> Path:
    """A run folder stands for its best.pt; any other path for itself."""
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    return path


TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript")


ONNX_SUFFIXES = (".onnx",)


OPENVINO_SUFFIXES = (".xml",)


def model_kind(path: str | os.PathLike) -> str:
    """checkpoint, torchscript, onnx or openvino: by the file's name alone, the one place that decides how a model is
    opened (an OpenVINO IR by its .xml; its .bin is read from beside it).

    Never by content: a TorchScript file is a program that runs when it is loaded, so only a file named for it
    (.ts, .torchscript) is loaded as one. Everything else, best.pt and a run folder included, is a checkpoint,
    read with weights_only=True whatever it holds (checkpoint.load_weights_only refuses TorchScript inside).
    """
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in OPENVINO_SUFFIXES:
        return "openvino"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    return "checkpoint"
