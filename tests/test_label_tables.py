"""Label tables as data (issue #15): csv, tsv, jsonl and parquet read as one row per image, columns found by name,
paths relative to the table, missing extensions found, splits from a split or is_valid column; and everything the
class-folder path guarantees (every image checked, broken and missing files named and in skipped.txt, duplicates
and leaks reported, nothing written into the data folder)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from label_tables import make_multilabel_table, make_single_label_table, write_multilabel_image, write_table

from rescli.core.errors import RescliError, UsageError
from rescli.data.scan import scan_dataset
from rescli.data.tables import TableOptions, read_label_table
from rescli.data.tasks import MULTI, SINGLE

FAST = ["--arch", "resnet20", "--weights", "none", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--precision", "fp32"]


def _pictures(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        write_multilabel_image(root / name, ("red",) if i % 2 else ("blue",), size=16, seed=i)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_table_in_each_text_format_reads_the_same_rows(tmp_path, suffix):
    _pictures(tmp_path, ["a.png", "b.png", "sub/c.png"])
    table = write_table(tmp_path / f"labels{suffix}", ["Image", "Tags", "notes"],
                        [["a.png", "cat dog", "x"], ["b.png", "dog", ""], ["sub/c.png", "cat", "y"]])
    read = read_label_table(table, options=TableOptions(multi_label=True))
    assert (read.path_column, read.label_column, read.split_column) == ("Image", "Tags", None)
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.labels) for r in read.rows] == [
        ("a.png", ("cat", "dog")), ("b.png", ("dog",)), ("sub/c.png", ("cat",))]


def test_a_parquet_table_with_list_labels(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    _pictures(tmp_path, ["a.png", "b.png"])
    pd.DataFrame({"file": ["a.png", "b.png"], "labels": [["cat", "dog"], ["dog"]], "is_valid": [False, True]}
                 ).to_parquet(tmp_path / "labels.parquet")
    read = read_label_table(tmp_path / "labels.parquet", options=TableOptions(multi_label=True))
    assert [(r.labels, r.split) for r in read.rows] == [(("cat", "dog"), "train"), (("dog",), "val")]


def test_parquet_without_pandas_names_the_extra_to_install(tmp_path, monkeypatch):
    (tmp_path / "labels.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(RescliError, match=r"pip install 'rescli\[tables\]'"):
        read_label_table(tmp_path / "labels.parquet")


def test_columns_are_named_by_flags_and_a_missing_one_is_one_clear_line(tmp_path):
    _pictures(tmp_path, ["a.png"])
    table = write_table(tmp_path / "t.csv", ["picture", "kind"], [["a.png", "cat"]])
    with pytest.raises(UsageError) as no_path:
        read_label_table(table)
    assert "no path column" in no_path.value.message and "'picture', 'kind'" in no_path.value.message
    assert "--path-column" in no_path.value.message
    with pytest.raises(UsageError, match=r"--label-column 'species': no such column"):
        read_label_table(table, options=TableOptions(path_column="picture", label_column="species"))
    read = read_label_table(table, options=TableOptions(path_column="picture", label_column="kind"))
    assert read.rows[0].labels == ("cat",)


def test_a_row_with_an_empty_label_is_named_by_its_line(tmp_path):
    _pictures(tmp_path, ["a.png", "b.png"])
    table = write_table(tmp_path / "t.csv", ["path", "label"], [["a.png", "cat"], ["b.png", "  "]])
    with pytest.raises(RescliError) as empty:
        read_label_table(table)
    assert "t.csv, line 3: empty label (column 'label')" in empty.value.message
    with pytest.raises(RescliError, match="line 3: empty label"):
        read_label_table(table, options=TableOptions(multi_label=True))


def test_paths_without_extension_absolute_paths_and_the_label_separator(tmp_path):
    _pictures(tmp_path / "imgs", ["0a1b.jpg", "0a1c.png"])
    elsewhere = tmp_path / "other" / "far.png"
    _pictures(tmp_path / "other", ["far.png"])
    table = write_table(tmp_path / "t.csv", ["id", "tags"],
                        [["imgs/0a1b", "haze;primary"], ["imgs/0a1c", "road"], [str(elsewhere), "haze"]])
    read = read_label_table(table, options=TableOptions(path_column="id", multi_label=True, label_sep=";"))
    assert [r.path for r in read.rows] == [str(tmp_path / "imgs/0a1b.jpg"), str(tmp_path / "imgs/0a1c.png"),
                                           str(elsewhere)]
    assert read.rows[0].labels == ("haze", "primary")


def test_split_and_is_valid_columns_give_the_split_and_a_bad_value_names_its_row(tmp_path):
    make_single_label_table(tmp_path / "d", per_class=4)
    rows = [line.split(",") for line in (tmp_path / "d/labels.csv").read_text().splitlines()[1:]]
    with_split = write_table(tmp_path / "d/split.csv", ["path", "label", "split"],
                             [[p, c, ("valid" if i % 4 == 0 else "test" if i % 4 == 1 else "train")]
                              for i, (p, c) in enumerate(rows)])
    index = scan_dataset(with_split)
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert not index.val_drawn
    flagged = write_table(tmp_path / "d/valid.csv", ["path", "label", "is_valid"],
                          [[p, c, "True" if i % 3 == 0 else "False"] for i, (p, c) in enumerate(rows)])
    assert len(scan_dataset(flagged).splits["val"]) == 4
    bad = write_table(tmp_path / "d/bad.csv", ["path", "label", "split"], [[*rows[0], "holdout"]])
    with pytest.raises(RescliError, match=r"bad.csv, line 2: split 'holdout'"):
        scan_dataset(bad)


def test_without_a_split_column_the_split_is_the_seeded_stratified_one_of_folders(tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=10)
    first, again = scan_dataset(table, seed=3), scan_dataset(table, seed=3)
    assert first.splits == again.splits and first.val_drawn
    assert first.counts("val") == {"blue": 2, "green": 2, "red": 2}
    assert first.layout == "table" and first.task is SINGLE and first.root == tmp_path / "d"


def test_multi_label_split_keeps_every_label_measured(tmp_path):
    table = make_multilabel_table(tmp_path / "d", n=21)
    index = scan_dataset(table, table=TableOptions(multi_label=True), seed=1)
    assert index.task is MULTI and index.classes == ["blue", "green", "red"]
    assert all(n >= 1 for n in index.counts("val").values()) and not index.warnings
    assert all(isinstance(y, tuple) for _, y in index.splits["train"])


def test_a_single_label_reading_of_a_multi_label_table_says_how_to_read_it(tmp_path):
    table = make_multilabel_table(tmp_path / "d", n=21)
    index = scan_dataset(table)
    assert any("pass --multi-label" in w for w in index.warnings)


def test_folder_options_on_a_folder_are_a_usage_error(tmp_path):
    from conftest import make_class_folder

    folder = make_class_folder(tmp_path / "f", per_class=2, size=8)
    with pytest.raises(UsageError, match="--multi-label: .* is a folder of class folders"):
        scan_dataset(folder, table=TableOptions(multi_label=True))


def test_broken_and_missing_files_are_named_skipped_and_listed_in_skipped_txt(cli, tmp_path):
    data = tmp_path / "d"
    table = make_single_label_table(data, per_class=6)
    (data / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    text = table.read_text() + "pics/broken.png,red\npics/gone.png,blue\n"
    table.write_text(text)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    res = cli("finetune", table, *FAST, "--output", tmp_path / "run")
    assert res.code == 0, res.err
    assert "skipped broken image pics/broken.png" in res.err and "skipped broken image pics/gone.png" in res.err
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in skipped] == [["broken", "pics/broken.png"], ["broken", "pics/gone.png"]]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data folder
    ckpt_data = json.loads((tmp_path / "run" / "run.json").read_text())
    assert ckpt_data["layout"] == "table" and ckpt_data["task"] == "single-label"


def test_the_run_folder_may_not_go_into_the_tables_folder(cli, tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=3)
    res = cli("finetune", table, *FAST, cwd=tmp_path / "d")  # runs/ would land beside the table
    assert res.code == 2 and "inside the data folder" in res.err
    assert not (tmp_path / "d" / "runs").exists()


def test_dataset_reports_duplicates_leaks_and_label_conflicts_of_a_table(cli, tmp_path):
    data = tmp_path / "d"
    table = make_multilabel_table(data, n=14, valid_every=2)
    images = data / "images"
    (images / "copy.png").write_bytes((images / "img_000.png").read_bytes())  # img_000 is a val row
    (images / "twin.png").write_bytes((images / "img_001.png").read_bytes())
    table.write_text(table.read_text() + "images/copy.png,red,0\nimages/twin.png,red blue,0\n")
    res = cli("dataset", table, "--multi-label", "--format", "json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert (report["layout"], report["task"], report["table"]) == ("table", "multi-label", str(table))
    groups = {tuple(g["paths"]): g for g in report["duplicates"]}
    leak = groups[("images/copy.png", "images/img_000.png")]
    assert leak["leak"] and leak["splits"] == ["train", "val"]
    twin = groups[("images/img_001.png", "images/twin.png")]
    assert twin["kind"] == "label-conflict" and twin["classes"] == ["blue red", "green"]
    shown = cli("dataset", table, "--multi-label")
    assert shown.code == 0 and "multi-label table" in shown.out and "label-conflict" in shown.out


def test_a_label_only_in_validation_rows_is_refused_by_its_row(tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=3)
    lines = table.read_text().splitlines()
    rows = [line.split(",") + ["train"] for line in lines[1:]]
    rows[0][1], rows[0][2] = "purple", "val"
    table = write_table(tmp_path / "d" / "s.csv", ["path", "label", "split"], rows)
    with pytest.raises(RescliError, match=r"s.csv, line 2: label 'purple' of a val row is in no training row"):
        scan_dataset(table)


def test_a_multi_label_table_read_as_single_label_is_refused_with_the_flag_to_pass(tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=3)
    lines = table.read_text().splitlines()
    combos = ["cat dog", "dog fox", "cat fox", "cat dog fox", "owl"]
    rows = [[line.split(",")[0], combos[i % len(combos)], "train"] for i, line in enumerate(lines[1:])]
    rows[-1][1:] = ["fox cat", "val"]  # a combination no training row has, as a class of its own
    table = write_table(tmp_path / "d" / "m.csv", ["path", "labels", "split"], rows)
    with pytest.raises(RescliError, match=r"line \d+: label 'fox cat' of a val row is in no training row.*"
                                          r"pass --multi-label"):
        scan_dataset(table)


def test_relative_table_paths_work_from_anywhere(cli, tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=4)
    os.makedirs(tmp_path / "w")
    res = cli("dataset", os.path.relpath(table, tmp_path / "w"), "--format", "json", cwd=tmp_path / "w")
    assert res.code == 0, res.err
    assert json.loads(res.out)["images"] == 12


def test_label_sep_without_multi_label_is_a_usage_error(tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=2)
    with pytest.raises(UsageError, match="add --multi-label"):
        scan_dataset(table, table=TableOptions(label_sep=";"))


def test_evaluate_on_a_single_label_table_scores_the_rows_held_out_or_a_tables_test_rows(cli, tmp_path):
    table = make_single_label_table(tmp_path / "d", per_class=6)
    res = cli("finetune", table, *FAST, "--output", tmp_path / "run")
    assert res.code == 0, res.err
    held_out = cli("evaluate", tmp_path / "run", table, "--no-files", "--format", "json", "--workers", "0")
    assert held_out.code == 0, held_out.err
    metrics = json.loads(held_out.out)
    assert (metrics["evaluated"]["split"], metrics["n"]) == ("val", 3)  # one of 6 a class (20%), held out by finetune
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    other = write_table(tmp_path / "d" / "other.csv", ["path", "label", "split"],
                        [[p, c, "test" if i % 3 == 0 else "train"] for i, (p, c) in enumerate(rows)])
    tested = cli("evaluate", tmp_path / "run", other, "--output", tmp_path / "eval", "--format", "json",
                 "--workers", "0")
    assert tested.code == 0, tested.err
    assert json.loads(tested.out)["evaluated"]["split"] == "test" and json.loads(tested.out)["n"] == 6
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    inside = cli("evaluate", tmp_path / "run", other, "--output", tmp_path / "d" / "eval")
    assert inside.code == 2 and "inside the data folder" in inside.err
