"""Opening exports: TorchScript and ONNX files as Predictors, with their metadata and graph checked on
load, and what an export holds (for rescli info)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rescli.core.errors import RescliError, first_line
from rescli.data.transforms import to_model_input
from rescli.models.checkpoint import check_model_metadata

META_KEY = "rescli.json"


EXPORT_AGAIN = "export it again from its checkpoint (rescli export)"


def meta_from(raw: str | bytes, path: Path) -> dict[str, Any]:
    """The export's rescli.json, checked like a checkpoint's metadata (checkpoint.check_model_metadata)."""
    try:
        meta = json.loads(raw)
        ours = isinstance(meta, dict) and meta.get("format") == "rescli-export"
    except ValueError:
        ours = False
    if not ours:
        raise RescliError(f"{path}: not a rescli export (no rescli metadata inside)")
    check_model_metadata(meta, path=path, fix=EXPORT_AGAIN)
    return meta


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in shape) + "]"


def _check_signature(path: Path, meta: dict[str, Any], *, input_shape: Sequence[Any] | None = None,
                     output_shape: Sequence[Any] | None) -> None:
    """What a rescli export takes, [batch, 3, img_size, img_size], and returns, [batch, classes] logits.

    A dimension the file leaves open (a name, None, 0) passes here; Predictor.logits checks every batch's output.
    """
    size = meta["img_size"]

    def fixed(dim: Any) -> bool:
        return isinstance(dim, int) and dim > 0

    if input_shape is not None:
        shown = _shape_text(input_shape)
        if len(input_shape) != 4:
            raise RescliError(f"{path}: input {shown}: expected 4 axes, [batch, 3, {size}, {size}]; {EXPORT_AGAIN}")
        _, channels, height, width = input_shape
        if fixed(channels) and channels != 3:
            raise RescliError(f"{path}: input {shown}: takes {channels}-channel images; rescli feeds 3 (RGB); "
                              f"{EXPORT_AGAIN}")
        if (fixed(height) and height != size) or (fixed(width) and width != size):
            raise RescliError(f"{path}: input {shown}: takes {height}x{width} images, but its metadata says "
                              f"img_size {size}; {EXPORT_AGAIN}")
    if output_shape is None:
        raise RescliError(f"{path}: output: not a tensor; a rescli export returns [batch, classes] logits; "
                          f"{EXPORT_AGAIN}")
    if len(output_shape) != 2:
        raise RescliError(f"{path}: output {_shape_text(output_shape)}: {len(output_shape)} axes; a rescli export "
                          f"returns [batch, classes] logits; {EXPORT_AGAIN}")
    if fixed(output_shape[1]):
        check_model_metadata(meta, path=path, outputs=output_shape[1], fix=EXPORT_AGAIN)


def _probe(path: Path, meta: dict[str, Any], run_one: Callable[[int], Any]) -> None:
    """Run one blank image of the size the metadata gives, so a file that cannot be used fails on load, in one line."""
    size = meta["img_size"]
    try:
        out = run_one(size)
    except Exception as exc:
        raise RescliError(f"{path}: input: the model does not run on one 3x{size}x{size} image (its metadata's "
                          f"img_size): {first_line(exc)}") from None
    _check_signature(path, meta, output_shape=tuple(out.shape) if hasattr(out, "shape") else None)


def _open_torchscript(path: Path, *, device: torch.device | str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The module and checked metadata of a TorchScript export.

    Loading runs code from the file (its __setstate__ methods), which is why only a file named for TorchScript
    (.ts, .torchscript) gets here: a checkpoint path never does, whatever it holds (predict.model_kind).
    """
    from rescli.inference.lookup import model_kind

    if model_kind(path) != "torchscript":
        raise RescliError(f"{path}: not named .ts or .torchscript; rescli loads TorchScript (a program) only from "
                          f"such a name")
    extra = {META_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:
        raise RescliError(f"{path}: not a readable TorchScript file ({first_line(exc)})") from None
    meta = meta_from(extra[META_KEY], path)
    module.eval()

    def run_one(size: int) -> Any:
        with torch.inference_mode():
            return module(torch.zeros(1, 3, size, size, device=device))

    _probe(path, meta, run_one)
    return module, meta


def load_torchscript_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto"):
    from rescli.core.runtime import select_runtime
    from rescli.inference.predictor import Predictor, torch_logits_fn

    path = Path(path)
    runtime = select_runtime(device=device, precision=precision)
    module, meta = _open_torchscript(path, device=runtime.device)
    return Predictor(
        classes=meta["classes"], img_size=int(meta["img_size"]), mean=meta["mean"], std=meta["std"],
        temperature=float(meta.get("temperature", 1.0)),
        logits_fn=torch_logits_fn(module, runtime=runtime, mean=meta["mean"], std=meta["std"]),
        kind="torchscript", meta=meta, device=runtime.device, source=str(path),
    )


def onnx_predictor_or_none(path: Path):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return load_onnx_predictor(path)


def _check_onnx_graph(path: Path, meta: dict[str, Any], *, inputs: list[tuple[bool, Sequence[Any]]],
                      outputs: list[Sequence[Any]]) -> None:
    """``inputs``: (is float32, shape) per graph input; ``outputs``: each output's shape (the first: the logits)."""
    if len(inputs) != 1:
        raise RescliError(f"{path}: input: the graph takes {len(inputs)} inputs; a rescli export takes one, the image "
                          f"batch; {EXPORT_AGAIN}")
    is_float, input_shape = inputs[0]
    if not is_float:
        raise RescliError(f"{path}: input: not float32; a rescli export takes a float32 image batch; {EXPORT_AGAIN}")
    _check_signature(path, meta, input_shape=input_shape, output_shape=outputs[0] if outputs else None)


def load_onnx_predictor(path: str | os.PathLike):
    from rescli.inference.predictor import Predictor

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

    _probe(path, meta, lambda size: run(np.zeros((1, 3, size, size), np.float32)))

    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, device=torch.device("cpu"), mean=meta["mean"], std=meta["std"], channels_last=False)
        return torch.from_numpy(run(np.ascontiguousarray(x.numpy()))).float()

    return Predictor(
        classes=meta["classes"], img_size=int(meta["img_size"]), mean=meta["mean"], std=meta["std"],
        temperature=float(meta.get("temperature", 1.0)), logits_fn=logits_fn, kind="onnx", meta=meta, source=str(path),
    )


