"""ONNX exports: written from a checkpoint's network (needs onnx), opened as a Predictor with onnxruntime, and
described for rescli info (with onnx, else onnxruntime).

onnx and onnxruntime are imported where they are used, never at the top: both are optional
(pip install 'rescli[onnx]'), and neither is needed by anything else rescli does.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rescli.core.errors import RescliError, first_line
from rescli.core.fileio import atomic_write_bytes
from rescli.data.transforms import to_model_input
from rescli.inference.export_format import EXPORT_AGAIN, META_KEY, check_signature, meta_from, probe
from rescli.inference.predictor import Predictor


def write_onnx(net: torch.nn.Module, *, example: torch.Tensor, meta: dict[str, Any], path: Path, opset: int) -> None:
    """Export ``net`` (traced on ``example``, batch axis dynamic) to ``path`` with ``meta`` as its rescli.json."""
    try:
        import onnx
    except ImportError:
        raise RescliError("ONNX export needs the onnx package: pip install 'rescli[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
        torch.onnx.export(
            # dynamo=False hands ``f`` to the TorchScript-based exporter, which writes to a file object as well as
            # to a path; torch's annotation names only paths (the dynamo exporter's).
            net, (example,), buf,  # type: ignore[arg-type]
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    proto.doc_string = f"rescli export of {meta['arch']} ({len(meta['classes'])} classes, {meta['task']})"
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())


def onnx_predictor_or_none(path: Path) -> Predictor | None:
    """The export as a Predictor, or None where onnxruntime is not installed."""
    try:
        import onnxruntime  # noqa: F401 (only whether it is there)
    except ImportError:
        return None
    return load_onnx_predictor(path)


def load_onnx_predictor(path: str | os.PathLike) -> Predictor:
    path = Path(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise RescliError("predicting with an .onnx model needs onnxruntime: pip install 'rescli[onnx]'") from None
    # Plain session options: no custom-op library is registered, so the file can only use onnxruntime's own
    # operators (a graph naming any other fails to load), never native code of its choosing.
    options = ort.SessionOptions()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=ort.get_available_providers())
    except Exception as exc:
        raise RescliError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    meta = meta_from(session.get_modelmeta().custom_metadata_map.get(META_KEY, ""), path)
    _check_onnx_graph(path, meta, inputs=[(i.type == "tensor(float)", i.shape) for i in session.get_inputs()],
                      outputs=[o.shape for o in session.get_outputs()])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    probe(path, meta, lambda size: run(np.zeros((1, 3, size, size), np.float32)))

    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, device=torch.device("cpu"), mean=meta["mean"], std=meta["std"], channels_last=False)
        return torch.from_numpy(run(np.ascontiguousarray(x.numpy()))).float()

    return Predictor.from_metadata(meta, logits_fn=logits_fn, kind="onnx", meta=meta, source=str(path))


def describe_onnx(path: Path) -> dict[str, Any]:
    """The metadata an ONNX export carries and its parameter count; reads the graph, so a broken one fails here."""
    try:
        import onnx
    except ImportError:  # onnxruntime alone is enough to read the metadata
        return {"kind": "onnx", "meta": load_onnx_predictor(path).meta, "parameters": None}
    try:
        # The graph and metadata only: a rescli export keeps its weights inside, and an external-data
        # reference would make onnx read files next to (or, if crafted, far from) this one.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise RescliError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    meta = meta_from({p.key: p.value for p in proto.metadata_props}.get(META_KEY, ""), path)
    initializers = {t.name for t in proto.graph.initializer}
    # Older IR versions list the weights among the graph's inputs too.
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    _check_onnx_graph(
        path, meta,
        inputs=[(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, _proto_shape(i)) for i in graph_inputs],
        outputs=[_proto_shape(o) for o in proto.graph.output],
    )
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return {"kind": "onnx", "meta": meta, "parameters": params}


def _check_onnx_graph(path: Path, meta: dict[str, Any], *, inputs: list[tuple[bool, Sequence[Any]]],
                      outputs: list[Sequence[Any]]) -> None:
    """``inputs``: (is float32, shape) per graph input; ``outputs``: each output's shape (the first: the logits)."""
    if len(inputs) != 1:
        raise RescliError(f"{path}: input: the graph takes {len(inputs)} inputs; a rescli export takes one, the image "
                          f"batch; {EXPORT_AGAIN}")
    is_float, input_shape = inputs[0]
    if not is_float:
        raise RescliError(f"{path}: input: not float32; a rescli export takes a float32 image batch; {EXPORT_AGAIN}")
    check_signature(path, meta, input_shape=input_shape, output_shape=outputs[0] if outputs else None)


def _proto_shape(value_info: Any) -> list[Any]:
    """An ONNX ValueInfoProto's shape: an int per fixed axis, the axis name (or None) per open one."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
