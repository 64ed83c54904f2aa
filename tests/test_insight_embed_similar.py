"""rescli embed and rescli similar: the vectors and their files, reuse without reading images again, the model
check, and the index."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_class_folder, run_cli

from rescli.insight.embeddings_file import EmbeddingsWriter, read_embeddings
from rescli.insight.similar import VectorIndex


def test_embed_writes_unit_vectors_and_a_paths_file_in_input_order(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "imgs", per_class=3)
    res = run_cli("embed", trained_run, data, "--output", tmp_path / "e.npy")
    assert res.code == 0, res.err
    assert res.out.startswith(f"wrote {tmp_path / 'e.npy'} (9 vectors of 512 dimensions")
    vectors = np.load(tmp_path / "e.npy")
    paths = (tmp_path / "e.paths.txt").read_text().splitlines()
    assert vectors.shape == (9, 512) and vectors.dtype == np.float32
    assert paths == sorted(str(p) for p in data.rglob("*.png"))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "e.npy.meta.json").read_text())
    assert meta["count"] == 9 and meta["normalised"] is True and meta["model"].endswith("best.pt")


def test_raw_features_are_what_fc_reads(trained_run, tmp_path):
    import torch

    from rescli.insight.network import open_network

    data = make_class_folder(tmp_path / "imgs", per_class=1)
    assert run_cli("embed", trained_run, data, "-o", tmp_path / "raw.jsonl", "--raw").code == 0
    paths, vectors, _ = read_embeddings(tmp_path / "raw.jsonl")
    net = open_network(trained_run, device="cpu")
    logits = net.module.fc(torch.from_numpy(vectors)).detach()
    from rescli.inference.load import load_predictor
    from rescli.inference.stream import predict_stream

    predicted = [row["label"] for row in predict_stream(paths, predictor=load_predictor(trained_run, device="cpu"))]
    assert [net.classes[i] for i in logits.argmax(1).tolist()] == predicted
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_similar_reuses_an_embeddings_file_without_reading_its_images(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "imgs", per_class=4)
    assert run_cli("embed", trained_run, data, "-o", tmp_path / "e.npy").code == 0
    query = tmp_path / "query.png"
    shutil.copy(data / "red" / "img_000.png", query)
    shutil.rmtree(data / "green")  # the collection's files are not opened again: these are gone
    res = run_cli("similar", trained_run, query, "--in", tmp_path / "e.npy", "-k", "3", "--format", "jsonl")
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(r["query"] == str(query) for r in rows)
    assert rows[0]["path"] == str(data / "red" / "img_000.png") and rows[0]["similarity"] == pytest.approx(1, abs=1e-4)
    assert rows[0]["similarity"] >= rows[1]["similarity"] >= rows[2]["similarity"]
    assert sum("/red/" in r["path"] for r in rows) >= 2


def test_similar_on_a_folder_leaves_the_query_out_of_its_own_neighbours(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "imgs", per_class=3)
    query = str(data / "blue" / "img_001.png")
    res = run_cli("similar", trained_run, query, "--in", data, "-k", "2", "--format", "csv")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "query,rank,similarity,path,error" and len(lines) == 3
    assert all(query not in line.split(",")[3] for line in lines[1:])


def test_embeddings_of_another_model_are_refused(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "imgs", per_class=2)
    assert run_cli("embed", trained_run, data, "-o", tmp_path / "e.npy").code == 0
    other = tmp_path / "other.ts"
    assert run_cli("export", trained_run, "--to", "torchscript", "-o", other).code == 0
    res = run_cli("similar", other, data / "red" / "img_000.png", "--in", tmp_path / "e.npy")
    assert res.code == 2 and "another model" in res.err


@pytest.mark.parametrize("suffix", [".npy", ".jsonl", ".parquet"])
def test_each_format_reads_back_what_was_written(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    target = tmp_path / f"v{suffix}"
    parts = [rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)]
    with EmbeddingsWriter(target, {"format": "rescli-embeddings"}) as writer:
        writer.add(["a.png", "b.png", "c d.png"], parts[0])
        writer.add(["é.png", "e.png"], parts[1])
    paths, vectors, meta = read_embeddings(target)
    assert paths == ["a.png", "b.png", "c d.png", "é.png", "e.png"]
    assert np.array_equal(vectors, np.concatenate(parts)) and meta["count"] == 5 and meta["dim"] == 5


def test_a_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "v.npy"
    with pytest.raises(KeyboardInterrupt), EmbeddingsWriter(target, {}) as writer:
        writer.add(["a.png"], np.ones((1, 3), dtype=np.float32))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_parquet_without_pyarrow_says_which_extra(monkeypatch, tmp_path, trained_run):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    res = run_cli("embed", trained_run, tmp_path, "-o", tmp_path / "v.parquet")
    assert res.code == 1 and "pip install 'rescli[parquet]'" in res.err and len(res.err.strip().splitlines()) == 1


def test_the_index_finds_the_exact_nearest_neighbours():
    rng = np.random.default_rng(1)
    stored = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    sims, idx = VectorIndex(stored, backend="sklearn").search(queries, 4)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.argsort(-(q @ unit.T), axis=1)[:, :4]
    assert np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(q @ unit.T, expected, axis=1), atol=1e-5)


def test_faiss_gives_the_same_neighbours_where_installed():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    stored = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    a = VectorIndex(stored, backend="sklearn").search(queries, 3)
    b = VectorIndex(stored, backend="faiss").search(queries, 3)
    assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-5)


def test_similar_keeps_input_order_with_a_broken_query(trained_run, tmp_path):
    data = make_class_folder(tmp_path / "imgs", per_class=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    queries = [str(data / "red" / "img_000.png"), str(broken), str(data / "blue" / "img_001.png")]
    res = run_cli("similar", trained_run, *queries, "--in", data, "-k", "1", "--format", "jsonl")
    assert res.code == 1
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["query"] for r in rows] == queries and "error" in rows[1] and rows[2]["rank"] == 1
