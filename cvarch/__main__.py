"""``python -m cvarch <tool> [overrides]``: a console script without its launcher, e.g.
``python -m cvarch train model=resnet20`` (how cvarch-bench and the quadrant sweep start fresh processes)."""

import sys

from cvarch.cli import TOOLS

if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
    sys.exit(f"usage: python -m cvarch {{{','.join(TOOLS)}}} [overrides]")
sys.argv[0:2] = [f"cvarch-{sys.argv[1]}"]  # Hydra reads the overrides from sys.argv[1:]
TOOLS[sys.argv[0].removeprefix("cvarch-")]()
