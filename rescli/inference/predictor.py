"""The inference core that predict, evaluate and finetune's validation share: a Predictor maps a uint8 image batch
to logits, whatever runs the model, and carries what is needed to feed it and read its output."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rescli.core import events
from rescli.core.errors import RescliError, first_line
from rescli.core.runtime import Runtime
from rescli.data.tasks import SINGLE, Task, task_named
from rescli.data.transforms import build_transform, to_model_input


@dataclass
class Predictor:
    """Anything that maps a uint8 image batch to logits, plus what is needed to feed it.

    An engine (a checkpoint in eager torch, a TorchScript or ONNX export) supplies ``logits_fn`` and the metadata
    it was checked against on load; what the logits mean to a user (scores, labels) is worked out from them in
    rescli.inference.scores. So a new engine touches only its loader, and a new kind of output only that module.
    """

    classes: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    temperature: float
    logits_fn: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B,3,H,W] -> float32 [B,C] on CPU
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device | None = None  # where the model runs (None: onnxruntime decides)
    source: str = "model"  # the file, for errors
    task: Task = SINGLE  # what the logits mean: one class (softmax), or any labels (a sigmoid each)
    thresholds: list[float] | None = None  # multi-label: each class's decision threshold (None: 0.5 each)

    @classmethod
    def from_metadata(
        cls, fields: Mapping[str, Any], *, logits_fn: Callable[[torch.Tensor], torch.Tensor], kind: str,
        source: str, meta: dict[str, Any], device: torch.device | None = None,
    ) -> Predictor:
        """A Predictor fed as a model file's checked metadata says (a checkpoint, or an export's rescli.json)."""
        thresholds = fields.get("thresholds")
        return cls(
            classes=list(fields["classes"]), img_size=int(fields["img_size"]), mean=list(fields["mean"]),
            std=list(fields["std"]), temperature=float(fields.get("temperature", 1.0)), logits_fn=logits_fn,
            kind=kind, meta=meta, device=device, source=source, task=task_named(fields.get("task")),
            thresholds=[float(t) for t in thresholds] if thresholds is not None else None,
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.logits_fn(images)
        # Checked on load too; this also covers shapes a file leaves open (a symbolic ONNX output axis).
        expected = (len(images), len(self.classes))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RescliError(f"{self.source}: output {got} for {len(images)} images: expected logits of shape "
                              f"{expected}, one per class")
        return out

    def transform(self) -> Callable:
        return build_transform(img_size=self.img_size, train=False)


def torch_logits_fn(
    model: torch.nn.Module, *, runtime: Runtime, mean, std, compile: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()
    forward: Callable[[torch.Tensor], torch.Tensor] = CompiledForward(model) if compile else model

    @torch.inference_mode()
    def fn(images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
        with runtime.autocast():
            out = forward(x)
        return out.float().cpu()

    return fn


class CompiledForward:
    """A torch.compile'd model for prediction, compiled for one batch shape.

    Inductor turns the eval-mode net into fused convolution kernels with BatchNorm folded in, so a CPU infers
    faster once it has paid for the compile, which takes seconds (fewer when inductor's on-disk cache has the
    graph; the figures are in docs/performance.md). A batch smaller than the largest seen so far is padded to it,
    since a new shape would compile again. Where compiling fails (no C++ compiler, an op inductor lacks),
    it says so once and runs the model as it is.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        # On a CPU-only machine inductor logs that it found no CUDA runtime: true, and of no interest here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self.rows = 0  # the batch size compiled for
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.model(x)
        n = len(x)
        self.rows = max(self.rows, n)
        if n < self.rows:
            x = _padded(x, self.rows)
        try:
            return self.compiled(x)[:n]
        except Exception as exc:
            self.failed = True
            events.warn(f"--compile: torch.compile failed ({type(exc).__name__}: {first_line(exc, 200)}); "
                        f"running the model uncompiled")
            return self.model(x[:n])


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` followed by zero rows up to ``rows``, in ``x``'s memory format (the compiled graph expects it)."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    padded = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=layout)
    padded[:len(x)] = x
    return padded
