"""The experiment and integration configs, shipped with the package.

mmengine Python configs, not modules to import: the CLI finds them by name
(``arnn-plugins train pan_tiny``) through
:func:`arnn_plugins.engine.config.config_path`.
"""
