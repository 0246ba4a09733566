"""The plugin's configs, ``conf/<group>/<option>.yaml``, added to cvarch's groups (``pkg://cvarch_example_plugin.conf``)."""
