"""Tiny random Hugging Face models of each supported family, saved to disk, for tests.

Usage::

    from hf_tiny import make_tiny_hf, load_hf_model
    path = make_tiny_hf("qwen2", tmp_path / "qwen2")          # config.json + model.safetensors
    model = load_hf_model(path)                               # transformers, eval mode, fp32

Weights are drawn so that every parameter matters (biases non-zero, norm weights != 1) and
activations are O(1), so logit comparisons are meaningful. Needs torch and transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers

FAMILIES = ("llama_mha", "llama_gqa", "llama_mqa", "mistral", "qwen2", "smollm_tied", "llama3_rope")
# Families beyond the Llama layout (one forward, different ModelConfig fields).
NEW_FAMILIES = ("qwen3", "qwen2_sliding", "gemma", "gemma2", "gemma3", "olmo2", "phi3",
                "mixtral", "qwen3_moe")

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_hf_config(family: str, *, tie: bool = False, **overrides: Any):
    """The transformers config of a tiny model of `family` (see `FAMILIES`).

    Args:
      family: one of `FAMILIES`. "llama_mha": kv heads == heads; "llama_gqa": 4 heads / 2 kv
        heads; "llama_mqa": 1 kv head; "mistral": sliding_window=4; "qwen2": q/k/v biases;
        "smollm_tied": Llama with tied embeddings (SmolLM2 style); "llama3_rope": llama3 RoPE
        scaling with a small original context so the scaling is active.
      tie: tie the input embeddings and the output head (always on for "smollm_tied").
      **overrides: config attributes to set (e.g. ``num_hidden_layers=3``).
    """
    kw = dict(_BASE, tie_word_embeddings=tie)
    if family == "llama_mha":
        cls = transformers.LlamaConfig
        kw.update(num_key_value_heads=4)
    elif family == "llama_gqa":
        cls = transformers.LlamaConfig
    elif family == "llama_mqa":
        cls = transformers.LlamaConfig
        kw.update(num_key_value_heads=1)
    elif family == "mistral":
        cls = transformers.MistralConfig
        kw.update(sliding_window=4, head_dim=16)
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "smollm_tied":
        cls = transformers.LlamaConfig
        kw.update(
            tie_word_embeddings=True,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=100000.0,
        )
    elif family == "llama3_rope":
        cls = transformers.LlamaConfig
        kw.update(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        kw.update(head_dim=16)
    elif family == "qwen2_sliding":  # layer 0 full, layer 1 sliding (max_window_layers=1)
        cls = transformers.Qwen2Config
        kw.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    elif family == "gemma":
        cls = transformers.GemmaConfig
        kw.update(head_dim=16, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")
    elif family == "gemma2":  # small caps so the soft-capping is active
        cls = transformers.Gemma2Config
        kw.update(head_dim=16, tie_word_embeddings=True, sliding_window=4,
                  query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                  final_logit_softcapping=3.0)
    elif family == "gemma3":  # sliding layer with a local RoPE base, global layer linear-scaled
        cls = transformers.Gemma3TextConfig
        kw.update(head_dim=16, tie_word_embeddings=True, sliding_window=4,
                  query_pre_attn_scalar=24,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                      "full_attention": {"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 1000000.0},
                  })
    elif family == "olmo2":
        cls = transformers.Olmo2Config
    elif family == "phi3":
        cls = transformers.Phi3Config
        kw.update(sliding_window=6)
    elif family == "mixtral":  # 4 experts, top 2
        cls = transformers.MixtralConfig
        kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)
    elif family == "qwen3_moe":  # 4 experts, top 2, weights not renormalized
        cls = transformers.Qwen3MoeConfig
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                  norm_topk_prob=False)
    else:
        raise ValueError(
            f"unknown tiny family {family!r}; choose from {FAMILIES + NEW_FAMILIES}"
        )
    kw.update(overrides)
    return cls(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draws every parameter in place: weights ~ N(0, 1/fan_in), biases and norms non-trivial.

    Families that scale embeddings by sqrt(hidden) and tie them (Gemma) draw them ~ N(0, 1/hidden²),
    so the tied-head logits stay O(1) like the other families'."""
    g = torch.Generator().manual_seed(seed)
    emb_std = 1.0
    if model.config.model_type.startswith("gemma"):
        emb_std = 1.0 / model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                new = emb_std * torch.randn(p.shape, generator=g)
            else:
                new = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            p.copy_(new.to(p.dtype))
    return model


def make_tiny_hf(
    family: str,
    out_dir: str | os.PathLike,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    safe_serialization: bool = True,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Builds a tiny random model of `family` and `save_pretrained`s it to `out_dir`.

    Args:
      family: one of `FAMILIES` (see `tiny_hf_config`).
      out_dir: directory to write (created).
      tie: tie embeddings and head.
      dtype: weight dtype on disk (e.g. ``torch.bfloat16``).
      seed: seed of the random weights; the same seed gives the same weights.
      safe_serialization: False writes ``pytorch_model*.bin`` instead of safetensors.
      max_shard_size: e.g. ``"40KB"`` to force sharded files with an index.
      **overrides: config attributes (see `tiny_hf_config`).

    Returns:
      `out_dir` as a Path.
    """
    cfg = tiny_hf_config(family, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    out = Path(out_dir)
    if safe_serialization:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **kwargs)
    else:
        model.save_pretrained(out)  # config.json, generation_config.json (+ safetensors)
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        save_bin(model.state_dict(), out, max_shard_size=max_shard_size)
    return out


def save_bin(
    state_dict: dict[str, torch.Tensor], out_dir: Path, *, max_shard_size: str | int | None = None
) -> None:
    """Writes ``pytorch_model.bin`` or ``pytorch_model-0000i-of-0000n.bin`` shards + index.

    transformers 5 no longer writes ``.bin`` files, so tests write them like transformers 4 did
    (tied weights appear once, under the first name).
    """
    seen, sd = set(), {}
    for k, v in state_dict.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        sd[k] = v.detach().clone().contiguous()
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if limit is not None and shards[-1] and used + n > limit:
            shards.append({})
            used = 0
        shards[-1][k] = v
        used += n
    if len(shards) == 1:
        torch.save(shards[0], out_dir / "pytorch_model.bin")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _parse_size(size: str | int | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, mult in units.items():
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * mult)
    return int(size)


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """`AutoModelForCausalLM.from_pretrained(path)` in eval mode with eager attention."""
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", **{dtype_kw: dtype}
    )
    return model.eval()


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
    """fp32 numpy logits of a transformers model for int tokens (numpy or list)."""
    import numpy as np

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None
            if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
            position_ids=None
            if position_ids is None
            else torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
            use_cache=False,
        )
    return out.logits.float().numpy()
