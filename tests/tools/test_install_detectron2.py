"""The detectron2 installer's path selection, tested without network access."""

import importlib.util
import os

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "install_detectron2", os.path.join(REPO, "tools", "install_detectron2.py")
)
inst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inst)


@pytest.mark.parametrize(
    "importable,reachable,expected",
    [(True, True, "keep"), (True, False, "keep"), (False, True, "source"), (False, False, "pypi")],
)
def test_choose_path(importable, reachable, expected):
    assert inst.choose_path(importable, reachable) == expected


def test_forced_path_is_validated():
    assert inst.choose_path(True, False, forced="pypi") == "pypi"
    with pytest.raises(
        ValueError, match="Unknown detectron2 install path 'conda'.*keep, source, pypi"
    ):
        inst.choose_path(False, False, forced="conda")


def test_source_path_builds_pinned_commit_without_build_isolation():
    (cmd,) = inst.commands_for("source", python="py")
    assert cmd[:4] == ["py", "-m", "pip", "install"]
    assert "--no-build-isolation" in cmd
    assert cmd[-1].endswith("detectron2.git@" + inst.DETECTRON2_COMMIT)
    assert len(inst.DETECTRON2_COMMIT) == 40


def test_pypi_path_unpacks_py310_wheel_and_installs_runtime_deps():
    wheel_cmd, deps_cmd = inst.commands_for("pypi", python="py", site_packages="/sp")
    assert "--no-deps" in wheel_cmd and "sal-detectron2==0.7.2" in wheel_cmd
    i = wheel_cmd.index("--python-version")
    assert wheel_cmd[i + 1] == "3.10"
    assert wheel_cmd[wheel_cmd.index("--target") + 1] == "/sp"
    names = {d.split("<")[0].split(">")[0].split("=")[0] for d in deps_cmd[4:]}
    for needed in ("fvcore", "iopath", "pycocotools", "omegaconf", "hydra-core", "yacs"):
        assert needed in names
    assert "setuptools<81" in deps_cmd  # detectron2.model_zoo imports pkg_resources


def test_keep_path_runs_nothing():
    assert inst.commands_for("keep") == []


def test_main_dry_run_reports_the_path(monkeypatch, capsys):
    monkeypatch.setattr(inst, "detectron2_importable", lambda python=None: False)
    monkeypatch.setattr(inst, "github_reachable", lambda *a, **k: False)
    assert inst.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "path (pypi)" in out and "GitHub unreachable" in out
    assert "sal-detectron2==0.7.2" in out

    monkeypatch.setattr(inst, "github_reachable", lambda *a, **k: True)
    inst.main(["--dry-run"])
    assert "path (source)" in capsys.readouterr().out


def test_github_probe_fails_fast_on_unresolvable_host():
    assert inst.github_reachable(host="nonexistent.invalid", timeout=2.0) is False
