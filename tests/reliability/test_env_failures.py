"""Environment failures (disk full, read-only or unwritable folder, a file where a folder should be) and
two writers on one --out: every command says it in one line naming the path and the cause, exit 1 (2 stays
bad input), and writes nothing half-way. In-process and fast; `moeperf run`'s ranks on a full disk are in
test_run_env.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from cli_harness import leftovers

from perfmodel.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
STUDY = {"kind": "study", "name": "s", "model": "tiny-moe", "cluster": "cpu-local-4", "global_batch": 8,
         "plans": [{"name": "a", "ep": 4}], "search": {"ep": [1, 2]}}
PLAN = "kind: plan\nsp: 2\nep: 2\nglobal_batch: 8\nmicro_batch: 2\n"
RUN = ["--model", "tiny-moe", "--nproc", "4", "--steps", "2", "--layers", "2", "--seq-len", "32", "--scale", "0.5"]
SIM = ["simulate", "--model", "tiny-moe", "--cluster", "cpu-local-4"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (tmp_path / "plan.yaml").write_text(PLAN)
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


def test_full_disk_while_writing_a_report_is_one_line_exit_1(files, capsys):
    """ENOSPC from the filesystem on the first output file: exit 1, the file named, nothing half-written."""
    out = files / "out"
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with mock.patch("perfmodel.atomic._write", side_effect=enospc):
        rc = cli(["search", str(files / "study.yaml"), "--out", str(out), "--quiet"])
        line = _one_line(capsys)
        assert rc == 1 and line.startswith("moeperf search: error: No space left on device (" + str(out)), line
        rc = cli([*SIM, "--plan", str(files / "plan.yaml"), "--trace", str(files / "t.json")])
        line = _one_line(capsys)
        assert rc == 1 and line == f"moeperf simulate: error: No space left on device ({files / 't.json'})", line
    assert not leftovers(out, files) and not (out / ".moeperf.lock").exists()


@pytest.mark.parametrize("cmd", ["search", "simulate", "run", "compare", "calibrate"])
def test_a_file_where_a_folder_should_be_is_one_line_exit_1(files, capsys, cmd):
    below = files / "a-file" / "sub"  # the parent is a file: the folder cannot be made
    argv = {"search": ["search", str(files / "study.yaml"), "--out", str(below), "--quiet"],
            "simulate": [*SIM, "--plan", str(files / "plan.yaml"), "--trace", str(files / "a-file" / "t.json")],
            "run": ["run", *RUN, "--plan", str(files / "plan.yaml"), "--out", str(below)],
            "compare": ["compare", str(ROOT / "studies" / "h100-1gpu.yaml"), "--out", str(below),
                        "--traces", str(ROOT / "traces")],
            "calibrate": ["calibrate", str(ROOT / "traces" / "h100-1gpu" / "mb1"), "--out", str(below / "p.yaml"),
                          "--no-figures"]}[cmd]
    if cmd == "calibrate" and not (ROOT / "traces" / "h100-1gpu" / "mb1" / "meta.yaml").is_file():
        pytest.skip("committed traces not in this checkout")
    with mock.patch("runtime.launch._launch", side_effect=AssertionError("launched")):
        rc = cli(argv)
    line = _one_line(capsys)
    assert rc == 1 and line.startswith(f"moeperf {cmd}: error: Not a directory ({files / 'a-file'}"), line


def test_read_only_folder_is_one_line_exit_1(files, capsys):
    """EROFS/EACCES on --out: from the filesystem if we are not root (root ignores chmod), else injected."""
    ro = files / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        rc = cli(["search", str(files / "study.yaml"), "--out", str(ro), "--quiet"])
        line = _one_line(capsys)
        assert rc == 1 and line == f"moeperf search: error: Permission denied ({ro / '.moeperf.lock'})", line
        ro.chmod(0o755)
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)

    with mock.patch("os.open", side_effect=read_only):
        rc = cli(["run", *RUN, "--plan", str(files / "plan.yaml"), "--out", str(ro)])
    line = _one_line(capsys)
    assert rc == 1 and line == f"moeperf run: error: Read-only file system ({ro / '.moeperf.lock'})", line


def test_bad_input_stays_exit_2(files, capsys):
    """A flag naming the wrong kind of path is bad input, not the environment."""
    assert cli([*SIM, "--plan", str(files / "plan.yaml"), "--trace", str(files)]) == 2
    assert "is a folder" in _one_line(capsys)
    assert cli(["search", str(files / "study.yaml"), "--out", str(files / "a-file")]) == 2
    assert "not a directory" in _one_line(capsys)


HOLD = """
import sys, time
from pathlib import Path
from perfmodel import outlock
lock = outlock.acquire(Path(sys.argv[1]), "search")
print("held", flush=True)
time.sleep(120)
"""


def test_two_writers_on_one_out(files, capsys):
    """A live holder: search and run refuse at once naming its pid (exit 1). A dead holder (SIGKILL, its
    lock file left behind): the next command takes the lock over, says so, and runs."""
    out = files / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = cli(["search", str(files / "study.yaml"), "--out", str(out), "--quiet"])
        line = _one_line(capsys)
        assert rc == 1 and line.startswith(f"moeperf search: error: {out} is in use by moeperf search (pid "
                                           f"{holder.pid} on "), line
        with mock.patch("runtime.launch._launch", side_effect=AssertionError("launched")):
            rc = cli(["run", *RUN, "--plan", str(files / "plan.yaml"), "--out", str(out)])
        line = _one_line(capsys)
        assert rc == 1 and f"is in use by moeperf search (pid {holder.pid} " in line, line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (out / ".moeperf.lock").exists()  # a dead holder leaves its file; the kernel dropped the lock
    rc = cli(["search", str(files / "study.yaml"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"took over the lock of pid {holder.pid} (search), which is no longer running" in err
    assert (out / "plans.csv").is_file() and not (out / ".moeperf.lock").exists()
