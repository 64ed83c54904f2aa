"""The targets of issue #16, measured: explanations localise, label issues are found, embeddings cluster, similar
answers fast, near-duplicates are found in reasonable time. Prints the figures; nothing asserts them.

    python bench/insight.py                          # every phase at the issue's sizes
    python bench/insight.py --phases similar --sizes 1000,20000,100000
    python bench/insight.py --small                  # every phase at small sizes (a check that the script runs)

Phases:
  localise      scripts/make_quadrant_digits.py (100 digits a class, 128 px), resnet18 from scratch (--epochs-localise),
                then `rescli explain` on the validation split: the share of correctly classified images whose peak_xy
                is in the digit's quadrant, per method (target: >= 90 %)
  label-issues  scikit-learn's 1,797 real digit scans at 32 px with 5 % of labels flipped, resnet18 trained 3 epochs on
                them, then `rescli label-issues --all`: precision and recall of the top k (k = flipped; target >= 0.6)
  cluster       the same digits, unflipped, a resnet18 trained 3 epochs: how often the 5 nearest neighbours of a
                validation image (among all images, itself left out) share its class (target >= 90 %)
  similar       N stored 512-d unit vectors: time per query (k = 5, one query at a time, median of --queries) for
                scikit-learn and, where installed, faiss (the crossover sets similar.FAISS_FROM; target < 100 ms at
                100,000)
  near-dup      N generated pictures (64 px, detail at every scale) of which 2 % have a re-encoded or resized copy:
                seconds to hash (cold cache, then warm) and to pair them, and the share of copies found
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rescli, for the phases that call it in this process
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def rescli(*args: object, capture: bool = False) -> str:
    """`python -m rescli ARGS` from this checkout; its stdout when ``capture``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "rescli", *map(str, args)], env=env, check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout or ""


def finetune(data: Path, out: Path, *, img_size: int, epochs: int) -> Path:
    rescli("finetune", data, "--weights", "none", "--img-size", img_size, "--epochs", epochs, "--output", out,
           "--augment", "none", "--seed", 0)
    return out


