"""The input drawn beside a tenant's maps is read beneath the job's roots, like the worker
reads it: a source swapped for a link is refused, never drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.extraction.inputs import OutsideRoots
from workers.pictures.report_job import input_image

PREP = {"size": [4, 4], "channels": 1}


def test_a_source_beneath_the_roots_is_drawn_as_the_trusted_reader_draws_it(
    tmp_path: Path,
) -> None:
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.bin").write_bytes(bytes(range(200)))
    for name in ("a.png", "a.bin"):
        drawn = input_image(str(tmp_path / name), PREP, (str(tmp_path),))
        assert drawn is not None
        np.testing.assert_array_equal(drawn, input_image(str(tmp_path / name), PREP))


@pytest.mark.parametrize("name", ["b.png", "b.bin"])
def test_a_source_swapped_for_a_link_is_refused_not_drawn(tmp_path: Path, name: str) -> None:
    (tmp_path / "root").mkdir()
    outside = tmp_path / f"outside{Path(name).suffix}"
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(outside, format="PNG")
    (tmp_path / "root" / name).symlink_to(outside)
    with pytest.raises(OutsideRoots):
        input_image(str(tmp_path / "root" / name), PREP, (str(tmp_path / "root"),))
    assert input_image(str(tmp_path / "root" / name), PREP) is not None  # trusted: followed
