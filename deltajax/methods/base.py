"""The method protocol: everything a compression method may declare is a field of `Method`.

A method is a frozen, keyword-only, hashable dataclass (a valid `jax.jit` static argument) with

* ``compress(delta, *, key=None, stats=None) -> container`` (jit-able; containers live in
  `deltajax.containers`),
* ``decompress(container) -> (out, in) fp32 delta`` (the mathematical reference),
* ``matmul(x, container) -> x @ decompress(container).T`` (reference or Pallas kernel).

Adding a method = one file in `deltajax/methods/` (a `Method` subclass) + one line in
`methods.REGISTRY` + one entry in the shared method test cases (`tests/test_methods.py`). If it
needs a new container, the container declares its bytes, layout and serving paths in
`deltajax.containers`; nothing else in the tree learns its name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from deltajax.errors import BudgetError


def ceil_sig(x: float, digits: int = 3) -> float:
    """`x` rounded UP to `digits` significant digits (a stated minimum ratio that works)."""
    if x <= 0:
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return float(f"{math.ceil(x / 10**e - 1e-9) * 10**e:.{digits}g}")


def ratio_range_error(method: str, ratio, *, below_one: bool = True) -> BudgetError | None:
    """A `BudgetError` for a ratio outside (0, 1) ((0, 1] with below_one=False), else None."""
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    if number and (0 < ratio < 1 if below_one else 0 < ratio <= 1):
        return None
    hi = "1)" if below_one else "1]"
    why = (" (a ratio >= 1 stores at least as many bytes as the 16-bit delta itself: store "
           "it densely with the keep method instead)" if below_one and number and ratio >= 1
           else "")
    return BudgetError(f"{method}: ratio must be in (0, {hi}, got {ratio!r}{why}")


def check_int_range(owner: str, field: str, value, lo: int, hi: int | None = None) -> None:
    """Raise ValueError naming ``owner.field`` unless `value` is an int in [lo, hi]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo \
        and (hi is None or value <= hi)
    if not ok:
        want = f"an int in {lo}..{hi}" if hi is not None else f"an int >= {lo}"
        raise ValueError(f"{owner}.{field} must be {want}, got {value!r}")


def method_dataclass(cls):
    """Decorator: frozen, keyword-only, hashable dataclass (a static jit argument)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@method_dataclass
class Method:
    """Base class of compression methods. Subclasses set `name` and implement the three calls.

    Class-level declarations (override in a subclass; read by the compress and serve steps):
    """

    name: ClassVar[str] = "base"
    # True when compress uses calibration statistics (`containers.LinearStats` of the leaf's
    # inputs, gathered layer by layer by `steps.calibrate`).
    needs_stats: ClassVar[bool] = False
    # With needs_stats: compress also runs without statistics (its data-free mode).
    data_free_ok: ClassVar[bool] = False
    # False for a delta that is not applied on the fly by `attach` but merged into the base
    # weight (`Keep`: embeddings, norms, biases stored densely).
    on_the_fly: ClassVar[bool] = True
    # True when `steps.bitdelta_distill` can tune the method's per-matrix scales against the
    # fine-tune's logits (`compress(..., distill_steps=N)`).
    distillable: ClassVar[bool] = False

    @property
    def mergeable(self) -> bool:
        """False when `decompress` cannot give the whole delta as one weight (e.g. an output bias
        remains): calibration then applies it on the fly, and `merge` refuses it."""
        return True

    @property
    def stats_pool_size(self) -> int | None:
        """Windows per pool of the pooled statistics this method asks calibration for (Bolaco's
        `LinearStats.pool_cov`); None: not computed."""
        return None

    def linear_part(self, c) -> jax.Array:
        """The (out, in) matrix part of a container (what relative errors compare); for most
        methods the whole `decompress`."""
        return self.decompress(c)

    def extra_rules(self) -> tuple:
        """`tree.Rule`s placed before the default ones by `methods.default_rules` (e.g. DSnoT's
        MLP projections without refinement). Default: none."""
        return ()

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raise `errors.BudgetError` if this method cannot compress a delta of `shape` (out, in)
        within its budget (ratio, sparsity, bits); the message names the smallest budget that
        would work for the shape (`BudgetError.min_ratio` where a ratio is at fault).

        Called by `containers.compress_leaf` before every compress (so no method writes an
        empty or over-budget container) and by `delta.check_budgets` over a model's shapes
        before any weight is loaded. Checks that need no shape (ranges of fields) belong in the
        subclass's ``__post_init__``. Default: every shape is fine.
        """

    def budget_note(self) -> str | None:
        """One line on how the nominal budget was set (for the compress report), or None."""
        return None

    def compress(self, delta: jax.Array, *, key: jax.Array | None = None, stats: Any = None):
        raise NotImplementedError

    def decompress(self, c) -> jax.Array:
        raise NotImplementedError

    def matmul(self, x: jax.Array, c) -> jax.Array:
        """Default: dense reference `x @ decompress(c).T` (fp32 accumulation)."""
        w = self.decompress(c)
        return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w,
                          precision=jax.lax.Precision.HIGHEST).astype(x.dtype)

    def to_config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}
