"""Exports for fast CPU deployment, kept only when they keep the checkpoint's accuracy: onnx-int8 (ONNX Runtime
static quantisation), openvino (an OpenVINO IR) and openvino-int8 (NNCF post-training quantisation).

Each is built in memory or in a temporary folder (int8: calibrated on images of the checkpoint's validation split,
or of --calibrate), then run beside the checkpoint's own network on the validation split. Only when label
agreement and accuracy are within the limits is the file written, atomically, with those figures in its metadata
(``deployment``), which `rescli info` shows; otherwise a RescliError says by how much, and nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rescli.core import events
from rescli.core.errors import RescliError
from rescli.core.runtime import select_runtime
from rescli.inference import deploy_check
from rescli.inference.deploy_check import Limits
from rescli.inference.predictor import Predictor, torch_logits_fn

#: --to name: (engine, precision).
CHECKED_FORMATS = {"onnx-int8": ("onnxruntime", "int8"), "openvino": ("openvino", "fp32"),
                   "openvino-int8": ("openvino", "int8")}


@dataclass(frozen=True)
class Calibration:
    """Where int8 calibration images come from (``folder``: --calibrate, else the validation split) and how many."""

    folder: str | os.PathLike | None = None
    count: int = 300


@dataclass
class _Candidate:
    predictor: Predictor  # the export as it will run
    write: Callable[[dict[str, Any]], None]  # writes the export with the metadata given
    method: str | None  # how it was quantised


def export_checked(
    *, net: torch.nn.Module, ckpt: dict[str, Any], meta: dict[str, Any], fmt: str, out: Path, opset: int,
    calibration: Calibration, limits: Limits,
) -> dict[str, Any]:
    """Build the ``fmt`` export of ``net``, check it on the validation split, and write it to ``out`` if it passes.

    ``meta``: export_format.export_metadata of ``ckpt``. Returns what export_model reports, the check included.
    """
    engine, precision = CHECKED_FORMATS[fmt]
    size = int(ckpt["img_size"])
    val = deploy_check.validation_samples(ckpt)
    images: list[torch.Tensor] = []
    source = None
    if precision == "int8":
        paths, source = deploy_check.calibration_paths(ckpt=ckpt, calibrate=calibration.folder)
        images = deploy_check.calibration_images(paths, count=calibration.count, img_size=size)
    example = torch.randn(2, 3, size, size)
    with tempfile.TemporaryDirectory(prefix="rescli-export-") as work:
        candidate = _build(fmt, net=net, example=example, meta=meta, images=images, opset=opset, out=out,
                           workdir=Path(work))
        check = _check(net, candidate.predictor, ckpt=ckpt, val=val, images=images, limits=limits)
        deployment = {
            "format": fmt, "engine": engine, "precision": precision,
            "parameters": sum(int(p.numel()) for p in net.parameters()),  # int8 weights are not float initialisers
            "inference_precision": candidate.predictor.meta.get("runtime", {}).get("inference_precision"),
            "quantisation": None if precision != "int8" else {
                "method": candidate.method, "calibration_images": len(images), "calibration_source": source},
            "check": check,
        }
        shortfalls = deploy_check.failures(check, limits=limits)
        if shortfalls:
            raise RescliError(f"{out}: not written: on {check['images']} {check['on']}, {'; '.join(shortfalls)}; "
                              f"the checkpoint itself predicts as before")
        candidate.write({**meta, "deployment": deployment})
    result: dict[str, Any] = {"output": str(out), "format": fmt, "classes": len(ckpt["classes"]), "img_size": size,
                              "deployment": deployment}
    if fmt.startswith("openvino"):
        result["weights"] = str(out.with_suffix(".bin"))
    return result


def _build(fmt: str, *, net: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any],
           images: list[torch.Tensor], opset: int, out: Path, workdir: Path) -> _Candidate:
    if fmt == "onnx-int8":
        from rescli.inference.onnx_export import load_onnx_predictor
        from rescli.inference.onnx_int8_export import METHOD, quantize_onnx, write_onnx_metadata

        events.info(f"quantising to int8 with onnxruntime, calibrated on {len(images)} image(s)")
        built = quantize_onnx(net, example=example, meta=meta, opset=opset, images=images, workdir=workdir)
        return _Candidate(load_onnx_predictor(built), lambda m: write_onnx_metadata(built, meta=m, path=out), METHOD)
    from rescli.inference.openvino_export import (
        convert_network,
        openvino_predictor,
        quantize_network,
        save_openvino,
    )

    model = convert_network(net, example=example)
    method = None
    if fmt == "openvino-int8":
        events.info(f"quantising to int8 with NNCF, calibrated on {len(images)} image(s)")
        model = quantize_network(model, images=images, mean=meta["mean"], std=meta["std"])
        method = "NNCF post-training quantisation (performance preset: symmetric int8), fast bias correction"
    predictor = openvino_predictor(model, meta=meta, source=str(out))
    return _Candidate(predictor, lambda m: save_openvino(model, meta=m, path=out), method)


def _check(net: torch.nn.Module, export: Predictor, *, ckpt: dict[str, Any],
           val: tuple[list[deploy_check.Sample], str] | None, images: list[torch.Tensor],
           limits: Limits) -> dict[str, Any]:
    """The comparison on the validation split; where it is gone, on the calibration images (no labels: agreement
    only), or, for an fp32 export with neither, on random images."""
    runtime = select_runtime(device="cpu", precision="fp32")
    reference = Predictor.from_metadata(
        ckpt, logits_fn=torch_logits_fn(net, runtime=runtime, mean=ckpt["mean"], std=ckpt["std"]),
        kind="checkpoint", meta={}, device=runtime.device, source="checkpoint")
    if val is not None:
        check = deploy_check.compare(reference, export, samples=val[0], labelled=True)
        check["on"] = f"images of {val[1]}"
    else:
        events.warn("the checkpoint's validation images are gone: the export is checked for label agreement only, "
                    "not accuracy, on " + ("its calibration images" if images else "random images"))
        size = int(ckpt["img_size"])
        check = _compare_tensors(reference, export, images or list(torch.rand(16, 3, size, size).mul(255).byte()))
        check["on"] = "calibration images (unlabelled)" if images else "random images"
    check.update(min_agreement=limits.min_agreement, max_drop_points=limits.max_drop)
    return check


def _compare_tensors(reference: Predictor, export: Predictor, images: list[torch.Tensor]) -> dict[str, Any]:
    """Agreement and the largest calibrated score difference on decoded images (uint8 [3, H, W] each)."""
    agree, worst = 0, 0.0
    for start in range(0, len(images), 32):
        batch = torch.stack(images[start:start + 32])
        ref, got = reference.logits(batch), export.logits(batch)
        scores = [torch.softmax(x / reference.temperature, dim=1) for x in (ref, got)]
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        worst = max(worst, float((scores[0] - scores[1]).abs().max()))
    return {"images": len(images), "unreadable": 0, "agreement": agree / len(images), "max_score_difference": worst}
