"""The decoder of every supported family (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Gemma 1/2/3 text,
OLMo 2, Phi-3) as pure functions over a params tree: one forward, family differences are data
(`ModelConfig` fields: activation, norm layout and offset, q/k norms, embedding scale, soft-caps,
per-layer attention kinds with their own RoPE, fused projections).

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

Family variants of a layer: ``self_attn.{q,k}_norm`` (Qwen3, Gemma 3: (head_dim,); OLMo 2: the
whole projection width), ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` (Gemma
2/3 "sandwich" norms; OLMo 2 has post-norms only and no ``input_layernorm``), Phi-3's fused
``self_attn.qkv_proj`` ((heads + 2 kv_heads) * head_dim, hidden) and ``mlp.gate_up_proj``
(2 * intermediate, hidden).

`forward` runs a full sequence, or a chunk of one against a `KVCache` (prefill and decode use the
same code). Every projection goes through `ops.linear`, so a weight leaf may be a dense array or a
delta-carrying operand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from deltajax import ops
from deltajax.rope import RoPE, rotate

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


LAYER_KINDS = ("full_attention", "sliding_attention")
NORM_LAYOUTS = ("pre", "sandwich", "post")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder. Hashable, so it can be a static jit argument.

    The defaults are Llama's; every other family sets the fields that make it differ.
    """

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
    # Window of the sliding-attention layers (Mistral v0.1: every layer, when layer_types is None).
    sliding_window: int | None = None
    model_type: str = "llama"
    # Per-layer "full_attention" / "sliding_attention" (Qwen2 max_window_layers, Gemma 2/3).
    layer_types: tuple[str, ...] | None = None
    # RoPE of sliding layers where it differs from the global one (Gemma 3 rope_local_base_freq).
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    hidden_act: str = "silu"  # the gate activation of the GLU MLP (Gemma: gelu_pytorch_tanh)
    norm_offset: bool = False  # Gemma RMSNorm: normalize * (1 + w), in fp32
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size) in the activation dtype
    # "pre": x + attn(norm(x)) (Llama); "sandwich": x + norm(attn(norm(x))) with
    # pre/post_feedforward_layernorm around the MLP (Gemma 2/3); "post": x + norm(attn(x))
    # (OLMo 2: no input_layernorm; post_attention/post_feedforward_layernorm).
    norm_layout: str = "pre"
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma 3); "proj": whole (OLMo 2)
    query_pre_attn_scalar: float | None = None  # softmax scale 1/sqrt(this) (Gemma 2/3)
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(logits / cap)
    fused_qkv: bool = False  # Phi-3 self_attn.qkv_proj
    fused_gate_up: bool = False  # Phi-3 mlp.gate_up_proj
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is a router ("gate", a linear
    # hidden -> num_experts) over num_experts GLU experts of moe_intermediate_size; each token
    # takes the softmax top-k experts (weights renormalized over the k when norm_topk_prob).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or any(
                t not in LAYER_KINDS for t in self.layer_types
            ):
                raise ValueError(
                    f"layer_types={self.layer_types}: expected {self.num_hidden_layers} "
                    f"entries from {LAYER_KINDS}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but no sliding_window")
        if self.norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout={self.norm_layout!r}: expected one of {NORM_LAYOUTS}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {ACTIVATIONS}")
        if self.qk_norm not in (None, "head", "proj"):
            raise ValueError(f"qk_norm={self.qk_norm!r}: expected None, 'head' or 'proj'")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def layer_kind(self, i: int) -> str:
        """"full_attention" or "sliding_attention" for layer `i`."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    def window(self, kind: str) -> int | None:
        return self.sliding_window if kind == "sliding_attention" else None

    @functools.cached_property
    def ropes(self) -> dict[str, RoPE]:
        """The RoPE of each attention kind."""
        glob = RoPE(self.head_dim, self.rope_theta, self.max_position_embeddings, self.rope_scaling)
        if self.sliding_rope_theta is None:
            local = glob
        else:
            local = RoPE(self.head_dim, self.sliding_rope_theta, self.max_position_embeddings,
                         self.sliding_rope_scaling)
        return {"full_attention": glob, "sliding_attention": local}

    @functools.cached_property
    def inv_freq(self) -> np.ndarray:
        """Inverse frequencies of the global RoPE (position-independent rope types only)."""
        return self.ropes["full_attention"].static_tables()[0]

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

    a = {}
    if cfg.fused_qkv:
        a["qkv_proj"] = proj(qd + 2 * kvd, d, cfg.attention_bias)
    else:
        a.update(q_proj=proj(qd, d, cfg.attention_bias), k_proj=proj(kvd, d, cfg.attention_bias),
                 v_proj=proj(kvd, d, cfg.attention_bias))
    a["o_proj"] = proj(d, qd, cfg.o_proj_bias)
    if cfg.qk_norm == "head":
        a.update(q_norm={"weight": (hd,)}, k_norm={"weight": (hd,)})
    elif cfg.qk_norm == "proj":
        a.update(q_norm={"weight": (qd,)}, k_norm={"weight": (kvd,)})
    inter = cfg.intermediate_size
    if cfg.num_experts:
        block, (gn, un, dn) = moe_names(cfg)
        mi = cfg.moe_intermediate_size or inter
        expert = {gn: proj(mi, d, False), un: proj(mi, d, False), dn: proj(d, mi, False)}
        moe = {"gate": {"weight": (cfg.num_experts, d)}, "experts": [expert] * cfg.num_experts}
    if cfg.fused_gate_up:
        mlp = {"gate_up_proj": proj(2 * inter, d, cfg.mlp_bias)}
    else:
        mlp = {"gate_proj": proj(inter, d, cfg.mlp_bias), "up_proj": proj(inter, d, cfg.mlp_bias)}
    mlp["down_proj"] = proj(d, inter, cfg.mlp_bias)
    layer = {}
    if cfg.norm_layout != "post":
        layer["input_layernorm"] = {"weight": (d,)}
    layer["self_attn"] = a
    layer["post_attention_layernorm"] = {"weight": (d,)}
    if cfg.norm_layout == "sandwich":
        layer["pre_feedforward_layernorm"] = {"weight": (d,)}
    if cfg.norm_layout != "pre":
        layer["post_feedforward_layernorm"] = {"weight": (d,)}
    if cfg.num_experts:
        layer[block] = moe
    else:
        layer["mlp"] = mlp
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
            w = w if cfg.norm_offset else 1.0 + w
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


def norm(cfg: ModelConfig, x: jax.Array, w) -> jax.Array:
    """The family's RMSNorm: Llama's (scale after the cast) or Gemma's (1 + w, in fp32)."""
    if not cfg.norm_offset:
        return ops.rms_norm(x, w, cfg.rms_norm_eps)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _uniform_kind(cfg: ModelConfig, kind: str | None) -> str:
    if kind is not None:
        return kind
    kinds = set(cfg.layer_kinds)
    if len(kinds) != 1:
        raise ValueError(
            f"{cfg.model_type} has per-layer attention kinds {sorted(kinds)}; pass kind= "
            "(cfg.layer_kind(i)) for layer i"
        )
    return kinds.pop()


