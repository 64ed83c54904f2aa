"""Label issues: the images whose given label is probably wrong, most suspect first.

Out-of-sample probabilities only: a model never judges an image it was trained on. Each image's backbone
features are computed once; a logistic-regression head is trained on K-1 folds of them and judges the K-th, so
every image is scored by a head that never saw its label (cross-validated heads on cached features: seconds,
where K fine-tunes would take K runs).

The rule is confident learning (Northcutt, Jiang and Chuang 2021, "Confident learning: estimating uncertainty in
dataset labels"), written here (cleanlab is AGPL): a class's threshold is the mean probability its own images
give it; an image is counted as belonging to the most probable of the classes whose threshold it reaches; an image
so counted in another class than its given one is an issue. So is one whose most probable class is another and whose
given label's probability is below that label's threshold: on small sets a clear mistake can fall just short of the
other class's threshold (0.96 where its images average 0.97), and then reaches no threshold at all. Suspects are
ranked by how little probability the held-out head gives the given label (1 - self-confidence, the ``score``), the
flagged ones first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rescli.core import events
from rescli.core.errors import RescliError
from rescli.insight.embed import embed_all
from rescli.insight.network import StagedNet

#: Folds of the cross-validation (fewer where the smallest class has fewer images).
FOLDS = 5


@dataclass
class Ranking:
    """Every judged image, most suspect first."""

    order: np.ndarray  # indices into the inputs, most suspect first
    suggested: np.ndarray  # per input: the label confident learning counts it under (another than given if it can)
    score: np.ndarray  # per input: 1 - the out-of-sample probability of its given label
    flagged: np.ndarray  # per input: counted under another label than the given one, or doubted (module doc)


def rank_label_issues(probs: np.ndarray, given: np.ndarray) -> Ranking:
    """Confident learning on out-of-sample ``probs`` [N, C] and given labels [N]."""
    probs = np.asarray(probs, dtype=np.float64)
    given = np.asarray(given, dtype=np.int64)
    n, c = probs.shape
    thresholds = np.full(c, np.inf)
    for j in np.unique(given):
        thresholds[j] = probs[given == j, j].mean()
    above = probs >= thresholds[None, :]
    confident = np.where(above, probs, -1.0).argmax(1)
    counted_elsewhere = above.any(1) & (confident != given)
    doubted = (probs.argmax(1) != given) & (probs[np.arange(n), given] < thresholds[given])
    flagged = counted_elsewhere | doubted
    others = probs.copy()
    others[np.arange(n), given] = -1.0
    suggested = np.where(counted_elsewhere, confident, others.argmax(1))
    score = 1.0 - probs[np.arange(n), given]
    order = np.lexsort((-score, ~flagged))  # flagged first, then by score, highest first
    return Ranking(order=order, suggested=suggested, score=score, flagged=flagged)


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, *, n_classes: int, folds: int = FOLDS,
                                seed: int = 0) -> np.ndarray:
    """[N, n_classes] probabilities, each row from a head trained on the folds that do not hold that image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    probs = np.zeros((len(labels), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold without some tiny class; convergence chatter
        for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(features, labels):
            head = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
            head.fit(features[train], labels[train])
            probs[np.ix_(test, head.classes_)] = head.predict_proba(features[test])
    return probs


def issue_rows(ranking: Ranking, *, paths: Sequence[str], given: Sequence[int], classes: Sequence[str],
               top: int | None = None, everything: bool = False) -> list[dict[str, Any]]:
    """Rows (path, given, suggested, score) most suspect first: the flagged images, or every image."""
    chosen = [int(i) for i in ranking.order if everything or ranking.flagged[i]]
    if top is not None:
        chosen = chosen[:top]
    return [{"path": paths[i], "given": classes[given[i]], "suggested": classes[int(ranking.suggested[i])],
             "score": round(float(ranking.score[i]), 6)} for i in chosen]


def find_label_issues(
    data_dir: str | os.PathLike, *, net: StagedNet, val_split: float = 0.2, seed: int = 0, folds: int = FOLDS,
    top: int | None = None, everything: bool = False, batch_size: int = 32, workers: int = 2,
) -> dict[str, Any]:
    """The label issues of a data folder (or label table), every split of it: {"rows", "images", "flagged",
    "judged", "not_judged", "folds"}. Classes with a single image cannot be judged (no fold could learn them)."""
    from rescli.data.scan import scan_dataset

    index = scan_dataset(data_dir, val_split=val_split, seed=seed)
    samples = [s for split in index.splits.values() for s in split]
    paths, features, errors = embed_all((p for p, _ in samples), net=net, batch_size=batch_size, workers=workers)
    for row in errors:
        events.warn(f"skipped {row['path']}: {row['error']}")
    label_of = dict(samples)
    labels = np.asarray([label_of[p] for p in paths], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(index.classes))
    judged = counts[labels] >= 2
    if judged.sum() < 4 or len(np.unique(labels[judged])) < 2:
        raise RescliError(f"{data_dir}: too few images to judge labels (need two classes with 2+ images each)")
    lonely = sorted({index.classes[y] for y in labels[~judged]})
    if lonely:
        events.warn(f"not judged: class(es) with a single image ({', '.join(lonely)})")
    keep = np.flatnonzero(judged)
    probs = out_of_sample_probabilities(features[keep], labels[keep], n_classes=len(index.classes), folds=folds,
                                        seed=seed)
    ranking = rank_label_issues(probs, labels[keep])
    kept_paths = [paths[i] for i in keep]
    rows = issue_rows(ranking, paths=kept_paths, given=labels[keep].tolist(), classes=index.classes, top=top,
                      everything=everything)
    return {"rows": rows, "images": len(paths), "judged": int(len(keep)), "flagged": int(ranking.flagged.sum()),
            "not_judged": int((~judged).sum()), "root": str(index.root)}
