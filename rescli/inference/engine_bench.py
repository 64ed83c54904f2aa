"""rescli bench: images/s of a checkpoint in every engine and precision this machine has, on the user's own images.

For each engine the checkpoint is converted in a temporary folder (int8: calibrated on the images given), then
timed in rounds (medians, with the spread): end to end (``predict``'s own stream: decode threads, batches, result
rows, from the files) and model-only (forward passes on the same images decoded once, in memory), after a warm-up
batch and a short warm-up stream (so a compile or the decode threads' start is not timed; the cost is ``setup_s``).
Each row also gives the share of images labelled as the checkpoint's fp32 network labels them. Ratios are against
today's default predict (torch eager, bf16 where the CPU has it, fp32 elsewhere), from the same run. Figures only:
nothing here decides anything.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rescli.core import events
from rescli.core.cpus import available_cpus
from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import cpu_has_fast_bf16, select_runtime
from rescli.data.images import load_rgb
from rescli.data.transforms import build_transform
from rescli.inference.inputs import BadInput, iter_input_paths
from rescli.inference.lookup import model_kind, run_folder_to_file
from rescli.inference.predictor import Predictor, torch_logits_fn
from rescli.inference.stream import predict_batches
from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint

#: Every engine and precision bench knows, in the order of its table.
ENGINES = ("torch-fp32", "torch-bf16", "torch-compiled", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32",
           "openvino-bf16", "openvino-int8")


#: Rounds of each timing; the figures are their medians (a single pass moved by 10-30 % on a shared machine).
ROUNDS = 3

#: The first row: what predict does today with a checkpoint (torch eager, bf16 where the CPU has it, else fp32).
DEFAULT_ENGINE = "default"


@dataclass(frozen=True)
class _Build:
    predictor: Predictor
    setup_s: float


def bench_engines(
    *, model: str | os.PathLike, inputs: Sequence[str], engines: Sequence[str] | None = None, batch_size: int = 32,
    max_images: int = 512, workers: int = 2, calibration_images: int = 300,
) -> dict[str, Any]:
    """img/s of ``model`` (a checkpoint or run folder) per engine on the images ``inputs`` name (at most
    ``max_images``); the CPU, its features and the threads, so that each figure says where it was measured."""
    chosen = _chosen_engines(engines)
    if batch_size < 1 or max_images < 1:
        raise UsageError("--batch-size and --images must be at least 1")
    src = run_folder_to_file(Path(model))
    if model_kind(src) != "checkpoint":
        raise UsageError(f"{src}: bench takes a rescli checkpoint (or run folder) and converts it to each engine")
    ckpt = load_checkpoint(src)
    paths = [p for p in itertools.islice(iter_input_paths(inputs), max_images) if not isinstance(p, BadInput)]
    decoded = _decoded(paths, img_size=int(ckpt["img_size"]))
    net = model_from_checkpoint(ckpt, source=src).float().eval()
    reference = _reference_labels(net, ckpt, decoded, batch_size=batch_size)
    rows = [_default_row(src, paths, decoded, reference, batch_size=batch_size, workers=workers)]
    with tempfile.TemporaryDirectory(prefix="rescli-bench-") as work:
        for name in chosen:
            events.info(f"bench: {name}")
            try:
                built = _build(name, src=src, ckpt=ckpt, net=net, decoded=decoded[:calibration_images],
                               workdir=Path(work))
            except RescliError as exc:
                rows.append({"engine": name, "skipped": exc.message})
                continue
            rows.append(_measure(name, built, paths, decoded, reference, batch_size=batch_size, workers=workers))
    base = rows[0]["end_to_end_img_s"]
    for row in rows:
        if "end_to_end_img_s" in row:
            row["vs_default"] = row["end_to_end_img_s"] / base
            row["of_model_bound"] = row["end_to_end_img_s"] / row["model_only_img_s"]
    return {"cpu": cpu_description(), "model": str(src), "arch": ckpt["arch"], "img_size": int(ckpt["img_size"]),
            "images": len(decoded), "batch_size": batch_size, "rows": rows}


def _chosen_engines(engines: Sequence[str] | None) -> list[str]:
    if not engines:
        return list(ENGINES)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise UsageError(f"--engine {unknown[0]!r}: expected one of {', '.join(ENGINES)}")
    return [e for e in ENGINES if e in engines]


def cpu_description() -> dict[str, Any]:
    """The CPU's name, the features that decide which engine and precision are fast, and the cores rescli may use."""
    name, flags = "unknown CPU", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    features = [label for flag, label in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                                          ("avx512_vnni", "AVX512-VNNI"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
                if flag in flags]
    return {"name": name, "features": features, "cpus": available_cpus(), "threads": torch.get_num_threads(),
            "fast_bf16": cpu_has_fast_bf16()}


def _decoded(paths: Sequence[str], *, img_size: int) -> list[torch.Tensor]:
    transform = build_transform(img_size=img_size, train=False)
    images = []
    for path in paths:
        try:
            images.append(transform(load_rgb(path, draft_size=img_size)))
        except RescliError:
            continue
    if not images:
        raise UsageError("no readable images among the inputs: give image files or folders of them")
    return images


def _batches(images: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(list(images[i:i + size])) for i in range(0, len(images), size)]


def _reference_labels(net: torch.nn.Module, ckpt: dict[str, Any], decoded: Sequence[torch.Tensor], *,
                      batch_size: int) -> torch.Tensor:
    fn = torch_logits_fn(net, runtime=select_runtime(device="cpu", precision="fp32"), mean=ckpt["mean"],
                         std=ckpt["std"])
    return torch.cat([fn(b).argmax(1) for b in _batches(decoded, batch_size)])


def _default_row(src: Path, paths: Sequence[str], decoded: Sequence[torch.Tensor], reference: torch.Tensor, *,
                 batch_size: int, workers: int) -> dict[str, Any]:
    from rescli.inference.load import load_checkpoint_predictor

    started = time.perf_counter()
    predictor = load_checkpoint_predictor(src, device="cpu", precision="auto", compile=False)
    built = _Build(predictor, time.perf_counter() - started)
    row = _measure(DEFAULT_ENGINE, built, paths, decoded, reference, batch_size=batch_size, workers=workers)
    row["precision"] = "torch " + predictor.meta["runtime"].split()[1]  # "cpu bf16 channels_last"
    return row


def _build(name: str, *, src: Path, ckpt: dict[str, Any], net: torch.nn.Module, decoded: list[torch.Tensor],
           workdir: Path) -> _Build:
    started = time.perf_counter()
    predictor = _BUILDERS[name](src=src, ckpt=ckpt, net=net, decoded=decoded, workdir=workdir)
    return _Build(predictor, time.perf_counter() - started)


def _torch(precision: str, *, compile: bool = False) -> Callable[..., Predictor]:
    def build(*, src: Path, **_: Any) -> Predictor:
        from rescli.inference.load import load_checkpoint_predictor

        if precision == "bf16" and not cpu_has_fast_bf16():
            raise RescliError("this CPU has no fast bf16 (AMX or AVX512-BF16)")
        return load_checkpoint_predictor(src, device="cpu", precision=precision, compile=compile)

    return build


def _onnxruntime(int8: bool) -> Callable[..., Predictor]:
    def build(*, ckpt: dict[str, Any], net: torch.nn.Module, decoded: list[torch.Tensor], workdir: Path,
              **_: Any) -> Predictor:
        from rescli.inference.export_format import export_metadata
        from rescli.inference.onnx_export import load_onnx_predictor, write_onnx
        from rescli.inference.onnx_int8_export import quantize_onnx

        meta = export_metadata(ckpt, source="bench")
        size = int(ckpt["img_size"])
        example = torch.randn(2, 3, size, size)
        path = workdir / ("int8.onnx" if int8 else "fp32.onnx")
        if int8:
            sub = workdir / "onnx-int8"
            sub.mkdir(exist_ok=True)
            path = quantize_onnx(net, example=example, meta=meta, opset=17, images=decoded, workdir=sub)
        else:
            write_onnx(net, example=example, meta=meta, path=path, opset=17)
        return load_onnx_predictor(path)

    return build


def _openvino(precision: str) -> Callable[..., Predictor]:
    def build(*, ckpt: dict[str, Any], net: torch.nn.Module, decoded: list[torch.Tensor], **_: Any) -> Predictor:
        from rescli.inference.export_format import export_metadata
        from rescli.inference.openvino_export import convert_network, openvino_predictor, quantize_network

        if precision == "bf16" and not cpu_has_fast_bf16():
            raise RescliError("this CPU has no fast bf16 (AMX or AVX512-BF16)")
        size = int(ckpt["img_size"])
        model = convert_network(net, example=torch.randn(2, 3, size, size))
        if precision == "int8":
            model = quantize_network(model, images=decoded, mean=ckpt["mean"], std=ckpt["std"])
        # int8: the layers left in floating point run as OpenVINO chooses (bf16 where the CPU has it)
        return openvino_predictor(model, meta=export_metadata(ckpt, source="bench"), source="bench",
                                  precision="auto" if precision == "int8" else precision)

    return build


_BUILDERS: dict[str, Callable[..., Predictor]] = {
    "torch-fp32": _torch("fp32"), "torch-bf16": _torch("bf16"), "torch-compiled": _torch("auto", compile=True),
    "onnxruntime-fp32": _onnxruntime(False), "onnxruntime-int8": _onnxruntime(True),
    "openvino-fp32": _openvino("fp32"), "openvino-bf16": _openvino("bf16"), "openvino-int8": _openvino("int8"),
}


def _measure(name: str, built: _Build, paths: Sequence[str], decoded: Sequence[torch.Tensor], reference: torch.Tensor,
             *, batch_size: int, workers: int) -> dict[str, Any]:
    """Model-only and end-to-end img/s of one engine (medians of ROUNDS, with their spread), and its label
    agreement with the checkpoint's fp32 network."""
    predictor = built.predictor
    batches = _batches(decoded, batch_size)
    warm = time.perf_counter()
    predictor.logits(batches[0])  # a compile, a first allocation: setup, not throughput
    # and one stream over a few files: the decode threads' first start is not the engine's throughput either
    _stream(paths[: 2 * batch_size], predictor=predictor, batch_size=batch_size, workers=workers)
    setup = built.setup_s + time.perf_counter() - warm
    model_rates, stream_rates = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        labels = torch.cat([predictor.logits(b).argmax(1) for b in batches])
        model_rates.append(len(decoded) / (time.perf_counter() - started))
        started = time.perf_counter()
        rows = _stream(paths, predictor=predictor, batch_size=batch_size, workers=workers)
        stream_rates.append(rows / (time.perf_counter() - started))
    return {"engine": name, "setup_s": setup, "model_only_img_s": statistics.median(model_rates),
            "end_to_end_img_s": statistics.median(stream_rates),
            "model_only_spread": [min(model_rates), max(model_rates)],
            "end_to_end_spread": [min(stream_rates), max(stream_rates)],
            "agreement": float((labels == reference).float().mean())}


def _stream(paths: Sequence[str], *, predictor: Predictor, batch_size: int, workers: int) -> int:
    """predict's own stream over ``paths``: the rows it gave."""
    rows = 0
    for batch in predict_batches(paths, predictor=predictor, batch_size=batch_size, workers=workers,
                                 jpeg_device=None):
        rows += len(batch)
    return rows
