"""OpenVINO exports: an IR (model.xml, its graph and metadata, beside model.bin, its weights), converted from a
checkpoint's network, int8 through NNCF post-training quantisation, opened as a Predictor, described for info.

An IR is a graph, not a program: rescli reads it with OpenVINO's own operators only (no extension library is
ever added), opens it by the .xml name alone, reads the .bin of the same name beside it and nothing else, and
checks both (the .bin's SHA-256 is in the metadata) before running it.

openvino and nncf are imported where they are used, never at the top: both are optional
(pip install 'rescli[openvino]'). Both ship openvino-telemetry, which sends usage statistics unless the user has
opted out; rescli never lets it (``_no_telemetry``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rescli.core.errors import RescliError, UsageError, first_line
from rescli.core.fileio import atomic_path
from rescli.data.transforms import to_model_input
from rescli.inference.export_format import EXPORT_AGAIN, check_signature, meta_from, probe
from rescli.inference.predictor import Predictor

#: Where the rescli metadata lives in the IR's rt_info (the .xml): rescli -> json.
RT_INFO_PATH = ["rescli", "json"]


INSTALL_HINT = "pip install 'rescli[openvino]' (or pip install openvino nncf)"


# --precision to OpenVINO's inference precision; auto leaves OpenVINO's own choice (bf16 on CPUs with AMX or
# AVX512-BF16, as rescli's auto does for torch; f32 elsewhere).
_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _no_telemetry() -> None:
    """Make sure openvino-telemetry sends nothing from this process.

    OpenVINO's converter and NNCF both count it as consent when no opt-out file exists (~/intel/openvino_telemetry)
    and both fall back to a stub when ``import openvino_telemetry`` fails: so, before either is imported, that
    import is made to fail. Where a host program loaded openvino_telemetry first, its sending is switched off.
    """
    loaded = sys.modules.get("openvino_telemetry")
    if loaded is None:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # the import raises ImportError
        return
    telemetry = getattr(loaded, "Telemetry", None)
    if telemetry is None:
        return

    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    def declined(self: Any, *args: Any, **kwargs: Any) -> None:
        self.consent = False
        self.sender = silent  # set, so that a later Telemetry() does not ask for the init arguments again

    for name in ("send_event", "send_error", "send_stack_trace", "start_session", "end_session",
                 "force_shutdown", "send_opt_in_event"):
        setattr(telemetry, name, silent)
    telemetry.init = declined
    instance = getattr(telemetry, "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False


def import_openvino() -> ModuleType:
    """openvino, with telemetry off; one line naming the pip command where it is not installed."""
    _no_telemetry()
    try:
        import openvino
    except ImportError:
        raise RescliError(f"OpenVINO models need the openvino package: {INSTALL_HINT}") from None
    return openvino


def import_nncf() -> ModuleType:
    _no_telemetry()
    # NNCF imports torch's C++ extension helper, which logs that a CPU-only machine has no CUDA: true, and no news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise RescliError(f"int8 OpenVINO exports need NNCF: {INSTALL_HINT}") from None
    nncf.set_log_level(logging.ERROR)  # its log goes to stdout, which carries rescli's results only
    return nncf


def convert_network(net: torch.nn.Module, *, example: torch.Tensor) -> Any:
    """``net`` as an OpenVINO model taking [any batch, 3, H, W] float32, H and W those of ``example``."""
    ov = import_openvino()
    size = tuple(example.shape[1:])
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the converter traces with torch.jit, which warns that it is deprecated
        model = ov.convert_model(net.float().eval(), example_input=example, input=[(-1, *size)])
    model.inputs[0].get_tensor().set_names({"input"})
    model.outputs[0].get_tensor().set_names({"logits"})
    return model


def quantize_network(model: Any, *, images: Sequence[torch.Tensor], mean: Sequence[float],
                     std: Sequence[float]) -> Any:
    """``model`` in int8, NNCF's post-training quantisation calibrated on ``images`` (uint8 [3, H, W] each)."""
    nncf = import_nncf()

    def model_input(image: torch.Tensor) -> np.ndarray:
        x = to_model_input(image[None], device=torch.device("cpu"), mean=mean, std=std, channels_last=False)
        return np.ascontiguousarray(x.numpy())

    # One image per item: NNCF's statistics are per sample, and its bias correction warns of batches.
    dataset = nncf.Dataset(list(images), model_input)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars on stdout
        return nncf.quantize(model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.PERFORMANCE)


