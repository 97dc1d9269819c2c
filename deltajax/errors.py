"""User-error types shared by every layer, and the one finiteness check of host arrays.

Both are `ValueError`s, so the scripts (`deltajax.cli`) print them as one ``error: ...`` line.

* `NonFiniteError`: a tensor holds NaN or Inf — a weight as loaded, a weight after a dtype cast
  (a value beyond the target dtype's range), or a delta given to a method's ``compress``. The
  message and `.name` name the tensor.
* `BudgetError`: a method cannot meet its budget (ratio, sparsity, bits) for a matrix shape; the
  message names the smallest budget that would work (`.min_ratio` where a ratio is at fault).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

__all__ = ["BudgetError", "CheckpointError", "NonFiniteError", "URLPathError",
           "check_finite_host", "check_local_path", "count_nonfinite", "is_url"]


class NonFiniteError(ValueError):
    """A tensor (weight or delta) holds NaN/Inf; `name` is the tensor, `count` the bad entries."""

    def __init__(self, message: str, *, name: str = "", count: int | None = None):
        super().__init__(message)
        self.name = name
        self.count = count


class BudgetError(ValueError):
    """A method cannot meet its budget for a shape; `min_ratio` is the smallest that would."""

    def __init__(self, message: str, *, min_ratio: float | None = None):
        super().__init__(message)
        self.min_ratio = min_ratio


class URLPathError(ValueError):
    """A path argument is a URL (``gs://...``) where deltajax reads or writes local files only."""


_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs",
             "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
    """True for ``scheme://...`` strings (``gs://b/x``, ``s3://``, ``file://``)."""
    return isinstance(path, str) and bool(_URL.match(path))


def check_local_path(path, what: str) -> None:
    """Raise `URLPathError` if `path` is a URL: deltajax's checkpoints, deltas and exports are
    written and read with local file I/O (atomic renames, mmap'd safetensors); a URL given to
    `pathlib` would silently become a local directory named ``gs:``.

    Args:
      path: the path as the user gave it (a str; `Path`s are local by construction).
      what: what the path is, for the message (e.g. "output directory").
    """
    if not is_url(path):
        return
    scheme = path.split("://", 1)[0].lower()
    try:
        import fsspec

        backend = fsspec.get_filesystem_class(scheme).__name__
        status = f"its fsspec backend ({backend}) is installed, but deltajax's I/O is local-only"
    except (ImportError, ValueError):
        status = (f"no {scheme}:// filesystem backend is installed (etils.epath/fsspec would "
                  f"need {_BACKENDS.get(scheme, 'a ' + scheme + ' package')})")
    raise URLPathError(
        f"{path}: {what} URLs are not supported ({status}); give a local path, e.g. a "
        f"gcsfuse/s3fs mount of the bucket, or write locally and copy")


# (unsigned view dtype, exponent mask, nan-only mask) of the ml_dtypes float formats: an entry is
# non-finite iff its exponent bits are all ones (e4m3fn has no Inf: NaN is S.1111.111).
_BIT_MASKS = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(ml_dtypes.float8_e5m2): (np.uint8, 0x7C),
    np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 0x7F),
}
_CHUNK = 1 << 24  # entries per step: bounded temporary memory for any tensor size


def count_nonfinite(arr: np.ndarray) -> int:
    """Number of NaN/Inf entries of a host array (0 for integer/bool arrays), in chunks."""
    arr = np.asarray(arr)
    dt = arr.dtype
    if dt in _BIT_MASKS:
        view, mask = _BIT_MASKS[dt]
        flat = np.ascontiguousarray(arr).reshape(-1).view(view)
        m = view(mask)
        sign_off = view(np.iinfo(view).max >> 1)  # all bits but the sign
        n = 0
        for i in range(0, flat.size, _CHUNK):
            mag = flat[i : i + _CHUNK] & sign_off
            # non-finite iff the exponent bits are all ones, i.e. |bits| >= the mask (one
            # reduction in the common all-finite case; counted only when there are some)
            if mag.size and mag.max() >= m:
                n += int(np.count_nonzero((mag & m) == m))
        return n
    if not np.issubdtype(dt, np.floating):
        return 0
    flat = arr.reshape(-1)
    return int(
        sum(
            flat[i : i + _CHUNK].size - np.count_nonzero(np.isfinite(flat[i : i + _CHUNK]))
            for i in range(0, flat.size, _CHUNK)
        )
    )


def check_finite_host(arr: np.ndarray, name: str, *, where: str = "", source=None) -> None:
    """Raise `NonFiniteError` naming `name` if the host array `arr` holds NaN/Inf.

    Args:
      arr: the array (any dtype; integer arrays always pass).
      name: the tensor's name, e.g. ``model.layers.0.mlp.up_proj.weight``.
      where: what was done to it (``"after casting float32 -> float16"``); empty: as stored.
      source: the file or directory it came from (for the message).
    """
    n = count_nonfinite(arr)
    if not n:
        return
    src = f"{source}: " if source is not None else ""
    if where:
        msg = (
            f"{src}'{name}' has {n} of {arr.size} entries NaN/Inf {where} (values beyond the "
            "target dtype's range); choose a wider --dtype (e.g. bfloat16 or float32)"
        )
    else:
        msg = (
            f"{src}'{name}' holds {n} NaN/Inf entries of {arr.size} (a corrupt checkpoint "
            "or a diverged fine-tune); refusing to use it"
        )
    raise NonFiniteError(msg, name=name, count=n)

class CheckpointError(ValueError):
    """A checkpoint (files or params tree) is malformed; `problems` lists every issue found.
    (Raised by `deltajax.io`; defined here, at the bottom layer, so every reader can raise it.)"""

    def __init__(self, source, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{self.source}: {n} problem{'s' if n != 1 else ''}:\n{lines}")
