"""Installed cvarch plugins: packages that add options to cvarch's config groups (a model, a dataset, …).

A plugin is an installed distribution with an entry point in the group ``cvarch.plugins`` whose value names
its package (see ``examples/cvarch-example-plugin``)::

    [project.entry-points."cvarch.plugins"]
    example = "cvarch_example_plugin"

- Its configs live in ``<package>/conf/<group>/<option>.yaml``, in the package ``<package>.conf`` (it needs an
  ``__init__.py``), read as ``pkg://<package>.conf``. cvarch's Hydra search-path plugin
  (``hydra_plugins.cvarch_searchpath``) appends it after cvarch's own configs, so
  ``cvarch-train model=<option>`` finds them, and ``cvarch-train --help`` lists them. cvarch's own options
  come first: a plugin adds options, it cannot replace one of cvarch's.
- Its package is trusted as cvarch is: installing it is the consent, so a received checkpoint or run folder
  may build the targets of its configs without ``trust=[<package>]`` (see :mod:`cvarch.config`).

Discovery reads the installed distributions' metadata only: no plugin package is imported here. This module
imports only the standard library, because Hydra imports it at start-up through the search-path plugin.
"""

from __future__ import annotations

import functools
import re
import warnings
from importlib.metadata import entry_points

GROUP = "cvarch.plugins"  # the entry-point group plugins register in

PACKAGE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a dotted package name (plugins, trust=[…])


@functools.cache
def _packages() -> tuple[str, ...]:
    """The plugin packages, sorted by entry-point name, once per process."""
    packages = []
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: (ep.name, ep.value)):
        if PACKAGE_NAME.fullmatch(ep.value.strip()):
            packages.append(ep.value.strip())
        else:  # a broken plugin must not stop every Hydra app of the environment
            warnings.warn(
                f"cvarch plugin {ep.name!r}: entry point value {ep.value!r} is not a package name "
                f'(expected e.g. {ep.name} = "mypackage"); ignored',
                stacklevel=2,
            )
    return tuple(dict.fromkeys(packages))


def plugin_packages() -> list[str]:
    """The packages of the installed cvarch plugins (the values of their ``cvarch.plugins`` entry points)."""
    return list(_packages())


def plugin_config_modules() -> list[str]:
    """The config packages of the installed cvarch plugins, ``<package>.conf``, in search-path order."""
    return [f"{package}.conf" for package in _packages()]