def describe_export(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an export carries, plus its parameter count; loads the file, so a broken one fails here."""
    from rescli.inference.lookup import model_kind

    path = Path(path)
    kind = model_kind(path)
    if kind == "torchscript":
        module, meta = _open_torchscript(path, device="cpu")
        params = sum(int(p.numel()) for p in module.parameters())
    elif kind == "onnx":
        try:
            import onnx
        except ImportError:  # onnxruntime alone is enough to read the metadata
            predictor = load_onnx_predictor(path)
            return {"kind": "onnx", "meta": predictor.meta, "parameters": None}
        try:
            # The graph and metadata only: a rescli export keeps its weights inside, and an external-data
            # reference would make onnx read files next to (or, if crafted, far from) this one.
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise RescliError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
        props = {p.key: p.value for p in proto.metadata_props}
        meta = meta_from(props.get(META_KEY, ""), path)
        initializers = {t.name for t in proto.graph.initializer}
        # Older IR versions list the weights among the graph's inputs too.
        graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
        _check_onnx_graph(
            path, meta,
            inputs=[(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, _proto_shape(i)) for i in graph_inputs],
            outputs=[_proto_shape(o) for o in proto.graph.output],
        )
        params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    else:
        raise RescliError(f"{path}: not an export (.ts, .torchscript or .onnx)")
    return {"kind": kind, "meta": meta, "parameters": params}


def _proto_shape(value_info) -> list[Any]:
    """An ONNX ValueInfoProto's shape: an int per fixed axis, the axis name (or None) per open one."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
