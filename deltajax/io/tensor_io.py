"""Tensor files of Hugging Face checkpoints: safetensors (parsed here) and PyTorch ``.bin``.

Safetensors files are parsed directly (8-byte little-endian header length, JSON header, raw
little-endian data). That reads bf16/fp8 tensors into `ml_dtypes` arrays without PyTorch, checks
every header entry (dtype, shape, offsets) and detects truncated files from their size before any
data is read, and lets `write_safetensors` stream arrays to disk one at a time. ``.bin`` files need
PyTorch and are opened with ``torch.load(weights_only=True, mmap=True)``: no arbitrary pickles,
and tensors are paged in only when read. Use it through `deltajax.io.hf`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from deltajax.errors import CheckpointError, check_finite_host

__all__ = ["TensorRef", "read_tensor", "scan_bin", "scan_safetensors", "write_safetensors"]

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
"""Safetensors dtype codes -> numpy dtypes."""
CODES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass
class TensorRef:
    """Where one stored tensor lives; its data is read only by `read_tensor`."""

    key: str  # as stored, e.g. "model.layers.0.mlp.up_proj.weight"
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int = 0  # safetensors: absolute byte range in `file`
    end: int = 0
    torch_tensor: Any = None  # .bin: a (memory-mapped) torch tensor


def short_list(keys: list[str], n: int = 4) -> str:
    """'a, b, c, d, ... (9 in all)'."""
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def scan_safetensors(
    path: Path, problems: list[str], unreadable: set[str]
) -> dict[str, TensorRef] | None:
    """Parses and checks a safetensors header without reading tensor data.

    Args:
      path: the file.
      problems: every problem found is appended here (prefixed with the file name).
      unreadable: keys the header lists but whose data cannot be read (truncated file, bad
        entry) are added here, so callers do not also report them as missing.

    Returns:
      {stored key: TensorRef} of the readable tensors, or None if the file is unusable.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problems.append(f"{name}: {size} bytes, too short to be a safetensors file")
                return None
            (hlen,) = struct.unpack("<Q", head)
            if 8 + hlen > size:
                problems.append(
                    f"{name}: header claims {hlen} bytes but the file has {size} bytes "
                    "(truncated, or not a safetensors file)"
                )
                return None
            header = json.loads(f.read(hlen))
    except OSError as e:
        problems.append(f"{name}: cannot read: {e}")
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{name}: corrupt safetensors header: {e}")
        return None
    if not isinstance(header, dict):
        problems.append(f"{name}: corrupt safetensors header (not a JSON object)")
        return None
    data_start, data_size = 8 + hlen, size - 8 - hlen
    out: dict[str, TensorRef] = {}
    beyond: list[str] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if any(s < 0 for s in shape) or not 0 <= begin <= end:
                raise ValueError("negative shape or offsets")
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{name}: bad header entry for '{key}': {info!r} ({e!r})")
            unreadable.add(key)
            continue
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            problems.append(
                f"{name}: '{key}' {info['dtype']}{list(shape)} needs {nbytes} bytes but its "
                f"data_offsets span {end - begin}"
            )
            unreadable.add(key)
        elif end > data_size:
            beyond.append(key)
            unreadable.add(key)
        else:
            out[key] = TensorRef(key, path, dtype, shape, data_start + begin, data_start + end)
    if beyond:
        need = max(int(header[k]["data_offsets"][1]) for k in beyond) + data_start
        problems.append(
            f"{name}: truncated: {size} bytes but the header needs at least {need}; "
            f"unreadable tensors: {short_list(beyond)}"
        )
    return out


