"""tools/install_detectron2.py's path selection, run as ``make setup`` runs it, without network.

The script only uses the standard library (it runs before anything is installed). Each test runs
its command line with ``--dry-run``: a stand-in interpreter (``--python``) decides whether
detectron2 "imports", and ``--probe`` points the GitHub check at a local port that answers or at
a host that does not resolve.
"""

import shlex
import socket
import stat
import sys

import pytest

from conftest import REPO
from kd_det.utils.testing import run_tool

COMMIT_RE = "detectron2.git@"


def _python(tmp_path, importable):
    """An interpreter whose ``-c "import detectron2"`` succeeds or fails as asked; anything else
    runs this interpreter."""
    path = tmp_path / ("py_with_d2" if importable else "py_without_d2")
    code = 0 if importable else 1
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ] && [ "$2" = "import detectron2" ]; then exit {code}; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def github():
    """A local port that accepts connections: a reachable "GitHub"."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        yield f"127.0.0.1:{srv.getsockname()[1]}"


UNREACHABLE = "nonexistent.invalid:443"


def _install(*args, env=None):
    env = {"KD_DET_D2_INSTALL": "", **(env or {})}
    proc = run_tool(REPO, "install_detectron2.py", ["--dry-run", *args], timeout=60, env=env)
    return proc


def _commands(stdout):
    """The pip commands the dry run prints (``[install_detectron2] $ ...``)."""
    return [line.split(" $ ", 1)[1].split() for line in stdout.splitlines() if " $ " in line]


@pytest.mark.parametrize(
    "importable,reachable,expected",
    [(True, True, "keep"), (True, False, "keep"), (False, True, "source"), (False, False, "pypi")],
)
def test_choose_path(tmp_path, github, importable, reachable, expected):
    proc = _install("--python", _python(tmp_path, importable),
                    "--probe", github if reachable else UNREACHABLE)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"path ({expected})" in proc.stdout


def test_forced_path_is_validated(tmp_path):
    proc = _install("--python", _python(tmp_path, True), "--path", "pypi", "--probe", UNREACHABLE)
    assert proc.returncode == 0 and "path (pypi)" in proc.stdout
    proc = _install("--python", _python(tmp_path, False), "--probe", UNREACHABLE,
                    env={"KD_DET_D2_INSTALL": "conda"})  # fmt: skip
    assert proc.returncode != 0
    assert (
        "Unknown detectron2 install path 'conda'; choose one of keep, source, pypi" in proc.stderr
    )


def test_source_path_builds_pinned_commit_without_build_isolation(tmp_path):
    py = _python(tmp_path, False)
    (cmd,) = _commands(_install("--python", py, "--path", "source").stdout)
    assert cmd[:4] == [py, "-m", "pip", "install"]
    assert "--no-build-isolation" in cmd
    commit = cmd[-1].split(COMMIT_RE, 1)[1]
    assert len(commit) == 40 and int(commit, 16) >= 0


def test_pypi_path_unpacks_py310_wheel_and_installs_runtime_deps(tmp_path):
    import sysconfig

    py = _python(tmp_path, False)
    wheel_cmd, deps_cmd = _commands(_install("--python", py, "--path", "pypi").stdout)
    assert "--no-deps" in wheel_cmd and "sal-detectron2==0.7.2" in wheel_cmd
    i = wheel_cmd.index("--python-version")
    assert wheel_cmd[i + 1] == "3.10"
    # Unpacked into the target interpreter's site-packages (here the stand-in runs this one).
    assert wheel_cmd[wheel_cmd.index("--target") + 1] == sysconfig.get_paths()["purelib"]
    names = {d.split("<")[0].split(">")[0].split("=")[0] for d in deps_cmd[4:]}
    for needed in ("fvcore", "iopath", "pycocotools", "omegaconf", "hydra-core", "yacs"):
        assert needed in names
    assert "setuptools<81" in deps_cmd  # detectron2.model_zoo imports pkg_resources


def test_keep_path_runs_nothing(tmp_path):
    proc = _install("--python", _python(tmp_path, True), "--path", "keep")
    assert "path (keep)" in proc.stdout and _commands(proc.stdout) == []


def test_main_dry_run_reports_the_path(tmp_path, github):
    py = _python(tmp_path, False)
    out = _install("--python", py, "--probe", UNREACHABLE).stdout
    assert "path (pypi)" in out and "GitHub unreachable" in out
    assert "sal-detectron2==0.7.2" in out
    assert "path (source)" in _install("--python", py, "--probe", github).stdout


def test_github_probe_fails_fast_on_unresolvable_host(tmp_path):
    import time

    start = time.time()
    proc = _install("--python", _python(tmp_path, False), "--probe", UNREACHABLE)
    assert "path (pypi)" in proc.stdout
    assert time.time() - start < 10  # no 5 s connection timeout on a name that does not resolve
