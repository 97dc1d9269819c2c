"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions over a params tree.

Params are nested dicts with Hugging Face names (without the leading ``model.``) and HF
``(out, in)`` layout::

    params["embed_tokens"]["weight"]                         (vocab, hidden)
    params["layers"][i]["input_layernorm"]["weight"]         (hidden,)
    params["layers"][i]["self_attn"]["q_proj"]["weight"]     (heads*head_dim, hidden)  (+ "bias")
    params["layers"][i]["self_attn"]["{k,v}_proj"]["weight"] (kv_heads*head_dim, hidden) (+ "bias")
    params["layers"][i]["self_attn"]["o_proj"]["weight"]     (hidden, heads*head_dim)
    params["layers"][i]["post_attention_layernorm"]["weight"]
    params["layers"][i]["mlp"]["{gate,up}_proj"]["weight"]   (intermediate, hidden)
    params["layers"][i]["mlp"]["down_proj"]["weight"]        (hidden, intermediate)
    params["norm"]["weight"]
    params["lm_head"]["weight"]                               absent when embeddings are tied

`forward` runs a full sequence, or a chunk of one against a `KVCache` (prefill and decode use the
same code). Every projection goes through `ops.linear`, so a weight leaf may be a dense array or a
delta-carrying operand.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from deltajax import ops

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("rope_type", value), ("factor", value), ... as a sorted tuple so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2, Llama attention_bias)
    o_proj_bias: bool = False  # Llama attention_bias=True also biases o_proj
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @functools.cached_property
    def inv_freq(self) -> np.ndarray:
        return ops.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)

    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in jax.tree.leaves(param_shapes(self), is_leaf=_is_shape))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected params tree with shape tuples as leaves (used to validate checkpoints)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def proj(out, inp, bias):
        p = {"weight": (out, inp)}
        if bias:
            p["bias"] = (out,)
        return p

    layer = {
        "input_layernorm": {"weight": (d,)},
        "self_attn": {
            "q_proj": proj(qd, d, cfg.attention_bias),
            "k_proj": proj(kvd, d, cfg.attention_bias),
            "v_proj": proj(kvd, d, cfg.attention_bias),
            "o_proj": proj(d, qd, cfg.o_proj_bias),
        },
        "post_attention_layernorm": {"weight": (d,)},
        "mlp": {
            "gate_proj": proj(cfg.intermediate_size, d, cfg.mlp_bias),
            "up_proj": proj(cfg.intermediate_size, d, cfg.mlp_bias),
            "down_proj": proj(d, cfg.intermediate_size, cfg.mlp_bias),
        },
    }
    tree = {
        "embed_tokens": {"weight": (cfg.vocab_size, d)},
        "layers": [layer] * cfg.num_hidden_layers,
        "norm": {"weight": (d,)},
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"weight": (cfg.vocab_size, d)}
    return jax.tree.map(lambda s: s, tree, is_leaf=_is_shape)  # fresh copy of the layer dicts


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params (normal(0, scale) weights, ones + noise for norms) for tests and benchmarks."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=_is_shape)[0]]
    out = []
    for k, shape, path in zip(keys, leaves, paths):
        w = jax.random.normal(k, shape, jnp.float32) * scale
        if "norm" in path:
            w = 1.0 + w
        out.append(w.astype(dtype))
    return jax.tree.unflatten(treedef, out)


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers of `max_len` slots; `length` of them are filled.

    `valid` (batch, max_len) marks slots holding real tokens (False for left padding and for slots
    not yet written), so left-padded batches attend only to their own tokens.
    """

    k: tuple  # per layer (batch, max_len, kv_heads, head_dim)
    v: tuple
    valid: jax.Array  # (batch, max_len) bool
    length: jax.Array  # () int32

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        z = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(
            k=z, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
            valid=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def _proj(x, p):
    return ops.linear(x, p["weight"], p.get("bias"))


def _attn_mask(cfg, q_slots, k_slots, k_valid):
    """(b, t, s) mask: causal by slot, key validity, optional sliding window."""
    m = k_slots[None, None, :] <= q_slots[None, :, None]
    if cfg.sliding_window is not None:
        m = m & (q_slots[None, :, None] - k_slots[None, None, :] < cfg.sliding_window)
    return m & k_valid[:, None, :]


def decoder_layer(
    cfg: ModelConfig, p: dict, h: jax.Array, positions: jax.Array, mask: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None = None, write_at: jax.Array | None = None,
    taps: dict | None = None,
):
    """One decoder layer. With `kv`, new keys/values are written into it at slot `write_at`
    (a scalar for every row, or a (batch,) array: one slot per row).

    With `taps` (a dict), the inputs of the linears are recorded into it under the names of the
    sub-blocks that share them: "qkv" (input of q/k/v_proj), "o", "gate_up", "down" (calibration
    capture; the values are traced arrays when called under jit).

    Returns (h, (k_all, v_all)): the layer output and the keys/values attended to.
    """
    b, t, _ = h.shape
    hd = cfg.head_dim
    x = ops.rms_norm(h, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
    a = p["self_attn"]
    if taps is not None:
        taps["qkv"] = x
    q = _proj(x, a["q_proj"]).reshape(b, t, cfg.num_attention_heads, hd)
    k = _proj(x, a["k_proj"]).reshape(b, t, cfg.num_key_value_heads, hd)
    v = _proj(x, a["v_proj"]).reshape(b, t, cfg.num_key_value_heads, hd)
    q = ops.apply_rope(q, positions, cfg.inv_freq)
    k = ops.apply_rope(k, positions, cfg.inv_freq)
    if kv is not None:
        ck, cv = kv
        if jnp.ndim(write_at) == 1:  # serve.engine: one write position per row (decode slots)
            k, v = _write_rows(ck, k, write_at), _write_rows(cv, v, write_at)
        else:
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, write_at, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, write_at, 0, 0))
    o = ops.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    o = o.reshape(b, t, -1)
    h = h + _proj(o, a["o_proj"])
    x = ops.rms_norm(h, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    m = p["mlp"]
    g = jax.nn.silu(_proj(x, m["gate_proj"]).astype(jnp.float32)).astype(x.dtype)
    d = g * _proj(x, m["up_proj"])
    if taps is not None:
        taps.update(o=o, gate_up=x, down=d)
    h = h + _proj(d, m["down_proj"])
    return h, (k, v)


def _write_rows(cache: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
    """cache (b, s, ...) with row r's `new[r]` (t, ...) written at slot at[r]."""
    return jax.vmap(lambda c, n, a: jax.lax.dynamic_update_slice(
        c, n.astype(c.dtype), (a,) + (0,) * (c.ndim - 1)))(cache, new, at)


