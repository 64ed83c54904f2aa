"""rescli predict: every input form, output format and error path; streaming, bounded memory, pipes, exit statuses."""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import COLORS, write_color_images
from PIL import Image

from rescli.inference import inputs as inputs_module

REPO = Path(__file__).resolve().parents[1]


# --- helpers -------------------------------------------------------------------------------------------------

@pytest.fixture
def model(trained_run) -> str:
    return str(trained_run / "best.pt")


@pytest.fixture
def images(tmp_path) -> Path:
    """imgs/blue_000.jpg, imgs/a/img_000.png (red), imgs/a/b/img_000.png (green), plus files that must be skipped."""
    root = tmp_path / "imgs"
    write_color_images(root / "a", COLORS["red"], 1)
    write_color_images(root / "a" / "b", COLORS["green"], 1)
    Image.new("RGB", (30, 20), COLORS["blue"]).save(root / "blue_000.jpg")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    return root


def expected_walk(root: Path) -> list[str]:
    # os.walk order: a folder's own files (by name), then its sub-folders (by name)
    return [str(root / "blue_000.jpg"), str(root / "a" / "img_000.png"), str(root / "a" / "b" / "img_000.png")]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def predict(cli, model, *args, stdin=None, cwd=None):
    return cli("predict", "--model", model, "--precision", "fp32", "--workers", "1", *args, stdin=stdin, cwd=cwd)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- input forms -------------------------------------------------------------------------------------------

def test_files_and_folders_recursive_in_order(cli, model, images):
    single = str(images / "blue_000.jpg")
    res = predict(cli, model, single, str(images), "-f", "jsonl")
    assert res.code == 0, res.err
    rows = jsonl(res.out)
    assert [r["path"] for r in rows] == [single] + expected_walk(images)  # notes.txt and .hidden.png skipped
    assert {r["label"] for r in rows} <= {"red", "green", "blue"}
    assert all(set(r) == {"path", "label", "score"} and 0 < r["score"] <= 1 for r in rows)
    assert rows[0]["label"] == rows[1]["label"]  # the same file, listed directly and found in the folder


def test_quoted_glob_is_expanded_by_rescli(cli, model, images):
    res = predict(cli, model, str(images / "**" / "*.png"), "-f", "jsonl")
    assert res.code == 0, res.err
    sorted_paths = [str(images / "a" / "b" / "img_000.png"), str(images / "a" / "img_000.png")]
    assert [r["path"] for r in jsonl(res.out)] == sorted_paths


def test_paths_on_stdin_newline_separated(cli, model, images):
    paths = expected_walk(images)
    stdin = f"{paths[0]}\n\n{paths[1]}\r\n{paths[2]}"  # blank line ignored, CRLF tolerated, no final newline
    res = predict(cli, model, "-", "-f", "jsonl", stdin=stdin)
    assert res.code == 0, res.err
    assert [r["path"] for r in jsonl(res.out)] == paths


def test_paths_on_stdin_nul_separated_keep_odd_names(cli, model, tmp_path):
    odd = tmp_path / "new\nline and space.png"
    Image.new("RGB", (24, 24), COLORS["red"]).save(odd)
    other = write_color_images(tmp_path / "x", COLORS["green"], 1)[0]
    res = predict(cli, model, "-0", "-", "-f", "jsonl", stdin=f"{odd}\0{other}\0")
    assert res.code == 0, res.err
    rows = jsonl(res.out)
    assert [r["path"] for r in rows] == [str(odd), str(other)]
    assert all(r["label"] in {"red", "green", "blue"} for r in rows)


def test_list_file_and_mixed_inputs_keep_order(cli, model, images, tmp_path):
    walk = expected_walk(images)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{walk[2]}\n{walk[0]}\n")
    nul_list = tmp_path / "list0"
    nul_list.write_bytes(f"{walk[1]}\0".encode())
    res = predict(cli, model, walk[1], f"@{listed}", "-", "-f", "jsonl", stdin=walk[0] + "\n")
    assert res.code == 0, res.err
    assert [r["path"] for r in jsonl(res.out)] == [walk[1], walk[2], walk[0], walk[0]]
    res = predict(cli, model, "-0", f"@{nul_list}", "-f", "jsonl")
    assert [r["path"] for r in jsonl(res.out)] == [walk[1]]


