"""Wiring of explain, embed, similar, label-issues and dataset --near-duplicates: the keyword arguments the library
receives from typical flags, how canned rows render, and the exit codes. No model, no images."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import run_cli
from test_cli_wiring import Call


@pytest.fixture
def library(monkeypatch):
    """``library("rescli.x.y", name=fake, ...)``: the module the command imports from, replaced for this test
    (as in test_cli_wiring)."""
    monkeypatch.setattr("rescli.core.cpus.adapt_to_load", lambda: None)

    def install(module_name: str, **names: Any) -> types.ModuleType:
        module = types.ModuleType(module_name)
        module.__dict__.update(names)
        monkeypatch.setitem(sys.modules, module_name, module)
        return module

    return install

def _model_modules(library, tmp_path):
    net = SimpleNamespace(kind="checkpoint", classes=["cat", "dog"], cam_stage="layer4", fingerprint="f00",
                          meta={"arch": "resnet18"}, source="runs/r/best.pt")
    library("rescli.inference.lookup", resolve_model_path=lambda model: (tmp_path / "best.pt", "--model"))
    library("rescli.insight.network", open_network=Call(net), choose_cam_stage=lambda net, layer: layer or "layer4",
            imagenet_network=Call(net))


def test_explain_flags_reach_the_library_and_rows_render(library, tmp_path):
    _model_modules(library, tmp_path)
    rows = [[{"path": "a.png", "label": "dog", "score": 0.75, "peak_xy": [3, 4], "overlay": "o/a.dog.png"},
             {"path": "b.png", "error": "not an image"}]]
    explain = Call(iter(rows))
    library("rescli.insight.explain", explain_batches=explain, check_output_dir=lambda out, inputs: out)
    res = run_cli("explain", "runs/r", "a.png", "b.png", "-o", tmp_path / "maps", "--method", "layercam",
                  "--label", "dog", "--layer", "layer3", "-b", "4", "--workers", "1", "--raw-scores", "-f", "csv")
    assert res.code == 1  # an input failed
    kwargs = explain.kwargs
    assert {k: v for k, v in kwargs.items() if k != "paths"} | {"net": None} == {
        "net": None, "output_dir": tmp_path / "maps", "method": "layercam", "labels": ["dog"], "raw_scores": True,
        "batch_size": 4, "workers": 1}
    assert res.out.splitlines() == ["path,label,score,peak_xy,overlay,error", "a.png,dog,0.750000,\"3,4\",o/a.dog.png,",
                                    "b.png,,,,,not an image"]
    assert "error: b.png: not an image" in res.err and "layercam at layer3" in res.err


def test_explain_rejects_an_unknown_method_before_loading(library, tmp_path):
    res = run_cli("explain", "runs/r", "a.png", "--method", "saliency")
    assert res.code == 2 and "gradcam, gradcam++, layercam" in res.err


def test_embed_writes_what_the_batches_give(library, tmp_path):
    _model_modules(library, tmp_path)
    import numpy as np

    batches = [SimpleNamespace(paths=["a.png"], vectors=np.ones((1, 2), np.float32), errors=[]),
               SimpleNamespace(paths=[], vectors=np.zeros((0, 0)), errors=[{"path": "x.png", "error": "broken"}])]
    embed = Call(iter(batches))
    library("rescli.insight.embed", embed_batches=embed)
    res = run_cli("embed", "runs/r", "a.png", "x.png", "-o", tmp_path / "v.jsonl", "--raw")
    assert res.code == 1 and embed.kwargs["raw"] is True and embed.kwargs["batch_size"] == 32
    assert res.out.strip() == f"wrote {tmp_path / 'v.jsonl'} (1 vectors of 2 dimensions, raw); 1 input(s) failed"
    assert json.loads((tmp_path / "v.jsonl").read_text()) == {"path": "a.png", "vector": [1.0, 1.0]}
    meta = json.loads((tmp_path / "v.jsonl.meta.json").read_text())
    assert meta["model_fingerprint"] == "f00" and meta["normalised"] is False and meta["count"] == 1


def test_embed_refuses_an_unknown_suffix(library, tmp_path):
    res = run_cli("embed", "runs/r", "a.png", "-o", tmp_path / "v.csv")
    assert res.code == 2 and ".npy, .parquet or .jsonl" in res.err


def test_similar_searches_the_collection_with_k(library, tmp_path):
    _model_modules(library, tmp_path)
    index = SimpleNamespace(backend="sklearn")
    search = Call(iter([[{"query": "q.png", "rank": 1, "path": "a.png", "similarity": 0.9}]]))
    library("rescli.insight.similar", load_collection=Call((["a.png"], None)), VectorIndex=lambda vectors: index,
            similar_batches=search)
    res = run_cli("similar", "runs/r", "q.png", "--in", "emb.npy", "-k", "3", "-f", "jsonl")
    assert res.code == 0, res.err
    assert search.kwargs["k"] == 3 and search.kwargs["paths"] == ["a.png"] and search.kwargs["index"] is index
    assert json.loads(res.out) == {"query": "q.png", "rank": 1, "path": "a.png", "similarity": 0.9}
    assert run_cli("similar", "runs/r", "q.png", "--in", "emb.npy", "-k", "0").code == 2


def test_label_issues_table_and_flags(library, tmp_path):
    _model_modules(library, tmp_path)
    find = Call({"rows": [{"path": "cat/x.png", "given": "cat", "suggested": "dog", "score": 0.91}], "images": 10,
                 "judged": 10, "flagged": 1, "not_judged": 0, "root": "data"})
    library("rescli.insight.label_issues", find_label_issues=find)
    res = run_cli("label-issues", "data", "--model", "runs/r", "--top", "5", "--folds", "3", "--all")
    assert res.code == 0, res.err
    assert {k: find.kwargs[k] for k in ("top", "folds", "everything", "val_split", "seed")} == {
        "top": 5, "folds": 3, "everything": True, "val_split": 0.2, "seed": 0}
    assert res.out.splitlines() == ["score  given  suggested  path", "0.9100  cat  dog  cat/x.png"]
    assert "1 of 10 images flagged" in res.err
    assert run_cli("label-issues", "data", "--folds", "1").code == 2


def test_dataset_passes_the_near_duplicate_method_and_embedder(library, tmp_path):
    describe = Call({"duplicates": []})
    library("rescli.data.report", describe_dataset=describe)
    embedder = Call(lambda paths: None)
    library("rescli.insight.reports", near_duplicate_embedder=embedder)
    res = run_cli("dataset", tmp_path, "--near-duplicates", "both", "--model", "runs/r", "--format", "json")
    assert res.code == 0, res.err
    assert json.loads(res.out) == {"duplicates": []}
    assert embedder.calls == [(("both", "runs/r"), {})]
    assert describe.kwargs["near_duplicates"] == "both" and describe.kwargs["embed"] is embedder.result
