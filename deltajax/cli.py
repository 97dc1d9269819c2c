"""The one template of the entry points in scripts/: flag errors and user errors as one line.

    from deltajax import cli

    _CONFIG = cli.define_run_config("config", "configs/rtn4.py", "Compression config file.")

    def main(argv):
        cli.no_extra_args(argv)
        run_config = _CONFIG.value          # a deltajax.config.RunConfig, overrides applied
        ...

    if __name__ == "__main__":
        cli.run(main)

`run(main)` is `absl.app.run(main)` plus: a flag the parser rejects (missing required flag,
bad enum value, unknown flag) and every user error the library raises (a missing file, a bad
checkpoint, a delta for another base, a config field that does not exist: `OSError`,
`ValueError` and their subclasses `CheckpointError`, `DeltaError`, `WrongBaseError`,
`TenantError`, `ConfigError`) are printed as ONE line ``error: <message>`` on stderr with exit
code 1 and no traceback. ``DELTAJAX_TRACEBACK=1`` or ``--verbosity=1`` re-raises them (for
debugging). Library logs (orbax, absl) stay at WARNING unless ``--verbosity`` is given
(`quiet_logs`). On a multi-host job, ``[tag] ...`` lines reach stdout from process 0 only
(`deltajax.progress.MainOnlyStdout`; progress bars: `deltajax.progress.bar`).
Run-config overrides ``--config.<field>=v`` / ``--config.method.<field>=v`` are taken out of
argv before absl parses it and applied, typed, by `deltajax.config.apply_overrides`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags

from deltajax import config as C
from deltajax import jax_cache, progress

# flags defined here (the run-config flag) belong to the script that calls define_run_config
flags.disclaim_key_flags()

_REPO = Path(__file__).resolve().parents[1]

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, app.UsageError)

_CONFIG_FLAGS: dict[str, _RunConfigFlag] = {}


class _RunConfigFlag:
    """Holder of a run-config flag: `.value` is the loaded `RunConfig` (after `run` parsed it)."""

    def __init__(self, name: str):
        self.name = name
        self.overrides: list[tuple[str, str]] = []
        self._value: C.RunConfig | None = None
        self._loaded = False

    def load(self) -> C.RunConfig:
        flag = flags.FLAGS[self.name]
        path = Path(flag.value).expanduser()
        if not path.is_absolute() and (not flag.present or not path.exists()):
            shipped = _shipped_config(path)
            if shipped is not None:
                path = shipped  # the default configs/x.py: the package's, whatever the cwd
        cfg = C.load_config(path, flag=self.name)
        self._value = C.apply_overrides(cfg, self.overrides, flag=self.name)
        self._loaded = True
        return self._value

    @property
    def value(self) -> C.RunConfig:
        if not self._loaded:
            self.load()
        return self._value


def _shipped_config(path: Path) -> Path | None:
    """``configs/<name>.py`` of the checkout beside the package, else of the installed package
    `deltajax_configs` (the wheel ships configs/ under that name; see setup.py)."""
    if (_REPO / path).exists():
        return _REPO / path
    if len(path.parts) != 2 or path.parts[0] != "configs":
        return None
    spec = importlib.util.find_spec("deltajax_configs")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / path.name).is_file():
            return Path(root) / path.name
    return None


def define_run_config(name: str, default: str | None, help: str, *,
                      required: bool = False) -> _RunConfigFlag:
    """A ``--<name>=configs/x.py`` flag whose file returns a `RunConfig`, plus typed overrides
    ``--<name>.<field>=v`` and ``--<name>.method.<field>=v`` of every field (None defaults too).
    """
    run_fields = ", ".join(f for f in C.RUN_FIELDS if f != "method")
    flags.DEFINE_string(
        name, default,
        f"{help} A configs/*.py file whose get_config() returns a deltajax.config.RunConfig. "
        f"Override any field with --{name}.<field>=value ({run_fields}), any field of the "
        f"method with --{name}.method.<field>=value (e.g. --{name}.method.rank=64; 'None' sets "
        f"an optional field back to None), or swap the method with --{name}.method=<name>.",
        required=required)
    holder = _RunConfigFlag(name)
    _CONFIG_FLAGS[name] = holder
    return holder


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """(argv without config overrides, {flag name: [(key, text), ...]}) for the defined
    run-config flags; both ``--config.a.b=v`` and ``--config.a.b v`` are accepted."""
    rest, found = [argv[0]] if argv else [], {n: [] for n in _CONFIG_FLAGS}
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        hit = next((n for n in _CONFIG_FLAGS if a.startswith(f"--{n}.")), None)
        if hit is None:
            rest.append(a)
            i += 1
            continue
        body = a[len(hit) + 3:]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(argv):
            key, text = body, argv[i + 1]
            i += 1
        else:
            raise app.UsageError(f"--{hit}.{body} needs a value (--{hit}.{body}=...)")
        found[hit].append((key, text))
        i += 1
    return rest, found


class UserError(ValueError):
    """A user mistake re-raised with the flag it came from (`about`)."""


@contextlib.contextmanager
def about(flag: str):
    """Prefix user errors raised inside with ``--flag: `` (e.g. a model that does not load)::

        with cli.about("base"):
            base, cfg, tok, _ = load_model(FLAGS.base)
    """
    try:
        yield
    except UserError:
        raise
    except USER_ERRORS as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        raise UserError(msg if msg.startswith(f"--{flag}") else f"--{flag}: {msg}") from e


def check_out(out: str, overwrite: bool, *, inputs: Sequence[str | None] = (),
              models: Sequence[str | None] = (), flag: str = "out") -> None:
    """Check an output directory flag before any work (``--out: ...`` errors): it must be absent,
    empty or `overwrite`-able, writable, and never be, contain or lie inside an input.

    Args:
      out: the output directory.
      overwrite: the script's --overwrite.
      inputs: input paths (files or directories; None and missing ones are skipped).
      models: model arguments ('smollm2', HF dirs, converted checkpoints): their directories are
        inputs too.
      flag: the flag named in errors.
    """
    from deltajax.io import params_ckpt, resolve

    paths = [*inputs, *(resolve.model_path(m) for m in models)]
    with about(flag):
        params_ckpt.check_destination(out, overwrite, inputs=paths)


def no_extra_args(argv: Sequence[str]) -> None:
    """Raise a usage error for positional arguments (absl passes them through to main)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def fail(message: str) -> None:
    """Print ``error: <message>`` (one line) on stderr and exit 1."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(1)


def _debug() -> bool:
    """Tracebacks of user errors asked for: DELTAJAX_TRACEBACK=1 or --verbosity >= 1."""
    if os.environ.get("DELTAJAX_TRACEBACK", "") not in ("", "0"):
        return True
    v = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
    return bool(v is not None and v.present and v.value >= 1)


def quiet_logs() -> None:
    """Library logs (orbax, absl, jax) at WARNING unless --verbosity was given: the user's
    output is progress bars and results."""
    import logging as py_logging

    from absl import logging

    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    for name in ("orbax", "absl", "jax", "tensorstore"):
        py_logging.getLogger(name).setLevel(py_logging.WARNING)


_HELP = {"--help": True, "-h": True, "-?": True, "--helpshort": True, "--helpfull": False}


def _parse_flags(argv: list[str]) -> list[str]:
    given = [a for a in argv[1:] if a in _HELP]
    if given:  # absl's help flags exit 1; a help request is not a failure
        app.usage(shorthelp=_HELP[given[0]], writeto_stdout=True)
        sys.exit(0)
    try:
        rest, found = split_overrides(argv)
        for name, ov in found.items():
            _CONFIG_FLAGS[name].overrides = ov
        return flags.FLAGS(rest)
    except (flags.Error, app.UsageError) as e:
        if _debug():
            raise
        fail(str(e))


def run(main: Callable[[list[str]], None], *,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """`absl.app.run(main)` with flag and user errors as one ``error:`` line, exit code 1.

    Args:
      main: the script's ``main(argv)``.
      user_errors: further exception types that are the user's mistake (e.g. ImportError
        for a missing optional dependency).
    """
    errors = USER_ERRORS + tuple(user_errors)

    def wrapped(argv):
        quiet_logs()
        jax_cache.enable()  # the persistent compilation cache (deltajax/jax_cache.py)
        stdout = sys.stdout
        sys.stdout = progress.MainOnlyStdout(stdout)  # '[tag] ...' lines: process 0 only
        try:
            for holder in _CONFIG_FLAGS.values():
                if flags.FLAGS[holder.name].value is not None:
                    holder.load()  # a bad file or override fails before any work
                elif holder.overrides:
                    raise app.UsageError(f"--{holder.name}.{holder.overrides[0][0]} given "
                                         f"without --{holder.name}=<file>")
            main(argv)
        except SystemExit as e:  # sys.exit("error: ...") of a library helper: one line too
            if isinstance(e.code, str) and not _debug():
                fail(e.code.removeprefix("error: "))
            raise
        except errors as e:
            if _debug():
                raise
            msg = str(e) or type(e).__name__
            if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
                msg = f"{e.filename}: {msg}"
            fail(msg)
        finally:
            if isinstance(sys.stdout, progress.MainOnlyStdout):
                sys.stdout.flush()
                sys.stdout = stdout

    app.run(wrapped, flags_parser=_parse_flags)


# ------------------------------------------------------------------ console entry points
# ``deltajax-<name>`` (pyproject.toml [project.scripts]) runs ``scripts/<name>.py``: installed as
# the module ``deltajax_scripts.<name>`` (setup.py); in a checkout that is not installed, the
# file beside the package; through `run`, exactly as ``python scripts/<name>.py`` does.

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
    run(mod.main, user_errors=_USER_ERRORS.get(name, ()))


def entry_convert() -> None:
    _run("convert")


def entry_compress() -> None:
    _run("compress")


def entry_export() -> None:
    _run("export_hf")


def entry_generate() -> None:
    _run("generate")


def entry_eval() -> None:
    _run("eval")


def entry_finetune() -> None:
    _run("finetune")


def entry_demo() -> None:
    _run("demo")


__all__ = ["USER_ERRORS", "UserError", "about", "check_out", "define_run_config", "fail",
           "no_extra_args", "run", "split_overrides"]