def _attn_mask(cfg, q_slots, k_slots, k_valid, kind: str | None = None):
    """(b, t, s) mask of one attention kind: causal by slot, key validity, sliding window."""
    m = k_slots[None, None, :] <= q_slots[None, :, None]
    window = cfg.window(_uniform_kind(cfg, kind))
    if window is not None:
        m = m & (q_slots[None, :, None] - k_slots[None, None, :] < window)
    return m & k_valid[:, None, :]


def attn_masks(cfg, q_slots, k_slots, k_valid) -> dict[str, jax.Array]:
    """{kind: mask} for each attention kind the model's layers use."""
    return {kd: _attn_mask(cfg, q_slots, k_slots, k_valid, kd) for kd in set(cfg.layer_kinds)}


def moe_names(cfg: ModelConfig) -> tuple[str, tuple[str, str, str]]:
    """(block name, (gate, up, down) names of an expert) in Hugging Face's checkpoint layout."""
    if cfg.model_type == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def _act(cfg: ModelConfig, gate: jax.Array, dtype) -> jax.Array:
    if cfg.hidden_act == "silu":
        return jax.nn.silu(gate.astype(jnp.float32)).astype(dtype)
    return jax.nn.gelu(gate, approximate=True)  # gelu_pytorch_tanh


