"""Exact storage accounting of compressed deltas: every stored byte, by part, and the ratios.

Bytes are the `nbytes` of the arrays actually held by each container (codes in uint32 words,
scales, zeros, singular values, factors, kept values, PRNG keys of regenerated masks), so padding
words and padded groups are counted. Static metadata (bit widths, shapes: a few bytes per matrix,
stored in meta.json) is not counted. Two ratios against a 16-bit delta:

* linear: over the leaves handled by a compressing method (the Delta-CoMe / BitDelta α);
* whole checkpoint: over every parameter, counting what `Keep` stores (embeddings, norms, ...)
  and 0 bytes for dropped deltas (the BitDelta / DeltaZip style).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from deltajax.tree import matrix_type

# container field name -> reported part
PARTS = {
    "planes": "codes", "words": "codes", "codes": "codes",
    "scale": "scales", "scales": "scales", "zero": "zeros", "zeros": "zeros",
    "s": "singular values", "u": "factors", "v": "factors",
    "values": "values", "key": "mask seeds", "mask": "masks", "g_idx": "g_idx",
    "perm": "act-order permutations", "bias": "output bias",
    "choice": "group choice",
}


def _part(path) -> str:
    for k in reversed(path):
        name = getattr(k, "name", None) or getattr(k, "key", None)
        if isinstance(name, str):
            base = name.split("_")[-1] if name not in PARTS else name
            return PARTS.get(name, PARTS.get(base, name))
    return "other"


def container_bytes(container) -> dict[str, int]:
    """{part: bytes} of one container's arrays."""
    out: dict[str, int] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(container)[0]:
        if x is None:
            continue
        part = _part(path)
        out[part] = out.get(part, 0) + int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return out


def account(compressed: Mapping, param_shapes: Mapping[str, tuple]) -> dict:
    """Accounting of `{name: DeltaLeaf}` against a model whose leaves have `param_shapes`.

    Returns a JSON-able dict: per-part bytes (linear / kept), parameter counts, bits per
    parameter, both ratios, and which leaves were kept or dropped.
    """
    lin_parts: dict[str, int] = {}
    keep_bytes = 0
    lin_params = keep_params = 0
    kept, dropped, by_method = [], [], {}
    by_type: dict[str, dict[str, int]] = {}
    for name, shape in param_shapes.items():
        n = int(np.prod(shape))
        leaf = compressed.get(name)
        if leaf is None:
            dropped.append(name)
            continue
        b = container_bytes(leaf.container)
        t = by_type.setdefault(matrix_type(name), {"leaves": 0, "params": 0, "bytes": 0})
        t["leaves"] += 1
        t["params"] += n
        t["bytes"] += sum(b.values())
        if not leaf.method.on_the_fly:  # Keep: a dense delta merged into the base
            keep_bytes += sum(b.values())
            keep_params += n
            kept.append(name)
            continue
        lin_params += n
        by_method[leaf.method.name] = by_method.get(leaf.method.name, 0) + n
        for k, v in b.items():
            lin_parts[k] = lin_parts.get(k, 0) + v
    lin_bytes = sum(lin_parts.values())
    total_params = sum(int(np.prod(s)) for s in param_shapes.values())
    total_bytes = lin_bytes + keep_bytes
    return {
        "linear_parts_bytes": lin_parts,
        "linear_bytes": lin_bytes,
        "linear_params": lin_params,
        "linear_bits_per_param": 8 * lin_bytes / max(lin_params, 1),
        "linear_ratio": 2 * lin_params / max(lin_bytes, 1),
        "kept_bytes": keep_bytes,
        "kept_params": keep_params,
        "total_params": total_params,
        "total_bytes": total_bytes,
        "total_ratio": 2 * total_params / max(total_bytes, 1),
        "methods": by_method,
        "by_type": by_type,
        "kept": kept,
        "dropped": dropped,
    }


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} GiB"


def format_table(acc: Mapping) -> str:
    """Markdown table of an `account` result."""
    lp = max(acc["linear_params"], 1)
    rows = ["| part | bytes | bits / linear param |", "|---|---:|---:|"]
    for k, v in sorted(acc["linear_parts_bytes"].items()):
        rows.append(f"| {k} | {_fmt_bytes(v)} | {8 * v / lp:.4f} |")
    rows.append(f"| **linear total** | {_fmt_bytes(acc['linear_bytes'])} | "
                f"{acc['linear_bits_per_param']:.4f} |")
    rows.append(f"| kept (bf16 delta: {len(acc['kept'])} leaves) | {_fmt_bytes(acc['kept_bytes'])}"
                f" | |")
    rows.append(f"| dropped (base used: {len(acc['dropped'])} leaves) | 0 B | |")
    if acc.get("by_type"):
        rows += ["", "| matrix type | leaves | params | bytes | ratio vs 16-bit |",
                 "|---|---:|---:|---:|---:|"]
        for k, t in sorted(acc["by_type"].items()):
            rows.append(f"| {k} | {t['leaves']} | {t['params']} | {_fmt_bytes(t['bytes'])} | "
                        f"{2 * t['params'] / max(t['bytes'], 1):.2f}x |")
    rows.append("")
    rows.append(f"linear-layer ratio vs 16-bit delta: **{acc['linear_ratio']:.2f}x** "
                f"({acc['linear_params'] / 1e6:.2f} M params); whole-checkpoint ratio: "
                f"**{acc['total_ratio']:.2f}x** ({acc['total_params'] / 1e6:.2f} M params, "
                f"{_fmt_bytes(acc['total_bytes'])} stored)")
    return "\n".join(rows)