# --- formats and fields ----------------------------------------------------------------------------------------

def test_formats_carry_the_same_results(cli, model, images):
    ref = jsonl(predict(cli, model, str(images), "-f", "jsonl").out)
    as_json = json.loads(predict(cli, model, str(images), "-f", "json").out)
    assert as_json == ref
    for fmt, delim in (("csv", ","), ("tsv", "\t")):
        res = predict(cli, model, str(images), "-f", fmt)
        rows = list(csv.DictReader(io.StringIO(res.out), delimiter=delim))
        assert list(rows[0]) == ["path", "label", "score", "error"]
        assert [(r["path"], r["label"], r["error"]) for r in rows] == [(x["path"], x["label"], "") for x in ref]
        assert [float(r["score"]) for r in rows] == pytest.approx([x["score"] for x in ref], abs=1e-6)
    table = predict(cli, model, str(images)).out.splitlines()
    assert table[0].split() == ["label", "score", "path"]
    assert [line.split()[0] for line in table[1:]] == [x["label"] for x in ref]
    assert [line.split()[-1] for line in table[1:]] == [x["path"] for x in ref]


def test_top_k(cli, model, images):
    rows = jsonl(predict(cli, model, str(images), "-f", "jsonl", "-k", "2").out)
    for r in rows:
        assert [t["label"] for t in r["topk"]][0] == r["label"] and len(r["topk"]) == 2
        first, second = r["topk"][0]["score"], r["topk"][1]["score"]
        assert first >= second and first + second <= 1.0 + 1e-6
    rows = jsonl(predict(cli, model, str(images), "-f", "jsonl", "-k", "10").out)
    assert all(len(r["topk"]) == 3 for r in rows)  # capped at the number of classes
    assert all(sum(t["score"] for t in r["topk"]) == pytest.approx(1.0, abs=1e-4) for r in rows)
    res = predict(cli, model, str(images), "-f", "csv", "-k", "2")
    first = next(csv.DictReader(io.StringIO(res.out)))
    assert first["topk"].count(";") == 1 and first["topk"].startswith(first["label"] + ":")


def test_fields_choose_and_order_columns(cli, model, images, tmp_path):
    missing = str(tmp_path / "gone.png")
    args = (str(images), missing, "--fields", "label,path")
    res = predict(cli, model, *args, "-f", "csv")
    assert res.code == 1
    lines = res.out.splitlines()
    assert lines[0] == "label,path" and lines[1].endswith(expected_walk(images)[0]) and lines[-1] == f",{missing}"
    res = predict(cli, model, *args, "-f", "tsv")
    assert res.out.splitlines()[0] == "label\tpath"
    rows = jsonl(predict(cli, model, *args, "-f", "jsonl").out)
    assert list(rows[0]) == ["label", "path"]
    assert rows[-1] == {"path": missing, "error": "file not found"}  # error rows always say which input and why
    table = predict(cli, model, *args).out.splitlines()
    assert table[0].split() == ["label", "path"] and "error: file not found" in table[-1]


def test_threshold_labels_unknown(cli, model, images):
    base = jsonl(predict(cli, model, str(images), "-f", "jsonl").out)
    scores = sorted(r["score"] for r in base)
    assert scores[0] < scores[-1]
    p = (scores[0] + scores[-1]) / 2  # some inputs on each side, none near the boundary
    rows = jsonl(predict(cli, model, str(images), "-f", "jsonl", "--threshold", str(p)).out)
    assert [r["score"] for r in rows] == [b["score"] for b in base]  # scores still shown
    assert [r["label"] for r in rows] == ["unknown" if b["score"] < p else b["label"] for b in base]
    assert {"unknown"} < {r["label"] for r in rows}


# --- errors per input, usage errors, exit statuses --------------------------------------------------------------

