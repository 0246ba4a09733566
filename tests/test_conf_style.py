"""House style of conf/: every key carries a trailing comment (unit, paper default), as in airbench."""

from __future__ import annotations

import re
from pathlib import Path

from cvarch.config import CONFIG_DIR

FILES = sorted(Path(CONFIG_DIR).rglob("*.yaml"))
KEY_WITH_VALUE = re.compile(r"^\s*(?!- )([\w./-]+):\s+(?!#)\S")


def test_every_key_has_a_trailing_comment():
    assert len(FILES) > 100  # the whole conf/ tree was found
    missing = [
        f"{path.relative_to(CONFIG_DIR)}:{number}: {line.strip()}"
        for path in FILES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := KEY_WITH_VALUE.match(line)) and match.group(1) != "_target_" and " #" not in line
    ]
    assert not missing, "keys without a comment:\n" + "\n".join(missing)
