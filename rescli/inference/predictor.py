"""A Predictor: anything that maps a uint8 image batch to logits, with what is needed to feed it and
read its output. The inference core that predict, evaluate and finetune's validation share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rescli.core import events
from rescli.core.errors import RescliError, first_line
from rescli.core.runtime import Runtime
from rescli.data.transforms import build_transform, to_model_input


@dataclass
class Predictor:
    """Anything that maps a uint8 image batch to logits, plus what is needed to feed it."""

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

    Inductor turns the eval-mode net into fused convolution kernels with BatchNorm folded in: resnet18
    and resnet50 infer ~1.7x faster on this CPU (docs/performance.md), after ~10-15 s of compiling (~2 s when
    inductor's on-disk cache has the graph). A batch smaller than the largest seen so far is padded to it,
    since a new shape would compile again. Where compiling fails (no C++ compiler, an op inductor lacks),
    it says so once and runs the model as it is.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        import logging

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
            fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            padded = torch.zeros((self.rows, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
            padded[:n] = x
            x = padded
        try:
            return self.compiled(x)[:n]
        except Exception as exc:
            self.failed = True
            events.warn(f"--compile: torch.compile failed ({type(exc).__name__}: {first_line(exc, 200)}); running the model uncompiled")
            return self.model(x[:n])