def real_digits(folder: Path, *, limit: int | None = None) -> Path:
    """scikit-learn's UCI digit scans as 32 px PNGs in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(len(digits.images) if limit is None else min(limit, len(digits.images))):
        ink = (255 - digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        cls = folder / NAMES[digits.target[i]]
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ink, "L").resize((32, 32), Image.Resampling.BICUBIC).save(cls / f"{cls.name}_{i:04d}.png")
    return folder


def localise(work: Path, *, per_class: int, epochs: int) -> dict:
    data = work / "quadrants"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_quadrant_digits.py"), data, "--per-class",
                    str(per_class)], check=True, stdout=subprocess.DEVNULL)
    quadrant = {r["path"]: int(r["quadrant"]) for r in csv.DictReader(open(f"{data}.quadrants.csv"))}
    run = finetune(data, work / "run-quadrants", img_size=128, epochs=epochs)
    import torch

    split = torch.load(run / "best.pt", weights_only=True)["data"]["splits"]["val"]["paths"]
    val = [str(data / p) for p in split]
    (work / "val.txt").write_text("\n".join(val) + "\n")
    out: dict = {"images": len(quadrant), "val": len(val), "epochs": epochs}
    for method in ("gradcam", "gradcam++", "layercam"):
        rows = [json.loads(line) for line in rescli("explain", run, f"@{work / 'val.txt'}", "--method", method,
                                                   "-o", work / f"maps-{method}", "-f", "jsonl", capture=True)
                .splitlines()]
        right = [r for r in rows if r["label"] == Path(r["path"]).parent.name]
        inside = [r for r in right
                  if int(r["peak_xy"][0] >= 64) + 2 * int(r["peak_xy"][1] >= 64) == quadrant[r["path"]]]
        out[method] = {"correct": len(right), "peak_in_quadrant": round(len(inside) / max(1, len(right)), 4)}
    return out


def label_issues(work: Path, *, limit: int | None, epochs: int) -> dict:
    data = real_digits(work / "digits-flipped", limit=limit)
    files = sorted(data.rglob("*.png"))
    rng = np.random.default_rng(0)
    flipped = set()
    for path in rng.choice(files, size=max(1, round(0.05 * len(files))), replace=False):
        other = rng.choice([n for n in NAMES if n != path.parent.name])
        target = data / other / path.name
        shutil.move(path, target)
        flipped.add(str(target))
    run = finetune(data, work / "run-flipped", img_size=32, epochs=epochs)
    rows = [json.loads(line) for line in rescli("label-issues", data, "--model", run, "--all", "-f", "jsonl",
                                                capture=True).splitlines()]
    top = {r["path"] for r in rows[:len(flipped)]}
    hits = len(top & flipped)
    return {"images": len(files), "flipped": len(flipped), "precision_at_k": round(hits / len(top), 4),
            "recall_at_k": round(hits / len(flipped), 4), "epochs": epochs}


def cluster(work: Path, *, limit: int | None, epochs: int) -> dict:
    import torch

    data = real_digits(work / "digits", limit=limit)
    run = finetune(data, work / "run-digits", img_size=32, epochs=epochs)
    rescli("embed", run, data, "-o", work / "digits.npy")
    vectors = np.load(work / "digits.npy")
    paths = (work / "digits.paths.txt").read_text().splitlines()
    labels = np.array([Path(p).parent.name for p in paths])
    val = {str(data / p) for p in torch.load(run / "best.pt", weights_only=True)["data"]["splits"]["val"]["paths"]}
    queries = [i for i, p in enumerate(paths) if p in val]
    sims = vectors[queries] @ vectors.T
    sims[np.arange(len(queries)), queries] = -np.inf  # not its own neighbour
    nearest = np.argsort(-sims, axis=1)[:, :5]
    share = float((labels[nearest] == labels[queries][:, None]).mean())
    return {"images": len(paths), "queries": len(queries), "top5_same_class": round(share, 4), "epochs": epochs}


def similar(sizes: list[int], *, queries: int) -> dict:
    from sklearn.neighbors import NearestNeighbors  # noqa: F401  (imported before the clock starts)

    from rescli.insight.similar import VectorIndex

    rng = np.random.default_rng(0)
    out: dict = {}
    backends = ["sklearn"]
    try:
        import faiss  # noqa: F401

        backends.append("faiss")
    except ImportError:
        pass
    for n in sizes:
        stored = rng.normal(size=(n, 512)).astype(np.float32)
        asked = rng.normal(size=(queries, 512)).astype(np.float32)
        out[n] = {}
        for backend in backends:
            started = time.perf_counter()
            index = VectorIndex(stored, backend=backend)
            build = time.perf_counter() - started
            index.search(asked[:1], 5)  # warm-up
            times = []
            for q in asked:
                started = time.perf_counter()
                index.search(q[None], 5)
                times.append(time.perf_counter() - started)
            out[n][backend] = {"build_s": round(build, 3), "query_ms": round(1000 * statistics.median(times), 2)}
    return out


def near_duplicates(work: Path, *, n: int) -> dict:
    from PIL import Image

    from rescli.data.near_duplicates import near_duplicate_groups
    from rescli.data.scan import scan_dataset

    data = work / "pictures"
    rng = np.random.default_rng(0)
    copies = []
    for k in range(n):
        folder = data / f"c{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = np.zeros((64, 64, 3), dtype=np.float32)
        for octave, cells in enumerate((2, 4, 8, 16, 32)):
            grid = rng.normal(0, 60 / 2 ** octave, (cells, cells, 3)).astype(np.float32)
            picture += np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((64, 64), Image.BICUBIC))
                                 for c in range(3)], axis=-1)
        image = Image.fromarray(np.clip(128 + picture, 0, 255).astype(np.uint8))
        image.save(folder / f"{k:05d}.png")
        if k % 50 == 0:  # 2 %: a copy, re-encoded or resized, in another class folder
            copy = data / f"c{(k + 1) % 10}" / f"{k:05d}-copy.jpg"
            copy.parent.mkdir(parents=True, exist_ok=True)
            (image if k % 100 else image.resize((48, 48))).save(copy, quality=75)
            copies.append((f"c{k % 10}/{k:05d}.png", f"c{(k + 1) % 10}/{k:05d}-copy.jpg"))
    os.environ["RESCLI_CACHE_DIR"] = str(work / "cache")
    index = scan_dataset(data)
    used = [(p, s, index.classes[y]) for s in index.splits for p, y in index.splits[s]]
    out: dict = {"images": len(used), "planted_copies": len(copies)}
    for what in ("cold", "warm"):
        started = time.perf_counter()
        groups = near_duplicate_groups(index, used, method="phash")
        out[f"phash_{what}_s"] = round(time.perf_counter() - started, 2)
    found = {tuple(g["paths"]) for g in groups}
    out["copies_found"] = round(sum(tuple(sorted(c)) in found for c in copies) / len(copies), 4)
    out["groups"] = len(groups)
    return out


PHASES = ("localise", "label-issues", "cluster", "similar", "near-dup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--small", action="store_true", help="small sizes: checks that every phase runs")
    parser.add_argument("--sizes", default="1000,5000,10000,20000,50000,100000", help="similar: stored vectors")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--epochs-localise", type=int, default=8)
    parser.add_argument("--near-images", type=int, default=10_000)
    args = parser.parse_args()
    small = args.small
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="rescli-bench-insight-") as tmp:
        work = Path(tmp)
        for phase in args.phases.split(","):
            started = time.perf_counter()
            if phase == "localise":
                results[phase] = localise(work, per_class=10 if small else 100, epochs=1 if small else
                                          args.epochs_localise)
            elif phase == "label-issues":
                results[phase] = label_issues(work, limit=300 if small else None, epochs=1 if small else 3)
            elif phase == "cluster":
                results[phase] = cluster(work, limit=300 if small else None, epochs=1 if small else 3)
            elif phase == "similar":
                sizes = [1000, 5000] if small else [int(s) for s in args.sizes.split(",")]
                results[phase] = similar(sizes, queries=5 if small else args.queries)
            elif phase == "near-dup":
                results[phase] = near_duplicates(work, n=500 if small else args.near_images)
            else:
                raise SystemExit(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
            results[phase]["phase_seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps({phase: results[phase]}), flush=True)
    import torch

    print(json.dumps({"cpu_threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