def _moe(cfg: ModelConfig, m: dict, x: jax.Array, taps: dict | None) -> jax.Array:
    """Router + experts, dense by weighting: every expert runs on every token and its output is
    weighted by the token's routing weight (0 outside its top-k). Exact, E times the FLOPs of a
    gather; each expert weight goes through `ops.linear`, so expert deltas apply on the fly."""
    _, (gn, un, dn) = moe_names(cfg)
    logits = _proj(x, m["gate"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    w = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32) * top[..., None], -2)
    if taps is not None:
        taps.update(gate_up=x)
    y = jnp.zeros(x.shape, jnp.float32)
    for e, ex in enumerate(m["experts"]):
        d = _act(cfg, _proj(x, ex[gn]), x.dtype) * _proj(x, ex[un])
        y = y + _proj(d, ex[dn]).astype(jnp.float32) * w[..., e : e + 1]
    return y.astype(x.dtype)


def _mlp(cfg: ModelConfig, m: dict, x: jax.Array, taps: dict | None) -> jax.Array:
    if cfg.fused_gate_up:
        gu = _proj(x, m["gate_up_proj"])
        gate, up = jnp.split(gu, 2, axis=-1)
    else:
        gate, up = _proj(x, m["gate_proj"]), _proj(x, m["up_proj"])
    if cfg.hidden_act == "silu":
        g = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype)
    else:  # gelu_pytorch_tanh
        g = jax.nn.gelu(gate, approximate=True)
    d = g * up
    if taps is not None:
        taps.update(gate_up=x, down=d)
    return _proj(d, m["down_proj"])


def decoder_layer(
    cfg: ModelConfig, p: dict, h: jax.Array, positions: jax.Array, mask,
    kv: tuple[jax.Array, jax.Array] | None = None, write_at: jax.Array | None = None,
    taps: dict | None = None, *, kind: str | None = None,
):
    """One decoder layer. With `kv`, new keys/values are written into it at slot `write_at`
    (a scalar for every row, or a (batch,) array: one slot per row).

    `kind` is the layer's attention kind (`cfg.layer_kind(i)`; needed only when the model mixes
    kinds); `mask` is its (b, t, s) mask or the `attn_masks` dict.

    With `taps` (a dict), the inputs of the linears are recorded into it under the names of the
    sub-blocks that share them: "qkv" (input of q/k/v_proj), "o", "gate_up", "down" (calibration
    capture; the values are traced arrays when called under jit).

    Returns (h, (k_all, v_all)): the layer output and the keys/values attended to.
    """
    kind = _uniform_kind(cfg, kind)
    if isinstance(mask, dict):
        mask = mask[kind]
    b, t, _ = h.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    x = h if cfg.norm_layout == "post" else norm(cfg, h, p["input_layernorm"]["weight"])
    a = p["self_attn"]
    if taps is not None:
        taps["qkv"] = x
    if cfg.fused_qkv:
        q, k, v = jnp.split(_proj(x, a["qkv_proj"]), [nh * hd, (nh + nkv) * hd], axis=-1)
    else:
        q, k, v = _proj(x, a["q_proj"]), _proj(x, a["k_proj"]), _proj(x, a["v_proj"])
    if cfg.qk_norm == "proj":
        q, k = norm(cfg, q, a["q_norm"]["weight"]), norm(cfg, k, a["k_norm"]["weight"])
    q, k, v = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd), v.reshape(b, t, nkv, hd)
    if cfg.qk_norm == "head":  # over (b, t * heads, head_dim): a per-row weight broadcasts too
        q = norm(cfg, q.reshape(b, t * nh, hd), a["q_norm"]["weight"]).reshape(q.shape)
        k = norm(cfg, k.reshape(b, t * nkv, hd), a["k_norm"]["weight"]).reshape(k.shape)
    cos, sin = cfg.ropes[kind].cos_sin(positions)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if kv is not None:
        ck, cv = kv
        if jnp.ndim(write_at) == 1:  # serve.engine: one write position per row (decode slots)
            k, v = _write_rows(ck, k, write_at), _write_rows(cv, v, write_at)
        else:
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, write_at, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, write_at, 0, 0))
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    o = ops.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=scale,
                      softcap=cfg.attn_logit_softcapping)
    o = o.reshape(b, t, -1)
    y = _proj(o, a["o_proj"])
    if cfg.norm_layout != "pre":
        y = norm(cfg, y, p["post_attention_layernorm"]["weight"])
    h = h + y
    if cfg.norm_layout == "pre":
        x = norm(cfg, h, p["post_attention_layernorm"]["weight"])
    elif cfg.norm_layout == "sandwich":
        x = norm(cfg, h, p["pre_feedforward_layernorm"]["weight"])
    else:
        x = h
    if taps is not None:
        taps["o"] = o
    if cfg.num_experts:
        y = _moe(cfg, p[moe_names(cfg)[0]], x, taps)
    else:
        y = _mlp(cfg, p["mlp"], x, taps)
    if cfg.norm_layout != "pre":
        y = norm(cfg, y, p["post_feedforward_layernorm"]["weight"])
    return h + y, (k, v)


