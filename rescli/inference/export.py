"""rescli export: a checkpoint written as a TorchScript, ONNX or OpenVINO file (fp32 or int8) that carries its own
labels and preprocessing (rescli.inference.export_format), checked against the checkpoint's own network: by logit
parity (torchscript, onnx), or on the validation split before it is kept (the others: inference.checked_export)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rescli.core.errors import RescliError, UsageError
from rescli.data.images import load_rgb
from rescli.data.transforms import build_transform, to_model_input
from rescli.inference.checked_export import CHECKED_FORMATS, Calibration, export_checked
from rescli.inference.deploy_check import Limits, validation_samples
from rescli.inference.export_format import export_metadata
from rescli.inference.inputs import iter_input_paths
from rescli.inference.lookup import model_kind, run_folder_to_file
from rescli.inference.onnx_export import onnx_predictor_or_none, write_onnx
from rescli.inference.predictor import Predictor
from rescli.inference.torchscript_export import load_torchscript_predictor, write_torchscript
from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint

FORMATS = ("torchscript", "onnx", *CHECKED_FORMATS)


SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx", "onnx-int8": ".int8.onnx", "openvino": ".xml",
            "openvino-int8": ".int8.xml"}


#: How rescli opens each format's file (lookup.model_kind), and the names that open so.
KINDS = {"torchscript": "torchscript", "onnx": "onnx", "onnx-int8": "onnx", "openvino": "openvino",
         "openvino-int8": "openvino"}


_NAMES = {"torchscript": ".ts or .torchscript", "onnx": ".onnx", "openvino": ".xml (its weights: the .bin beside it)"}


def export_model(
    *,
    model: str | os.PathLike,
    fmt: str | None = None,
    output: str | os.PathLike | None = None,
    check_images: Sequence[str] | None = None,
    opset: int = 17,
    to: str | None = None,
    calibration: Calibration | None = None,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Write the export and check it against the checkpoint; returns paths and the check's figures.

    ``to``: the format, one of FORMATS (``fmt`` is its older name, and still works). torchscript and onnx are
    checked by max |logit difference| after writing; onnx-int8, openvino and openvino-int8 on the validation split
    before (``limits``), int8 calibrated on ``calibration`` (default: 300 images of the validation split).
    """
    fmt = _chosen_format(fmt=fmt, to=to)
    src, out = _source_and_output(model, fmt=fmt, output=output)
    ckpt = load_checkpoint(src)
    meta = export_metadata(ckpt, source=src.name)
    net = model_from_checkpoint(ckpt, source=src).float().eval()
    if fmt in CHECKED_FORMATS:
        return export_checked(net=net, ckpt=ckpt, meta=meta, fmt=fmt, out=out, opset=opset,
                              calibration=calibration or Calibration(), limits=limits or Limits())
    size = int(ckpt["img_size"])
    example = torch.randn(2, 3, size, size)
    predictor: Predictor | None
    if fmt == "torchscript":
        write_torchscript(net, example=example, meta=meta, path=out)
        predictor = load_torchscript_predictor(out, device="cpu", precision="fp32")
    else:
        write_onnx(net, example=example, meta=meta, path=out, opset=opset)
        predictor = onnx_predictor_or_none(out)
    result: dict[str, Any] = {"output": str(out), "format": fmt, "classes": len(ckpt["classes"]), "img_size": size}
    if predictor is None:
        result["parity"] = "not checked: onnxruntime is not installed (pip install onnxruntime)"
        return result
    result.update(_check_parity(net, predictor, ckpt=ckpt, check_images=check_images, out=out))
    return result


def _chosen_format(*, fmt: str | None, to: str | None) -> str:
    if to is not None and fmt is not None and to != fmt:
        raise UsageError(f"to={to!r} and fmt={fmt!r}: give the format once (fmt is the older name of to)")
    chosen, flag = (to, "--to") if to is not None else (fmt, "--format")
    if chosen is None:
        raise UsageError(f"no export format given: expected one of {', '.join(FORMATS)}")
    if chosen not in FORMATS:
        raise UsageError(f"{flag} {chosen!r}: expected one of {', '.join(FORMATS)}")
    return chosen


def _source_and_output(model: str | os.PathLike, *, fmt: str, output: str | os.PathLike | None) -> tuple[Path, Path]:
    """The checkpoint to export and the file to write, refused before any work where either cannot be right."""
    src = run_folder_to_file(Path(model))
    if src.is_file() and model_kind(src) != "checkpoint":
        raise RescliError(f"{src}: is already a {model_kind(src)} export; export takes a rescli checkpoint such as "
                          f"runs/run1/best.pt")
    out = Path(output) if output else src.with_suffix(SUFFIXES[fmt])
    if out.resolve() == src.resolve():
        raise UsageError(f"--output {out}: would overwrite the checkpoint; choose another file name")
    if model_kind(out) != KINDS[fmt]:  # rescli opens a model file by its name: any other would not open as an export
        raise UsageError(f"--output {out}: a {fmt} export must be named {_NAMES[KINDS[fmt]]}; choose such a name")
    if KINDS[fmt] == "openvino" and out.with_suffix(".bin").resolve() == src.resolve():
        raise UsageError(f"--output {out}: its weights file {out.with_suffix('.bin')} would overwrite the checkpoint; "
                         f"choose another file name")
    return src, out


def _check_parity(net: torch.nn.Module, predictor: Predictor, *, ckpt: dict[str, Any],
                  check_images: Sequence[str] | None, out: Path) -> dict[str, Any]:
    """max |logit difference| between the export and ``net`` on random images, and on real ones where there are
    some; a RescliError unless the worst is within 1e-3 of the logits' scale."""

    def reference(images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, device=torch.device("cpu"), mean=ckpt["mean"], std=ckpt["std"], channels_last=False)
        with torch.no_grad():
            return net(x)

    size = int(ckpt["img_size"])
    rand = torch.rand(4, 3, size, size).mul(255).to(torch.uint8)
    on_random = reference(rand)
    result: dict[str, Any] = {"max_abs_diff_random": float((on_random - predictor.logits(rand)).abs().max())}
    real = _real_batch(check_images, ckpt)
    if real is not None:
        result["max_abs_diff_real"] = float((reference(real) - predictor.logits(real)).abs().max())
        result["real_images"] = int(real.shape[0])
    worst = max(v for k, v in result.items() if k.startswith("max_abs_diff"))
    result["parity_ok"] = bool(worst < 1e-3 * max(1.0, float(on_random.abs().max())))
    if not result["parity_ok"]:
        raise RescliError(f"{out}: export does not match the checkpoint (max |logit difference| {worst:.3g}); "
                          f"please report this")
    return result


def _real_batch(check_images: Sequence[str] | None, ckpt: dict[str, Any]) -> torch.Tensor | None:
    """A few real images: the ones given, else some from the folder the model was trained on (if still there)."""
    sources = list(check_images or [])
    if not sources:  # the validation split it recorded (a folder's or a label table's), else its data folder
        val = validation_samples(ckpt)
        data_dir = ckpt.get("settings", {}).get("data_dir")
        if val is not None:
            sources = [path for path, _ in val[0][:64]]
        elif data_dir and Path(data_dir).is_dir():
            sources = [data_dir]
    if not sources:
        return None
    transform = build_transform(img_size=int(ckpt["img_size"]), train=False)
    tensors = []
    for path in itertools.islice(iter_input_paths(sources), 64):
        try:
            tensors.append(transform(load_rgb(path, draft_size=int(ckpt["img_size"]))))
        except RescliError:
            continue
        if len(tensors) == 8:
            break
    return torch.stack(tensors) if tensors else None
