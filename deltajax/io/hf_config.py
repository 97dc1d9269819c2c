"""Hugging Face ``config.json`` <-> `ModelConfig` for Llama (2/3, SmolLM2), Mistral and Qwen2.

`load_config` refuses, with a ValueError naming the attribute and its value, anything that would
change the math and is not implemented (another activation, YaRN/dynamic/LongRoPE, partial
rotary, Qwen2 sliding windows, per-layer attention types, quantized weights, heads that do not
divide, ...): a converted model either computes what transformers computes or is not converted.
Both transformers 4 (``rope_theta`` + ``rope_scaling``) and transformers 5 (``rope_parameters``)
RoPE fields are read. Use it through `deltajax.io.hf`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from deltajax import model as model_lib
from deltajax import rope as rope_lib
from deltajax.model import ModelConfig

__all__ = ["ARCHITECTURES", "config_to_hf", "load_config", "read_hf_config"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_MOE = ("mixtral", "qwen3_moe")

# transformers 5's defaults for attributes a config.json may omit (they change the math).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=2048, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                    max_position_embeddings=131072, rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28, head_dim=128),
    "gemma": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, rope_theta=10000.0, head_dim=256),
    "gemma2": dict(rms_norm_eps=1e-6, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                   rope_theta=10000.0, head_dim=256, sliding_window=4096,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(rms_norm_eps=1e-6, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, head_dim=256,
                        sliding_window=4096, query_pre_attn_scalar=256,
                        attn_logit_softcapping=None, final_logit_softcapping=None,
                        sliding_window_pattern=6),
    "olmo2": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=2048, rope_theta=10000.0),
    "phi3": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                 max_position_embeddings=4096, rope_theta=10000.0, sliding_window=None),
    "mixtral": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                    max_position_embeddings=131072, rope_theta=1_000_000.0, sliding_window=None,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                      max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
                      use_sliding_window=False, num_local_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1),
}

# Attributes of other architectures that change the math; refused unless neutral.
_FOREIGN_MATH_ATTRS = (
    "logit_scale",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "clip_qkv",
    "use_qk_norm",
    "qk_layernorm",
    "quantization_config",
    "use_bidirectional_attention",
    "num_local_experts",
    "num_experts",
    "moe_intermediate_size",
    "mlp_only_layers",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
    "sliding_window_pattern",
    "use_sliding_window",
)
# What each family reads itself (so it is not checked as foreign).
_OWN_ATTRS = {
    "mixtral": {"num_local_experts"},
    "qwen3_moe": {"use_sliding_window", "num_local_experts", "num_experts",
                  "moe_intermediate_size", "mlp_only_layers"},
    "qwen2": {"use_sliding_window"},
    "qwen3": {"use_sliding_window"},
    "gemma2": {"attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"},
    "gemma3_text": {
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "rope_local_base_freq",
        "sliding_window_pattern",
    },
}
_NEUTRAL = (None, False, 1, 1.0, {}, [])

_GEMMA = ("gemma", "gemma2", "gemma3_text")
# q/k/v/o biases together
_ATTENTION_BIAS_ALL = ("gemma", "gemma2", "gemma3_text", "qwen3", "olmo2", "qwen3_moe")


def _unsupported(attr: str, value: Any, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"unsupported Hugging Face config: {attr}={value!r}{why}")


def _get(hf: Mapping, mt: str, key: str) -> Any:
    return hf[key] if key in hf else _DEFAULTS[mt].get(key)


def _int(value: Any, attr: str, *, positive: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{attr}: expected an int, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{attr}: expected a positive int, got {value!r}")
    return value


def _float(value: Any, attr: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{attr}: expected a number, got {value!r}")
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"{attr}: expected a positive number, got {value!r}")
    return value


def _bool(value: Any, attr: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{attr}: expected true or false, got {value!r}")
    return value


def read_hf_config(src: Any) -> dict:
    """The raw config dict from a directory, a ``config.json`` path, a dict or a PretrainedConfig.

    Raises:
      FileNotFoundError: no config file. ValueError: the file is not a JSON object.
    """
    if isinstance(src, Mapping):
        return dict(src)
    if hasattr(src, "to_dict") and not isinstance(src, (str, os.PathLike)):
        return dict(src.to_dict())  # a transformers PretrainedConfig
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _standardize_rope(d: Mapping, attr: str, hf: Mapping, mt: str, theta_key: str) -> dict:
    """One rope dict resolved as transformers' `standardize_rope_params` does it."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{attr}: expected an object, got {d!r}")
    d = dict(d)
    kind, legacy = d.pop("rope_type", None), d.pop("type", None)
    if kind is not None and legacy is not None and kind != legacy:
        raise _unsupported(f"{attr}.type", legacy, f"conflicts with {attr}.rope_type={kind!r}")
    d["rope_type"] = kind or legacy or "default"
    top_theta = hf.get(theta_key)
    if top_theta is None:
        top_theta = _DEFAULTS[mt][theta_key]
    if "rope_theta" in d and theta_key in hf and hf[theta_key] is not None:
        if float(d["rope_theta"]) != float(hf[theta_key]):
            raise _unsupported(
                f"{attr}.rope_theta", d["rope_theta"],
                f"disagrees with {theta_key}={hf[theta_key]!r}; remove one",
            )
    d.setdefault("rope_theta", top_theta)
    if "partial_rotary_factor" in hf and hf["partial_rotary_factor"] is not None:
        d.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if d["rope_type"] in ("llama3", "yarn", "longrope"):
        top = hf.get("original_max_position_embeddings")
        if top is not None:  # transformers gives the top-level value priority (Phi-3)
            if "original_max_position_embeddings" in d and (
                d["original_max_position_embeddings"] != top
            ):
                raise _unsupported(
                    f"{attr}.original_max_position_embeddings",
                    d["original_max_position_embeddings"],
                    f"disagrees with original_max_position_embeddings={top!r}; remove one",
                )
            d["original_max_position_embeddings"] = top
        else:
            mp = _get(hf, mt, "max_position_embeddings")
            d.setdefault("original_max_position_embeddings", mp)
    return d


