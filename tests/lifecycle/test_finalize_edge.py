"""The lifecycle's one edge into analysis is a name, resolved when a screening job
finalizes: it must name the scorer that exists."""

from __future__ import annotations

import pkgutil

from workers.analysis.profiles import score_job
from workers.lifecycle.state import SCORE_SCREENING


def test_the_scorer_the_lifecycle_names_is_the_screening_scorer() -> None:
    assert pkgutil.resolve_name(SCORE_SCREENING) is score_job