def test_bad_inputs_become_error_rows_and_exit_1(cli, model, images, tmp_path):
    good = expected_walk(images)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes((images / "a" / "img_000.png").read_bytes()[:120])  # truncated PNG
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    inputs = [str(tmp_path / "missing.png"), str(broken), good, str(text), str(tmp_path / "nomatch*.png"),
              str(empty_dir)]
    res = predict(cli, model, *inputs, "-f", "jsonl")
    assert res.code == 1
    rows = jsonl(res.out)
    assert [r["path"] for r in rows] == inputs
    errors = {r["path"]: r.get("error") for r in rows}
    assert errors[inputs[0]] == "file not found"
    assert "truncated" in errors[inputs[1]] or "corrupt" in errors[inputs[1]]
    assert errors[good] is None and rows[2]["label"] in {"red", "green", "blue"}
    assert errors[inputs[3]].startswith("not an image")
    assert errors[inputs[4]] == "no file matches this pattern"
    assert errors[inputs[5]] == "no images found in this folder"
    assert res.err.count("error: ") == 5 and "Traceback" not in res.err
    assert "6 input(s), 1 predicted, 5 failed" in res.err


def test_unreadable_list_file_is_a_usage_error_before_any_output(cli, model, images, tmp_path):
    res = predict(cli, model, str(images), f"@{tmp_path / 'nope.txt'}", "-f", "jsonl")
    assert res.code == 2 and res.out == ""
    assert "cannot read list file" in res.err and "Traceback" not in res.err
    res = predict(cli, model, f"@{tmp_path}", "-f", "jsonl")  # a folder is not a list
    assert res.code == 2 and "cannot read list file" in res.err


@pytest.mark.parametrize("args, message", [
    (["--fields", "path,colour"], "unknown field(s) colour"),
    (["--fields", "path,path"], "named twice"),
    (["--top-k", "0"], "--top-k"),
    (["--threshold", "1.5"], "--threshold"),
    (["--batch-size", "0"], "--batch-size"),
    (["-", "-"], "only once"),
    (["--format", "xml"], "xml"),
])
def test_usage_errors_exit_2(cli, model, images, args, message):
    res = predict(cli, model, str(images), *args)
    assert res.code == 2, res
    assert message in res.err and res.out == "" and "Traceback" not in res.err


def test_no_model_found(cli, images, tmp_path):
    res = cli("predict", str(images), cwd=tmp_path)
    assert res.code == 2 and "no model given" in res.err and "--model" in res.err and res.out == ""


def test_model_from_env_and_newest_run(cli, model, images, tmp_path, monkeypatch):
    for i, name in enumerate(("run1", "run2")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        dst = tmp_path / "runs" / name / "best.pt"
        dst.write_bytes(Path(model).read_bytes())
        os.utime(dst, (1_000_000 + i, 1_000_000 + i))
    res = cli("predict", str(images), "-f", "jsonl", cwd=tmp_path)
    assert res.code == 0 and "runs/run2/best.pt (newest runs/*/best.pt" in res.err
    monkeypatch.setenv("RESCLI_MODEL", str(tmp_path / "runs" / "run1"))  # a run folder stands for its best.pt
    res = cli("predict", str(images), "-f", "jsonl", cwd=tmp_path)
    assert res.code == 0 and "run1/best.pt (RESCLI_MODEL" in res.err and len(jsonl(res.out)) == 3
    res = cli("predict", str(images), "--model", "latest", "-f", "jsonl", cwd=tmp_path)  # 'latest' beats RESCLI_MODEL
    assert res.code == 0 and "runs/run2/best.pt (newest runs/*/best.pt" in res.err


class Payload:
    """Any pickled object that is not a plain dict of tensors: weights_only loading must refuse it."""


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace/save are deprecated upstream
@pytest.mark.parametrize(
    "kind",
    ["missing", "random bytes", "truncated", "foreign state_dict", "pickled object", "torchscript without metadata"],
)
def test_bad_model_files_give_one_line_errors(cli, model, images, tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "random bytes":
        path.write_bytes(os.urandom(2000))
    elif kind == "truncated":
        path.write_bytes(Path(model).read_bytes()[:5000])
    elif kind == "foreign state_dict":
        torch.save({"fc.weight": torch.zeros(3, 4)}, path)
    elif kind == "pickled object":
        torch.save({"format": "rescli-checkpoint", "x": Payload()}, path)
    elif kind == "torchscript without metadata":
        path = tmp_path / "plain.ts"
        torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 3), torch.zeros(1, 4)), str(path))
    res = cli("predict", str(images), "--model", str(path))
    assert res.code == 1 and res.out == "" and "Traceback" not in res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0], res.err
    expected = {
        "missing": "no such model file", "random bytes": "not a readable rescli checkpoint",
        "truncated": "not a readable rescli checkpoint",
        "foreign state_dict": "not a rescli checkpoint", "pickled object": "not a readable rescli checkpoint",
        "torchscript without metadata": "not a rescli export",
    }[kind]
    assert expected in lines[0]


