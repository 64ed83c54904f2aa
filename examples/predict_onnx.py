#!/usr/bin/env python3
"""Label images with a rescli ONNX export, without rescli, PyTorch or torchvision.

Needs only:  pip install onnxruntime numpy pillow

    python predict_onnx.py model.onnx photo.jpg more_photos/ --top-k 3 > labels.jsonl

Everything the model needs is read from the file itself: class names, input size,
normalisation and temperature live in its metadata (key "rescli.json"). The preprocessing
below is the one rescli uses, so the scores match `rescli predict --model model.onnx`.
Prints one JSON object per image on stdout: {"path", "label", "score", "topk"}, or
{"path", "error"} for a file that cannot be read (the exit status is then 1). A model whose
metadata or graph cannot be right (a std or temperature of 0, more logits than classes, an
input that is not [batch, 3, img_size, img_size]) is refused with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_model(path: str):
    # Plain session options: no custom-op library is registered, so the model can use only onnxruntime's own
    # operators, never native code of its choosing.
    try:
        session = ort.InferenceSession(path, sess_options=ort.SessionOptions(), providers=ort.get_available_providers())
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        sys.exit(f"{path}: not a readable ONNX model ({reason})")
    meta_json = session.get_modelmeta().custom_metadata_map.get("rescli.json")
    try:
        meta = json.loads(meta_json or "")
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        sys.exit(f"{path}: no rescli metadata inside; export it with `rescli export CHECKPOINT --to onnx`")
    problem = metadata_problem(meta) or graph_problem(session, meta)
    if problem:
        sys.exit(f"{path}: {problem}; export it again with `rescli export CHECKPOINT --to onnx`")
    return session, meta


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metadata_problem(meta: dict) -> str | None:
    """What rescli checks too: each of these would give wrong labels, a division by zero or NaN scores."""
    classes, size = meta.get("classes"), meta.get("img_size")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return f"classes {classes!r:.80}: expected a non-empty list of class names"
    if len(set(classes)) != len(classes):
        return "classes: a name appears more than once"
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 8192:
        return f"img_size {size!r}: expected a whole number of pixels from 1 to 8192"
    for field in ("mean", "std"):
        values = meta.get(field)
        if not isinstance(values, list) or len(values) != 3 or not all(_finite(v) for v in values):
            return f"{field} {values!r:.80}: expected 3 finite numbers, one per RGB channel"
    if not all(v > 0 for v in meta["std"]):
        return f"std {meta['std']!r}: every value must be above 0 (pixels are divided by it)"
    temperature = meta.get("temperature", 1.0)
    if not _finite(temperature) or not temperature > 0:
        return f"temperature {temperature!r}: expected a finite number above 0 (logits are divided by it)"
    return None


def graph_problem(session, meta: dict) -> str | None:
    """The graph must take [batch, 3, img_size, img_size] float32 and return [batch, classes] logits."""
    size, n = meta["img_size"], len(meta["classes"])
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        return "input: expected one float32 input, the image batch"
    shape = inputs[0].shape
    if len(shape) != 4:
        return f"input {shape}: expected 4 axes, [batch, 3, {size}, {size}]"
    if isinstance(shape[1], int) and shape[1] != 3:
        return f"input {shape}: takes {shape[1]}-channel images; this script feeds 3 (RGB)"
    if any(isinstance(d, int) and d != size for d in shape[2:]):
        return f"input {shape}: takes {shape[2]}x{shape[3]} images, but its metadata says img_size {size}"
    try:  # one blank image settles what the graph's shapes leave open
        out = session.run(None, {inputs[0].name: np.zeros((1, 3, size, size), np.float32)})[0]
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return f"input: the model does not run on one 3x{size}x{size} image ({reason})"
    if out.ndim != 2:
        return f"output {list(out.shape)}: {out.ndim} axes; expected [batch, classes] logits"
    if out.shape[1] != n:
        return f"classes: {n} names, but the model outputs {out.shape[1]} logits (one per class expected)"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright per EXIF; transparency composited on white; every mode as 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    if img.mode.startswith("I;16"):
        img = img.point(lambda v: v / 257).convert("L")
    return img.convert("RGB")


def preprocess(path: str, size: int, mean, std) -> np.ndarray:
    """The central square, resized to size x size (bilinear), scaled to [0,1] and normalised: CHW float32."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # decode at a reduced scale when the photo is much larger
        img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def expand(inputs):
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                        yield os.path.join(dirpath, name)
        else:
            yield item


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a .onnx file written by `rescli export`")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    session, meta = load_model(args.model)
    classes, size, temperature = meta["classes"], int(meta["img_size"]), float(meta.get("temperature", 1.0))
    input_name = session.get_inputs()[0].name
    k = max(1, min(args.top_k, len(classes)))
    failed = 0

    def run(batch):
        logits = session.run(None, {input_name: np.stack([x for _, x in batch])})[0] / temperature
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for (path, _), p in zip(batch, probs):
            top = np.argsort(-p, kind="stable")[:k]
            print(json.dumps({
                "path": path, "label": classes[top[0]], "score": round(float(p[top[0]]), 6),
                "topk": [{"label": classes[i], "score": round(float(p[i]), 6)} for i in top],
            }))
        sys.stdout.flush()

    batch = []
    for path in expand(args.images):
        try:
            batch.append((path, preprocess(path, size, meta["mean"], meta["std"])))
        except Exception as exc:  # unreadable file: report it and go on
            failed += 1
            if batch:
                run(batch)
                batch = []
            print(json.dumps({"path": path, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        if len(batch) == args.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
