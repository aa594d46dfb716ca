"""Search on Ray (`--executor ray`): the same report bytes as `--jobs 1`, every plan exactly once
even when a worker is killed mid-search, and one-line failures for a missing Ray or a bad
address. One local Ray instance with 2 CPUs serves the module (its startup is slow)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import STUDY_YAML, sim_for_tests
from fakes import tiny_study as _study

from perfmodel import cli
from perfmodel.search import run_search
from perfmodel.search.cli import study_variants

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def test_cli_on_its_own_local_ray_is_quiet_and_byte_identical_to_jobs_1(tmp_path, capsys):
    """As a user runs it: a fresh process starts its own local Ray (before this module's instance
    exists); stdout is the JSON alone, stderr empty, the files those of --jobs 1."""
    pytest.importorskip("ray")
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY_YAML)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "perfmodel.cli", "search", str(study), "--out", str(tmp_path / "r"),
                           "--executor", "ray", "--jobs", "2", "--json", "--top", "3"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["evaluated"] > 10
    assert cli.main(["search", str(study), "--out", str(tmp_path / "l"), "--jobs", "1", "--quiet", "--json",
                     "--top", "3"]) == 0
    files = sorted(p.name for p in (tmp_path / "l").iterdir())
    assert "plans.csv" in files and "report.html" in files
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == files
    for name in files:
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "l" / name).read_bytes(), name


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard) shared by this module's tests and shut down
    after them, so no Ray threads live on in the process while later tests fork pools; CI must
    have Ray installed."""
    if os.environ.get("CI"):
        import ray
    else:
        ray = pytest.importorskip("ray")
    # workers import this folder's modules (the dying simulator below) by name
    # HERE.parent holds the shared fakes.py the workers unpickle the fake simulator from
    paths = [str(HERE), str(HERE.parent), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def reference():
    """The tiny study searched in this process (--jobs 1): rows and the report folder's bytes."""
    study = _study()
    return run_search(study, study_variants(study, "tiny"), jobs=1, simulate_fn=sim_for_tests())


def _rows(result):
    return [(r.index, r.variant, r.plan.name, r.status, r.reason, r.metrics) for r in result.rows]


def test_ray_gives_the_same_rows_and_a_complete_progress(ray_local, reference):
    study = _study()
    calls: list[tuple[int, int]] = []
    res = run_search(study, study_variants(study, "tiny"), executor="ray", simulate_fn=sim_for_tests(),
                     progress=lambda done, total: calls.append((done, total)))
    assert _rows(res) == _rows(reference)
    todo = calls[0][1]
    assert calls[0] == (0, todo) and calls[-1] == (todo, todo) and len(calls) > 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


class DieOnce:
    """The simulator, except that the first plan it meets kills its worker process (os._exit,
    as a SIGKILL or an OOM kill would: no exception, no reply); later calls simulate."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, model, cluster, plan, profile=None, *, trace=False):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return sim_for_tests()(model, cluster, plan, profile, trace=trace)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


def test_a_killed_worker_loses_no_plan_and_counts_none_twice(ray_local, reference, tmp_path, capfd):
    study = _study()
    marker = tmp_path / "died"
    res = run_search(study, study_variants(study, "tiny"), executor="ray", simulate_fn=DieOnce(marker))
    pid = int(marker.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone: its batch was run again elsewhere
    assert _rows(res) == _rows(reference)  # each plan once, with the same outcome
    err = ""
    for _ in range(50):  # Ray reports the death asynchronously: one warning line on stderr
        out, e = capfd.readouterr()
        assert out == "", "nothing from Ray on stdout (it would break --json)"
        err += e
        if err:
            break
        time.sleep(0.1)
    assert err.startswith("moeperf search: warning: Ray: A worker died"), err
    assert all(line.startswith("moeperf search: warning: Ray:") for line in err.splitlines()), err


@pytest.mark.parametrize("args", [["--address", "1.2.3.4:5"], ["--executor", "ray", "--address", "not an address"],
                                  ["--executor", "ray", "--address", "auto", "--jobs", "2"]])
def test_bad_executor_flags_exit_2_with_one_line(tmp_path, capsys, args):
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY_YAML)
    assert cli.main(["search", str(study), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeperf: error:") and "--address" in err and "\n" not in err
    assert not (tmp_path / "tiny-search").exists()


def test_executor_ray_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY_YAML)
    assert cli.main(["search", str(study), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'moeperf[distributed]'" in err and "\n" not in err


def test_unreachable_ray_address_exits_1_with_one_line(tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a local port nobody listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY_YAML)
    # a fresh process: this one's Ray instance would be used instead of connecting
    proc = subprocess.run([sys.executable, "-m", "perfmodel.cli", "search", str(study), "--executor", "ray",
                           "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert f"127.0.0.1:{port}" in err and "\n" not in err and "Traceback" not in err
    assert proc.stdout == "" and not (tmp_path / "tiny-search").exists()
