"""Deployable exports: TorchScript and ONNX files that carry their own labels and preprocessing.

Both take a normalised float32 NCHW batch and return logits. What is needed to build that
input and read the output (class names, image size, mean/std, temperature) travels inside
the file: TorchScript extra file ``rescli.json`` / ONNX ``metadata_props['rescli.json']``, a JSON
object (see ``export_metadata``), so an export can be used without rescli: plain ``torch.jit.load``
or onnxruntime, plus Pillow for the preprocessing (examples/predict_onnx.py shows how).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import atomic_write_bytes
from rescli.data.transforms import build_transform, to_model_input
from rescli.inference.exported import (
    META_KEY,
    load_torchscript_predictor,
    onnx_predictor_or_none,
)
from rescli.models.checkpoint import load_checkpoint, versions

FORMATS = ("torchscript", "onnx")


SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}


def export_metadata(ckpt: dict[str, Any], *, source: str | None = None) -> dict[str, Any]:
    import datetime as _dt

    headline = {k: ckpt.get("metrics", {}).get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1") if k in ckpt.get("metrics", {})}
    settings = ckpt.get("settings", {})
    return {
        "format": "rescli-export",
        "arch": ckpt["arch"],
        "arch_kwargs": ckpt.get("arch_kwargs", {}),
        "classes": ckpt["classes"],
        "img_size": ckpt["img_size"],
        "mean": ckpt["mean"],
        "std": ckpt["std"],
        "temperature": ckpt.get("temperature", 1.0),
        "input": "float32 NCHW RGB, scaled to [0,1] then (x - mean) / std",
        "preprocess": "RGB (EXIF-upright, transparency on white); central square (side = the shorter side) resized to img_size x img_size (bilinear, antialiased)",
        "output": "logits; softmax(logits / temperature) gives calibrated probabilities",
        "metrics": headline,
        "versions": versions(),
        "trained_with": ckpt.get("versions", {}),
        # what evaluate needs to rebuild the validation split of the training folder
        "settings": {k: settings[k] for k in ("data_dir", "val_split", "seed") if k in settings},
        "data": ckpt.get("data"),  # the training folder and its split, file for file: evaluate scores the held-out part
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RescliError("ONNX export needs the onnx package: pip install 'rescli[onnx]' (or pip install onnx onnxruntime)") from None
    return onnx


def export_model(
    *,
    model: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike | None = None,
    check_images: Sequence[str] | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write the export and check it against the checkpoint; returns paths and max |logit difference|."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    from rescli.inference.lookup import model_kind
    from rescli.inference.lookup import run_folder_to_file as _run_folder_to_file

    src = _run_folder_to_file(Path(model))
    if src.is_file() and model_kind(src) != "checkpoint":
        raise RescliError(f"{src}: is already a {model_kind(src)} export; export takes a rescli checkpoint such as runs/run1/best.pt")
    out = Path(output) if output else src.with_suffix(SUFFIXES[fmt])
    if out.resolve() == src.resolve():
        raise UsageError(f"--output {out}: would overwrite the checkpoint; choose another file name")
    if model_kind(out) != fmt:  # rescli opens a model file by its name: any other name would not open as an export
        names = {"torchscript": ".ts or .torchscript", "onnx": ".onnx"}[fmt]
        raise UsageError(f"--output {out}: a {fmt} export must be named {names}; choose such a name")
    ckpt = load_checkpoint(src)
    meta = export_metadata(ckpt, source=src.name)

    from rescli.models.checkpoint import model_from_checkpoint

    net = model_from_checkpoint(ckpt, source=src).float().eval()
    size = int(ckpt["img_size"])
    example = torch.randn(2, 3, size, size)
    if fmt == "torchscript":
        # TorchScript is deprecated upstream but still the one format plain `torch.jit.load` reads anywhere.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(net, example, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf, _extra_files={META_KEY: json.dumps(meta)})
        atomic_write_bytes(out, buf.getvalue())
        predictor = load_torchscript_predictor(out, device="cpu", precision="fp32")
    else:
        onnx = _require_onnx()
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
            torch.onnx.export(
                net, (example,), buf, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
            )
        proto = onnx.load_from_string(buf.getvalue())
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        proto.doc_string = f"rescli export of {ckpt['arch']} ({len(ckpt['classes'])} classes)"
        onnx.checker.check_model(proto)
        atomic_write_bytes(out, proto.SerializeToString())
        predictor = onnx_predictor_or_none(out)

    result: dict[str, Any] = {"output": str(out), "format": fmt, "classes": len(ckpt["classes"]), "img_size": size}
    if predictor is None:
        result["parity"] = "not checked: onnxruntime is not installed (pip install onnxruntime)"
        return result
    reference = _normalised_logits_fn(net)
    rand = torch.rand(4, 3, size, size).mul(255).to(torch.uint8)
    result["max_abs_diff_random"] = _max_diff(reference, predictor.logits, rand, ckpt)
    real = _real_batch(check_images, ckpt)
    if real is not None:
        result["max_abs_diff_real"] = _max_diff(reference, predictor.logits, real, ckpt)
        result["real_images"] = int(real.shape[0])
    worst = max(v for k, v in result.items() if k.startswith("max_abs_diff"))
    result["parity_ok"] = bool(worst < 1e-3 * max(1.0, _scale(reference, rand, ckpt)))
    if not result["parity_ok"]:
        raise RescliError(f"{out}: export does not match the checkpoint (max |logit difference| {worst:.3g}); please report this")
    return result


def _normalised_logits_fn(net: torch.nn.Module):
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x)
    return fn


def _inputs(images: torch.Tensor, ckpt) -> torch.Tensor:
    return to_model_input(images, device=torch.device("cpu"), mean=ckpt["mean"], std=ckpt["std"], channels_last=False)


def _max_diff(reference, logits_fn, images: torch.Tensor, ckpt) -> float:
    ref = reference(_inputs(images, ckpt))
    return float((ref - logits_fn(images)).abs().max())


def _scale(reference, images, ckpt) -> float:
    return float(reference(_inputs(images, ckpt)).abs().max())


def _real_batch(check_images: Sequence[str] | None, ckpt) -> torch.Tensor | None:
    """A few real images: the ones given, else some from the folder the model was trained on (if still there)."""
    from rescli.data.images import load_rgb
    from rescli.inference.inputs import iter_input_paths

    sources = list(check_images or [])
    if not sources:
        data_dir = ckpt.get("settings", {}).get("data_dir")
        if data_dir and Path(data_dir).is_dir():
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
