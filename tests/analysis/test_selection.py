"""Choosing samples of a job: correct against misclassified, by label, prediction or id."""

from __future__ import annotations

import numpy as np
import pytest

from workers.errors import SpecError
from workers.storage.stored_job import select

TABLE = {
    "sample": np.array(["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]),
    "label": np.array([0, 1, 1, -1, 2, 0], dtype=np.int32),
    "pred": np.array([0, 2, 1, 1, 2, 0], dtype=np.int32),
    "error_code": np.array([0, 0, 0, 0, 0, 3], dtype=np.int16),
}


def test_correct_and_misclassified_come_from_stored_labels_and_predictions() -> None:
    assert select(TABLE, correct=True).tolist() == [0, 2, 4]
    # d.png has no known label, f.png failed: neither counts as misclassified.
    assert select(TABLE, correct=False).tolist() == [1]


def test_labels_predictions_and_ids_narrow_the_selection_together() -> None:
    assert select(TABLE, label=[1, 2]).tolist() == [1, 2, 4]
    assert select(TABLE, label=1, pred=2).tolist() == [1]
    assert select(TABLE, ids=["e.png", "a.png"]).tolist() == [0, 4]


def test_an_empty_selection_or_unknown_ids_are_user_errors() -> None:
    with pytest.raises(SpecError, match="widen"):
        select(TABLE, label=1, correct=True, pred=0)
    with pytest.raises(SpecError, match=r"not in the job \(zz.png\)"):
        select(TABLE, ids=["a.png", "zz.png"])
    with pytest.raises(SpecError, match="'pred'"):
        select({"label": TABLE["label"]}, correct=True)
