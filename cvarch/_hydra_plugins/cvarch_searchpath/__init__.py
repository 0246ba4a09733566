"""cvarch's Hydra search-path plugin: cvarch's configs, and the installed cvarch plugins', in every Hydra app.

Hydra imports every module of the ``hydra_plugins`` namespace at start-up and calls each
:class:`~hydra.plugins.search_path_plugin.SearchPathPlugin` on the config search path of the app. This one
appends ``pkg://cvarch.conf``, so a user's own ``@hydra.main`` app can use ``model=resnet20`` beside its own
groups, and then ``pkg://<package>.conf`` of each installed cvarch plugin (:mod:`cvarch.plugins`), so
``cvarch-train`` finds their options. An entry already on the path (cvarch's own apps, whose primary config is
``pkg://cvarch.conf``) is not added twice.

This file is installed as ``hydra_plugins/cvarch_searchpath/__init__.py``: pyproject.toml maps the
``hydra_plugins`` namespace to ``cvarch/_hydra_plugins``.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from cvarch.plugins import plugin_config_modules

# cvarch.config.CONFIG_MODULE, not imported from there: cvarch.config imports torch
CVARCH_CONFIG_PATH = "pkg://cvarch.conf"


class CvarchSearchPathPlugin(SearchPathPlugin):
    """Appends cvarch's configs and the installed cvarch plugins' configs to the config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        present = {element.path for element in search_path.get_path()}
        for path in (CVARCH_CONFIG_PATH, *(f"pkg://{module}" for module in plugin_config_modules())):
            if path not in present:
                search_path.append(provider="cvarch", path=path)
