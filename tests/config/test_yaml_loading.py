"""Config YAML is read as data (kd_det/config/loading.py): Python tags and duplicate keys are
refused with the file and line named, ``_BASE_`` cycles with the chain named, and the config class
get_kd_cfg returns reads every file that way, whatever detectron2's ``allow_unsafe`` says."""

import pytest

from kd_det.config import ConfigFileError, get_kd_cfg, load_yaml


def test_yaml_python_tags_and_duplicate_keys_are_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigFileError, match=r"evil\.yaml, line 1.*safe YAML loader"):
        load_yaml(str(evil))
    assert not marker.exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text("SOLVER:\n  BASE_LR: 0.1\nMODEL:\n  DEVICE: cpu\nSOLVER:\n  MAX_ITER: 4\n")
    with pytest.raises(ConfigFileError, match=r"dup\.yaml, line 5.*'SOLVER' twice \(first at "
                       r"line 1\)"):  # fmt: skip
        load_yaml(str(dup))
    ok = tmp_path / "ok.yaml"
    ok.write_text("A:\n  B: [1, 2]\n  C: {x: 1}\nD: 'text'\n")
    assert load_yaml(str(ok)) == {"A": {"B": [1, 2], "C": {"x": 1}}, "D": "text"}


def test_merge_from_file_never_loads_unsafely(tmp_path):
    """detectron2's merge_from_file asks fvcore for allow_unsafe=True; kd_det's config ignores it,
    also in a _BASE_ file."""
    marker = tmp_path / "marker"
    (tmp_path / "base.yaml").write_text(
        f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    (tmp_path / "top.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    cfg = get_kd_cfg()
    with pytest.raises(ConfigFileError, match=r"base\.yaml, line 1"):
        cfg.merge_from_file(str(tmp_path / "top.yaml"), allow_unsafe=True)
    assert not marker.exists()


def test_base_inheritance_still_merges(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 3\n  BASE_LR: 0.5\nSEED: 4\n")
    (tmp_path / "sub" / "top.yaml").write_text("_BASE_: ../base.yaml\nSOLVER:\n  MAX_ITER: 7\n")
    cfg = get_kd_cfg()
    cfg.merge_from_file(str(tmp_path / "sub" / "top.yaml"))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SEED) == (7, 0.5, 4)
    assert type(cfg.clone()) is type(cfg)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_base_cycle_names_the_chain(tmp_path, length):
    names = [f"c{i}.yaml" for i in range(length)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"_BASE_: {names[(i + 1) % length]}\nSEED: {i}\n")
    with pytest.raises(ConfigFileError, match="_BASE_ cycle") as info:
        get_kd_cfg().merge_from_file(str(tmp_path / names[0]))
    msg = str(info.value)
    assert all(n in msg for n in names) and "Remove the _BASE_ entry" in msg
