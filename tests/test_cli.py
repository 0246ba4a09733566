"""cvarch/cli.py: the console scripts' thin @hydra.main wrappers (their import cost is in test_imports)."""

from __future__ import annotations

import re
from pathlib import Path

from cvarch.config import CONFIG_DIR
from tests.conftest import run_main


def test_help_says_what_cvarch_is_and_gives_every_group_a_line():
    proc = run_main("cvarch-train", "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("cvarch-train: train one classic CNN")
    described = set(re.findall(r"^  (\w+)\s{2,}\S", proc.stdout, flags=re.M))
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert groups - {"hydra"} <= described, groups - described
    assert "model: alexnet, alexnet_tv," in proc.stdout  # each group's options, from conf/
