"""The plugin system: the ``Plugin`` base class, the pluggy manager, the planner, and the built-in plugins."""
