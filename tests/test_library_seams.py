"""The library's rooms (core, data, evaluation, experiments): progress reported as events, one layout detection
for every command, and the rules every package keeps (nothing prints)."""

from __future__ import annotations

import pytest
from conftest import make_class_folder, write_color_images

from rescli.core import events
from rescli.data import scan as scan_module
from rescli.data.scan import scan_dataset
from rescli.evaluation.selection import select_images


def _checking(seen: list[events.Event]) -> list[tuple[int, int | None, bool]]:
    return [(e.done, e.total, e.finished) for e in seen if e.kind == "progress" and e.task == "checking images"]


def test_image_check_reports_progress_as_events_and_to_the_callback(tmp_path, capsys):
    folder = make_class_folder(tmp_path / "d", per_class=3, size=8)
    for run in ("first", "cached"):
        seen: list[events.Event] = []
        calls: list[tuple[int, int]] = []
        with events.subscribed(seen.append):
            scan_dataset(folder, workers=2, progress=lambda done, total, calls=calls: calls.append((done, total)))
        checking = _checking(seen)
        assert checking[0] == (0, 9, False) and checking[-1] == (9, 9, True), run
        counts = [done for done, _, _ in checking]
        assert counts == sorted(counts) and all(total == 9 for _, total, _ in checking), run
        assert calls and calls[-1] == (9, 9) and [d for d, _ in calls] == counts[1:-1], run
    assert capsys.readouterr() == ("", "")  # the library says everything through events, nothing on its own


def test_image_check_says_when_it_ends_even_when_it_is_interrupted(tmp_path, monkeypatch):
    folder = make_class_folder(tmp_path / "d", per_class=2, size=8)

    def interrupted(paths, *, workers, cache_file, progress):
        progress(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "check_images", interrupted)
    seen: list[events.Event] = []
    with events.subscribed(seen.append), pytest.raises(KeyboardInterrupt):
        scan_dataset(folder)
    assert _checking(seen) == [(0, 6, False), (1, 6, False), (1, 6, True)]  # the display can go


def test_evaluate_sees_a_class_named_train_as_a_class_as_training_does(tmp_path):
    """Layout detection is one function: a train/ folder of images is a class for evaluation too, so the whole
    folder is scored as one the model was not trained on (not as a "val" split of a split root)."""
    folder = make_class_folder(tmp_path / "trains", per_class=2, size=8, classes=("red",))
    write_color_images(folder / "train", (90, 90, 90), 2, size=8)
    index = scan_dataset(folder, val_split=0.0)
    assert index.layout == "class-folders" and index.classes == ["red", "train"]
    chosen = select_images(folder, classes=["red", "train"], split=None, record=None, settings={})
    assert (chosen.split, chosen.name, chosen.held_out) == (None, "trains", True)
    assert sorted(chosen.samples) == sorted(index.splits["train"])


def test_the_check_cache_is_written_like_any_file_the_user_creates(tmp_path, monkeypatch):
    """Guard: one atomic write (core.fileio) for everything, so no cache file ends up 0600 as tempfile.mkstemp's do."""
    monkeypatch.setenv("RESCLI_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_class_folder(tmp_path / "d", per_class=2, size=8)
    scan_dataset(folder, workers=1)
    (cache_file,) = (tmp_path / "cache" / "checks").iterdir()
    probe = tmp_path / "cache" / "probe"
    probe.write_bytes(b"")
    assert cache_file.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
