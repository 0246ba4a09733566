"""cvarch/extras.py: the console filter, train.log's contents, the benign-warning list, enforce_tags,
print_config, the sweep-folder callback and the W&B group choices."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from cvarch import extras


def _record(name: str, level: int, **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    record.__dict__.update(extra)
    return record


def test_the_console_filter_drops_library_info_but_keeps_their_warnings_and_cvarchs_info():
    quiet = extras.QuietLibraries()
    assert not quiet.filter(_record("pytorch_lightning.utilities.rank_zero", logging.INFO))  # GPU available…
    assert not quiet.filter(_record("lightning_fabric.utilities.seed", logging.INFO))  # Seed set to 0
    assert quiet.filter(_record("pytorch_lightning.trainer", logging.WARNING))
    assert quiet.filter(_record("cvarch.train", logging.INFO))
    assert quiet.filter(_record("pytorch_lightning_extras", logging.INFO))  # a prefix, not a child
    assert not quiet.filter(_record("cvarch.train", logging.ERROR, file_only=True))  # the logged traceback


def test_lightnings_own_console_handler_is_replaced_by_the_root_loggers():
    lightning = logging.getLogger("pytorch_lightning")
    handler = logging.StreamHandler()
    lightning.addHandler(handler)
    lightning.propagate = False
    extras.route_library_logs()
    assert handler not in lightning.handlers and lightning.propagate
    logging.captureWarnings(False)


def test_only_the_known_benign_warnings_are_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extras.ignore_benign_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning, stacklevel=1)
        warnings.warn(
            "You have overridden `on_after_batch_transfer` in `LightningModule` but …", stacklevel=1
        )
        warnings.warn("a warning a user must see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning a user must see"]
    assert extras.benign("`isinstance(treespec, LeafSpec)` is deprecated") and not extras.benign("anything")


def test_enforce_tags_refuses_an_untagged_run_and_print_config_prints_the_tree(capsys):
    cfg = OmegaConf.create({"extras": {"enforce_tags": True}, "tags": []})
    with pytest.raises(ValueError, match=r"tags: empty, and extras.enforce_tags=true"):
        extras.apply(cfg)
    logging.captureWarnings(False)
    cfg = OmegaConf.create(
        {"extras": {"print_config": True, "print_config_order": ["model"]}, "seed": 3, "model": {"depth": 20}}
    )
    extras.apply(cfg)
    logging.captureWarnings(False)
    out = capsys.readouterr().out
    assert out.index("model") < out.index("seed") and "depth: 20" in out


def test_a_multirun_ends_by_printing_its_sweep_folder(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "multiruns" / "t")}}})
    extras.SweepFolder().on_multirun_end(config)
    assert capsys.readouterr().out.strip() == str(tmp_path / "multiruns" / "t")


def test_choices_are_hydras_group_choices_without_hydras_own(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    runtime = SimpleNamespace(
        choices={"model": "resnet56", "norm": "none", "hydra/help": "train", "debug": None}
    )
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(runtime=runtime)))
    assert extras.choices() == {"model": "resnet56", "norm": "none"}


def test_conf_local_is_an_optional_last_group_and_its_yaml_is_git_ignored():
    from cvarch.config import CONFIG_DIR

    root = (Path(CONFIG_DIR) / "train.yaml").read_text()
    defaults = root[root.index("defaults:") : root.index("\n\n")]
    assert "- optional local: default" in defaults  # a missing conf/local/default.yaml is no error
    assert defaults.index("optional local") > defaults.index("optional debug")  # after every group
    assert "/conf/local/*.yaml" in (Path(CONFIG_DIR).parent / ".gitignore").read_text().splitlines()
