"""Typed run configs: one frozen dataclass per compression run; the method is a field.

A config file (``configs/*.py``) defines ``get_config()`` returning a `RunConfig`; variants are
built with ``dataclasses.replace``::

    from deltajax.config import RunConfig
    from deltajax.methods import LowRank

    def get_config():
        return RunConfig(method=LowRank(ratio=1 / 16), calib_seq_len=128)

Scripts load it with `load_config` and apply command-line overrides with `apply_overrides`:
``--config.<field>=value`` for a run field and ``--config.method.<field>=value`` for a field of
the method, typed by the dataclass annotations (``int``, ``float``, ``bool``, ``str``,
``int | None``, tuples ...), so a field whose default is None (``LowRank.rank``) takes an
``int`` like any other; ``--config.method=gptq`` swaps the method for the registered one with
its defaults (later ``method.*`` overrides apply to it). Unknown fields and values that do not
parse raise `ConfigError` naming the key and the fields that exist.

A leaf module (standard library only at import time): `deltajax.methods` is imported inside the
functions that build or check methods, so any module may import this one.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltajax.methods import Method


class ConfigError(ValueError):
    """A config file, field or override value that cannot be used (names the file / key)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One compression run: the method for the projections and the options around it."""

    # The method compressing the seven projections (a `deltajax.methods` dataclass); the other
    # leaves follow `methods.default_rules(method, keep_other=...)`.
    method: Method
    # Embeddings, lm_head, norms and biases keep a bf16 delta (False: the base value is used).
    keep_other: bool = True
    # PRNG seed of the run (per-leaf keys are folded from it and the leaf name).
    seed: int = 0
    # BitDelta scale-distillation steps (the paper: 200); 0 = no distillation.
    distill_steps: int = 0
    # Calibration / distillation text (a jsonl or raw text file); None: the GSM8K train split.
    calib_data: str | None = None
    # Calibration token windows for methods that calibrate (0: their data-free mode).
    calib_windows: int = 64
    # Tokens per calibration window (also the distillation sequence length).
    calib_seq_len: int = 256
    # Windows per calibration forward (bounds activation memory).
    calib_batch_size: int = 8
    # GPTQ-style true-sequential order within a layer ([q,k,v] → [o] → [gate,up] → [down]).
    true_sequential: bool = True

    def __post_init__(self):
        from deltajax.methods import Method

        if not isinstance(self.method, Method):
            raise ConfigError(f"RunConfig.method must be a deltajax.methods dataclass (e.g. "
                              f"RTN(bits=4)), got {type(self.method).__name__}")
        if self.calib_data == "":
            object.__setattr__(self, "calib_data", None)

    def to_dict(self) -> dict:
        """JSON-able form (stored in a delta checkpoint's meta.json); `from_dict` inverts it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["method"] = self.method.to_config()
        return d


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def from_dict(d: Mapping, *, where: str = "config") -> RunConfig:
    """A `RunConfig` from a mapping ``{"method": {"name": ..., **fields}, **run fields}``.

    Missing run fields take the dataclass defaults; unknown keys raise `ConfigError`.
    """
    d = dict(d)
    if "method" not in d:
        raise ConfigError(f"{where}: a run config needs a 'method' entry (e.g. "
                          "{'method': {'name': 'rtn', 'bits': 4}})")
    unknown = sorted(set(d) - set(RUN_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown config field(s) {unknown} (fields of RunConfig: "
                          f"{', '.join(RUN_FIELDS)})")
    from deltajax.methods import Method, method_from_config

    m = d.pop("method")
    if not isinstance(m, Method):
        m = method_from_config(dict(m))
    return RunConfig(method=m, **d)


def as_run_config(spec: Any, *, where: str = "config") -> RunConfig:
    """`RunConfig` as is; a mapping (or ml_collections ConfigDict) through `from_dict`."""
    if isinstance(spec, RunConfig):
        return spec
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        return from_dict(spec, where=where)
    raise ConfigError(f"{where}: expected a RunConfig, got {type(spec).__name__}")


def load_config(path: str | Path, *, flag: str = "config") -> RunConfig:
    """``get_config()`` of a config file; errors name the flag and the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--{flag}: config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"deltajax_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise ConfigError(f"--{flag}: {p} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"--{flag}: {p} defines no get_config()")
    return as_run_config(mod.get_config(), where=f"--{flag}={p}")


def load_base(name: str, here: str | Path):
    """A sibling config module (for variants: ``_base = load_base("deltacome_16", __file__)``)."""
    p = Path(here).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"deltajax_config_{name}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------- overrides


def _field_types(cls) -> dict[str, Any]:
    from deltajax.methods import Method

    hints = typing.get_type_hints(cls, localns={"Method": Method})
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_number(text: str, kind: type):
    t = text.strip()
    try:
        v = ast.literal_eval(t)
    except (ValueError, SyntaxError):
        v = None
    if v is None and "/" in t:  # 1/16
        num, _, den = t.partition("/")
        try:
            v = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            v = None
    if kind is int:
        if isinstance(v, bool) or not (isinstance(v, int) or
                                       (isinstance(v, float) and v.is_integer())):
            raise ValueError("expected an integer")
        return int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("expected a number")
    return float(v)


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _tupled(v):
    return tuple(_tupled(x) for x in v) if isinstance(v, (list, tuple)) else v


def parse_value(text: str, tp: Any):
    """`text` (from the command line) as a value of annotation `tp`; ValueError if it is not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(" or ".join(errors) + (" or None" if type(None) in args else ""))
    if origin is typing.Literal:
        for a in typing.get_args(tp):
            if str(a) == text:
                return a
        raise ValueError(f"expected one of {list(typing.get_args(tp))}")
    if tp is bool:
        return _parse_bool(text)
    if tp in (int, float):
        return _parse_number(text, tp)
    if tp is str:
        return text
    if tp is tuple or origin is tuple:
        try:
            v = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError("expected a tuple literal, e.g. ((8, 2), (3, 32))") from None
        if not isinstance(v, (tuple, list)):
            raise ValueError("expected a tuple literal, e.g. ((8, 2), (3, 32))")
        return _tupled(v)
    raise ValueError(f"fields of type {tp} cannot be set from the command line")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fields_line(cls) -> str:
    return ", ".join(f"{n}: {_type_name(t)}" for n, t in _field_types(cls).items()) or "none"


def apply_overrides(cfg: RunConfig, overrides: Sequence[tuple[str, str]], *,
                    flag: str = "config") -> RunConfig:
    """`cfg` with ``(key, text)`` overrides applied in order (key: ``seed``, ``method.rank``,
    ``method``). Raises `ConfigError` naming the key for unknown fields and bad values."""
    from deltajax.methods import REGISTRY

    run_types = _field_types(RunConfig)
    for key, text in overrides:
        parts = key.split(".")
        if parts == ["method"]:
            name = text.strip()
            if name not in REGISTRY:
                raise ConfigError(f"--{flag}.method={text}: unknown method; registered: "
                                  f"{', '.join(sorted(REGISTRY))}")
            cfg = dataclasses.replace(cfg, method=REGISTRY[name]())
            continue
        if parts[0] == "method" and len(parts) == 2:
            m = cfg.method
            mtypes = _field_types(type(m))
            if parts[1] not in mtypes:
                raise ConfigError(f"--{flag}.{key}: unknown config field '{key}' (fields of "
                                  f"{type(m).__name__}: {_fields_line(type(m))})")
            try:
                v = parse_value(text, mtypes[parts[1]])
                cfg = dataclasses.replace(cfg, method=dataclasses.replace(m, **{parts[1]: v}))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--{flag}.{key}={text}: {e} ({type(m).__name__}.{parts[1]} "
                                  f"is {_type_name(mtypes[parts[1]])})") from None
            continue
        if len(parts) != 1 or parts[0] not in run_types:
            raise ConfigError(f"--{flag}.{key}: unknown config field '{key}' (fields of "
                              f"RunConfig: {_fields_line(RunConfig)}; method fields as "
                              f"method.<field>)")
        try:
            v = parse_value(text, run_types[key])
        except ValueError as e:
            raise ConfigError(f"--{flag}.{key}={text}: {e} (RunConfig.{key} is "
                              f"{_type_name(run_types[key])})") from None
        cfg = dataclasses.replace(cfg, **{key: v})
    return cfg


def field_paths(cfg: RunConfig) -> dict[str, Any]:
    """Every overridable key of `cfg` (``seed``, ``method.rank`` ...) → its type annotation."""
    out = {k: t for k, t in _field_types(RunConfig).items() if k != "method"}
    out.update({f"method.{k}": t for k, t in _field_types(type(cfg.method)).items()})
    return out


__all__ = ["ConfigError", "RUN_FIELDS", "RunConfig", "apply_overrides", "as_run_config",
           "field_paths", "from_dict", "load_base", "load_config", "parse_value"]
