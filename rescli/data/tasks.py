"""The label type of a data set and of the model trained on it: single-label (one class per image) or multi-label
(any number of labels per image, possibly none).

This module says what a label is for each task: how a sample's label is held (a class index, or the sorted
indices of the image's labels), what a training target looks like (an index for cross-entropy, a 0/1 vector for
binary cross-entropy), how the label is stored in a checkpoint, and which classes it counts for. Each step of the
pipeline asks the task for what differs and keeps one implementation per task where it acts: the objective in
rescli.train.step, the metrics in rescli.evaluation.metrics, the result rows in rescli.inference.scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from rescli.core.errors import RescliError

if TYPE_CHECKING:  # torch is imported where a target is made: reading a folder or a table stays light
    import torch

SINGLE_LABEL = "single-label"


MULTI_LABEL = "multi-label"


TASKS = (SINGLE_LABEL, MULTI_LABEL)


#: A sample's label: a class index (single-label), or the sorted class indices of an image's labels (multi-label).
Label = Union[int, tuple[int, ...]]


class Task:
    """What one task's labels are. Stateless: the two instances below are all there is."""

    name: str
    #: Which probability a model's logits turn into, for humans reading metadata.
    activation: str

    def target(self, label: Label, n_classes: int) -> Any:
        """What the loss is computed against for one sample."""
        raise NotImplementedError

    def empty_targets(self, n_classes: int) -> torch.Tensor:
        """The targets of a batch without images, in the shape a full batch's would have."""
        raise NotImplementedError

    def classes_of(self, label: Label) -> tuple[int, ...]:
        """The class indices a label counts for (one, or the image's labels)."""
        raise NotImplementedError

    def record(self, label: Label) -> int | list[int]:
        """The label as a checkpoint stores it (weights-only loadable: ints and lists)."""
        raise NotImplementedError

    def from_indices(self, indices: Sequence[int]) -> Label:
        """The label of an image with the classes ``indices`` (single-label: exactly one)."""
        raise NotImplementedError

    def from_record(self, value: Any) -> Label:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # One instance per task, also in the other processes of a distributed run (an index is sent pickled):
        # code asks ``task is MULTI``.
        return task_named, (self.name,)


class SingleLabel(Task):
    name = SINGLE_LABEL
    activation = "softmax"

    def target(self, label: Label, n_classes: int) -> int:
        return int(label)  # type: ignore[arg-type]

    def empty_targets(self, n_classes: int) -> torch.Tensor:
        import torch

        return torch.zeros(0, dtype=torch.long)

    def classes_of(self, label: Label) -> tuple[int, ...]:
        return (int(label),)  # type: ignore[arg-type]

    def record(self, label: Label) -> int:
        return int(label)  # type: ignore[arg-type]

    def from_indices(self, indices: Sequence[int]) -> int:
        (only,) = indices
        return int(only)

    def from_record(self, value: Any) -> int:
        return int(value)


class MultiLabel(Task):
    name = MULTI_LABEL
    activation = "sigmoid"

    def target(self, label: Label, n_classes: int) -> torch.Tensor:
        import torch

        hot = torch.zeros(n_classes, dtype=torch.float32)
        hot[list(self.classes_of(label))] = 1.0
        return hot

    def empty_targets(self, n_classes: int) -> torch.Tensor:
        import torch

        return torch.zeros(0, n_classes, dtype=torch.float32)

    def classes_of(self, label: Label) -> tuple[int, ...]:
        return tuple(label) if isinstance(label, (tuple, list)) else (int(label),)

    def record(self, label: Label) -> list[int]:
        return [int(i) for i in self.classes_of(label)]

    def from_indices(self, indices: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in indices))

    def from_record(self, value: Any) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in value)) if isinstance(value, (list, tuple)) else (int(value),)


SINGLE = SingleLabel()


MULTI = MultiLabel()


def task_named(name: str | None) -> Task:
    """The task a model file or a run names; files from before tasks existed are single-label."""
    if name is None or name == SINGLE_LABEL:
        return SINGLE
    if name == MULTI_LABEL:
        return MULTI
    raise RescliError(f"unknown task {str(name)[:40]!r}: expected {' or '.join(TASKS)}")


def class_counts(task: Task, labels: Iterable[Label], classes: Sequence[str]) -> dict[str, int]:
    """Images per class (multi-label: an image counts once for each of its labels)."""
    out = dict.fromkeys(classes, 0)
    for label in labels:
        for i in task.classes_of(label):
            out[classes[i]] += 1
    return out


def label_text(task: Task, label: Label, classes: Sequence[str], *, sep: str = " ") -> str:
    """A label as people read it: the class name, or the image's labels joined by ``sep``."""
    return sep.join(classes[i] for i in task.classes_of(label))


def task_field_problem(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, problem) where a model file's ``task`` or ``thresholds`` cannot be used; None when they can (absent
    is fine: single-label, and thresholds of 0.5)."""
    name = meta.get("task", SINGLE_LABEL)
    if name not in TASKS:
        return "task", f"expected {' or '.join(TASKS)}"
    thresholds = meta.get("thresholds")
    if thresholds is None:
        return None
    classes = meta.get("classes") or []
    numbers = isinstance(thresholds, (list, tuple)) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t <= 1
        for t in thresholds)
    if not numbers:
        return "thresholds", "expected one probability from 0 to 1 per class"
    if len(thresholds) != len(classes):
        return "thresholds", f"{len(thresholds)} values for {len(classes)} classes (one per class expected)"
    return None