def _rope_items(d: dict, attr: str, head_dim: int) -> tuple[float, tuple | None]:
    """(theta, sorted scaling items or None) of a standardized rope dict, refusing what we lack."""
    d = dict(d)
    kind = d.pop("rope_type")
    theta = _float(d.pop("rope_theta"), f"{attr}.rope_theta")
    prf = d.pop("partial_rotary_factor", None)
    if prf is not None and float(prf) != 1.0:
        raise _unsupported("partial_rotary_factor", prf, "only full rotary embeddings")
    if kind not in rope_lib.ROPE_KEYS:
        raise _unsupported(
            f"{attr}.rope_type", kind, f"supported: {sorted(rope_lib.ROPE_KEYS)}"
        )
    required, optional = rope_lib.ROPE_KEYS[kind]
    extra = sorted(set(d) - required - optional)
    if extra:
        raise _unsupported(f"{attr}", dict(d, rope_type=kind), f"unknown keys {extra}")
    missing = sorted(k for k in required if d.get(k) is None)
    if missing:
        raise _unsupported(f"{attr}", dict(d, rope_type=kind), f"missing keys {missing}")
    for k, v in d.items():
        if k in ("short_factor", "long_factor"):
            if not isinstance(v, (list, tuple)) or len(v) != head_dim // 2:
                raise ValueError(
                    f"{attr}.{k}: expected a list of head_dim/2={head_dim // 2} numbers, got {v!r}"
                )
            for x in v:
                _float(x, f"{attr}.{k}")
        elif k == "truncate":
            _bool(v, f"{attr}.{k}")
        elif k == "original_max_position_embeddings":
            _int(v, f"{attr}.{k}")
        elif v is not None:
            _float(v, f"{attr}.{k}", positive=k not in ("beta_fast", "beta_slow"))
    if kind == "default":
        return theta, None
    items = {"rope_type": kind, **{k: model_lib.hashable(v) for k, v in d.items()}}
    return theta, tuple(sorted(items.items()))


