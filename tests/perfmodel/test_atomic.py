"""Atomic writes: the whole new file or the old one, with ordinary permissions."""

import os
import stat

from perfmodel import atomic


def test_write_replaces_whole_file_with_umask_mode(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    atomic.write_text(p, "new")
    assert p.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
