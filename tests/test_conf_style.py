"""House style of conf/: every key carries a trailing comment (unit, paper default), as in airbench."""

from __future__ import annotations

import re
from pathlib import Path

from cvarch.config import CONFIG_DIR

FILES = sorted(Path(CONFIG_DIR).rglob("*.yaml"))
KEY_WITH_VALUE = re.compile(r"^\s*(?!- )([\w./-]+):\s+(?!#)\S")


def outside_block_scalars(text: str) -> list[tuple[int, str]]:
    """Numbered lines of a YAML text, but the bodies of block scalars (``template: |``): prose, not keys."""
    lines, block = [], None  # the indentation of the key whose block scalar is being read
    for number, line in enumerate(text.splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if block is not None and (not line.strip() or indent > block):
            continue
        block = indent if re.match(r"^\s*[\w./-]+:\s*[|>][-+]?\s*(#.*)?$", line) else None
        lines.append((number, line))
    return lines


def test_every_key_has_a_trailing_comment():
    assert len(FILES) > 100  # the whole conf/ tree was found
    missing = [
        f"{path.relative_to(CONFIG_DIR)}:{number}: {line.strip()}"
        for path in FILES
        for number, line in outside_block_scalars(path.read_text())
        if (match := KEY_WITH_VALUE.match(line)) and match.group(1) != "_target_" and " #" not in line
    ]
    assert not missing, "keys without a comment:\n" + "\n".join(missing)