def embed(params: dict, tokens: jax.Array, dtype=None) -> jax.Array:
    """Embedding rows of `tokens`. A weight with a `lookup(tokens)` method (serve.engine's
    per-row table: each batch row adds its own fine-tune's embedding delta) is asked for them."""
    w = params["embed_tokens"]["weight"]
    if hasattr(w, "lookup"):
        return w.lookup(tokens).astype(dtype or _param_dtype(w))
    return jnp.take(w, tokens, axis=0).astype(dtype or _param_dtype(w))


def _param_dtype(w):
    return getattr(w, "dtype", jnp.float32)


def unembed(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Final norm + lm_head (or tied embeddings). Returns fp32 logits."""
    h = ops.rms_norm(h, params["norm"]["weight"], cfg.rms_norm_eps)
    head = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return ops.linear(h, head["weight"]).astype(jnp.float32)


def forward(
    params: dict,
    tokens: Int[Array, "b t"],
    cfg: ModelConfig,
    *,
    positions: Int[Array, "b t"] | None = None,
    attention_mask: Array | None = None,
    cache: KVCache | None = None,
    return_hidden: bool = False,
) -> tuple[Float[Array, "b t v"], KVCache | None]:
    """Logits for `tokens`.

    Without a cache: `attention_mask` (b, t) marks real tokens (default all). With a cache: the
    tokens fill slots [cache.length, cache.length + t); `attention_mask` (b, t) marks which of the
    new tokens are real, and the returned cache holds them. `positions` default to the number of
    real tokens before each one (so left padding does not shift RoPE positions).
    Activations run in the embedding dtype (fp32 or bf16); logits are fp32.
    """
    b, t = tokens.shape
    new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        k_valid, start = new_valid, jnp.zeros((), jnp.int32)
        k_slots = jnp.arange(t)
        prev_count = jnp.zeros((b,), jnp.int32)
    else:
        start = cache.length
        k_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, start))
        k_slots = jnp.arange(cache.max_len)
        prev_count = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)
    if positions is None:
        positions = prev_count[:, None] + jnp.cumsum(new_valid, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)
    q_slots = start + jnp.arange(t)
    mask = _attn_mask(cfg, q_slots, k_slots, k_valid)

    h = embed(params, tokens)
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        h, (k, v) = decoder_layer(cfg, lp, h, positions, mask, kv, start)
        new_k.append(k)
        new_v.append(v)
    if cache is not None:
        cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=k_valid, length=start + t)
    if return_hidden:
        return h, cache
    return unembed(cfg, params, h), cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params, tokens, cfg, attention_mask=None):
    """Jitted full-sequence logits (no cache)."""
    return forward(params, tokens, cfg, attention_mask=attention_mask)[0]
