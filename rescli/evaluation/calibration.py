"""Calibration from plain arrays: softmax, expected calibration error, reliability bins, temperature scaling.

Everything here takes numpy arrays (``logits``/``probs`` of shape ``(N, C)``, integer ``labels`` of shape ``(N,)``)
and returns plain Python values, so the training and evaluation code can call it on whatever they collected.
Reference: Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017).
"""

from __future__ import annotations

import math

import numpy as np

from rescli.core.errors import RescliError

#: ``fit_temperature`` never returns a temperature outside this range.
MIN_TEMPERATURE = 0.05


MAX_TEMPERATURE = 20.0


def _as_2d(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise RescliError(f"{name} must be a 2-D array (samples x classes), got shape {arr.shape}")
    return arr


def _as_labels(labels: np.ndarray, n: int, n_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise RescliError(f"labels must be a 1-D array of {n} class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise RescliError("labels must be integer class indices")
        arr = as_int
    arr = arr.astype(np.int64, copy=False)
    if n_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise RescliError(f"labels must lie in [0, {n_classes}), got values in [{arr.min()}, {arr.max()}]")
    return arr


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` over the last axis (float64)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise RescliError(f"temperature must be a positive finite number, got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size == 0:
        return z.copy()
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def as_binary_decisions(logits: np.ndarray) -> np.ndarray:
    """A multi-label model's logits [N, C] as N*C two-class logits [0, z] (image by image, class by class).

    softmax([0, z] / T) is [1 - sigmoid(z / T), sigmoid(z / T)], so every tool here (the temperature fit, the
    reliability bins, the ECE) reads each (image, class) decision as the binary decision it is, against the 0/1
    targets flattened the same way.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    return np.stack([np.zeros_like(z), z], axis=1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against ``labels`` (natural log)."""
    z = _as_2d("logits", logits)
    y = _as_labels(labels, z.shape[0], z.shape[1])
    if z.shape[0] == 0:
        return 0.0
    z = z / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(z.shape[0]), y]))


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    # Bins are (lo, hi] as in Guo et al.; a confidence of exactly 0 goes to the first bin.
    idx = np.ceil(confidence * n_bins).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> list[dict]:
    """Top-1 confidence vs accuracy in ``n_bins`` equal-width bins over [0, 1].

    Returns one dict per bin (empty bins included, in order): ``lo``, ``hi``, ``count`` and the mean ``confidence``
    and ``accuracy`` of the samples in it (``None`` for an empty bin).
    """
    if int(n_bins) < 1:
        raise RescliError(f"n_bins must be at least 1, got {n_bins}")
    n_bins = int(n_bins)
    p = _as_2d("probs", probs)
    y = _as_labels(labels, p.shape[0])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = [
        {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": 0, "confidence": None, "accuracy": None}
        for b in range(n_bins)
    ]
    if p.shape[0] == 0 or p.shape[1] == 0:
        return rows
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(confidence, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    for b in range(n_bins):
        if counts[b]:
            rows[b]["count"] = int(counts[b])
            rows[b]["confidence"] = float(conf_sum[b] / counts[b])
            rows[b]["accuracy"] = float(acc_sum[b] / counts[b])
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> float:
    """ECE: sum over equal-width bins of ``|accuracy - confidence|`` weighted by the fraction of samples in the bin."""
    rows = reliability_bins(probs, labels, n_bins=n_bins)
    total = sum(r["count"] for r in rows)
    if total == 0:
        return 0.0
    ece = sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])
    return float(ece)


def _golden_section_log_t(nll, lo: float, hi: float, iters: int = 80) -> float:
    # NLL is convex in 1/T, hence unimodal in log T: golden-section search is safe.
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return (a + b) / 2.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` on ``labels``.

    Optimises ``log T`` with L-BFGS in float64 (falling back to a bounded golden-section search if that fails),
    clamps to ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` and returns 1.0 when there are fewer than 2 classes or samples.
    """
    import torch

    z_np = _as_2d("logits", logits)
    n, c = z_np.shape
    if n < 2 or c < 2:
        return 1.0
    y_np = _as_labels(labels, n, c)
    if not np.all(np.isfinite(z_np)):
        raise RescliError("logits contain NaN or infinite values; cannot fit a temperature")

    z = torch.from_numpy(np.ascontiguousarray(z_np))
    y = torch.from_numpy(np.ascontiguousarray(y_np))
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def nll_of(log_t: float) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # Clamp inside the graph so the line search cannot wander to overflow territory.
        loss = torch.nn.functional.cross_entropy(z / torch.exp(log_t.clamp(lo - 1.0, hi + 1.0)), y)
        loss.backward()
        return loss

    best = 0.0
    try:
        optimizer.step(closure)
        candidate = float(log_t.detach())
        if math.isfinite(candidate):
            best = candidate
        else:
            raise FloatingPointError
    except (FloatingPointError, RuntimeError):
        best = _golden_section_log_t(nll_of, lo, hi)

    best = min(max(best, lo), hi)
    # Belt and braces: never return something worse than the bounded search or than doing nothing.
    if not (nll_of(best) <= nll_of(0.0) + 1e-12):
        alt = _golden_section_log_t(nll_of, lo, hi)
        best = alt if nll_of(alt) < nll_of(0.0) else 0.0
    temperature = math.exp(best)
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))
