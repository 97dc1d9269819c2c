"""Rotary position embeddings: every `rope_type` transformers 5 applies to the supported families.

One `RoPE` spec per attention kind (global layers, and sliding layers where a family gives them
their own base, e.g. Gemma 3) computes ``(cos, sin)`` tables for the positions of a forward:

    default   1 / theta^(2i/d)
    linear    default / factor
    llama3    Llama 3.1 wavelength-banded scaling
    yarn      YaRN ramp between interpolated and extrapolated frequencies,
              cos/sin * attention_factor
    longrope  short_factor or long_factor (long when max(position)+1 > original context),
              cos/sin * attention_factor
    dynamic   NTK-aware base growth once max(position)+1 exceeds max_position_embeddings

The formulas follow ``transformers/modeling_rope_utils.py`` line by line, in float32 as torch
does. `dynamic` and `longrope` depend on the positions of the call: as in transformers, the
largest position of the whole batch chunk decides. (transformers' dynamic RoPE also keeps the
largest frequency table it has grown to across calls of one model object; a stateless forward
cannot, so after a call longer than ``max_position_embeddings`` a later shorter call of
transformers' object may differ. A fresh model — `from_pretrained` then one call — is matched.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

# Keys each rope_type may carry (besides rope_type / rope_theta), as transformers validates them.
ROPE_KEYS: dict[str, tuple[frozenset, frozenset]] = {  # type -> (required, optional)
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "llama3": (
        frozenset(
            {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        ),
        frozenset(),
    ),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset(
            {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}
        ),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"factor", "attention_factor"}),
    ),
}
DYNAMIC_TYPES = ("dynamic", "longrope")  # frequencies depend on the positions of the call


@dataclasses.dataclass(frozen=True)
class RoPE:
    """One attention kind's rotary embedding (hashable: part of the static `ModelConfig`)."""

    head_dim: int
    theta: float
    max_position_embeddings: int
    scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items incl. "rope_type"

    @property
    def params(self) -> dict:
        return dict(self.scaling) if self.scaling else {}

    @property
    def rope_type(self) -> str:
        return self.params.get("rope_type", "default")

    def _base_inv(self, theta: float | np.ndarray) -> np.ndarray:
        d = self.head_dim
        return (1.0 / (np.float32(theta) ** (np.arange(0, d, 2).astype(np.float32) / d))).astype(
            np.float32
        )

    def static_tables(self) -> tuple[np.ndarray, float]:
        """(inv_freq, attention_factor) for position-independent types (and longrope's short)."""
        p, kind = self.params, self.rope_type
        inv = self._base_inv(self.theta)
        if kind in ("default", "dynamic"):
            return inv, 1.0
        if kind == "linear":
            return (inv / np.float32(p["factor"])).astype(np.float32), 1.0
        if kind == "llama3":
            factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            low_wl, high_wl = old / low, old / high
            wavelen = (2 * math.pi / inv).astype(np.float32)
            scaled = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
            smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
            mid = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
            is_mid = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            return np.where(is_mid, mid, scaled).astype(np.float32), 1.0
        if kind == "yarn":
            return self._yarn()
        if kind == "longrope":
            return self._longrope(long=False)
        raise ValueError(f"rope_type={kind!r} is not implemented")

    def _attention_factor_default(self, factor: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def _yarn(self) -> tuple[np.ndarray, float]:
        p, d = self.params, self.head_dim
        base, orig = self.theta, p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / orig
        att = p.get("attention_factor")
        if att is None:
            ms, msa = p.get("mscale"), p.get("mscale_all_dim")
            if ms and msa:

                def get(scale, m):
                    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

                att = float(get(factor, ms) / get(factor, msa))
            else:
                att = self._attention_factor_default(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def corr_dim(rot):
            return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrap_w = (1 - ramp).astype(np.float32)
        pos_freqs = (np.float32(base) ** (np.arange(0, d, 2).astype(np.float32) / d)).astype(
            np.float32
        )
        inv_extrap = (1.0 / pos_freqs).astype(np.float32)
        inv_interp = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        inv = inv_interp * (1 - extrap_w) + inv_extrap * extrap_w
        return inv.astype(np.float32), float(att)

    def _longrope(self, *, long: bool) -> tuple[np.ndarray, float]:
        p, d = self.params, self.head_dim
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / orig
        att = p.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = np.asarray(p["long_factor" if long else "short_factor"], np.float32)
        shape = np.arange(0, d, 2).astype(np.float32) / d
        inv = 1.0 / (ext * (np.float32(self.theta) ** shape).astype(np.float32))
        return inv.astype(np.float32), float(att)

    def inv_freq(self, positions: jnp.ndarray) -> tuple[jnp.ndarray, float]:
        """(inv_freq (d/2,) fp32, attention factor) for a forward over `positions`."""
        kind = self.rope_type
        if kind == "dynamic":
            p, d = self.params, self.head_dim
            mp = self.max_position_embeddings
            seq = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, mp).astype(jnp.float32)
            factor = jnp.float32(p["factor"])
            base = jnp.float32(self.theta) * ((factor * seq / mp) - (factor - 1)) ** (d / (d - 2))
            shape = jnp.arange(0, d, 2).astype(jnp.float32) / d
            return 1.0 / (base**shape), 1.0
        if kind == "longrope":
            short, att = self._longrope(long=False)
            long, _ = self._longrope(long=True)
            seq = jnp.max(positions) + 1
            orig = self.params["original_max_position_embeddings"]
            return jnp.where(seq > orig, jnp.asarray(long), jnp.asarray(short)), att
        inv, att = self.static_tables()
        return jnp.asarray(inv), att

    def cos_sin(self, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """fp32 (b, t, head_dim) cos and sin (times the attention factor) at `positions` (b, t)."""
        inv, att = self.inv_freq(positions)
        ang = positions.astype(jnp.float32)[..., None] * inv.astype(jnp.float32)
        emb = jnp.concatenate([ang, ang], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        if att != 1.0:
            cos, sin = cos * jnp.float32(att), sin * jnp.float32(att)
        return cos, sin


def rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE of x (b, t, h, d) with (b, t, d) tables (Hugging Face convention),
    computed in fp32 and cast back to x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)
