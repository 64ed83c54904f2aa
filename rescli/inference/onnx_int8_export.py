"""int8 ONNX exports: the fp32 ONNX export, quantised by ONNX Runtime's static quantisation (QDQ format: int8
weights per channel, uint8 activations, MinMax ranges calibrated on real images), then written with its metadata.

It stays an ordinary rescli ONNX export (float32 image batch in, logits out, rescli.json inside), so it is
opened, checked and described by rescli.inference.onnx_export like any other, and runs on onnxruntime anywhere.
onnx and onnxruntime are optional (pip install 'rescli[onnx]') and imported where they are used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_write_bytes
from rescli.data.transforms import to_model_input
from rescli.inference.export_format import META_KEY
from rescli.inference.onnx_export import write_onnx

INSTALL_HINT = "pip install 'rescli[onnx]' (or pip install onnx onnxruntime)"


METHOD = "onnxruntime static quantisation, QDQ: int8 weights per channel, uint8 activations, MinMax calibration"


def quantize_onnx(net: torch.nn.Module, *, example: torch.Tensor, meta: dict[str, Any], opset: int,
                  images: Sequence[torch.Tensor], workdir: Path) -> Path:
    """``net`` exported to ONNX and quantised to int8, calibrated on ``images`` (uint8 [3, H, W] each); the file,
    with ``meta`` inside, in ``workdir`` (a temporary folder: the caller writes the export once it is checked)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise RescliError(f"int8 ONNX exports need onnxruntime: {INSTALL_HINT}") from None
    fp32, prepared, int8 = workdir / "fp32.onnx", workdir / "prepared.onnx", workdir / "int8.onnx"
    write_onnx(net, example=example, meta=meta, path=fp32, opset=opset)
    # Shape inference and graph optimisation first, as onnxruntime recommends before quantising.
    quant_pre_process(str(fp32), str(prepared))

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = (
                {"input": _model_input(batch, meta)} for batch in _batched(images, 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(prepared), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    candidate = workdir / "candidate.onnx"
    write_onnx_metadata(int8, meta=meta, path=candidate)
    return candidate


def write_onnx_metadata(source: Path, *, meta: dict[str, Any], path: Path) -> None:
    """``source`` written to ``path`` (atomically) with ``meta`` as its rescli.json, in place of what it had."""
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (META_KEY, json.dumps(meta))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"rescli int8 export of {meta['arch']} ({len(meta['classes'])} classes)"
    atomic_write_bytes(path, proto.SerializeToString())


def _batched(images: Sequence[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        yield torch.stack(list(images[start:start + size]))


def _model_input(batch: torch.Tensor, meta: dict[str, Any]) -> np.ndarray:
    x = to_model_input(batch, device=torch.device("cpu"), mean=meta["mean"], std=meta["std"], channels_last=False)
    return np.ascontiguousarray(x.numpy())
