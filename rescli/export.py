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
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rescli import data
from rescli.checkpoint import check_model_metadata, load_checkpoint, versions
from rescli.fileio import atomic_write_bytes
from rescli.errors import RescliError, UsageError, first_line

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}
META_KEY = "rescli.json"


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
    from rescli.predict import _run_folder_to_file, model_kind

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

    from rescli.models import model_from_checkpoint

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
        predictor = _onnx_predictor_or_none(out)

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
    return data.to_model_input(images, device=torch.device("cpu"), mean=ckpt["mean"], std=ckpt["std"], channels_last=False)


def _max_diff(reference, logits_fn, images: torch.Tensor, ckpt) -> float:
    ref = reference(_inputs(images, ckpt))
    return float((ref - logits_fn(images)).abs().max())


def _scale(reference, images, ckpt) -> float:
    return float(reference(_inputs(images, ckpt)).abs().max())


def _real_batch(check_images: Sequence[str] | None, ckpt) -> torch.Tensor | None:
    """A few real images: the ones given, else some from the folder the model was trained on (if still there)."""
    from rescli.images import load_rgb
    from rescli.predict import iter_input_paths

    sources = list(check_images or [])
    if not sources:
        data_dir = ckpt.get("settings", {}).get("data_dir")
        if data_dir and Path(data_dir).is_dir():
            sources = [data_dir]
    if not sources:
        return None
    transform = data.build_transform(img_size=int(ckpt["img_size"]), train=False)
    tensors = []
    for path in itertools.islice(iter_input_paths(sources), 64):
        try:
            tensors.append(transform(load_rgb(path, draft_size=int(ckpt["img_size"]))))
        except RescliError:
            continue
        if len(tensors) == 8:
            break
    return torch.stack(tensors) if tensors else None


# --- opening exports: TorchScript (a program: loaded only from a file named for it) and ONNX -----------------

EXPORT_AGAIN = "export it again from its checkpoint (rescli export)"


def _meta_from(raw: str | bytes, path: Path) -> dict[str, Any]:
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
    from rescli.predict import model_kind

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
    meta = _meta_from(extra[META_KEY], path)
    module.eval()

    def run_one(size: int) -> Any:
        with torch.inference_mode():
            return module(torch.zeros(1, 3, size, size, device=device))

    _probe(path, meta, run_one)
    return module, meta


def load_torchscript_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto"):
    from rescli.predict import Predictor, torch_logits_fn
    from rescli.runtime import select_runtime

    path = Path(path)
    runtime = select_runtime(device=device, precision=precision)
    module, meta = _open_torchscript(path, device=runtime.device)
    return Predictor(
        classes=meta["classes"], img_size=int(meta["img_size"]), mean=meta["mean"], std=meta["std"],
        temperature=float(meta.get("temperature", 1.0)),
        logits_fn=torch_logits_fn(module, runtime=runtime, mean=meta["mean"], std=meta["std"]),
        kind="torchscript", meta=meta, device=runtime.device, source=str(path),
    )


def _onnx_predictor_or_none(path: Path):
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
    from rescli.predict import Predictor

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
    meta = _meta_from(session.get_modelmeta().custom_metadata_map.get(META_KEY, ""), path)
    _check_onnx_graph(path, meta, inputs=[(i.type == "tensor(float)", i.shape) for i in session.get_inputs()],
                      outputs=[o.shape for o in session.get_outputs()])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    _probe(path, meta, lambda size: run(np.zeros((1, 3, size, size), np.float32)))

    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        x = data.to_model_input(images, device=torch.device("cpu"), mean=meta["mean"], std=meta["std"], channels_last=False)
        return torch.from_numpy(run(np.ascontiguousarray(x.numpy()))).float()

    return Predictor(
        classes=meta["classes"], img_size=int(meta["img_size"]), mean=meta["mean"], std=meta["std"],
        temperature=float(meta.get("temperature", 1.0)), logits_fn=logits_fn, kind="onnx", meta=meta, source=str(path),
    )


# --- reading an export's metadata (for `rescli info`) -----------------------------------------------------

def describe_export(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an export carries, plus its parameter count; loads the file, so a broken one fails here."""
    from rescli.predict import model_kind

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
        meta = _meta_from(props.get(META_KEY, ""), path)
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
