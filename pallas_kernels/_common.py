"""Helpers shared by the op dispatchers: implementation choice, shape checks, padding.

Nothing here launches a kernel, and nothing here imports another pallas_kernels module (this
file and `packing.py` are the leaves of the package's import graph). The dispatchers
(`pallas_kernels/<op>/__init__.py`) validate the packed operands with `packing.check_packed`, ask
each backend's guard why it cannot run (a string, or None when it can), and let
`resolve_implementation` pick what runs. Each op's `IMPLEMENTATIONS` table (name -> the module or
function implementing it, in the op's `__init__.py`) is the list of names its dispatcher accepts,
besides "auto"; `check_implementation` enforces that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Streaming multiprocessors of an H100 SXM; used only when the device does not report its count.
_DEFAULT_SM_COUNT = 132


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides `n` and is <= `cap` (1 if n is odd)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def sm_count() -> int:
    """Number of SMs of the first GPU (the H100 value when no GPU is attached)."""
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(getattr(dev, "core_count", _DEFAULT_SM_COUNT))
    except RuntimeError:
        pass
    return _DEFAULT_SM_COUNT


def pad_last(x: jax.Array, k_pad: int, *, where: str) -> jax.Array:
    """Zero-pads the last axis of `x` to `k_pad` (x may already be padded)."""
    k = x.shape[-1]
    if k == k_pad:
        return x
    if k > k_pad:
        raise ValueError(f"{where}: x has {k} features but the packed weight holds K_pad={k_pad}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_pad - k)])


def split_for(tiles: int, nblocks: int, sms: int, cap: int = 32, waves: float = 1.5) -> int:
    """Smallest split-K dividing nblocks with tiles * S >= `waves` waves of SMs.

    1.5 waves came from an H100 sweep; quant/sign_matmul ask for `_triton.PACKED_WAVES` (H200
    sweep), the Mosaic GPU kernel for 4.
    """
    best = 1
    for s in range(1, min(cap, nblocks) + 1):
        if nblocks % s:
            continue
        best = s
        if tiles * s >= waves * sms:
            break
    return best


def check_dtype(x: jax.Array, *, where: str) -> None:
    """Activations must be bf16, fp16 or fp32."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: x dtype must be float32, bfloat16 or float16, got {x.dtype}")


def check_implementation(
    implementation: str, implementations, *, where: str, hints: dict[str, str] | None = None
) -> None:
    """Accepts "auto" or a key of an op's `IMPLEMENTATIONS` table.

    Args:
      implementation: the name given.
      implementations: the op's table (its keys are what is allowed besides "auto").
      where: the call's name, which starts the error message.
      hints: optional name -> advice appended when that (refused) name is given.

    Raises:
      ValueError: naming the call (`where`), the value given and every allowed value.
    """
    allowed = ("auto", *implementations)
    if implementation not in allowed:
        hint = (hints or {}).get(implementation)
        raise ValueError(
            f"{where}: implementation must be one of {allowed}, got {implementation!r}"
            + (f" ({hint})" if hint else "")
        )


def resolve_implementation(
    implementation: str,
    *,
    implementations,
    gpu_reason: str | None,
    tpu_reason: str | None,
    interpret: bool,
    where: str,
) -> str:
    """Picks "xla", "pallas_gpu" or "pallas_tpu" for an op whose table has those keys.

    `implementation` must be "auto" or a key of `implementations` (the op's `IMPLEMENTATIONS`
    table; `check_implementation`). "auto" takes the Pallas kernel of the current backend
    (`jax.default_backend()`) when its guard accepts the shapes, else the reference ("xla"); on
    CPU it is always "xla". An explicit Pallas choice that the guard refuses, or that needs
    hardware that is absent while `interpret` is False, raises a ValueError that says why.
    """
    check_implementation(implementation, implementations, where=where)
    backend = jax.default_backend()
    if implementation == "auto":
        if backend == "gpu" and gpu_reason is None:
            return "pallas_gpu"
        if backend == "tpu" and tpu_reason is None:
            return "pallas_tpu"
        return "xla"
    if implementation == "pallas_gpu":
        if gpu_reason is not None:
            raise ValueError(f"{where}: pallas_gpu cannot run this call: {gpu_reason}")
        if backend != "gpu" and not interpret:
            raise ValueError(
                f"{where}: pallas_gpu needs a GPU backend (have {backend!r}); pass interpret=True"
            )
    if implementation == "pallas_tpu":
        if tpu_reason is not None:
            raise ValueError(f"{where}: pallas_tpu cannot run this call: {tpu_reason}")
        if backend != "tpu" and not interpret:
            raise ValueError(
                f"{where}: pallas_tpu needs a TPU backend (have {backend!r}); pass interpret=True"
            )
    return implementation


def tenant_work_items(tenant_ids: jax.Array, num_tenants: int, block_m: int):
    """Sorts rows by tenant and cuts each tenant's segment into work items of <= block_m rows.

    Segment-sorted (SGMV) scheduling shared by the multi-tenant kernels: every work item is one
    tenant's run of consecutive sorted rows, so its weight is read once for up to block_m rows.

    Args:
      tenant_ids: (M,) int tenant per row; ids outside [0, num_tenants) (e.g. -1) mean "no delta".
      num_tenants: T, the number of stacked deltas.
      block_m: maximum rows per item.

    Returns:
      order: (M,) int32 permutation sorting rows by tenant (invalid ids first).
      items: (item_tenant, item_row0, item_rows), int32 vectors of the static length
        `num_items`; item_tenant is -1 for "no delta" items and unused slots (item_rows == 0).
      item_of_row: (M,) int32 item of each sorted row.
      num_items: static upper bound on the number of items.
    """
    m = tenant_ids.shape[0]
    num_items = min(m, m // block_m + min(m, num_tenants + 1))
    t = tenant_ids.astype(jnp.int32)
    t = jnp.where((t >= 0) & (t < num_tenants), t, -1)
    order = jnp.argsort(t, stable=True).astype(jnp.int32)
    ts = t[order]
    pos = jnp.arange(m, dtype=jnp.int32)
    seg_start = jnp.concatenate([jnp.ones((1,), bool), ts[1:] != ts[:-1]])
    seg_first = jax.lax.cummax(jnp.where(seg_start, pos, 0), axis=0)
    item_start = seg_start | ((pos - seg_first) % block_m == 0)
    item_of_row = jnp.cumsum(item_start.astype(jnp.int32)) - 1
    item_rows = jnp.zeros((num_items,), jnp.int32).at[item_of_row].add(1, mode="drop")
    first_row = jnp.full((num_items,), m, jnp.int32).at[item_of_row].min(pos, mode="drop")
    item_row0 = jnp.where(item_rows > 0, first_row, 0)
    item_tenant = jnp.where(item_rows > 0, ts[jnp.minimum(item_row0, m - 1)], -1)
    return order, (item_tenant, item_row0, item_rows), item_of_row, num_items


def unsort_rows(y_sorted, order, tenant_ids, num_tenants, y_base, out_dtype):
    """Puts sorted rows back in order, zeroes rows without a delta and adds y_base (fp32)."""
    out = y_sorted[jnp.argsort(order)]
    valid = (tenant_ids >= 0) & (tenant_ids < num_tenants)
    out = jnp.where(valid[:, None], out.astype(jnp.float32), 0.0)
    if y_base is not None:
        return (y_base.astype(jnp.float32) + out).astype(y_base.dtype)
    return out.astype(out_dtype)
