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

from deltajax.io import params_ckpt as ckpt_lib
from deltajax.model import ModelConfig

__all__ = ["ARCHITECTURES", "config_to_hf", "load_config", "read_hf_config"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Attributes of other architectures that change the math; refused unless neutral.
_FOREIGN_MATH_ATTRS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "logit_scale",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "clip_qkv",
    "use_qk_norm",
    "qk_layernorm",
    "quantization_config",
)
_NEUTRAL = (None, False, 1, 1.0, {}, [])

_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
}


def _unsupported(attr: str, value: Any, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"unsupported Hugging Face config: {attr}={value!r}{why}")


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


def _parse_rope(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling items) from either transformers 4 or 5 style configs."""
    params = hf.get("rope_parameters")
    attr = "rope_parameters"
    if params is not None and isinstance(params, Mapping) and params:
        if all(isinstance(v, Mapping) for v in params.values()):  # one entry per layer type
            distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
            if len(distinct) != 1:
                raise _unsupported("rope_parameters", params, "different RoPE per layer type")
            params = next(iter(params.values()))
        rope = dict(params)
    else:
        attr = "rope_scaling"
        rope = dict(hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    kind, legacy_kind = rope.pop("rope_type", None), rope.pop("type", None)
    if kind is not None and legacy_kind is not None and kind != legacy_kind:
        raise _unsupported(f"{attr}.type", legacy_kind, f"conflicts with rope_type={kind!r}")
    kind = kind or legacy_kind or "default"
    prf = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf is not None and float(prf) != 1.0:
        raise _unsupported("partial_rotary_factor", prf, "only full rotary embeddings")
    if kind not in _ROPE_KEYS:
        raise _unsupported(f"{attr}.rope_type", kind, f"supported: {sorted(_ROPE_KEYS)}")
    extra = sorted(set(rope) - _ROPE_KEYS[kind])
    if extra:
        raise _unsupported(f"{attr}", dict(rope, rope_type=kind), f"unknown keys {extra}")
    missing = sorted(_ROPE_KEYS[kind] - set(rope))
    if missing:
        raise _unsupported(f"{attr}", dict(rope, rope_type=kind), f"missing keys {missing}")
    if kind == "default":
        return float(theta), None
    items = {"rope_type": kind, **{k: ckpt_lib._hashable(v) for k, v in rope.items()}}
    return float(theta), tuple(sorted(items.items()))


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

    Raises:
      FileNotFoundError: no config file.
      ValueError: a missing required attribute, or one (named, with its value) whose math is not
        implemented: unknown ``model_type``/architecture, ``hidden_act`` other than silu, RoPE
        types other than default/linear/llama3, ``partial_rotary_factor`` != 1, Qwen2 sliding
        windows, per-layer attention types, quantized weights, heads that do not divide, ...
    """
    hf = read_hf_config(src)
    _check_numeric(hf)
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise _unsupported("model_type", mt, f"supported: {sorted(ARCHITECTURES)}")
    archs = hf.get("architectures") or []
    bad_archs = [a for a in archs if a not in ARCHITECTURES.values()]
    if bad_archs:
        raise _unsupported("architectures", archs, "only *ForCausalLM of llama/mistral/qwen2")
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if hf.get(k) is None
    ]
    if missing:
        raise ValueError(f"Hugging Face config lacks required attributes {missing}")
    for k in _FOREIGN_MATH_ATTRS:
        if k in hf and not any(hf[k] is n or hf[k] == n for n in _NEUTRAL):
            raise _unsupported(k, hf[k])
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise _unsupported("hidden_act", act, "only silu")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise _unsupported("layer_types", layer_types, "only full_attention layers")

    heads = int(hf["num_attention_heads"])
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else int(kv_heads)
    if kv_heads <= 0 or heads % kv_heads:
        raise _unsupported(
            "num_key_value_heads",
            kv_heads,
            f"num_attention_heads={heads} must be a positive multiple of it",
        )
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise _unsupported(
                "hidden_size",
                hidden,
                f"not divisible by num_attention_heads={heads} and no head_dim given",
            )
        head_dim = hidden // heads
    head_dim = int(head_dim)
    if head_dim % 2:
        raise _unsupported("head_dim", head_dim, "RoPE needs an even head_dim")
    theta, rope_scaling = _parse_rope(hf)

    attention_bias = o_proj_bias = mlp_bias = False
    sliding_window = None
    if mt == "llama":
        attention_bias = o_proj_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    elif mt == "mistral":
        sliding_window = hf.get("sliding_window")
        if sliding_window is not None:
            sliding_window = int(sliding_window)
            if sliding_window <= 0:
                raise _unsupported("sliding_window", sliding_window, "must be positive")
    elif mt == "qwen2":
        attention_bias = True  # q/k/v always have biases in Qwen2; o_proj and the MLP never do
        if hf.get("use_sliding_window", False):
            raise _unsupported(
                "use_sliding_window",
                hf["use_sliding_window"],
                "Qwen2 sliding-window layers are not implemented",
            )

    kwargs = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=mlp_bias,
        sliding_window=sliding_window,
        model_type=mt,
    )
    if hf.get("max_position_embeddings") is not None:
        kwargs["max_position_embeddings"] = int(hf["max_position_embeddings"])
    return ModelConfig(**kwargs)


def config_to_hf(cfg: ModelConfig, *, dtype: Any = None) -> dict:
    """A ``config.json`` dict that transformers (4.48+ and 5.x) loads into the matching class.

    RoPE is written in the transformers 4 form (``rope_theta`` + ``rope_scaling``), which
    transformers 5 also reads.

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
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": (
            {k: ckpt_lib._jsonable(v) for k, v in cfg.rope_scaling} if cfg.rope_scaling else None
        ),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
    }
    biases = (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias)
    if mt == "llama":
        if cfg.attention_bias != cfg.o_proj_bias:
            raise ValueError(
                f"llama cannot express attention_bias={cfg.attention_bias} with "
                f"o_proj_bias={cfg.o_proj_bias} (its attention_bias covers q/k/v/o together)"
            )
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif mt == "mistral":
        if any(biases):
            raise ValueError(f"mistral has no biases; got attention/o_proj/mlp bias = {biases}")
        d["sliding_window"] = cfg.sliding_window
    elif mt == "qwen2":
        if biases != (True, False, False):
            raise ValueError(
                f"qwen2 needs attention/o_proj/mlp bias = (True, False, False), got {biases}"
            )
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    if cfg.sliding_window is not None and mt != "mistral":
        raise ValueError(f"{mt} cannot express sliding_window={cfg.sliding_window}")
    if dtype is not None:
        d["torch_dtype"] = jnp.dtype(dtype).name
    return d
