"""The command-line programs; installed as the package `deltajax_scripts` (setup.py), run by
the console entry points in `deltajax.cli` (entry_*) or as ``python scripts/<name>.py``."""
