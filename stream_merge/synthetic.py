"""Synthetic Llama-shaped checkpoints and PEFT-format LoRA adapters of any size, written shard by shard.

Used by the README demo and the benchmarks: needs no network, no transformers and no peft, and never holds
more than one tensor block in memory, so a 30 GB checkpoint can be made on a 24 GiB machine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .records import DTYPE_SIZES, numel
from .fileio import AtomicFile, write_file_atomic
from .safetensors_io import header_bytes
from .torch_dtypes import TORCH_DTYPES, tensor_bytes

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 12
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden * self.kv_heads // self.heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def config(self, dtype: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                "tie_word_embeddings": False, "torch_dtype": {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32"),
                "bos_token_id": 1, "eos_token_id": 2}

    def nbytes(self, dtype: str = "BF16") -> int:
        return sum(numel(s) for _, s in self.tensors()) * DTYPE_SIZES[dtype]


def shape_for_size(size_bytes: int, base: LlamaShape = LlamaShape(), dtype: str = "BF16") -> LlamaShape:
    """The Llama shape with `base`'s widths and as many layers as fit in about `size_bytes`."""
    one = LlamaShape(base.hidden, base.intermediate, 1, base.vocab, base.heads, base.kv_heads)
    zero = LlamaShape(base.hidden, base.intermediate, 0, base.vocab, base.heads, base.kv_heads)
    per_layer = one.nbytes(dtype) - zero.nbytes(dtype)
    layers = max(1, round((size_bytes - zero.nbytes(dtype)) / per_layer))
    return LlamaShape(base.hidden, base.intermediate, layers, base.vocab, base.heads, base.kv_heads)


class _Filler:
    """Cheap deterministic pseudo-random values: slices of one random pool at shifting offsets."""

    def __init__(self, seed: int, std: float, pool: int = 1 << 22) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pool, generator=g) * std
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        out = torch.empty(n)
        done = 0
        while done < n:
            k = min(n - done, self.pool.numel() - self.pos)
            out[done:done + k] = self.pool[self.pos:self.pos + k]
            done += k
            self.pos = (self.pos + k + 7919) % self.pool.numel()
        return out


def _write_file(path: Path, tensors: Sequence[tuple[str, tuple[int, ...]]], dtype: str, filler: _Filler,
                metadata: dict | None = None, ones: Sequence[str] = ()) -> int:
    entries, pos = [], 0
    for name, shape in tensors:
        n = numel(shape) * DTYPE_SIZES[dtype]
        entries.append((name, dtype, shape, pos, pos + n))
        pos += n
    tdtype = TORCH_DTYPES[dtype]
    with AtomicFile(path) as f:
        f.write(header_bytes(entries, metadata))
        for name, shape in tensors:
            total = numel(shape)
            step = 1 << 24
            for s in range(0, total, step):
                k = min(step, total - s)
                vals = torch.ones(k) if name in ones else filler.take(k)
                f.write(tensor_bytes(vals.to(tdtype)))
        return f.commit()[0]


def write_checkpoint(out: Path, shape: LlamaShape, dtype: str = "BF16", max_shard_bytes: int = 2 * 2**30,
                     seed: int = 0) -> list[str]:
    """A sharded safetensors checkpoint with index and config.json; returns the shard names."""
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shape.tensors():
        n = numel(shp) * DTYPE_SIZES[dtype]
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += n
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    filler = _Filler(seed, 0.02)
    weight_map = {}
    for fname, group in zip(names, groups):
        norms = [n for n, s in group if len(s) == 1]
        _write_file(out / fname, group, dtype, filler, {"format": "pt"}, ones=norms)
        weight_map.update({n: fname for n, _ in group})
    total = shape.nbytes(dtype)
    write_file_atomic(out / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())
    write_file_atomic(out / "config.json", json.dumps(shape.config(dtype), indent=2).encode())
    write_file_atomic(out / "generation_config.json", b'{"bos_token_id": 1, "eos_token_id": 2}\n')
    return names


def write_adapter(out: Path, shape: LlamaShape, r: int = 16, alpha: float = 32.0, targets: Sequence[str] = LORA_TARGETS,
                  dtype: str = "F32", seed: int = 1, base_name: str | None = None) -> Path:
    """A PEFT-format LoRA adapter (key grammar and config exactly as peft 0.21 saves them)."""
    out.mkdir(parents=True, exist_ok=True)
    dims = dict(shape.tensors())
    tensors = []
    for name, shp in shape.tensors():
        mod = name[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] in targets and len(shp) == 2:
            tensors.append((f"base_model.model.{mod}.lora_A.weight", (r, dims[name][1])))
            tensors.append((f"base_model.model.{mod}.lora_B.weight", (dims[name][0], r)))
    _write_file(out / "adapter_model.safetensors", tensors, dtype, _Filler(seed, 0.05), {"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "init_lora_weights": True, "base_model_name_or_path": base_name, "rank_pattern": {}, "alpha_pattern": {},
           "peft_version": "0.21.2"}
    write_file_atomic(out / "adapter_config.json", json.dumps(cfg, indent=2).encode())
    return out

