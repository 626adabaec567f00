"""Adapter key grammar and adapter-module -> base-tensor name resolution. Pure: strings in, strings out.

Adapter keys name modules as they were in memory at training time; the checkpoint on disk may use another
layout (VLM refactors, Mixtral's block_sparse_moe, wrapper prefixes). Names are therefore resolved by lookup
in the base's tensor names: exact, then user rules, then a rename table, then a unique suffix match, then
the renames transformers v5 applies when it loads the checkpoint (load_renames.py: ViT, Dinov2, Swin...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from .load_renames import LoadRenames
from .patterns import compile_patterns, pattern_value, peft_targets  # noqa: F401  (re-exported)

PEFT_PREFIX = "base_model.model."
LORA_MARKERS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B",
                "lora_magnitude_vector": "magnitude"}

# Layout renames tried when a name is not in the base (in-memory name -> on-disk name), both directions.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "model."),            # Qwen2-VL / Qwen2.5-VL / Qwen3-VL (>= 4.52) -> legacy
    (r"^model\.visual\.", "visual."),
    (r"^model\.(?!language_model\.|visual\.|vision_tower\.|multi_modal_projector\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
    (r"^model\.language_model\.", "language_model.model."),  # LLaVA / Gemma 3 / Mistral3 legacy layout
    (r"^language_model\.model\.", "model.language_model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"\.mlp\.(?=experts\.\d+\.w[123]\.|gate\.)", ".block_sparse_moe."),  # Mixtral per-expert / router
    (r"\.block_sparse_moe\.", ".mlp."),
)

# Model types whose MoE blocks transformers v5 fuses and for which PEFT 0.21 converts adapters at load time
# (transformers conversion_mapping._MODEL_TO_CONVERSION_PATTERN -> mixtral / qwen2_moe, plus mixtral itself):
# PEFT then merges a LoRA on the router `mlp.gate` as a raw parameter (`gate.weight`), rounding twice.
PEFT_CONVERTED_MOE = frozenset({
    "mixtral", "minimax", "minimax_m2", "Dots3NoteTextModel", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "dots1", "ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open",
    "mellum", "qwen3_moe", "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next",
    "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel",
})


def is_converted_router(module: str, model_type: str | None) -> bool:
    """A MoE router (`...mlp.gate`) that PEFT merges as a raw parameter for this model type."""
    parts = module.split(".")
    return (model_type in PEFT_CONVERTED_MOE and len(parts) >= 2 and parts[-1] == "gate"
            and parts[-2] in ("mlp", "block_sparse_moe"))


# Model types whose fused experts transformers stores (E, in, out) and marks `is_transposed=True`
# (`@use_experts_implementation(is_transposed=True)`): PEFT's ParamWrapper then computes the delta as
# einsum("ore,eri->eio"). Checked against the installed transformers by tests/test_keymap.py.
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter", "ergo"})  # transformers 5.25


CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


@dataclass(frozen=True)
class ParsedKey:
    """One adapter tensor key, decoded.

    role: A, B, B_bias, emb_A, emb_B, magnitude (DoRA), tokens (trainable tokens), replace (a full tensor replacing `<module>.<param>` of the base) or original (the untrained
    module a modules_to_save wrapper keeps; never merged).
    """

    key: str
    module: str
    role: str
    param: str | None = None
    adapter_name: str | None = None
    depth: int = 0  # target_parameters nesting: how many `.base_layer` wrap this LoRA's module

    @property
    def replace_target(self) -> str:
        return f"{self.module}.{self.param}" if self.module else str(self.param)


def parse_key(key: str) -> ParsedKey | str:
    """Decode a key; returns an explanation string when the key is not something we understand."""
    name = key
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    elif name.startswith("base_model."):
        return "prefix 'base_model.' without '.model.' belongs to prompt-learning or another PEFT tuner"
    seg = name.split(".")
    for i, s in enumerate(seg):
        if s in LORA_MARKERS:
            role, module, rest = LORA_MARKERS[s], ".".join(seg[:i]), seg[i + 1:]
            if not module:
                return "LoRA key without a module path"
            depth = 0
            while module.endswith(".base_layer"):
                module, depth = module[: -len(".base_layer")], depth + 1
            if module == "base_layer":
                return "LoRA key without a module path"
            if role in ("A", "B"):
                if len(rest) in (1, 2) and rest[-1] in ("weight", "bias"):
                    if rest[-1] == "bias":
                        if role == "A":
                            return "lora_A has no bias in PEFT"
                        role = "B_bias"
                    return ParsedKey(key, module, role, adapter_name=rest[0] if len(rest) == 2 else None,
                                     depth=depth)
                return f"unexpected suffix after {s}"
            if role == "magnitude" and rest and rest[-1] == "weight":
                rest = rest[:-1]
            if len(rest) <= 1:
                return ParsedKey(key, module, role, adapter_name=rest[0] if rest else None, depth=depth)
            return f"unexpected suffix after {s}"
    if "token_adapter" in seg:
        return ParsedKey(key, ".".join(seg[:seg.index("token_adapter")]), "tokens")
    for wrapper, role in (("original_module", "original"), ("modules_to_save", "replace")):
        # ModulesToSaveWrapper internals; PEFT saves them next to the plain key when it saves a resized
        # embedding layer whole: `X.modules_to_save[.name].weight` (the trained copy, same as `X.weight`)
        # and `X.original_module.weight` (the untrained original, not part of the merge result).
        if wrapper in seg:
            j = seg.index(wrapper)
            rest = seg[j + 1:]
            if not rest or j == 0:
                return f"malformed {wrapper} key"
            name = rest[0] if len(rest) > 1 and wrapper == "modules_to_save" else None
            return ParsedKey(key, ".".join(seg[:j]), role, ".".join(rest[1:] if name else rest), adapter_name=name)
    if "base_layer" in seg:
        j = seg.index("base_layer")
        rest = seg[j + 1:]
        if not rest:
            return "key ends in base_layer"
        return ParsedKey(key, ".".join(seg[:j]), "replace", ".".join(rest))
    if len(seg) < 2:
        return ParsedKey(key, "", "replace", seg[0])
    return ParsedKey(key, ".".join(seg[:-1]), "replace", seg[-1])


def is_conv1d_module(module: str, model_type: str | None, fan_in_fan_out: bool) -> bool:
    """HF Conv1D (weight stored (in, out)) vs nn.Linear, for square weights where shapes cannot tell."""
    leaf = module.rsplit(".", 1)[-1]
    if model_type:
        return model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_LEAVES
    return fan_in_fan_out


class TargetResolver:
    """Finds the on-disk tensor for an in-memory name: exact, user rules, rename table, unique suffix, then
    the renames transformers applies when it loads this checkpoint (`load_renames`, built on first need)."""

    def __init__(self, names: Collection[str], rules: Sequence[tuple[str, str]] = (),
                 load_renames: Callable[[], LoadRenames | None] | None = None) -> None:
        self.names = names
        self.rules = [(re.compile(p), r) for p, r in rules]
        self.renames = [(re.compile(p), r) for p, r in RENAMES]
        self._suffixes: dict[str, list[str]] | None = None
        self._load_renames = load_renames
        self._loaded: tuple[dict[str, list[str]], str] | None = None

    def _suffix_index(self) -> dict[str, list[str]]:
        if self._suffixes is None:
            idx: dict[str, list[str]] = {}
            for n in self.names:
                parts = n.split(".")
                for i in range(1, len(parts)):
                    idx.setdefault(".".join(parts[i:]), []).append(n)
            self._suffixes = idx
        return self._suffixes

    def _memory_names(self) -> tuple[dict[str, list[str]], str]:
        """In-memory name -> disk names, for the base names that transformers renames on load."""
        if self._loaded is None:
            found = self._load_renames() if self._load_renames else None
            index: dict[str, list[str]] = {}
            if found is not None:
                for n in self.names:
                    memory = found.rename(n)
                    if memory != n:
                        index.setdefault(memory, []).append(n)
            self._loaded = (index, f"rename ({found.source})" if found else "")
        return self._loaded

    def resolve(self, name: str) -> tuple[str | None, str, list[str]]:
        """(target or None, how it was found, ambiguous candidates)."""
        if name in self.names:
            return name, "exact", []
        for rx, repl in self.rules:
            if rx.search(name):
                cand = rx.sub(repl, name)
                if cand in self.names:
                    return cand, f"key_map {rx.pattern!r}", []
        hits = sorted({cand for rx, repl in self.renames
                       if rx.search(name) and (cand := rx.sub(repl, name, count=1)) in self.names})
        if len(hits) == 1:
            return hits[0], "rename", []
        if len(hits) > 1:
            return None, "ambiguous", hits
        longer = self._suffix_index().get(name, [])
        parts = name.split(".")
        shorter = [".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in self.names]
        cands = sorted(set(longer) | set(shorter[:1]))
        if len(cands) == 1:
            return cands[0], "suffix", []
        if cands:
            return None, "ambiguous", cands
        index, via = self._memory_names()
        loaded = sorted(index.get(name, []))
        if len(loaded) == 1:
            return loaded[0], via, []
        if loaded:
            return None, "ambiguous", loaded
        return None, "missing", []


# Fused parameters of transformers-v5 expert modules, in registration order (PEFT nests the LoRA of the last
# registered parameter outermost), and how checkpoints store them one expert at a time.
PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
PER_EXPERT_PARTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),  # Qwen/DeepSeek/OLMoE..., Mixtral
    "down_proj": (("down_proj",), ("w2",)),
    "gate_proj": (("gate_proj",), ("w1",)),
    "up_proj": (("up_proj",), ("w3",)),
}


def targeted_params(module: str, target_parameters: Sequence[str]) -> list[str]:
    """Names of `module`'s parameters that `target_parameters` selects, in PARAM_ORDER then config order."""
    names = []
    for t in target_parameters:
        mod, _, pname = t.rpartition(".")
        if (not mod or module == mod or module.endswith("." + mod)) and pname not in names:
            names.append(pname)
    known = [p for p in PARAM_ORDER if p in names]
    return known + [p for p in names if p not in known]
