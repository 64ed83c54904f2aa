"""Where and how the model runs: device, precision (autocast), memory format, decode workers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rescli.core.cpus import available_cpus
from rescli.core.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: Apple MPS is not available here")
        return torch.device("mps")
    raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 autocast is several times faster than fp32.

    Also asks which kernels torch will really use: with ``ATEN_CPU_CAPABILITY=avx2`` (or a torch built without
    AVX-512 kernels) the bf16 instructions go unused and bf16 only costs conversions, so fp32 it is.
    """
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")()
    if not str(capability).upper().startswith("AVX512"):
        return False
    try:
        if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
            return True
    except AttributeError:  # older torch: read the flags ourselves
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    except OSError:
        return False


def resolve_precision(spec: str, device: torch.device) -> str:
    spec = (spec or "auto").lower()
    if spec not in PRECISIONS:
        raise UsageError(f"--precision {spec!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if spec == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return spec
    if device.type == "cpu":
        if spec == "auto":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        if spec == "fp16":
            raise UsageError("--precision fp16 is for GPUs; on CPU use bf16 or fp32")
        return spec
    return "fp32" if spec == "auto" else spec


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool = True

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def needs_grad_scaler(self) -> bool:
        # bf16 has fp32's exponent range; only fp16 gradients underflow without scaling.
        return self.precision == "fp16" and self.device.type == "cuda"

    def describe(self) -> str:
        return f"{self.device} {self.precision}{' channels_last' if self.channels_last else ''}"


def select_runtime(*, device: str = "auto", precision: str = "auto", channels_last: bool = True) -> Runtime:
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=dev, precision=resolve_precision(precision, dev), channels_last=channels_last)


def default_workers() -> int:
    """Decode workers: enough to keep the model fed without starving its own threads."""
    cpus = available_cpus()
    if torch.cuda.is_available():
        return max(1, min(16, cpus - 1))
    # On a CPU the model's OpenMP threads want every core, and a decode process beside them makes them wait on
    # each other: on a small machine one worker process trains slower than decoding in the main process
    # (docs/performance.md, "How rescli is fast"). Decoding an image costs a small fraction of its training
    # step, so small machines decode inline and big ones give decoding one core in four.
    return 0 if cpus <= 5 else min(8, cpus // 4)
