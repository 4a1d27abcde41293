"""The input paths (glm_ft.config.paths): resolved once, from where the user launched, as validation returns them."""

from __future__ import annotations

from conftest import compose
from glm_ft.config.paths import input_paths
from glm_ft.config.schema import TINY_MODEL_DIR
from glm_ft.config.validate import validate


def test_relative_paths_are_taken_from_the_launch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = input_paths(compose(["model.path=models/m", "data.data_dir=data", "data.test_file=null"]))
    assert where.model_dir == tmp_path / "models" / "m" and where.data_dir == tmp_path / "data"
    assert where.data_files["test"] is None and where.data_files["train"].parent == tmp_path / "data"
    assert not where.builds_tiny_model  # only the tiny model's own location builds a random model


def test_validation_returns_the_paths_it_checked(tmp_path):
    where = validate(compose(["experiment=quickstart"]))
    assert where.builds_tiny_model and where.model_dir.resolve() == TINY_MODEL_DIR.resolve()
    assert all(path.is_file() for path in where.data_files.values() if path is not None)
    assert validate(compose(["experiment=quickstart"]), check_paths=False) is None
