"""The rescli export format, shared by every kind of export: the metadata it carries and the signature it has.

An export takes a normalised float32 NCHW batch and returns logits. What is needed to build that input and
read the output (class names, image size, mean/std, temperature, the task and, multi-label, each class's
threshold) travels inside the file as one JSON object
under ``META_KEY`` (a TorchScript extra file, an ONNX ``metadata_props`` entry), so an export can be used
without rescli: plain ``torch.jit.load`` or onnxruntime, plus Pillow for the preprocessing
(examples/predict_onnx.py shows how). ``export_metadata`` writes that object; ``meta_from`` reads it back and
checks it like a checkpoint's, and ``check_signature`` / ``probe`` check the network against it on load.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from rescli.core.errors import RescliError, first_line
from rescli.data.tasks import MULTI_LABEL
from rescli.models.checkpoint import check_model_metadata, model_fields, versions

META_KEY = "rescli.json"


EXPORT_FORMAT = "rescli-export"


EXPORT_AGAIN = "export it again from its checkpoint (rescli export)"


#: What the logits mean, single-label and multi-label.
OUTPUTS = ("logits; softmax(logits / temperature) gives calibrated probabilities",
           "logits; sigmoid(logits / temperature) gives each class's probability; a class is predicted where its "
           "probability reaches its threshold (thresholds, one per class)")


EXPORTED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "mean_average_precision")


EXPORTED_SETTINGS = ("data_dir", "val_split", "seed", "multi_label", "label_sep", "path_column", "label_column")


def export_metadata(ckpt: dict[str, Any], *, source: str | None = None) -> dict[str, Any]:
    """The metadata an export of ``ckpt`` carries (``source``: the checkpoint's file name)."""
    metrics = ckpt.get("metrics", {})
    settings = ckpt.get("settings", {})
    fields = model_fields(ckpt)
    return {
        "format": EXPORT_FORMAT,
        **fields,
        "input": "float32 NCHW RGB, scaled to [0,1] then (x - mean) / std",
        "preprocess": "RGB (EXIF-upright, transparency on white); central square (side = the shorter side) resized "
                      "to img_size x img_size (bilinear, antialiased)",
        "output": OUTPUTS[fields["task"] == MULTI_LABEL],
        "metrics": {k: metrics[k] for k in EXPORTED_METRICS if k in metrics},
        "versions": versions(),
        "trained_with": ckpt.get("versions", {}),
        # what evaluate needs to rebuild the validation split of the training folder, or read its table
        "settings": {k: settings[k] for k in EXPORTED_SETTINGS if k in settings},
        "data": ckpt.get("data"),  # the training folder and its split, file for file: evaluate scores the held-out part
        "source": source,
        # engine, precision, int8 calibration and the validation-split check it passed (inference.checked_export);
        # None for the exports checked by logit parity alone (torchscript, onnx)
        "deployment": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def meta_from(raw: str | bytes, path: Path) -> dict[str, Any]:
    """The export's rescli.json, checked like a checkpoint's metadata (checkpoint.check_model_metadata)."""
    try:
        meta = json.loads(raw)
        ours = isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT
    except ValueError:
        ours = False
    if not ours:
        raise RescliError(f"{path}: not a rescli export (no rescli metadata inside)")
    check_model_metadata(meta, path=path, fix=EXPORT_AGAIN)
    return meta


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in shape) + "]"


def _fixed(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0


def check_signature(path: Path, meta: dict[str, Any], *, input_shape: Sequence[Any] | None = None,
                    output_shape: Sequence[Any] | None) -> None:
    """What a rescli export takes, [batch, 3, img_size, img_size], and returns, [batch, classes] logits.

    A dimension the file leaves open (a name, None, 0) passes here; Predictor.logits checks every batch's output.
    """
    if input_shape is not None:
        _check_input_shape(path, meta, input_shape)
    if output_shape is None:
        raise RescliError(f"{path}: output: not a tensor; a rescli export returns [batch, classes] logits; "
                          f"{EXPORT_AGAIN}")
    if len(output_shape) != 2:
        raise RescliError(f"{path}: output {_shape_text(output_shape)}: {len(output_shape)} axes; a rescli export "
                          f"returns [batch, classes] logits; {EXPORT_AGAIN}")
    if _fixed(output_shape[1]):
        check_model_metadata(meta, path=path, outputs=output_shape[1], fix=EXPORT_AGAIN)


def _check_input_shape(path: Path, meta: dict[str, Any], input_shape: Sequence[Any]) -> None:
    size = meta["img_size"]
    shown = _shape_text(input_shape)
    if len(input_shape) != 4:
        raise RescliError(f"{path}: input {shown}: expected 4 axes, [batch, 3, {size}, {size}]; {EXPORT_AGAIN}")
    _, channels, height, width = input_shape
    if _fixed(channels) and channels != 3:
        raise RescliError(f"{path}: input {shown}: takes {channels}-channel images; rescli feeds 3 (RGB); "
                          f"{EXPORT_AGAIN}")
    if (_fixed(height) and height != size) or (_fixed(width) and width != size):
        raise RescliError(f"{path}: input {shown}: takes {height}x{width} images, but its metadata says "
                          f"img_size {size}; {EXPORT_AGAIN}")


def probe(path: Path, meta: dict[str, Any], run_one: Callable[[int], Any]) -> None:
    """Run one blank image of the size the metadata gives, so a file that cannot be used fails on load, in one line.

    ``run_one(size)``: the network's output for one zero image of ``size`` x ``size`` pixels.
    """
    size = meta["img_size"]
    try:
        out = run_one(size)
    except Exception as exc:
        raise RescliError(f"{path}: input: the model does not run on one 3x{size}x{size} image (its metadata's "
                          f"img_size): {first_line(exc)}") from None
    check_signature(path, meta, output_shape=tuple(out.shape) if hasattr(out, "shape") else None)
