"""The console entry points of the package (pyproject.toml ``[project.scripts]``).

``deltajax-<name>`` runs ``scripts/<name>.py`` (installed as the module
``deltajax_scripts.<name>``; in a source checkout that is not installed, the file beside the
package) through `deltajax.cli.run`, exactly as ``python scripts/<name>.py`` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from deltajax import cli

# ImportError is a user error where an optional dependency serves one input kind (torch: .bin)
_USER_ERRORS = {"convert": (ImportError,)}


def load_script(name: str):
    """The module of ``scripts/<name>.py``: the installed ``deltajax_scripts.<name>``, else
    (a checkout) the file ``scripts/<name>.py`` next to the package."""
    try:
        return importlib.import_module(f"deltajax_scripts.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("deltajax_scripts", f"deltajax_scripts.{name}"):
            raise
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"deltajax_scripts.{name}", path)
    if spec is None or not path.exists():
        raise ModuleNotFoundError(f"deltajax_scripts.{name}: no installed module and no {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(name: str) -> None:
    mod = load_script(name)
    main = sys.modules.get("__main__")
    if main is not None:
        main.__doc__ = mod.__doc__  # absl's --help prints the __main__ docstring
    cli.run(mod.main, user_errors=_USER_ERRORS.get(name, ()))


def convert() -> None:
    _run("convert")


def compress() -> None:
    _run("compress")


def export() -> None:
    _run("export_hf")


def generate() -> None:
    _run("generate")


def eval() -> None:  # noqa: A001 - the command is deltajax-eval
    _run("eval")


def finetune() -> None:
    _run("finetune")


def demo() -> None:
    _run("demo")
