"""The one leaf naming of a params tree, and the one table of which leaves are linear projections.

Names are dotted Hugging Face paths without the ``model.`` prefix, e.g.
``layers.3.self_attn.q_proj.weight``, ``embed_tokens.weight``, ``lm_head.weight``:

    flat = flatten(params)                   # {name: leaf} in tree order
    params = map_with_names(fn, params)      # fn(name, leaf) -> new leaf
    is_projection("layers.0.mlp.up_proj.weight")   # True: one of the seven Llama projections

Objects that subclass `Leaf` (a compressed `DeltaLeaf`, every `ops.LinearOperand` weight
wrapper) are single leaves to `flatten` / `map_with_names`, not pytrees to descend into.

`Rule` maps a regex on these names to a compression method (None: drop that leaf's delta);
`rule_for` picks the first matching rule. Which method a rule names is up to the caller: this
module imports nothing of deltajax.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import jax

# The seven linear projections of a Llama-family decoder layer, by role.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]
MLP_PROJECTIONS = PROJECTIONS[4:]
# Fused projections (Phi-3): one weight for q/k/v and one for gate/up. Their delta is one
# matrix to every method (compressed as a whole, not per logical projection).
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj")
# Experts of a mixture-of-experts layer are projections too: Qwen3-MoE's
# ``mlp.experts.<e>.{gate,up,down}_proj`` match the names above, Mixtral's
# ``block_sparse_moe.experts.<e>.w1 (gate) / w3 (up) / w2 (down)`` the alternative below. The
# router (``gate.weight``) is not: it is a small, sensitive hidden -> experts matrix.
PROJ_PATTERN = (
    r"(^|\.)(q|k|v|o|gate|up|down|qkv|gate_up)_proj\.weight$|(^|\.)experts\.\d+\.w[123]\.weight$"
)
MLP_PATTERN = r"(^|\.)(gate|up|down|gate_up)_proj\.weight$|(^|\.)experts\.\d+\.w[123]\.weight$"
LM_HEAD = "lm_head.weight"
EMBEDDING = "embed_tokens.weight"


class Leaf:
    """Marker base class: instances are one leaf of a named tree (see `flatten`)."""


def _is_leaf(x) -> bool:
    return isinstance(x, Leaf)


def path_name(path) -> str:
    """Dotted name of a `jax.tree_util` key path."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten(tree) -> dict[str, Any]:
    """{dotted name: leaf} in tree order (`Leaf` instances count as leaves)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return {path_name(p): x for p, x in leaves}


def map_with_names(fn, tree):
    """`jax.tree_util.tree_map_with_path` with the dotted name as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree,
                                            is_leaf=_is_leaf)


def is_projection(name: str) -> bool:
    """True for the decoder-layer projection weights (q/k/v/o/gate/up/down, fused qkv/gate_up)."""
    return re.search(PROJ_PATTERN, name) is not None


def is_linear(name: str) -> bool:
    """True for every weight that meets an activation through `ops.linear`: the projections and
    an untied output head. (A tied head is the embedding table, read by `model.embed`.)"""
    return is_projection(name) or name == LM_HEAD


def matrix_type(name: str) -> str:
    """'q_proj' ... 'down_proj' for a projection weight ('expert.gate_proj', 'expert.w1', ... for
    a mixture-of-experts expert); else the leaf's first name part."""
    m = re.search(r"\.experts\.\d+\.(\w+)\.weight$", name)
    if m:
        return f"expert.{m.group(1)}"
    m = re.search(r"(\w+_proj)\.weight$", name)
    return m.group(1) if m else name.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (regex searched in the dotted name) → `method` (None: drop the delta)."""

    pattern: str
    method: Any

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def rule_for(name: str, rules: Iterable[Rule]) -> Rule | None:
    """The first rule whose pattern matches `name`, or None."""
    for r in rules:
        if r.matches(name):
            return r
    return None