def _resolve_ropes(hf: Mapping, mt: str, head_dim: int) -> dict[str, tuple[float, tuple | None]]:
    """{"full_attention": (theta, scaling), "sliding_attention": ...} as transformers 5 resolves
    ``rope_parameters`` (5.x layout) and legacy ``rope_theta`` / ``rope_scaling``: where both
    layouts are present and disagree, the config is refused naming the attribute (transformers
    would silently let ``rope_scaling`` win)."""
    rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
    if rp is not None and not isinstance(rp, Mapping):
        raise ValueError(f"rope_parameters: expected an object, got {rp!r}")
    if rs is not None and not isinstance(rs, Mapping):
        raise ValueError(f"rope_scaling: expected an object, got {rs!r}")
    nested = bool(rp) and all(isinstance(v, Mapping) for v in rp.values()) and set(rp) <= {
        "full_attention", "sliding_attention"}
    if mt == "gemma3_text":
        if rp and not nested:
            raise _unsupported("rope_parameters", rp, "gemma3_text expects one entry per layer "
                               "type (full_attention, sliding_attention)")
        rp = dict(rp or {})
        full = dict(rp.get("full_attention") or {"rope_type": "default"})
        if rs:
            if "full_attention" in rp:
                a = _standardize_rope(full, "rope_parameters.full_attention", hf, mt, "rope_theta")
                b = _standardize_rope({**full, **rs}, "rope_scaling", hf, mt, "rope_theta")
                if a != b:
                    raise _unsupported("rope_scaling", rs, "disagrees with rope_parameters."
                                       f"full_attention={rp['full_attention']!r}; remove one")
            full.update(rs)
        full = _standardize_rope(full, "rope_parameters.full_attention", hf, mt, "rope_theta")
        local = dict(rp.get("sliding_attention") or {"rope_type": "default"})
        local = _standardize_rope(
            local, "rope_parameters.sliding_attention", hf, mt, "rope_local_base_freq"
        )
        return {
            "full_attention": _rope_items(full, "rope_parameters.full_attention", head_dim),
            "sliding_attention": _rope_items(local, "rope_parameters.sliding_attention", head_dim),
        }
    if nested:
        raise _unsupported("rope_parameters", rp, f"{mt} has one RoPE for every layer")
    if rs and rp:
        a = _standardize_rope(rp, "rope_parameters", hf, mt, "rope_theta")
        b = _standardize_rope(rs, "rope_scaling", hf, mt, "rope_theta")
        if a != b:
            raise _unsupported(
                "rope_scaling", rs, f"disagrees with rope_parameters={rp!r}; transformers would "
                "apply rope_scaling; remove the one that is wrong"
            )
    chosen, attr = (rs, "rope_scaling") if rs else (rp or {}, "rope_parameters")
    one = _rope_items(_standardize_rope(chosen, attr, hf, mt, "rope_theta"), attr, head_dim)
    return {"full_attention": one, "sliding_attention": one}