def test_onnx_model_without_onnxruntime_gives_install_hint(cli, images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x07\x12\x07pytorch")
    res = cli("predict", str(images), "--model", str(fake))
    assert res.code == 1 and res.out == ""
    hint = "error: predicting with an .onnx model needs onnxruntime: pip install 'rescli[onnx]'"
    assert res.err.strip().splitlines()[-1] == hint


# --- stderr: quiet, progress --------------------------------------------------------------------------------------

def test_quiet_leaves_only_errors_on_stderr(cli, model, images, tmp_path):
    res = predict(cli, model, str(images), "-f", "jsonl", "--quiet")
    assert res.code == 0 and res.err == "" and len(jsonl(res.out)) == 3
    res = predict(cli, model, str(images), str(tmp_path / "gone.png"), "-f", "jsonl", "-q")
    assert res.code == 1 and res.err.strip() == f"error: {tmp_path / 'gone.png'}: file not found"


def test_progress_only_when_stderr_is_a_terminal(cli, model, images, monkeypatch):
    from rich.console import Console

    from rescli.cli import console

    res = predict(cli, model, str(images), "-f", "jsonl")
    assert "images," not in res.err  # captured stderr is not a terminal
    monkeypatch.setattr(console, "err", Console(stderr=True, force_terminal=True, highlight=False))
    res = predict(cli, model, str(images), "-f", "jsonl")
    assert "\r3 images, 0 failed" in res.err and len(jsonl(res.out)) == 3  # stdout stays clean
    res = predict(cli, model, str(images), "-f", "jsonl", "--no-progress")
    assert "images," not in res.err
    assert predict(cli, model, str(images), "-f", "jsonl", "--quiet").err == ""


# --- streaming and memory ------------------------------------------------------------------------------------------

def _fake_predictor(classes=("a", "b")):
    from rescli.inference.predictor import Predictor

    return Predictor(classes=list(classes), img_size=8, mean=[0.5] * 3, std=[0.5] * 3, temperature=1.0,
                     logits_fn=lambda x: x.float().mean(dim=(2, 3))[:, : len(classes)], kind="test")


def test_in_flight_images_are_bounded(monkeypatch):
    """However many paths come in, only about lookahead + one batch of them are taken (and decoded) at a time."""
    from rescli.inference.stream import predict_batches

    def numbered_image(path, draft_size=None):
        return Image.new("RGB", (8, 8), (int(path[4:]) % 256, 0, 0))

    monkeypatch.setattr(inputs_module, "load_rgb", numbered_image)
    consumed = 0

    def paths():
        nonlocal consumed
        for i in range(2000):
            consumed += 1
            yield f"img_{i}"

    emitted, most_in_flight = [], 0
    for batch in predict_batches(paths(), predictor=_fake_predictor(), batch_size=16, lookahead=32, workers=2):
        emitted.extend(batch)
        most_in_flight = max(most_in_flight, consumed - len(emitted) + len(batch))
    assert [r["path"] for r in emitted] == [f"img_{i}" for i in range(2000)]  # all of them, in input order
    assert most_in_flight <= 16 + 32 + 1, most_in_flight


def test_a_batch_is_emitted_before_the_input_ends(monkeypatch):
    from rescli.inference.stream import predict_batches

    monkeypatch.setattr(inputs_module, "load_rgb", lambda path, draft_size=None: Image.new("RGB", (8, 8)))
    more = threading.Event()

    def slow_paths():
        yield from ("x1", "x2", "x3")
        assert more.wait(30), "the first batch never came out"
        yield "x4"

    batches = predict_batches(slow_paths(), predictor=_fake_predictor(), batch_size=32, linger=0.05)
    first = next(batches)
    assert [r["path"] for r in first] == ["x1", "x2", "x3"] and not more.is_set()
    more.set()
    assert [r["path"] for b in batches for r in b] == ["x4"]


def test_results_stream_while_stdin_is_still_open(model, images, tmp_path):
    """A real process: the first result is read before the producer has finished or closed stdin."""
    good = expected_walk(images)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rescli", "predict", "-", "--model", model, "--precision", "fp32", "-f", "jsonl", "-q"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
        cwd=tmp_path,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        proc.stdin.write(good[0] + "\n")
        proc.stdin.flush()
        first = json.loads(lines.get(timeout=120))  # stdin still open
        assert first["path"] == good[0] and first["label"] in {"red", "green", "blue"}
        proc.stdin.write(f"{good[1]}\n{tmp_path / 'missing.png'}\n")
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    rest = [json.loads(lines.get(timeout=5)) for _ in range(2)]
    assert rest[0]["path"] == good[1] and rest[1] == {"path": str(tmp_path / "missing.png"), "error": "file not found"}
    assert proc.returncode == 1  # one input failed
    assert "Traceback" not in proc.stderr.read()


def test_head_ends_the_pipeline_cleanly(model, images, tmp_path):
    many = tmp_path / "many.txt"
    many.write_text("\n".join(expected_walk(images) * 1000) + "\n")  # 3,000 paths
    script = (f"'{sys.executable}' -m rescli predict @'{many}' --model '{model}' --precision fp32 -f jsonl"
              f" 2>'{tmp_path / 'err'}'"
              " | head -3; echo \"status=${PIPESTATUS[0]}\"")
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                         timeout=300)
    out = res.stdout.splitlines()
    assert len(out) == 4 and all(json.loads(line)["path"] for line in out[:3])
    assert out[3] in ("status=141", "status=0")
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err and "Broken pipe" not in err and "error" not in err.lower(), err


