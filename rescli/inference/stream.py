"""Prediction: find the model, turn inputs into paths, stream labelled results in input order.

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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import torch

from rescli.core.errors import UsageError
from rescli.inference.inputs import load_input
from rescli.inference.jpeg import decode_jpegs, jpeg_decode_works
from rescli.inference.predictor import Predictor

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
                future = pool.submit(load_input, path, transform, predictor.img_size, jpeg_bytes=jpeg_device is not None)
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
                items = decode_jpegs(items, device=jpeg_device, img_size=predictor.img_size, transform=transform)
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