def _layer_types(hf: Mapping, mt: str, n_layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """(layer_types or None when uniform full/sliding, sliding_window) as transformers sets them."""
    lt = hf.get("layer_types")
    if lt is not None:
        if not isinstance(lt, (list, tuple)) or len(lt) != n_layers or any(
            t not in model_lib.LAYER_KINDS for t in lt
        ):
            raise _unsupported(
                "layer_types", lt, f"expected {n_layers} entries from {model_lib.LAYER_KINDS}"
            )
        lt = tuple(lt)
    window = _get(hf, mt, "sliding_window")
    if mt in ("qwen2", "qwen3"):
        use = _bool(_get(hf, mt, "use_sliding_window"), "use_sliding_window")
        window = window if use else None
        if lt is None:
            mwl = _int(_get(hf, mt, "max_window_layers"), "max_window_layers", positive=False)
            lt = tuple(
                "sliding_attention" if window is not None and i >= mwl else "full_attention"
                for i in range(n_layers)
            )
    elif mt == "gemma2":
        if lt is None:
            lt = tuple(
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
            )
    elif mt == "gemma3_text":
        if lt is None:
            pat = _int(_get(hf, mt, "sliding_window_pattern"), "sliding_window_pattern")
            lt = tuple(
                "sliding_attention" if (i + 1) % pat else "full_attention" for i in range(n_layers)
            )
    elif mt in ("mistral", "phi3", "mixtral", "qwen3_moe"):
        # every layer uses the window (when set)
        if mt == "qwen3_moe" and not _bool(_get(hf, mt, "use_sliding_window"),
                                           "use_sliding_window"):
            window = None
        if lt is not None and any(t != "full_attention" for t in lt):
            raise _unsupported("layer_types", list(lt), f"{mt} has no per-layer attention kinds")
        lt = None
    else:
        if lt is not None and any(t != "full_attention" for t in lt):
            raise _unsupported("layer_types", list(lt), f"{mt} has only full_attention layers")
        return None, None
    if window is not None:
        window = _int(window, "sliding_window")
    if lt is not None:
        if "sliding_attention" in lt and window is None:
            raise _unsupported(
                "layer_types", list(lt), "sliding_attention layers need a sliding_window"
                + (" and use_sliding_window=true" if mt in ("qwen2", "qwen3") else "")
            )
        if "sliding_attention" not in lt:
            return None, None
        if all(t == "sliding_attention" for t in lt) and mt not in ("gemma2", "gemma3_text"):
            return None, window
    return lt, window


# attributes read as numbers: (type, smallest value); a wrong type is named, not a TypeError
_NUMERIC_ATTRS = {
    "vocab_size": (int, 1), "hidden_size": (int, 1), "intermediate_size": (int, 1),
    "num_hidden_layers": (int, 1), "num_attention_heads": (int, 1),
    "num_key_value_heads": (int, 1), "head_dim": (int, 1), "max_position_embeddings": (int, 1),
    "rms_norm_eps": (float, 0), "rope_theta": (float, 0),
}


def _check_numeric(hf: Mapping) -> None:
    for k, (tp, lo) in _NUMERIC_ATTRS.items():
        v = hf.get(k)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (
            tp is float or float(v).is_integer())
        if not ok:
            want = "an int" if tp is int else "a number"
            raise ValueError(f"Hugging Face config: {k}: expected {want}, got {v!r}")
        if not v >= lo or (tp is float and not abs(v) < float("inf")):
            raise ValueError(f"Hugging Face config: {k}: must be >= {lo}, got {v!r}")


def load_config(src: str | os.PathLike | Mapping | Any) -> ModelConfig:
    """Reads a Hugging Face config into a `ModelConfig`, refusing what deltajax does not implement.

    Args:
      src: an HF model directory, a ``config.json`` path, the parsed dict, or a transformers
        ``PretrainedConfig``. Both transformers 4 (``rope_theta``/``rope_scaling``) and
        transformers 5 (``rope_parameters``) RoPE fields are understood.

    Returns:
      The config. RoPE scaling is kept as sorted ``(key, value)`` items with a ``"rope_type"`` key.
      Attributes a config omits take transformers 5's default for the family.

    Raises:
      FileNotFoundError: no config file.
      ValueError: a missing or mistyped attribute (named), or one (named, with its value) whose
        math is not implemented: unknown ``model_type``/architecture, another activation,
        ``partial_rotary_factor`` != 1, RoPE layouts that disagree, quantized weights,
        bidirectional attention, heads that do not divide, ...
    """
    hf = read_hf_config(src)
    _check_numeric(hf)
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise _unsupported("model_type", mt, f"supported: {sorted(ARCHITECTURES)}")
    archs = hf.get("architectures") or []
    bad_archs = [a for a in archs if a != ARCHITECTURES[mt]]
    if bad_archs:
        raise _unsupported("architectures", archs, f"{mt} converts from {ARCHITECTURES[mt]}")
    required = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"Hugging Face config lacks required attributes {missing}")
    own = _OWN_ATTRS.get(mt, set())
    for k in _FOREIGN_MATH_ATTRS:
        if k in own or k not in hf:
            continue
        if not any(hf[k] is n or (type(hf[k]) is type(n) and hf[k] == n) for n in _NEUTRAL):
            raise _unsupported(k, hf[k], f"not part of {mt}")
    act_key = "hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"
    act = _get(hf, mt, act_key)
    if mt in ("gemma2", "gemma3_text") and hf.get("hidden_activation") is None:
        act = hf.get("hidden_act") or _DEFAULTS[mt]["hidden_activation"]
    if mt == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers maps Gemma's legacy "gelu" to the tanh form
    if act == "swish":
        act = "silu"
    if act not in model_lib.ACTIVATIONS:
        raise _unsupported(act_key, act, f"supported: {list(model_lib.ACTIVATIONS)}")

    vocab = _int(hf["vocab_size"], "vocab_size")
    hidden = _int(hf["hidden_size"], "hidden_size")
    inter = _int(hf["intermediate_size"], "intermediate_size")
    n_layers = _int(hf["num_hidden_layers"], "num_hidden_layers")
    heads = _int(hf["num_attention_heads"], "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int(kv_heads, "num_key_value_heads")
    if heads % kv_heads:
        raise _unsupported(
            "num_key_value_heads",
            kv_heads,
            f"num_attention_heads={heads} must be a positive multiple of it",
        )
    head_dim = hf.get("head_dim")
    if head_dim is None:
        head_dim = _DEFAULTS[mt].get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise _unsupported(
                "hidden_size",
                hidden,
                f"not divisible by num_attention_heads={heads} and no head_dim given",
            )
        head_dim = hidden // heads
    head_dim = _int(head_dim, "head_dim")
    if head_dim % 2:
        raise _unsupported("head_dim", head_dim, "RoPE needs an even head_dim")
    max_pos = _int(_get(hf, mt, "max_position_embeddings"), "max_position_embeddings")
    ropes = _resolve_ropes(hf, mt, head_dim)
    theta, rope_scaling = ropes["full_attention"]
    layer_types, window = _layer_types(hf, mt, n_layers)

    attention_bias = o_proj_bias = mlp_bias = False
    if mt == "llama":
        attention_bias = o_proj_bias = _bool(hf.get("attention_bias", False), "attention_bias")
        mlp_bias = _bool(hf.get("mlp_bias", False), "mlp_bias")
    elif mt == "qwen2":
        attention_bias = True  # q/k/v always have biases in Qwen2; o_proj and the MLP never do
    elif mt in _ATTENTION_BIAS_ALL:
        attention_bias = o_proj_bias = _bool(hf.get("attention_bias", False), "attention_bias")
    for k in ("attention_bias", "mlp_bias"):
        if mt in ("mistral", "phi3", "qwen2", "mixtral") and hf.get(k):
            raise _unsupported(k, hf[k], f"{mt} has no such biases")
    if mt != "llama" and hf.get("mlp_bias"):
        raise _unsupported("mlp_bias", hf["mlp_bias"], f"{mt} has no MLP biases")

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(_get(hf, mt, "rms_norm_eps"), "rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=_bool(_get(hf, mt, "tie_word_embeddings"), "tie_word_embeddings"),
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=mlp_bias,
        sliding_window=window,
        layer_types=layer_types,
        model_type=mt,
        hidden_act=act,
    )
    if ropes["sliding_attention"] != ropes["full_attention"]:
        kwargs["sliding_rope_theta"], kwargs["sliding_rope_scaling"] = ropes["sliding_attention"]
    if mt in _GEMMA:
        kwargs.update(norm_offset=True, embed_scale=True)
    if mt in ("gemma2", "gemma3_text"):
        kwargs["norm_layout"] = "sandwich"
        qpas = _get(hf, mt, "query_pre_attn_scalar")
        _float(qpas, "query_pre_attn_scalar")
        kwargs["query_pre_attn_scalar"] = qpas  # as given: transformers 5 wants an int here
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            v = _get(hf, mt, k)
            kwargs[k] = None if v is None else _float(v, k)
    if mt in ("qwen3", "gemma3_text"):
        kwargs["qk_norm"] = "head"
    if mt == "olmo2":
        kwargs.update(norm_layout="post", qk_norm="proj")
    if mt == "phi3":
        kwargs.update(fused_qkv=True, fused_gate_up=True)
    if mt in _MOE:
        n_exp = hf.get("num_local_experts", hf.get("num_experts"))
        n_exp = _int(n_exp if n_exp is not None else _DEFAULTS[mt]["num_local_experts"],
                     "num_local_experts")
        k = _int(_get(hf, mt, "num_experts_per_tok"), "num_experts_per_tok")
        if k > n_exp:
            raise ValueError(f"num_experts_per_tok: {k} exceeds num_local_experts={n_exp}")
        kwargs.update(num_experts=n_exp, num_experts_per_tok=k)
        if mt == "qwen3_moe":
            kwargs["qk_norm"] = "head"
            kwargs["moe_intermediate_size"] = _int(
                _get(hf, mt, "moe_intermediate_size"), "moe_intermediate_size")
            kwargs["norm_topk_prob"] = _bool(_get(hf, mt, "norm_topk_prob"), "norm_topk_prob")
            step = _int(_get(hf, mt, "decoder_sparse_step"), "decoder_sparse_step")
            if step != 1:
                raise _unsupported("decoder_sparse_step", step, "only every layer sparse (1)")
            if hf.get("mlp_only_layers"):
                raise _unsupported("mlp_only_layers", hf["mlp_only_layers"],
                                   "dense layers inside a MoE model are not implemented")
    return ModelConfig(**kwargs)


def config_to_hf(cfg: ModelConfig, *, dtype: Any = None) -> dict:
    """A ``config.json`` dict that transformers (4.48+ and 5.x) loads into the matching class.

    RoPE is written in the transformers 4 form (``rope_theta`` + ``rope_scaling``, and Gemma 3's
    ``rope_local_base_freq``), which transformers 5 also reads. Every math attribute is written
    explicitly (no reliance on a version's defaults).

    Args:
      cfg: the model config.
      dtype: weight dtype recorded as ``torch_dtype`` (e.g. ``"bfloat16"``); omitted if None.

    Raises:
      ValueError: `cfg` combines options its ``model_type`` cannot express (e.g. Llama with q/k/v
        biases but no o_proj bias, or a sliding window outside Mistral).
    """
    mt = cfg.model_type
    if mt not in ARCHITECTURES:
        raise _unsupported("model_type", mt, f"supported: {sorted(ARCHITECTURES)}")
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": (
            {k: model_lib.jsonable(v) for k, v in cfg.rope_scaling} if cfg.rope_scaling else None
        ),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        # no family default (Phi-3's 32000 can lie outside the vocabulary); export_hf carries
        # the source's token ids over
        "pad_token_id": None,
    }
    d["hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"] = cfg.hidden_act
    expect = load_config_fields_for(mt)
    got = {k: getattr(cfg, k) for k in expect}
    # the family's fixed structure must hold (it is not expressible otherwise)
    bad = {k: (v, expect[k]) for k, v in got.items() if expect[k] is not _ANY and v != expect[k]}
    if bad:
        raise ValueError(
            f"{mt} cannot express "
            + ", ".join(f"{k}={v!r} (it has {want!r})" for k, (v, want) in sorted(bad.items()))
        )
    biases = (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias)
    if mt == "llama":
        if cfg.attention_bias != cfg.o_proj_bias:
            raise ValueError(
                f"llama cannot express attention_bias={cfg.attention_bias} with "
                f"o_proj_bias={cfg.o_proj_bias} (its attention_bias covers q/k/v/o together)"
            )
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif mt in ("mistral", "phi3", "mixtral"):
        if any(biases):
            raise ValueError(f"{mt} has no biases; got attention/o_proj/mlp bias = {biases}")
        d["sliding_window"] = cfg.sliding_window
    elif mt == "qwen2":
        if biases != (True, False, False):
            raise ValueError(
                f"qwen2 needs attention/o_proj/mlp bias = (True, False, False), got {biases}"
            )
    elif mt in _ATTENTION_BIAS_ALL:
        if cfg.attention_bias != cfg.o_proj_bias or cfg.mlp_bias:
            raise ValueError(
                f"{mt} needs o_proj_bias == attention_bias and no MLP bias, got {biases}"
            )
        d["attention_bias"] = cfg.attention_bias
    if mt in _MOE:
        d["num_local_experts"] = cfg.num_experts
        d["num_experts_per_tok"] = cfg.num_experts_per_tok
        d["sliding_window"] = cfg.sliding_window
    if mt == "qwen3_moe":
        d["moe_intermediate_size"] = cfg.moe_intermediate_size
        d["norm_topk_prob"] = cfg.norm_topk_prob
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["decoder_sparse_step"] = 1
        d["mlp_only_layers"] = []
    if mt in ("qwen2", "qwen3"):
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["sliding_window"] = cfg.sliding_window
        d["max_window_layers"] = cfg.num_hidden_layers
        d["layer_types"] = list(cfg.layer_kinds)
    elif mt in ("gemma2", "gemma3_text"):
        d["sliding_window"] = cfg.sliding_window
        d["layer_types"] = list(cfg.layer_kinds)
        d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar
        d["attn_logit_softcapping"] = cfg.attn_logit_softcapping
        d["final_logit_softcapping"] = cfg.final_logit_softcapping
    elif cfg.layer_types is not None and any(t != cfg.layer_types[0] for t in cfg.layer_types):
        raise ValueError(f"{mt} cannot express per-layer attention kinds {cfg.layer_types}")
    if cfg.sliding_window is not None and mt not in (
        "mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe"
    ):
        raise ValueError(f"{mt} cannot express sliding_window={cfg.sliding_window}")
    if mt == "gemma3_text":
        local = cfg.ropes["sliding_attention"]
        d["rope_local_base_freq"] = local.theta
        if local.scaling is not None:
            raise ValueError("gemma3_text cannot express a scaled RoPE on sliding layers")
    elif cfg.sliding_rope_theta is not None:
        raise ValueError(f"{mt} cannot express a separate RoPE for sliding layers")
    if dtype is not None:
        d["torch_dtype"] = jnp.dtype(dtype).name
    return d


_ANY = object()


def load_config_fields_for(mt: str) -> dict[str, Any]:
    """The structural `ModelConfig` fields `load_config` sets for family `mt` (value or _ANY)."""
    gemma = mt in _GEMMA
    sandwich = mt in ("gemma2", "gemma3_text")
    return {
        "norm_offset": gemma,
        "embed_scale": gemma,
        "norm_layout": "sandwich" if sandwich else "post" if mt == "olmo2" else "pre",
        "qk_norm": "head" if mt in ("qwen3", "gemma3_text", "qwen3_moe")
        else "proj" if mt == "olmo2" else None,
        "num_experts": _ANY if mt in _MOE else 0,
        "fused_qkv": mt == "phi3",
        "fused_gate_up": mt == "phi3",
        "query_pre_attn_scalar": _ANY if sandwich else None,
        "attn_logit_softcapping": _ANY if sandwich else None,
        "final_logit_softcapping": _ANY if sandwich else None,
    }
