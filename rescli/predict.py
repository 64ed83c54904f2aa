"""Prediction: find the model, turn inputs into paths, stream labelled results in input order.

A feeder thread reads the inputs lazily (stdin, list files, folder walks) and hands each path to a
small pool of decode threads (Pillow and torch both release the GIL), staying at most
``lookahead`` paths ahead of the model. So the next batch is decoded while the model works on
this one, only a bounded number of images is ever in memory however many paths come in, and a
slow producer (``tail -f``, a ``find`` over a network share) still sees results as soon as its
first paths are labelled: a batch goes to the model when it is full or when the input pauses.
"""

from __future__ import annotations

import glob
import os
import queue
import sys
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import torch

from rescli import console, data
from rescli.checkpoint import load_checkpoint
from rescli.errors import RescliError, UsageError, first_line
from rescli.images import ImageError, is_clutter, is_hidden, load_rgb, looks_like_image, plain_jpeg_bytes
from rescli.runtime import Runtime, select_runtime

GLOB_CHARS = set("*?[")


# --- which model -------------------------------------------------------------------------------------

def resolve_model_path(model: str | os.PathLike | None, *, cwd: str | os.PathLike = ".") -> tuple[Path, str]:
    """--model, else $RESCLI_MODEL, else the newest runs/*/best.pt under ``cwd``; says which rule chose it.

    A run folder stands for its best.pt; the word ``latest`` for the newest runs/*/best.pt.
    """
    if model and not (str(model) == "latest" and not Path(model).exists()):
        return _run_folder_to_file(Path(model).expanduser()), "--model"
    env = os.environ.get("RESCLI_MODEL")
    if env and not model:  # "latest" means the newest run, whatever RESCLI_MODEL says
        return _run_folder_to_file(Path(env).expanduser()), "RESCLI_MODEL"
    candidates = sorted(Path(cwd).glob("runs/*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(
            "no model given: pass --model PATH, set RESCLI_MODEL, or run `rescli finetune DATA` here first (it writes runs/*/best.pt)"
        )
    return candidates[-1], "newest runs/*/best.pt"


def _run_folder_to_file(path: Path) -> Path:
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    return path


TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)


def model_kind(path: str | os.PathLike) -> str:
    """checkpoint, torchscript or onnx: by the file's name alone, the one place that decides how a model is opened.

    Never by content: a TorchScript file is a program that runs when it is loaded, so only a file named for it
    (.ts, .torchscript) is loaded as one. Everything else, best.pt and a run folder included, is a checkpoint,
    read with weights_only=True whatever it holds (checkpoint.load_weights_only refuses TorchScript inside).
    """
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    return "checkpoint"


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
        return data.build_transform(img_size=self.img_size, train=False)


