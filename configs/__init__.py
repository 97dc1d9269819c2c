"""The run configs (each file's get_config() returns a deltajax.config.RunConfig); installed as
the package `deltajax_configs` (setup.py), where an installed tool finds its default
``--config=configs/<name>.py``."""
