"""House style of conf/: every key carries a trailing comment (unit, paper default), as airbench's dict does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cvarch.config import CONFIG_DIR

FILES = sorted(Path(CONFIG_DIR).rglob("*.yaml"))
KEY_WITH_VALUE = re.compile(r"^\s*(?!- )([\w./-]+):\s+(?!#)\S")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in FILES])
def test_every_key_has_a_trailing_comment(path):
    missing = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = KEY_WITH_VALUE.match(line)
        if match and match.group(1) != "_target_" and " #" not in line:
            missing.append(f"{path.name}:{number}: {line.strip()}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)