# --- completion and help ---------------------------------------------------------------------------------------------

def test_shell_completion(cli, tmp_path):
    """Through the installed `rescli` script, as a shell calls it (the completion script names the program)."""
    exe = Path(sys.executable).with_name("rescli")
    if not exe.exists():
        pytest.skip("the rescli console script is not installed next to this Python")
    assert "--install-completion" in cli("--help").out
    script = subprocess.run([str(exe), "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete -o default -F _rescli_completion rescli" in script.stdout
    env = {**os.environ, "_RESCLI_COMPLETE": "complete_bash", "COMP_WORDS": "rescli predict --format ",
           "COMP_CWORD": "3"}
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert res.stdout.split() == ["table", "jsonl", "json", "csv", "tsv"]
    env.update(COMP_WORDS="rescli expo", COMP_CWORD="1")  # ("ex" is export and explain)
    assert subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60).stdout.split() == ["export"]
    home = tmp_path / "home"
    home.mkdir()
    res = subprocess.run([str(exe), "--install-completion", "bash"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HOME": str(home), "SHELL": "/bin/bash"})
    assert res.returncode == 0 and "rescli" in (home / ".bashrc").read_text()


def test_every_command_help_has_examples(cli):
    from rescli.cli.app import app

    assert "Examples:" in cli("--help").out
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"predict", "export", "info"} <= set(names)
    for name in names:
        res = cli(name, "--help")
        assert res.code == 0 and "Examples:" in res.out, name
