"""Streaming prediction: labelled results in input order, batch by batch, however many inputs come in.

A feeder thread reads the inputs lazily (stdin, list files, folder walks) and hands each path to a
small pool of decode threads (Pillow and torch both release the GIL), staying at most
``lookahead`` paths ahead of the model. So the next batch is decoded while the model works on
this one, only a bounded number of images is ever in memory however many paths come in, and a
slow producer (``tail -f``, a ``find`` over a network share) still sees results as soon as its
first paths are labelled: a batch goes to the model when it is full or when the input pauses.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import torch

from rescli.core.errors import UsageError
from rescli.inference.inputs import load_input
from rescli.inference.jpeg import decode_jpegs, jpeg_decode_device
from rescli.inference.predictor import Predictor
from rescli.inference.scores import rows_for


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
) -> Generator[list[dict[str, Any]], None, None]:
    """Yield one list of result dicts per batch, one dict per path, in input order (what a row holds depends on
    the model's task: rescli.inference.scores).

    ``threshold``: single-label, "unknown" below it; multi-label, the one threshold of every class (instead of
    those stored in the model).

    At most ``lookahead`` (default twice batch_size) paths are taken from ``paths`` beyond the batch being
    predicted, so memory does not grow with the number of inputs. A batch is run when it is full, or
    when no further path has arrived ``linger`` seconds after its first one.

    ``jpeg_device``: where plain JPEGs are decoded, batched, by torchvision (nvJPEG on a GPU); other files,
    and JPEGs it cannot decode, go through Pillow. "auto" means the model's GPU when torchvision can decode
    there, else Pillow for everything (None); see jpeg.jpeg_decode_device.

    A generator: close it (contextlib.closing) to stop the feeder and cancel the decodes still queued.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    transform = predictor.transform()
    gpu_jpegs = jpeg_decode_device(jpeg_device, model_device=predictor.device)
    temperature = 1.0 if raw_scores else predictor.temperature
    load = partial(load_input, transform=transform, draft_size=predictor.img_size, jpeg_bytes=gpu_jpegs is not None)
    ahead = _DecodeAhead(paths, load=load, workers=workers,
                         lookahead=max(1, lookahead if lookahead is not None else 2 * batch_size))
    try:
        for futures in ahead.batches(batch_size=batch_size, linger=linger):
            items = [f.result() for f in futures]
            if gpu_jpegs is not None:
                items = decode_jpegs(items, device=gpu_jpegs, img_size=predictor.img_size, transform=transform)
            yield _rows(items, predictor, top_k=top_k, temperature=temperature, threshold=threshold)
    finally:
        ahead.close()


def predict_stream(paths: Iterable[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Like predict_batches, one result dict at a time."""
    for batch in predict_batches(paths, **kwargs):
        yield from batch


def _rows(items: list[tuple[str, Any, str | None]], predictor: Predictor, *, top_k: int, temperature: float,
          threshold: float | None) -> list[dict[str, Any]]:
    """One row per input, in input order: a labelled row per decoded image, an error row per failure."""
    decoded = [(path, image) for path, image, _ in items if image is not None]
    labelled: Iterator[dict[str, Any]] = iter(())
    if decoded:
        device = decoded[0][1].device  # GPU-decoded images are already on the model's device; Pillow's join them there
        logits = predictor.logits(torch.stack([image.to(device, non_blocking=True) for _, image in decoded]))
        rows = rows_for(predictor.task)
        labelled = iter(rows([path for path, _ in decoded], logits, classes=predictor.classes, top_k=top_k,
                             temperature=temperature, threshold=threshold, thresholds=predictor.thresholds))
    return [{"path": path, "error": error} if image is None else next(labelled) for path, image, error in items]


class _FeedFailed:
    """Reading the inputs failed (an unreadable list file, stdin that cannot be decoded): raised in the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()  # the inputs are exhausted


class _DecodeAhead:
    """Each path of ``paths`` handed to a pool of decode threads as a feeder thread takes it, at most ``lookahead``
    paths ahead of what the consumer has taken; ``batches`` gives the decodes' futures in input order."""

    def __init__(self, paths: Iterable[str], *, load: Callable[[str], Any], workers: int, lookahead: int) -> None:
        self._paths = paths
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rescli-decode")
        self._ready: queue.Queue = queue.Queue(maxsize=lookahead)
        self._stop = threading.Event()
        threading.Thread(target=self._feed, name="rescli-inputs", daemon=True).start()

    def _put(self, item: Any) -> bool:
        """Queue ``item`` as soon as there is room; False if the consumer stopped first."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self) -> None:
        try:
            for path in self._paths:
                if self._stop.is_set():
                    return
                future = self._pool.submit(self._load, path)
                if not self._put(future):
                    future.cancel()
                    return
            self._put(_END)
        except BaseException as exc:  # re-raised in the consumer, after the results before it
            self._put(_FeedFailed(exc))

    def batches(self, *, batch_size: int, linger: float) -> Iterator[list[Future]]:
        """Up to ``batch_size`` futures at a time: a batch ends when full, or ``linger`` seconds after its first."""
        while True:
            first = self._ready.get()
            if first is _END:
                return
            if isinstance(first, _FeedFailed):
                raise first.exc
            batch = [first]
            end = self._fill(batch, batch_size=batch_size, deadline=time.monotonic() + linger)
            yield batch
            if isinstance(end, _FeedFailed):
                raise end.exc
            if end is _END:
                return

    def _fill(self, batch: list[Future], *, batch_size: int, deadline: float) -> Any:
        """Add to ``batch`` what arrives by ``deadline``, up to ``batch_size``; the end marker, if it came."""
        while len(batch) < batch_size:
            item = self._next_by(deadline)
            if item is None or item is _END or isinstance(item, _FeedFailed):
                return item
            batch.append(item)
        return None

    def _next_by(self, deadline: float) -> Any:
        """The next queued item, waiting until ``deadline`` at the most; None if nothing came."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            try:
                return self._ready.get(timeout=wait)
            except queue.Empty:
                return None

    def close(self) -> None:
        """Stop the feeder, and cancel the decodes it queued that nobody will take."""
        self._stop.set()
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Future):
                item.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
