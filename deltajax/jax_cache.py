"""The persistent XLA compilation cache, on by default in scripts and the server.

A second run of the same compress / generate / serve command reuses the executables the first
one compiled (the first layer of a calibrated Delta-CoMe compression, the decode step, every
prefill bucket) instead of paying XLA's compile time again.

Where: ``$DELTAJAX_COMPILATION_CACHE`` if set (``0`` / ``off`` turns the cache off), else jax's
own ``JAX_COMPILATION_CACHE_DIR`` if the user set it, else ``$DELTAJAX_CACHE/jax`` (default
``~/.cache/deltajax/jax``). Entries are keyed by jax / XLA version, device and the program, so a
stale entry is never used for another program.
"""

from __future__ import annotations

import os
from pathlib import Path

_OFF = ("0", "off", "false", "no", "none")


def cache_dir() -> Path | None:
    """The directory the cache uses, or None when it is turned off."""
    env = os.environ.get("DELTAJAX_COMPILATION_CACHE")
    if env is not None:
        return None if env.strip().lower() in _OFF or not env.strip() else Path(env).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    root = os.environ.get("DELTAJAX_CACHE", Path.home() / ".cache" / "deltajax")
    return Path(root).expanduser() / "jax"


def enable(*, min_compile_time_s: float = 1.0) -> Path | None:
    """Turn on jax's persistent compilation cache (see the module docstring); returns the
    directory, or None when turned off or not writable (then compiling works as without it).

    Only programs whose compilation took at least `min_compile_time_s` are stored (the ones
    worth it; tiny helper programs would only fill the directory).
    """
    d = cache_dir()
    if d is None:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK):
            return None
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d


__all__ = ["cache_dir", "enable"]
