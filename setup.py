"""Package layout (everything else is in pyproject.toml): the library packages, plus the
entry-point scripts (scripts/*.py) and the run configs (configs/*.py) installed as the
packages `deltajax_scripts` and `deltajax_configs`, so that the console commands
(`deltajax-compress`, ...) and their default `--config=configs/x.py` work from an installed
wheel, while `python scripts/<name>.py --config=configs/x.py` keeps working in a checkout."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["deltajax", "deltajax.*", "pallas_kernels", "pallas_kernels.*"]),
        "deltajax_scripts",
        "deltajax_configs",
    ],
    package_dir={"deltajax_scripts": "scripts", "deltajax_configs": "configs"},
)
