"""The app's run config (pyproject's [tool.flwr.app.config]) and the ServerApp's typed settings agree.

Flower refuses a `--run-config` key that the app does not declare, so a setting the ServerApp knows but
pyproject lacks can never be set; one that pyproject declares but the ServerApp lacks fails every run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from federation.server_app import RunSettings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _declared() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_every_setting_is_declared_and_every_declared_key_is_a_setting():
    settings = {f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)}
    assert sorted(settings - set(_declared())) == []
    assert sorted(set(_declared()) - settings) == []


def test_declared_defaults_are_the_settings_defaults():
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunSettings)}
    for key, value in _declared().items():
        assert value == fields[key], key


def test_declared_defaults_pass_the_checks(tmp_path: Path):
    paths = {"run-dir": str(tmp_path / "run"), "registry": str(tmp_path / "reg"), "parity-images": str(tmp_path)}
    settings = RunSettings.from_run_config({**_declared(), **paths})
    assert settings.train_top == _declared()["train-top"]
    with pytest.raises(ValueError, match="train-top"):
        RunSettings.from_run_config({**_declared(), **paths, "train-top": "everything"})
    with pytest.raises(ValueError, match="augmentation 'sepia'"):
        RunSettings.from_run_config({**_declared(), **paths, "augment": "sepia"})
    with pytest.raises(ValueError, match="clean-view-p 1.5 is not within"):
        RunSettings.from_run_config({**_declared(), **paths, "clean-view-p": 1.5})
    with pytest.raises(ValueError, match="logit-adjustment -1.0 is not within"):
        RunSettings.from_run_config({**_declared(), **paths, "logit-adjustment": -1.0})
    with pytest.raises(ValueError, match="detail must be"):
        RunSettings.from_run_config({**_declared(), **paths, "detail": 4})
    with pytest.raises(ValueError, match="test-views 'sideways'"):
        RunSettings.from_run_config({**_declared(), **paths, "test-views": "sideways"})


def test_test_views_reach_the_contract(tmp_path: Path):
    from federation.server_app import build_contract_from_settings

    paths = {"run-dir": str(tmp_path / "run"), "registry": str(tmp_path / "reg"), "parity-images": str(tmp_path)}
    for views in ("none", "flips", "dihedral", "turns-zooms"):
        settings = RunSettings.from_run_config({**_declared(), **paths, "test-views": views})
        assert build_contract_from_settings(settings).test_views == views


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_logit_adjustment_reaches_every_sites_loss(tmp_path: Path, tau: float):
    """The server's train config, as a site reads it back: logit adjustment replaces the class weights."""
    from federation.client_app import local_train_config, site_seed
    from federation.server_app import train_config_record

    paths = {"run-dir": str(tmp_path / "run"), "registry": str(tmp_path / "reg"), "parity-images": str(tmp_path)}
    settings = RunSettings.from_run_config({**_declared(), **paths, "logit-adjustment": tau, "seed": 7})
    record = train_config_record(settings, "{}", "layout")
    record["server-round"] = 3
    config = local_train_config(record, "bccd")
    assert config.logit_adjustment == tau
    assert config.class_balanced is (tau == 0.0)
    assert (config.epochs, config.lr, config.batch_size) == (settings.local_epochs, settings.lr, settings.batch_size)
    assert config.seed == site_seed(7, 3, "bccd") and config.proximal_mu == 0.0
