"""The command-line programs; installed as the package `deltajax_scripts` (setup.py), run by
the console entry points of `deltajax.entry_points` or as ``python scripts/<name>.py``."""
