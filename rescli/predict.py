"""Prediction: find the model, turn inputs into paths, stream labelled results in input order.

Decoding runs in a small thread pool ahead of the model (Pillow and torch both release the
GIL), so the next batch is being decoded while the model works on this one, and at most a
few batches are in memory however many paths come in.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from rescli import data
from rescli.checkpoint import load_checkpoint
from rescli.errors import RescliError, UsageError
from rescli.images import is_clutter, is_hidden, load_rgb, sniff_format
from rescli.runtime import Runtime, select_runtime

GLOB_CHARS = set("*?[")


# --- which model -------------------------------------------------------------------------------------

def resolve_model_path(model: str | os.PathLike | None, *, cwd: str | os.PathLike = ".") -> tuple[Path, str]:
    """--model, else $RESCLI_MODEL, else the newest runs/*/best.pt under ``cwd``; says which rule chose it."""
    if model:
        return Path(model).expanduser(), "--model"
    env = os.environ.get("RESCLI_MODEL")
    if env:
        return Path(env).expanduser(), "RESCLI_MODEL"
    candidates = sorted(Path(cwd).glob("runs/*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(
            "no model given: pass --model PATH, set RESCLI_MODEL, or run `rescli finetune DATA` here first (it writes runs/*/best.pt)"
        )
    return candidates[-1], "newest runs/*/best.pt"


# --- predictors: checkpoint, TorchScript, ONNX ---------------------------------------------------------

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

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_fn(images)

    def transform(self) -> Callable:
        return data.build_transform(img_size=self.img_size, train=False)


def torch_logits_fn(model: torch.nn.Module, *, runtime: Runtime, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()

    @torch.inference_mode()
    def fn(images: torch.Tensor) -> torch.Tensor:
        x = data.to_model_input(images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
        with runtime.autocast():
            out = model(x)
        return out.float().cpu()

    return fn


def load_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto") -> Predictor:
    path = Path(path)
    if not path.exists():
        raise RescliError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from rescli.export import load_onnx_predictor

        return load_onnx_predictor(path)
    if suffix in (".ts", ".torchscript"):
        from rescli.export import load_torchscript_predictor

        return load_torchscript_predictor(path, device=device, precision=precision)
    from rescli.models import model_from_checkpoint

    ckpt = load_checkpoint(path)
    runtime = select_runtime(device=device, precision=precision)
    model = model_from_checkpoint(ckpt).to(runtime.device, memory_format=runtime.memory_format)
    return Predictor(
        classes=list(ckpt["classes"]),
        img_size=int(ckpt["img_size"]),
        mean=list(ckpt["mean"]),
        std=list(ckpt["std"]),
        temperature=float(ckpt.get("temperature", 1.0)),
        logits_fn=torch_logits_fn(model, runtime=runtime, mean=ckpt["mean"], std=ckpt["std"]),
        kind="checkpoint",
        meta={"arch": ckpt["arch"], "runtime": runtime.describe(), "settings": ckpt.get("settings", {})},
    )


# --- inputs -------------------------------------------------------------------------------------------

def iter_input_paths(
    inputs: Sequence[str], *, stdin: IO[str] | None = None, null_separated: bool = False
) -> Iterator[str]:
    """Expand files, folders (recursive), quoted globs, '-' (paths on stdin) and '@list.txt', lazily, in order."""
    for item in inputs:
        if item == "-":
            yield from _read_paths(stdin if stdin is not None else sys.stdin, null_separated=null_separated)
        elif item.startswith("@") and len(item) > 1 and not os.path.exists(item):
            list_file = Path(item[1:]).expanduser()
            try:
                with open(list_file, encoding="utf-8") as f:
                    yield from _read_paths(f, null_separated=null_separated)
            except OSError as exc:
                raise UsageError(f"{item}: cannot read list file ({exc.strerror or exc})") from None
        elif os.path.isdir(item):
            yield from _images_under(Path(item))
        elif not os.path.exists(item) and GLOB_CHARS & set(item):
            matches = sorted(glob.iglob(os.path.expanduser(item), recursive=True))
            if not matches:
                yield item  # reported as an error row: the user asked for it
            for m in matches:
                if os.path.isdir(m):
                    yield from _images_under(Path(m))
                else:
                    yield m
        else:
            yield item


def _read_paths(stream: IO[str], *, null_separated: bool) -> Iterator[str]:
    if null_separated:
        buf = ""
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            buf += chunk
            *items, buf = buf.split("\0")
            yield from (i for i in items if i)
        if buf:
            yield buf
        return
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _images_under(folder: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and not is_clutter(d))
        for name in sorted(filenames):
            if is_hidden(name) or is_clutter(name):
                continue
            path = os.path.join(dirpath, name)
            if sniff_format(path):
                yield path


# --- streaming ----------------------------------------------------------------------------------------

def _load(path: str, transform, draft_size: int) -> tuple[str, torch.Tensor | None, str | None]:
    try:
        return path, transform(load_rgb(path, draft_size=draft_size)), None
    except RescliError as exc:
        return path, None, exc.message
    except Exception as exc:  # never let one odd file stop a pipeline over thousands
        return path, None, f"{path}: {type(exc).__name__}: {exc}"


def predict_stream(
    paths: Iterable[str],
    *,
    predictor: Predictor,
    batch_size: int = 32,
    workers: int = 2,
    top_k: int = 1,
    raw_scores: bool = False,
    threshold: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one result dict per path, in input order, a batch at a time."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    k = max(1, min(top_k, len(predictor.classes)))
    transform = predictor.transform()
    temperature = 1.0 if raw_scores else predictor.temperature
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rescli-decode")
    pending: deque[Future] = deque()
    lookahead = batch_size * 3  # decode up to ~3 batches ahead; memory stays bounded
    it = iter(paths)
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < lookahead:
                try:
                    path = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(_load, path, transform, predictor.img_size))
            if not pending:
                return
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            yield from _predict_batch(batch, predictor, k=k, temperature=temperature, threshold=threshold)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _predict_batch(batch, predictor: Predictor, *, k: int, temperature: float, threshold: float | None) -> Iterator[dict]:
    good = [(p, t) for p, t, e in batch if t is not None]
    probs = None
    if good:
        logits = predictor.logits(torch.stack([t for _, t in good]))
        probs = torch.softmax(logits / temperature, dim=1)
        top_scores, top_idx = probs.topk(k, dim=1)
    row = 0
    for path, tensor, error in batch:
        if tensor is None:
            yield {"path": path, "error": error}
            continue
        scores, idx = top_scores[row].tolist(), top_idx[row].tolist()
        row += 1
        label = predictor.classes[idx[0]]
        if threshold is not None and scores[0] < threshold:
            label = "unknown"
        yield {
            "path": path,
            "label": label,
            "score": round(scores[0], 6),
            "topk": [{"label": predictor.classes[i], "score": round(s, 6)} for i, s in zip(idx, scores)],
        }
