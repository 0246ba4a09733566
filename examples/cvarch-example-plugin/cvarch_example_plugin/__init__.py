"""An example cvarch plugin: the model ``example_net`` (:class:`cvarch_example_plugin.model.ExampleNet`).

Kept free of imports: Hydra imports this package whenever it reads ``pkg://cvarch_example_plugin.conf``.
"""
