"""TorchScript exports: written from a checkpoint's network, opened as a Predictor, described for rescli info.

A TorchScript file is a program: loading it runs code from the file (its __setstate__ methods). That is why
rescli opens one only from a file named for it (.ts, .torchscript; lookup.model_kind), never from a checkpoint
path, whatever that holds.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from rescli.core.errors import RescliError, first_line
from rescli.core.fileio import atomic_write_bytes
from rescli.core.runtime import select_runtime
from rescli.inference.export_format import META_KEY, meta_from, probe
from rescli.inference.lookup import model_kind
from rescli.inference.predictor import Predictor, torch_logits_fn


def write_torchscript(net: torch.nn.Module, *, example: torch.Tensor, meta: dict[str, Any], path: Path) -> None:
    """Trace ``net`` on ``example`` and write it to ``path`` with ``meta`` as its rescli.json."""
    # TorchScript is deprecated upstream but still the one format plain `torch.jit.load` reads anywhere.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, buf.getvalue())


def open_torchscript(path: Path, *, device: torch.device | str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The module and checked metadata of a TorchScript export, which has run one blank image."""
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

    probe(path, meta, run_one)
    return module, meta


def load_torchscript_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto") -> Predictor:
    path = Path(path)
    runtime = select_runtime(device=device, precision=precision)
    module, meta = open_torchscript(path, device=runtime.device)
    return Predictor.from_metadata(
        meta, logits_fn=torch_logits_fn(module, runtime=runtime, mean=meta["mean"], std=meta["std"]),
        kind="torchscript", meta=meta, device=runtime.device, source=str(path),
    )


def describe_torchscript(path: Path) -> dict[str, Any]:
    """The metadata a TorchScript export carries and its parameter count; loads the file, so a broken one fails."""
    module, meta = open_torchscript(path, device="cpu")
    return {"kind": "torchscript", "meta": meta, "parameters": sum(int(p.numel()) for p in module.parameters())}
