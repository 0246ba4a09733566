"""cvarch's configs, installed as the package ``cvarch.conf`` (``pkg://cvarch.conf``); see pyproject.toml."""
