import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.atomic import MARKER, atomic_folder


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


def test_clean_up_removes_only_the_marked_siblings_of_dead_writers_on_this_host(tmp_path):
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\nfrom seglab.pipeline.core.atomic import atomic_folder\n"
        "with atomic_folder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.txt').write_text('x')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    [abandoned] = tmp_path.glob(".out.*")

    dead, here = 99999999, socket.gethostname()  # above Linux's pid_max: no process has it
    kept = {
        ".out.99999999.mybackup": None,  # a user's folder: no marker, not our name
        ".out.99999999.0badcafe": None,  # our name, no marker
        ".out.99999999.1badcafe": {"pid": dead, "host": "other-node"},  # another host's writer: may be alive
        ".out.99999999.2badcafe": {"pid": 12345, "host": here},  # marker of another pid
        f".out.{os.getpid()}.3badcafe": {"pid": os.getpid(), "host": here},  # a live writer
        ".out.99999999.4badcafe.x": {"pid": dead, "host": here},  # not exactly our name
    }
    for name, marker in kept.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("keep")
        if marker:
            (tmp_path / name / MARKER).write_text(json.dumps({**marker, "created": 0}))
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("done")
    assert not abandoned.exists()
    assert all((tmp_path / name / "mine.txt").read_text() == "keep" for name in kept)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the marker left before the rename