def torch_logits_fn(
    model: torch.nn.Module, *, runtime: Runtime, mean, std, compile: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()
    forward: Callable[[torch.Tensor], torch.Tensor] = CompiledForward(model) if compile else model

    @torch.inference_mode()
    def fn(images: torch.Tensor) -> torch.Tensor:
        x = data.to_model_input(images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
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
            console.warn(f"--compile: torch.compile failed ({type(exc).__name__}: {first_line(exc, 200)}); running the model uncompiled")
            return self.model(x[:n])


def load_predictor(path: str | os.PathLike, *, device: str = "auto", precision: str = "auto", compile: bool = False) -> Predictor:
    """A checkpoint (.pt), TorchScript export (.ts) or ONNX export (.onnx) as a Predictor; a run folder means its best.pt.

    Which of the three is decided by the name (``model_kind``); each loader checks the file's metadata.

    ``compile``: torch.compile a checkpoint's model (see CompiledForward); exports are already compiled forms.
    """
    path = _run_folder_to_file(Path(path))
    if not path.exists():
        raise RescliError(f"{path}: no such model file")
    if path.is_dir():
        raise RescliError(f"{path}: is a folder; pass a model file (a run folder's best.pt, or a .ts/.onnx export)")
    kind = model_kind(path)
    if compile and kind != "checkpoint":
        raise UsageError(f"--compile is for checkpoints (.pt); {path} is a {kind} export, which runs as it was exported")
    if kind == "onnx":
        from rescli.export import load_onnx_predictor

        return load_onnx_predictor(path)
    if kind == "torchscript":
        from rescli.export import load_torchscript_predictor

        return load_torchscript_predictor(path, device=device, precision=precision)
    from rescli.models import model_from_checkpoint

    ckpt = load_checkpoint(path)
    runtime = select_runtime(device=device, precision=precision)
    model = model_from_checkpoint(ckpt, source=path).to(runtime.device, memory_format=runtime.memory_format)
    return Predictor(
        classes=list(ckpt["classes"]),
        img_size=int(ckpt["img_size"]),
        mean=list(ckpt["mean"]),
        std=list(ckpt["std"]),
        temperature=float(ckpt.get("temperature", 1.0)),
        logits_fn=torch_logits_fn(model, runtime=runtime, mean=ckpt["mean"], std=ckpt["std"], compile=compile),
        kind="checkpoint",
        meta={"arch": ckpt["arch"], "runtime": runtime.describe(), "settings": ckpt.get("settings", {}),
              "data": ckpt.get("data")},
        device=runtime.device,
        source=str(path),
    )


# --- inputs -------------------------------------------------------------------------------------------

class BadInput(str):
    """An input that names no image (a pattern matching nothing, a folder without images): becomes an error row."""

    reason: str

    def __new__(cls, value: str, reason: str) -> "BadInput":
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


def _is_list_file(item: str) -> bool:
    return item.startswith("@") and len(item) > 1 and not os.path.exists(item)


def check_inputs(inputs: Sequence[str]) -> None:
    """Usage errors found before any result is written: '-' twice, a list file that cannot be read."""
    if not inputs:
        raise UsageError("no inputs: give image files, folders, quoted globs, '-' (paths on stdin) or @LIST")
    if list(inputs).count("-") > 1:
        raise UsageError("'-' (paths on stdin) can be given only once")
    for item in inputs:
        if _is_list_file(item):
            try:
                with open(Path(item[1:]).expanduser(), "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"{item}: cannot read list file ({exc.strerror or exc})") from None


def iter_input_paths(
    inputs: Sequence[str], *, stdin: IO | None = None, null_separated: bool = False
) -> Iterator[str]:
    """Expand files, folders (recursive), quoted globs, '-' (paths on stdin) and '@list.txt', lazily, in order.

    Paths on stdin and in list files are one per line, or NUL-separated with ``null_separated``; they are
    read as bytes and decoded like the OS decodes file names, so any file name survives.
    """
    for item in inputs:
        if item == "-":
            yield from _read_paths(stdin if stdin is not None else sys.stdin, null_separated=null_separated)
        elif _is_list_file(item):
            list_file = Path(item[1:]).expanduser()
            try:
                with open(list_file, "rb") as f:
                    yield from _read_paths(f, null_separated=null_separated)
            except OSError as exc:
                raise UsageError(f"{item}: cannot read list file ({exc.strerror or exc})") from None
        elif os.path.isdir(item):
            yield from _folder(item)
        elif not os.path.exists(item) and GLOB_CHARS & set(item):
            matches = sorted(glob.iglob(os.path.expanduser(item), recursive=True))
            if not matches:
                yield BadInput(item, "no file matches this pattern")
            for m in matches:
                if os.path.isdir(m):
                    yield from _images_under(Path(m))
                else:
                    yield m
        else:
            yield item


def _folder(item: str) -> Iterator[str]:
    found = False
    for path in _images_under(Path(item)):
        found = True
        yield path
    if not found:
        yield BadInput(item, "no images found in this folder")


def _read_paths(stream: IO, *, null_separated: bool) -> Iterator[str]:
    raw = getattr(stream, "buffer", stream)  # bytes when we can: file names need not be UTF-8
    read = getattr(raw, "read1", None) or raw.read  # read1: take what has arrived, do not wait for a full chunk
    # The unfinished item is kept as a list of the chunks it spans and joined once, when its separator comes: only
    # each new chunk is searched, so one 32 MB line costs one pass, not a re-split of all of it per 64 KB chunk.
    pending: list = []
    first = True
    while True:
        chunk = read(65536)
        if not chunk:
            break
        sep = ("\0" if null_separated else "\n") if isinstance(chunk, str) else (b"\0" if null_separated else b"\n")
        *items, rest = chunk.split(sep)
        if items:
            items[0] = chunk[:0].join([*pending, items[0]])
            pending = []
        if rest:
            pending.append(rest)
        for item in items:
            path = _clean_path(item, null_separated=null_separated, first=first)
            first = False
            if path:
                yield path
    if pending:
        path = _clean_path(pending[0][:0].join(pending), null_separated=null_separated, first=first)
        if path:
            yield path


def _clean_path(item: bytes | str, *, null_separated: bool, first: bool) -> str | None:
    path = os.fsdecode(item) if isinstance(item, bytes) else item
    if first and path.startswith("\ufeff"):  # a byte-order mark from Windows editors
        path = path[1:]
    if not null_separated:
        path = path.rstrip("\r\n")
        if not path.strip():
            return None
    return path or None


def _images_under(folder: Path) -> Iterator[str]:
    from rescli.images import not_regular_reason, special_file

    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and not is_clutter(d))
        for name in sorted(filenames):
            if is_hidden(name) or is_clutter(name):
                continue
            path = os.path.join(dirpath, name)
            kind = special_file(path)
            if kind:  # a FIFO would hang whoever opened it: named in an error row, never read
                yield BadInput(path, not_regular_reason(kind))
            elif looks_like_image(path):  # by content or extension: a zero-byte photo.jpg becomes an error row
                yield path


# --- streaming ----------------------------------------------------------------------------------------

def _load(path: str, transform, draft_size: int, *, jpeg_bytes: bool = False) -> tuple[str, Any, str | None]:
    """(path, uint8 tensor, None) or (path, None, why it failed); never raises.

    With ``jpeg_bytes``, a plain JPEG comes back undecoded, as (path, bytearray, None), for the GPU to decode.
    """
    if isinstance(path, BadInput):
        return str(path), None, path.reason
    if jpeg_bytes:
        raw = plain_jpeg_bytes(path)
        if raw is not None:
            return path, raw, None
    try:
        return path, transform(load_rgb(path, draft_size=draft_size)), None
    except ImageError as exc:
        return path, None, exc.reason
    except RescliError as exc:
        return path, None, exc.message
    except Exception as exc:  # never let one odd file stop a pipeline over thousands
        return path, None, f"{type(exc).__name__}: {exc}"


_END = object()


class _FeedFailed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def predict_batches(
    paths: Iterable[str],
    *,
    predictor: Predictor,
    batch_size: int = 32,
    workers: int = 2,
    top_k: int = 1,
    raw_scores: bool = False,
    threshold: float | None = None,
    lookahead: int | None = None,
    linger: float = 0.05,
    jpeg_device: torch.device | str | None = "auto",
) -> Iterator[list[dict[str, Any]]]:
    """Yield one list of result dicts per batch, one dict per path, in input order.

    At most ``lookahead`` (default 2 x batch_size) paths are taken from ``paths`` beyond the batch being
    predicted, so memory does not grow with the number of inputs. A batch is run when it is full, or
    when no further path has arrived ``linger`` seconds after its first one.

    ``jpeg_device``: where plain JPEGs are decoded, batched, by torchvision (nvJPEG on a GPU); other files,
    and JPEGs it cannot decode, go through Pillow. "auto" means the model's GPU when torchvision can decode
    there, else Pillow for everything (None). On a CPU Pillow is the faster (measured: docs/performance.md).
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    k = max(1, min(top_k, len(predictor.classes)))
    transform = predictor.transform()
    if jpeg_device == "auto":
        dev = predictor.device
        jpeg_device = dev if dev is not None and dev.type == "cuda" and jpeg_decode_works(dev) else None
    jpeg_device = torch.device(jpeg_device) if jpeg_device is not None else None
    temperature = 1.0 if raw_scores else predictor.temperature
    lookahead = max(1, lookahead if lookahead is not None else 2 * batch_size)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rescli-decode")
    ready: queue.Queue = queue.Queue(maxsize=lookahead)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            for path in paths:
                if stop.is_set():
                    return
                future = pool.submit(_load, path, transform, predictor.img_size, jpeg_bytes=jpeg_device is not None)
                if not put(future):
                    future.cancel()
                    return
            put(_END)
        except BaseException as exc:  # an unreadable list file, a stdin decoding problem: re-raised in the caller
            put(_FeedFailed(exc))

    feeder = threading.Thread(target=feed, name="rescli-inputs", daemon=True)
    feeder.start()
    try:
        ended = False
        failure: BaseException | None = None
        while not ended:
            first = ready.get()
            if first is _END:
                break
            if isinstance(first, _FeedFailed):
                raise first.exc
            batch: list[Future] = [first]
            deadline = time.monotonic() + linger
            while len(batch) < batch_size:
                try:
                    item = ready.get_nowait()
                except queue.Empty:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        item = ready.get(timeout=wait)
                    except queue.Empty:
                        break
                if item is _END:
                    ended = True
                    break
                if isinstance(item, _FeedFailed):
                    ended, failure = True, item.exc
                    break
                batch.append(item)
            items = [f.result() for f in batch]
            if jpeg_device is not None:
                items = _decode_jpegs(items, device=jpeg_device, img_size=predictor.img_size, transform=transform)
            yield _predict_batch(items, predictor, k=k, temperature=temperature, threshold=threshold)
            if failure is not None:
                raise failure
    finally:
        stop.set()
        while True:
            try:
                item = ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Future):
                item.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# --- JPEG decoding with torchvision (nvJPEG on a GPU) -----------------------------------------------------

_JPEG_DECODE_WORKS: dict[str, bool] = {}


def jpeg_decode_works(device: torch.device) -> bool:
    """Whether torchvision decodes JPEGs on ``device`` here (its build may lack nvJPEG): tried once per device."""
    key = str(device)
    if key not in _JPEG_DECODE_WORKS:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
        try:  # torchvision 0.29 deprecated its decoders (for TorchCodec): a release without them gets Pillow
            from torchvision.io import ImageReadMode, decode_jpeg

            out = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)
            _JPEG_DECODE_WORKS[key] = tuple(out.shape) == (3, 16, 16)
        except Exception:
            _JPEG_DECODE_WORKS[key] = False
    return _JPEG_DECODE_WORKS[key]


def _decode_jpegs(items: list[tuple[str, Any, str | None]], *, device: torch.device, img_size: int, transform) -> list:
    """Decode the batch's undecoded JPEGs in one torchvision call on ``device``; the rest stays as it is.

    A JPEG torchvision refuses (a corrupt stream, a variant nvJPEG lacks) goes through Pillow instead, which
    decodes it or names what is wrong with it, as for every other file.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    at = [i for i, (_, payload, _) in enumerate(items) if isinstance(payload, bytearray)]
    if not at:
        return items
    datas = [torch.frombuffer(items[i][1], dtype=torch.uint8) for i in at]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad stream fails the batched call: decode one by one to find it
        decoded = []
        for d in datas:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
    items = list(items)
    for i, image in zip(at, decoded):
        path = items[i][0]
        if image is None:
            items[i] = _load(path, transform, img_size)
        else:
            items[i] = (path, data.center_square_tensor(image, img_size), None)
    return items


def predict_stream(paths: Iterable[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Like predict_batches, one result dict at a time."""
    for batch in predict_batches(paths, **kwargs):
        yield from batch


def _predict_batch(batch, predictor: Predictor, *, k: int, temperature: float, threshold: float | None) -> list[dict]:
    good = [t for _, t, _ in batch if t is not None]
    if good:
        device = good[0].device  # GPU-decoded images are already on the model's device; Pillow's join them there
        logits = predictor.logits(torch.stack([t.to(device, non_blocking=True) for t in good]))
        probs = torch.softmax(logits.float() / temperature, dim=1)
        top_scores, top_idx = probs.topk(k, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
    rows: list[dict] = []
    row = 0
    for path, tensor, error in batch:
        if tensor is None:
            rows.append({"path": path, "error": error})
            continue
        scores, idx = top_scores[row], top_idx[row]
        row += 1
        label = predictor.classes[idx[0]]
        if threshold is not None and scores[0] < threshold:
            label = "unknown"
        rows.append({
            "path": path,
            "label": label,
            "score": round(scores[0], 6),
            "topk": [{"label": predictor.classes[i], "score": round(s, 6)} for i, s in zip(idx, scores)],
        })
    return rows
