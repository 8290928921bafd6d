"""Opening beneath a tenant's roots: both resolvers (the kernel's openat2 and the
per-component walk) answer the same, and what they refuse is never read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.errors import InputError, SampleCode, SpecError
from workers.extraction import beneath
from workers.extraction.beneath import OutsideRoots, fd_path, open_beneath, opened
from workers.extraction.inputs import decode, discover, labels_from_csv
from workers.jobs import Preprocessing


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs on both code paths; the walk is forced where openat2 exists."""
    if request.param == "openat2" and not beneath.OPENAT2:
        pytest.skip("this kernel has no openat2")
    if request.param == "walk":
        monkeypatch.setattr(beneath, "OPENAT2", False)
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/a/b/file.bin, root/top.bin, and other/secret.bin beside the root."""
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    (tmp_path / "root" / "a" / "b" / "file.bin").write_bytes(b"mine")
    (tmp_path / "root" / "top.bin").write_bytes(b"top")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "secret.bin").write_bytes(b"theirs")
    return tmp_path


def _read(path: Path | str, roots: tuple[str, ...]) -> bytes:
    with opened(str(path), roots) as fd:
        return os.read(fd, 100)


@pytest.mark.usefixtures("resolver")
def test_a_file_beneath_a_root_is_opened_and_read(tree: Path) -> None:
    roots = (str(tree / "root"),)
    assert _read(tree / "root" / "a" / "b" / "file.bin", roots) == b"mine"
    assert _read(tree / "root" / "top.bin", roots) == b"top"


@pytest.mark.usefixtures("resolver")
def test_a_link_as_the_last_component_is_refused_even_pointing_inside(tree: Path) -> None:
    root = tree / "root"
    (root / "out.bin").symlink_to(tree / "other" / "secret.bin")
    (root / "in.bin").symlink_to(root / "top.bin")
    for link in ("out.bin", "in.bin"):
        with pytest.raises(OutsideRoots, match="symbolic link"):
            _read(root / link, (str(root),))


@pytest.mark.usefixtures("resolver")
def test_a_link_as_a_middle_component_is_refused(tree: Path) -> None:
    root = tree / "root"
    (root / "out").symlink_to(tree / "other")
    (root / "in").symlink_to(root / "a")
    with pytest.raises(OutsideRoots, match="symbolic link"):
        _read(root / "out" / "secret.bin", (str(root),))
    with pytest.raises(OutsideRoots, match="symbolic link"):
        _read(root / "in" / "b" / "file.bin", (str(root),))
    with pytest.raises(OutsideRoots, match="symbolic link"):  # even one `..` leaves at once
        _read(f"{root}/in/../top.bin", (str(root),))


@pytest.mark.usefixtures("resolver")
def test_dot_dot_may_move_inside_a_root_but_never_above_it(tree: Path) -> None:
    root = tree / "root"
    assert _read(f"{root}/a/b/../../top.bin", (str(root),)) == b"top"
    with pytest.raises(OutsideRoots, match="above its root"):
        _read(f"{root}/../other/secret.bin", (str(root),))
    with pytest.raises(OutsideRoots, match="above its root"):
        _read(f"{root}/a/../../other/secret.bin", (str(root),))


@pytest.mark.usefixtures("resolver")
def test_a_root_that_is_itself_a_link_is_followed_once_by_either_spelling(tree: Path) -> None:
    (tree / "alias").symlink_to(tree / "root")
    roots = (str(tree / "alias"),)
    assert _read(tree / "alias" / "top.bin", roots) == b"top"
    assert _read(tree / "root" / "top.bin", roots) == b"top"
    with pytest.raises(OutsideRoots):
        _read(tree / "other" / "secret.bin", roots)


@pytest.mark.usefixtures("resolver")
def test_a_path_under_no_root_is_refused_and_the_matching_root_is_found(tree: Path) -> None:
    roots = (str(tree / "root" / "a"), str(tree / "other"))
    assert _read(tree / "other" / "secret.bin", roots) == b"theirs"
    with pytest.raises(OutsideRoots, match="not inside"):
        _read(tree / "root" / "top.bin", roots)
    with pytest.raises(OutsideRoots, match="not inside"):
        _read(tree / "rootx" / "top.bin", (str(tree / "root"),))  # a prefix is not a folder
    with pytest.raises(OutsideRoots):
        _read("top.bin", (str(tree / "root"),))  # relative: under no root


@pytest.mark.usefixtures("resolver")
def test_a_missing_file_is_an_os_error_not_a_refusal(tree: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _read(tree / "root" / "none.bin", (str(tree / "root"),))


@pytest.mark.usefixtures("resolver")
def test_a_fifo_opens_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "root" / "pipe.png")
    fd = open_beneath(str(tree / "root" / "pipe.png"), (str(tree / "root"),))
    os.close(fd)
    prep = Preprocessing(size=(4, 4), channels=1)
    with pytest.raises(InputError, match="not a regular file"):
        decode(str(tree / "root" / "pipe.png"), prep, roots=(str(tree / "root"),))


@pytest.mark.usefixtures("resolver")
def test_what_was_opened_is_read_even_after_the_path_is_swapped(tree: Path) -> None:
    root = tree / "root"
    with opened(str(root / "top.bin"), (str(root),)) as fd:
        (root / "top.bin").unlink()
        (root / "top.bin").symlink_to(tree / "other" / "secret.bin")
        assert Path(fd_path(fd)).read_bytes() == b"top"


@pytest.mark.usefixtures("resolver")
def test_a_folder_swapped_for_a_link_during_a_walk_is_not_listed(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree / "root"
    (root / "sub").mkdir()
    (root / "sub" / "ok.png").write_bytes(b"x")
    real_open = os.open
    swapped: list[bool] = []

    def swap_then_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "sub" and not swapped:  # listed as a folder; now the attacker moves
            swapped.append(True)
            (root / "sub").rename(root / "moved")
            (root / "sub").symlink_to(tree / "other")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swap_then_open)
    ids = [s.id for s in discover([str(root)], (str(root),))]
    assert swapped
    assert "sub/secret.bin" not in ids
    assert "secret.bin" not in ids


@pytest.mark.usefixtures("resolver")
def test_discovery_beneath_roots_lists_links_to_refuse_and_skips_linked_folders(tree: Path) -> None:
    root = tree / "root"
    (root / "link.bin").symlink_to(tree / "other" / "secret.bin")
    (root / "folder").symlink_to(tree / "other")
    ids = [s.id for s in discover([str(root)], (str(root),))]
    assert ids == ["a/b/file.bin", "link.bin", "top.bin"]
    with pytest.raises(SpecError, match="symbolic link"):
        discover([str(root / "folder")], (str(root),))


@pytest.mark.usefixtures("resolver")
def test_decode_beneath_roots_reads_the_same_pixels_and_refuses_a_link(tree: Path) -> None:
    root = tree / "root"
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    Image.fromarray(pixels).save(root / "a.png")
    np.save(root / "a.npy", pixels[None].astype(np.float32))
    (root / "b.png").symlink_to(root / "a.png")
    prep = Preprocessing(size=(4, 4), channels=1)
    roots = (str(root),)
    for name in ("a.png", "a.npy", "top.bin"):
        np.testing.assert_array_equal(
            decode(str(root / name), prep, roots=roots), decode(str(root / name), prep)
        )
    with pytest.raises(InputError) as refused:
        decode(str(root / "b.png"), prep, roots=roots)
    assert refused.value.code == SampleCode.OUTSIDE_ROOTS
    assert str(refused.value).startswith("b.png ")
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.usefixtures("resolver")
def test_a_labels_file_reached_through_a_link_is_refused(tree: Path) -> None:
    root = tree / "root"
    (tree / "other" / "labels.csv").write_text("top.bin,1\n")
    (root / "labels.csv").symlink_to(tree / "other" / "labels.csv")
    sources = discover([str(root / "top.bin")], (str(root),))
    with pytest.raises(SpecError, match="symbolic link"):
        labels_from_csv(str(root / "labels.csv"), sources, None, 10, (str(root),))
    (root / "own.csv").write_text(f"{root / 'top.bin'},3\n")
    assert labels_from_csv(str(root / "own.csv"), sources, None, 10, (str(root),))[0] == [3]


def test_trusted_callers_keep_following_links(tree: Path) -> None:
    (tree / "root" / "in.bin").symlink_to(tree / "other" / "secret.bin")
    assert _read_trusted(tree / "root" / "in.bin") == b"theirs"


def _read_trusted(path: Path) -> bytes:
    with opened(str(path), None) as fd:
        return os.read(fd, 100)
