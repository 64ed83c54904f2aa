"""Distributed fine-tuning for real: 2-process gloo jobs on CPU (torchrun and `finetune --nproc 2`), compared
with single-process runs of the same seed, plus the pieces (rank_batches, shard, gather order) on their own.

The data is chosen to hit the awkward cases: 27 training images (the last global batch does not split
evenly; with --batch-size 2 one process gets no image at all in the last step) and 7 validation images
(not divisible by 2: each must still be counted exactly once).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import dist_worker
import numpy as np
import pytest
from conftest import COLORS, StopAfter, write_color_images

from rescli.core.errors import UsageError
from rescli.evaluation.folder import evaluate_folder
from rescli.models.checkpoint import load_checkpoint
from rescli.train.distributed import SINGLE, DistContext, rank_batches, shard
from rescli.train.interrupts import Interrupted
from rescli.train.launch import strip_launch_option
from rescli.train.loop import finetune
from rescli.train.settings import TrainSettings

TINY = ["--arch", "resnet20", "--weights", "none", "--img-size", "16", "--workers", "0", "--precision", "fp32",
        "--augment", "none"]
TRAIN, VAL = {"red": 9, "green": 9, "blue": 9}, {"red": 3, "green": 2, "blue": 2}
N_TRAIN, N_VAL = 27, 7




@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "data"
    for k, (name, n) in enumerate(TRAIN.items()):
        write_color_images(root / "train" / name, COLORS[name], n, size=16, seed=k)
        write_color_images(root / "val" / name, COLORS[name], VAL[name], size=16, seed=10 + k)
    return root


def child_env() -> dict[str, str]:
    env = dict(os.environ)  # RESCLI_CACHE_DIR / TORCH_HOME as the autouse fixture set them
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RESCLI_LAUNCH_STATUS_FILE", None)
    return env


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "rescli", "finetune", *map(str, args)], cwd)


def history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


def assert_close_histories(a: Path, b: Path, tol: float) -> None:
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=tol), (k, ra, rb)


def assert_every_val_image_once(run_dir: Path, data: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == N_VAL
    assert int(np.asarray(metrics["confusion_matrix"]).sum()) == N_VAL
    with open(run_dir / "predictions.csv") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    val_files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    assert sorted(paths) == val_files  # each validation image exactly once: none twice, none left out
    return metrics


# --- the pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,world", [(27, 6, 2), (27, 2, 2), (10, 4, 2), (7, 9, 3), (12, 4, 4), (5, 8, 4)])
def test_rank_batches_split_every_global_batch_exactly(n, batch, world):
    order = list(np.random.default_rng(n).permutation(n))
    single = rank_batches(order, batch_size=batch, ctx=SINGLE)
    per_rank = [rank_batches(order, batch_size=batch, ctx=DistContext(r, world, r)) for r in range(world)]
    assert all(len(p) == len(single) == math.ceil(n / batch) for p in per_rank)  # same number of steps everywhere
    for step, global_batch in enumerate(single):
        parts = [p[step] for p in per_rank]
        assert sorted(i for part in parts for i in part) == sorted(global_batch)  # a partition of the global batch
        if len(global_batch) == batch:
            assert all(len(part) == batch // world for part in parts)
    assert [i for b in single for i in b] == order


def test_rank_batches_leave_a_process_empty_in_a_short_last_batch():
    last = [rank_batches(list(range(27)), batch_size=2, ctx=DistContext(r, 2, r))[-1] for r in range(2)]
    assert last == [[26], []]


def test_rank_batches_refuse_a_batch_that_does_not_split():
    with pytest.raises(UsageError, match="divisible"):
        rank_batches(list(range(10)), batch_size=5, ctx=DistContext(0, 2, 0))


def test_shard_is_a_partition():
    items = list(range(7))
    shards = [shard(items, DistContext(r, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(items, SINGLE) == items


def test_strip_launch_option():
    argv = ["finetune", "d", "--gpus", "2", "--epochs", "3", "--nproc=4", "-o", "x", "--", "--gpus"]
    assert strip_launch_option(argv) == ["finetune", "d", "--epochs", "3", "-o", "x", "--", "--gpus"]


def test_gather_by_index_all_reduce_and_errors_in_a_real_gloo_group(tmp_path):
    import torch.multiprocessing as mp

    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=dist_worker.collectives, args=(r, str(tmp_path / "store"), str(outs[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    for res in results:
        assert res["idx"] == list(range(7))  # every item once, in index order, whatever order the shards came in
        assert res["logits"] == [[i, -i] for i in range(7)] and res["y"] == [i % 2 for i in range(7)]
        assert "more than one process" in res["dup"]
        assert res["any"] == [True, False] and res["sums"] == [3.0, 20.0]
        assert res["on_main"] == ["only rank 0 runs this", 3, True]
        assert res["value"] == {"from": 0}


# --- real 2-process runs -----------------------------------------------------------------------------------

def test_torchrun_full_run_writes_one_set_of_files_and_counts_each_val_image_once(cli, odd_data, tmp_path):
    args = [odd_data, *TINY, "--epochs", "2", "--batch-size", "6", "--format", "json"]
    work = tmp_path / "work"
    work.mkdir()
    res = torchrun(*args, cwd=work)  # no --output: rank 0 picks runs/run1 and tells rank 1
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # one summary on stdout (rank 1 printed nothing)
    run_dir = work / summary["run_dir"]
    assert [p.name for p in (work / "runs").iterdir()] == ["run1"]
    assert res.stderr.count("epoch 1/2 ") == 1 and res.stderr.count("epoch 2/2 ") == 1  # rank 0 alone logs
    info = json.loads((run_dir / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo", "per_process_batch": 3, "sync_bn": False}
    metrics = assert_every_val_image_once(run_dir, odd_data)

    # The sharded, gathered validation is exactly a single-process evaluation of the saved best.pt (rank 0's
    # weights and BatchNorm statistics, which every process used).
    ref_metrics, ref_ev, _ = evaluate_folder(model=run_dir / "best.pt", data_dir=odd_data, split="val",
                                             write_files=False, workers=0, device="cpu", precision="fp32")
    assert ref_metrics["n"] == N_VAL and metrics["accuracy"] == ref_metrics["accuracy"]
    assert math.isclose(metrics["loss"], ref_metrics["loss"], rel_tol=1e-4)
    best = int(metrics["best_epoch"])
    assert math.isclose(history(run_dir)[best - 1]["val_loss"], ref_metrics["loss"], rel_tol=1e-4)
    with open(run_dir / "predictions.csv") as f:
        predicted = {row["path"]: row["predicted"] for row in csv.DictReader(f)}
    classes = load_checkpoint(run_dir / "best.pt")["classes"]
    assert predicted == {p: classes[int(y)] for p, y in zip(ref_ev.paths, ref_ev.y_pred)}

    # The same files as a single-process run. (Its numbers are not compared here: each process normalises
    # BatchNorm over its own half of the batch, which on 27 images changes the run; the head-only runs below
    # match a single process to 1e-5.)
    single = cli("finetune", *args, "--output", tmp_path / "single")
    assert single.code == 0, single.err
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    hd = history(run_dir)
    assert [r["epoch"] for r in hd] == [1, 2] and hd[1]["train_loss"] < hd[0]["train_loss"]
    assert load_checkpoint(run_dir / "best.pt")["settings"]["batch_size"] == 6  # the global batch is what is stored


def test_nproc_matches_a_single_process_run_and_a_single_process_resumes_it(cli, odd_data, tmp_path):
    # Head only (BatchNorm frozen), image loader path, --batch-size 2: one image per process per step, and in the
    # last step one process has none. The loss is scaled so the 2-process gradient is the global-batch gradient.
    args = [odd_data, *TINY, "--strategy", "head", "--no-cache-features", "--epochs", "1", "--batch-size", "2"]
    res = run([sys.executable, "-m", "rescli", "finetune", *map(str, args), "--output", tmp_path / "dist",
               "--nproc", "2", "--format", "json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["run_dir"] == str(tmp_path / "dist")
    assert_every_val_image_once(tmp_path / "dist", odd_data)
    single = cli("finetune", *args, "--output", tmp_path / "single")
    assert single.code == 0, single.err
    assert_close_histories(tmp_path / "dist", tmp_path / "single", 1e-5)
    assert max_weight_diff(tmp_path / "dist" / "best.pt", tmp_path / "single" / "best.pt") < 1e-5
    assert (json.loads((tmp_path / "dist" / "metrics.json").read_text())["accuracy"]
            == json.loads((tmp_path / "single" / "metrics.json").read_text())["accuracy"])

    # A single process continues the distributed run exactly as it continues its own.
    for name in ("dist", "single"):
        r = cli("finetune", "--resume", tmp_path / name, "--epochs", "2")
        assert r.code == 0, r.err
    assert_close_histories(tmp_path / "dist", tmp_path / "single", 1e-5)
    assert max_weight_diff(tmp_path / "dist" / "last.pt", tmp_path / "single" / "last.pt") < 1e-5

    # Errors raised in the processes keep their exit status through the launcher (torchrun itself says 1).
    again = run([sys.executable, "-m", "rescli", "finetune", *map(str, args), "--output", tmp_path / "dist",
                 "--nproc", "2"], tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert again.stderr.count("already holds a run") == 1  # rank 0 says it; rank 1 stays quiet


def test_distributed_run_resumes_a_single_process_run_mid_epoch(odd_data, tmp_path):
    # Cached-feature head training (features computed in shards and gathered); interrupted in the middle of
    # epoch 1 by one process, finished by two: the same run as one process training straight through.
    settings = {"data_dir": str(odd_data), "arch": "resnet20", "weights": "none", "img_size": 16, "workers": 0,
                "precision": "fp32", "augment": "none", "strategy": "head", "epochs": 2, "batch_size": 4}
    finetune(settings=TrainSettings(**settings), output=tmp_path / "straight", show_progress=False)
    with pytest.raises(Interrupted):
        finetune(settings=TrainSettings(**settings), output=tmp_path / "run", show_progress=False, _stop=StopAfter(3))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step_in_epoch"] == 3
    res = torchrun("--resume", tmp_path / "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "caching backbone features" in res.stderr and "resuming" in res.stderr
    assert_close_histories(tmp_path / "run", tmp_path / "straight", 1e-5)
    assert max_weight_diff(tmp_path / "run" / "best.pt", tmp_path / "straight" / "best.pt") < 1e-5
    assert json.loads((tmp_path / "run" / "run.json").read_text())["feature_cache"]["val"] == N_VAL
    assert_every_val_image_once(tmp_path / "run", odd_data)


# --- usage errors (no processes started) -------------------------------------------------------------------

def test_sync_bn_on_cpu_is_a_clear_usage_error(cli, odd_data, tmp_path):
    res = cli("finetune", odd_data, *TINY, "--device", "cpu", "--sync-bn", "--output", tmp_path / "r")
    assert res.code == 2 and "SyncBatchNorm runs on CUDA GPUs only" in res.err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_launch_refuses_bad_process_counts_before_starting_anything(cli, odd_data, tmp_path):
    res = cli("finetune", odd_data, *TINY, "--batch-size", "5", "--nproc", "2", "--output", tmp_path / "r")
    assert res.code == 2 and "divisible by the number of processes (2)" in res.err
    res = cli("finetune", odd_data, *TINY, "--gpus", "0", "--output", tmp_path / "r")
    assert res.code == 2 and "at least 1" in res.err
    assert not (tmp_path / "r").exists()
