"""A model file as a Predictor: a checkpoint here, an export through its format's module (torchscript_export,
onnx_export, openvino_export); which one is decided by the file's name alone (lookup.model_kind)."""

from __future__ import annotations

import os
from pathlib import Path

from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import select_runtime
from rescli.inference.lookup import model_kind, run_folder_to_file
from rescli.inference.onnx_export import load_onnx_predictor
from rescli.inference.openvino_export import load_openvino_predictor
from rescli.inference.predictor import Predictor, torch_logits_fn
from rescli.inference.torchscript_export import load_torchscript_predictor
from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint


def load_predictor(
    path: str | os.PathLike, *, device: str = "auto", precision: str = "auto", compile: bool = False
) -> Predictor:
    """A checkpoint (.pt), TorchScript export (.ts), ONNX export (.onnx, fp32 or int8) or OpenVINO export (.xml) as
    a Predictor; a run folder means its best.pt. Each loader checks the file's metadata.

    ``compile``: torch.compile a checkpoint's model (see CompiledForward); exports are already compiled forms.
    """
    path = run_folder_to_file(Path(path))
    if not path.exists():
        raise RescliError(f"{path}: no such model file")
    if path.is_dir():
        raise RescliError(f"{path}: is a folder; pass a model file (a run folder's best.pt, or a .ts/.onnx/.xml "
                          f"export)")
    kind = model_kind(path)
    if compile and kind != "checkpoint":
        raise UsageError(
            f"--compile is for checkpoints (.pt); {path} is a {kind} export, which runs as it was exported"
        )
    if kind == "onnx":
        return load_onnx_predictor(path)
    if kind == "openvino":
        return load_openvino_predictor(path, device=device, precision=precision)
    if kind == "torchscript":
        return load_torchscript_predictor(path, device=device, precision=precision)
    return load_checkpoint_predictor(path, device=device, precision=precision, compile=compile)


def load_checkpoint_predictor(path: Path, *, device: str, precision: str, compile: bool) -> Predictor:
    """A rescli checkpoint's network in eager torch (or compiled), on the device and precision asked for."""
    ckpt = load_checkpoint(path)
    runtime = select_runtime(device=device, precision=precision)
    model = model_from_checkpoint(ckpt, source=path).to(runtime.device).to(memory_format=runtime.memory_format)
    return Predictor.from_metadata(
        ckpt,
        logits_fn=torch_logits_fn(model, runtime=runtime, mean=ckpt["mean"], std=ckpt["std"], compile=compile),
        kind="checkpoint",
        meta={"arch": ckpt["arch"], "runtime": runtime.describe(), "settings": ckpt.get("settings", {}),
              "data": ckpt.get("data")},
        device=runtime.device,
        source=str(path),
    )