def save_openvino(model: Any, *, meta: dict[str, Any], path: Path) -> None:
    """Write ``path`` (.xml) and the .bin beside it, each atomically, with ``meta`` (and the .bin's SHA-256) inside.

    The .bin goes first: the .xml names the pair, and one that is already new checks the .bin it finds.
    """
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="rescli-openvino-") as staging:
        # Saved twice: the weights do not change with the metadata, so the first save gives the .bin's hash.
        first = Path(staging) / "weights.xml"
        ov.save_model(model, str(first), compress_to_fp16=False)
        meta = {**meta, "weights": {"file": path.with_suffix(".bin").name,
                                    "sha256": _sha256(first.with_suffix(".bin"))}}
        model.set_rt_info(json.dumps(meta), RT_INFO_PATH)
        final = Path(staging) / "model.xml"
        ov.save_model(model, str(final), compress_to_fp16=False)
        if _sha256(final.with_suffix(".bin")) != meta["weights"]["sha256"]:
            raise RescliError(f"{path}: OpenVINO wrote different weights twice; please report this")
        for staged, target in ((final.with_suffix(".bin"), path.with_suffix(".bin")), (final, path)):
            with atomic_path(target) as tmp:
                shutil.copyfile(staged, tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_openvino(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The model of an IR and its checked metadata: its .bin is the one it was saved with, and its input and output
    are what a rescli export takes and returns."""
    path = Path(path)
    ov = import_openvino()
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise RescliError(f"{path}: its weights file {weights.name} is not beside it; an OpenVINO model is a .xml "
                          f"and a .bin of the same name: copy both")
    try:
        model = ov.Core().read_model(str(path), str(weights))
    except Exception as exc:
        raise RescliError(f"{path}: not a readable OpenVINO model ({first_line(exc)})") from None
    raw = model.get_rt_info(RT_INFO_PATH).astype(str) if model.has_rt_info(RT_INFO_PATH) else ""
    meta = meta_from(raw, path)
    recorded = (meta.get("weights") or {}).get("sha256")
    if recorded is not None and _sha256(weights) != recorded:
        raise RescliError(f"{path}: {weights.name} is not the weights file this model was saved with (its contents "
                          f"differ); copy the .xml and .bin of one export together, or {EXPORT_AGAIN}")
    _check_io(path, meta, model)
    return model, meta


def _check_io(path: Path, meta: dict[str, Any], model: Any) -> None:
    if len(model.inputs) != 1:
        raise RescliError(f"{path}: input: the graph takes {len(model.inputs)} inputs; a rescli export takes one, "
                          f"the image batch; {EXPORT_AGAIN}")
    port = model.inputs[0]
    if port.get_element_type().get_type_name() != "f32":
        raise RescliError(f"{path}: input: not float32; a rescli export takes a float32 image batch; {EXPORT_AGAIN}")
    check_signature(path, meta, input_shape=_shape(port.get_partial_shape()),
                    output_shape=_shape(model.outputs[0].get_partial_shape()) if model.outputs else None)


def _shape(partial: Any) -> list[Any]:
    """An OpenVINO partial shape: an int per fixed axis, None per open one (a rank left open: no axes)."""
    if partial.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else None for d in partial]


def load_openvino_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto") -> Predictor:
    """An OpenVINO export (.xml) as a Predictor, on the CPU."""
    path = Path(path)
    if device not in ("auto", "cpu"):
        raise UsageError(f"--device {device}: rescli runs OpenVINO models on the CPU; use --device cpu or auto")
    model, meta = read_openvino(path)
    return openvino_predictor(model, meta=meta, source=str(path), precision=precision)


def openvino_predictor(model: Any, *, meta: dict[str, Any], source: str, precision: str = "auto") -> Predictor:
    """``model`` compiled for this CPU's throughput, run as a Predictor (``meta``: its checked metadata).

    A throughput hint gives as many streams as the cores allow, each a parallel inference request, and a batch is
    shared out among them; OpenVINO releases the GIL while it runs, so the decode threads prepare the next batch.
    """
    if precision not in ("auto", *_PRECISIONS):
        raise UsageError(f"--precision {precision!r}: expected auto, fp32, bf16 or fp16")
    ov = import_openvino()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision in _PRECISIONS:
        config["INFERENCE_PRECISION_HINT"] = _PRECISIONS[precision]
    try:
        compiled = ov.Core().compile_model(model, "CPU", config)
    except Exception as exc:
        raise RescliError(f"{source}: OpenVINO cannot compile this model for the CPU ({first_line(exc)})") from None
    requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    queue = ov.AsyncInferQueue(compiled, requests)
    run = _queued_runner(queue, requests)
    probe(Path(source), meta, lambda size: run(np.zeros((1, 3, size, size), np.float32)))

    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, device=torch.device("cpu"), mean=meta["mean"], std=meta["std"], channels_last=False)
        return torch.from_numpy(run(np.ascontiguousarray(x.numpy()))).float()

    inference_precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    engine = {"engine": "openvino", "requests": requests,
              "inference_precision": getattr(inference_precision, "get_type_name", lambda: str(inference_precision))()}
    return Predictor.from_metadata(meta, logits_fn=logits_fn, kind="openvino", meta={**meta, "runtime": engine},
                                   source=source)


def _queued_runner(queue: Any, requests: int) -> Any:
    """A batch split into up to ``requests`` parts, run at once on the queue's requests, the outputs in order."""
    outputs: dict[int, np.ndarray] = {}

    def keep(request: Any, part: int) -> None:
        outputs[part] = request.get_output_tensor(0).data.copy()

    queue.set_callback(keep)

    def run(x: np.ndarray) -> np.ndarray:
        outputs.clear()
        parts = list(_parts(len(x), requests))
        for i, (start, stop) in enumerate(parts):
            queue.start_async({0: x[start:stop]}, i)
        queue.wait_all()
        return np.concatenate([outputs[i] for i in range(len(parts))])

    return run


def _parts(n: int, count: int) -> Iterator[tuple[int, int]]:
    """``n`` rows as up to ``count`` consecutive (start, stop) ranges of nearly equal size."""
    count = max(1, min(count, n))
    step, extra = divmod(n, count)
    start = 0
    for i in range(count):
        stop = start + step + (1 if i < extra else 0)
        yield start, stop
        start = stop


def describe_openvino(path: Path) -> dict[str, Any]:
    """The metadata an OpenVINO export carries and its weight count; reads and checks the model."""
    model, meta = read_openvino(path)
    weights = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_partial_shape(0).rank.get_length() > 1:
            weights += int(np.prod([d.get_length() for d in op.get_output_partial_shape(0)]))
    return {"kind": "openvino", "meta": meta, "parameters": weights}