def _write_rows(cache: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
    """cache (b, s, ...) with row r's `new[r]` (t, ...) written at slot at[r]."""
    return jax.vmap(lambda c, n, a: jax.lax.dynamic_update_slice(
        c, n.astype(c.dtype), (a,) + (0,) * (c.ndim - 1)))(cache, new, at)


def embed(params: dict, tokens: jax.Array, dtype=None, cfg: ModelConfig | None = None) -> jax.Array:
    """Embedding rows of `tokens` (times sqrt(hidden) where `cfg.embed_scale`: pass `cfg`).

    A weight with a `lookup(tokens)` method (serve.engine's per-row table: each batch row adds
    its own fine-tune's embedding delta) is asked for them."""
    w = params["embed_tokens"]["weight"]
    if hasattr(w, "lookup"):
        h = w.lookup(tokens).astype(dtype or _param_dtype(w))
    else:
        h = jnp.take(w, tokens, axis=0).astype(dtype or _param_dtype(w))
    if cfg is not None and cfg.embed_scale:
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), h.dtype)
    return h


def _param_dtype(w):
    return getattr(w, "dtype", jnp.float32)


def unembed(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Final norm + lm_head (or tied embeddings). Returns fp32 logits."""
    h = norm(cfg, h, params["norm"]["weight"])
    head = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    logits = ops.linear(h, head["weight"]).astype(jnp.float32)
    cap = cfg.final_logit_softcapping
    if cap is not None:
        logits = jnp.tanh(logits / cap) * cap
    return logits


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
    masks = attn_masks(cfg, q_slots, k_slots, k_valid)

    h = embed(params, tokens, cfg=cfg)
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        h, (k, v) = decoder_layer(cfg, lp, h, positions, masks, kv, start,
                                  kind=cfg.layer_kind(i))
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


def hashable(v: Any) -> Any:
    """A JSON value as a hashable one (lists -> tuples, mappings -> sorted item tuples): how
    `ModelConfig` stores nested config values such as `rope_scaling`."""
    if isinstance(v, (list, tuple)):
        return tuple(hashable(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, hashable(x)) for k, x in v.items()))
    return v


def jsonable(v: Any) -> Any:
    """The inverse of `hashable` for tuples (back to lists) for writing JSON."""
    if isinstance(v, tuple):
        return [jsonable(x) for x in v]
    return v
