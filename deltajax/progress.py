"""Multi-host manners: progress bars and ``[tag]`` log lines on process 0 only.

On a multi-host job (a TPU slice, a SLURM allocation) every process runs the same program; N
copies of every progress bar and log line are noise. Every tqdm bar of deltajax is made by
`bar` (disabled off process 0), library ``log=`` defaults and script prints go through `log`,
and `deltajax.cli.run` wraps stdout in `MainOnlyStdout` so that ``[tag] ...`` lines printed
anywhere reach the terminal from process 0 only (results, tables and errors are untouched).

`process_index` never initialises a JAX backend itself: before `jax.distributed.initialize()`
(or any computation) it reads the launcher's environment, since touching the backend first
would make a later `jax.distributed.initialize()` fail.
"""

from __future__ import annotations

import io
import os
import re
import sys

__all__ = ["MainOnlyStdout", "bar", "is_main", "log", "process_index"]

# launchers' process-rank variables, in the order jax.distributed's cluster detection trusts
_RANK_VARS = ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK",
              "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")
_TAG = re.compile(r"^\[[\w.-]+\] ")


def _jax_ready() -> bool:
    try:
        from jax._src import distributed, xla_bridge

        return distributed.global_state.client is not None or \
            xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without these internals: ask jax itself
        return "jax" in sys.modules


def process_index() -> int:
    """`jax.process_index()` once JAX is up; before that, the launcher's rank variable (0 for
    a single process)."""
    if _jax_ready():
        import jax

        return jax.process_index()
    for var in _RANK_VARS:
        v = os.environ.get(var, "").strip()
        if v.isdigit():
            return int(v)
    return 0


def is_main() -> bool:
    """True on process 0 (the one that shows progress and logs)."""
    return process_index() == 0


def bar(iterable=None, *, disable: bool = False, **kwargs):
    """`tqdm.auto.tqdm(iterable, **kwargs)`, disabled off process 0 (and when `disable`)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable or not is_main(), **kwargs)


def log(*args, **kwargs) -> None:
    """`print` on process 0 only (the default ``log=`` of library functions)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class MainOnlyStdout(io.TextIOBase):
    """A stdout wrapper that drops ``[tag] ...`` lines off process 0 and passes the rest.

    Lines are buffered until their newline (print writes text and end separately), so the
    decision is made per whole line; a partial line is passed on `flush` unless it is tagged.
    """

    def __init__(self, stream):
        self._s = stream
        self._buf = ""

    def _keep(self, line: str) -> bool:
        return not _TAG.match(line) or is_main()

    def write(self, text: str) -> int:
        if not self._buf and is_main():  # process 0: straight through, unbuffered
            return self._s.write(text)
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        out = "".join(ln + "\n" for ln in lines if self._keep(ln))
        if out:
            self._s.write(out)
        return len(text)

    def flush(self) -> None:
        if self._buf and self._keep(self._buf):
            self._s.write(self._buf)
            self._buf = ""
        self._s.flush()

    def isatty(self) -> bool:
        return self._s.isatty()

    def fileno(self) -> int:
        return self._s.fileno()

    @property
    def encoding(self):
        return getattr(self._s, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
