import os
import stat

import pytest

from seglab.pipeline.atomic import atomic_folder
from seglab.pipeline.errors import SeglabError


def test_a_failed_write_leaves_nothing_and_a_good_one_appears_whole(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("done")
    assert (out / "a.txt").read_text() == "done" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(SeglabError, match="already exists"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_folder_gets_the_mode_any_folder_of_the_user_gets(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "export") as tmp:
            (tmp / "a.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "export").stat().st_mode == (tmp_path / "plain").stat().st_mode