def require_torch():
    """Imports torch, or raises an ImportError saying why it is needed."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading pytorch_model*.bin checkpoints needs PyTorch: pip install 'deltajax[torch]' "
            "(or convert the checkpoint to safetensors)"
        ) from e
    return torch


def _torch_to_numpy_dtype(torch, dtype) -> np.dtype | None:
    table = {
        torch.float64: np.dtype("f8"),
        torch.float32: np.dtype("f4"),
        torch.float16: np.dtype("f2"),
        torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
        torch.int64: np.dtype("i8"),
        torch.int32: np.dtype("i4"),
        torch.int16: np.dtype("i2"),
        torch.int8: np.dtype("i1"),
        torch.uint8: np.dtype("u1"),
        torch.bool: np.dtype("?"),
    }
    for name, np_dt in (
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", ml_dtypes.float8_e5m2),
    ):
        if hasattr(torch, name):
            table[getattr(torch, name)] = np.dtype(np_dt)
    return table.get(dtype)


def scan_bin(path: Path, problems: list[str], unreadable: set[str]) -> dict[str, TensorRef] | None:
    """Opens a ``.bin`` state dict (weights only, memory-mapped when the format allows).

    Same contract as `scan_safetensors`. Old non-zip ``.bin`` files cannot be memory-mapped and
    are loaded whole.
    """
    torch = require_torch()
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # old (non-zip) serialization cannot be memory-mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt or unsafe files
        problems.append(f"{path.name}: cannot load with torch.load(weights_only=True): {e}")
        return None
    if not isinstance(sd, Mapping):
        problems.append(f"{path.name}: holds a {type(sd).__name__}, not a state dict")
        return None
    out = {}
    for key, t in sd.items():
        key = str(key)
        if not isinstance(t, torch.Tensor):
            problems.append(f"{path.name}: '{key}' is a {type(t).__name__}, not a tensor")
            unreadable.add(key)
            continue
        dt = _torch_to_numpy_dtype(torch, t.dtype)
        if dt is None:
            problems.append(f"{path.name}: '{key}' has unsupported dtype {t.dtype}")
            unreadable.add(key)
            continue
        out[key] = TensorRef(key, path, dt, tuple(t.shape), torch_tensor=t)
    return out


def read_tensor(t: TensorRef, *, check_finite: bool = True) -> np.ndarray:
    """The tensor's data as a fresh host array of its stored dtype.

    Raises `errors.NonFiniteError` naming the tensor and file if a float tensor holds NaN/Inf
    (unless `check_finite` is False).
    """
    arr = _read(t)
    if check_finite:
        check_finite_host(arr, t.key, source=t.file.name)
    return arr


def _read(t: TensorRef) -> np.ndarray:
    if t.torch_tensor is not None:
        torch = require_torch()
        x = t.torch_tensor.detach().contiguous()
        if x.dtype == torch.bfloat16:
            arr = x.view(torch.int16).numpy().view(t.dtype)
        elif t.dtype.name.startswith("float8"):
            arr = x.view(torch.uint8).numpy().view(t.dtype)
        else:
            arr = x.numpy()
        return np.array(arr, copy=True)
    arr = np.empty(t.shape, t.dtype)
    with open(t.file, "rb") as f:
        f.seek(t.start)
        n = f.readinto(arr.reshape(-1).view(np.uint8))
    if n != t.end - t.start:
        problem = f"'{t.key}': read {n} of {t.end - t.start} bytes (file changed while loading?)"
        raise CheckpointError(t.file, [problem])
    return arr


def write_safetensors(
    path: Path,
    entries: list[tuple[str, Any]],
    dtypes: Mapping[str, np.dtype],
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Streams arrays to a safetensors file one at a time (device -> host -> disk).

    Args:
      path: file to write.
      entries: (key, array) pairs, written in this order; arrays may be jax or numpy.
      dtypes: {key: dtype to write}; must be in `CODES`.
      on_tensor: called with each key once its data is written (progress).

    Raises:
      errors.NonFiniteError: an array holds NaN/Inf, or a cast to the written dtype made a
        finite value Inf (a weight beyond float16's range); the file is then incomplete
        (callers write into an `atomic_dir`).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, x in entries:
        dt = np.dtype(dtypes[key])
        nbytes = int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
        header[key] = {
            "dtype": CODES[dt],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # 8-byte aligned data, as the reference implementation does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, x in entries:
            src = np.asarray(jax.device_get(x))
            with np.errstate(over="ignore"):  # an overflow is reported below, naming the key
                arr = np.ascontiguousarray(src.astype(dtypes[key], copy=False))
            check_finite_host(src, key)
            if arr.dtype != src.dtype:  # a cast may overflow (e.g. float32 -> float16)
                check_finite_host(arr, key, where=f"after casting {src.dtype} -> {arr.dtype}")
            del src
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
            if on_tensor is not None:
                on_tensor(key)
