"""Oracle helpers for the "names" parity cases (test_parity_names.py): tiny GPT-OSS and ViT models as
transformers 5.24 writes them, PEFT adapters on them, and PEFT's own merge as the oracle.

Helpers only (no tests); the shared ones come from oracle.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from oracle import load_folder_tensors, randomize_adapter, randomize_module, save_model

BF16, FP32 = torch.bfloat16, torch.float32

# GPT-OSS: experts (E, in, out) with biases, router `mlp.router`, attention sinks. hidden == intermediate, so
# down_proj (E, 64, 64) is square: only the model type (is_transposed) can tell its layout.
GPT_OSS = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, layer_types=["sliding_attention", "full_attention"], sliding_window=32,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def gpt_oss_base(path: Path) -> Path:
    """A tiny bf16 GPT-OSS checkpoint in several shards, as transformers' save_pretrained writes it."""
    cfg = AutoConfig.for_model("gpt_oss", **GPT_OSS)
    model = randomize_module(AutoModelForCausalLM.from_config(cfg, dtype=FP32), seed=0).to(BF16)
    assert getattr(model.model.layers[0].mlp.experts, "is_transposed", False)
    return save_model(model, path, max_shard_size="40KB")


def peft_adapter(model_cls: Any, base: Path, out: Path, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter on `base` (loaded with `model_cls`), every adapter parameter randomised."""
    from peft import LoraConfig, get_peft_model

    model = model_cls.from_pretrained(base, dtype=BF16)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


def transposed_expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    """PEFT_SEMANTICS §5 for `is_transposed` experts: einsum("ore,eri->eio") * s, in fp32."""
    a3 = a.float().reshape(experts, -1, a.shape[1])
    b3 = b.float().reshape(b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e i o", b3, a3) * scale


def adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def matching(names: Any, *patterns: str) -> set[str]:
    return {n for n in names if any(re.fullmatch(p, n) for p in patterns)}


def base_tensors(base: Path) -> dict[str, torch.Tensor]:
    return load_folder_tensors(base)


VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
           patch_size=8, num_labels=5)


def vit_base(path: Path) -> Path:
    """A tiny bf16 ViT image classifier in several shards: transformers 5.24 writes the legacy names
    (`vit.encoder.layer.N.attention.attention.query`), its model holds `vit.layers.N.attention.q_proj`."""
    from transformers import ViTConfig, ViTForImageClassification

    model = randomize_module(ViTForImageClassification(ViTConfig(**VIT)).float(), seed=0).to(BF16)
    assert "vit.layers.0.attention.q_proj.weight" in model.state_dict()
    return save_model(model, path, max_shard_size="40KB")


def vit_logits(folder: Path) -> torch.Tensor:
    from transformers import ViTForImageClassification

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(BF16)
    model = ViTForImageClassification.from_pretrained(folder, dtype=BF16).eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


# Typical on-disk names per family of load_renames.BUILTIN_RULES (as transformers 5.24 saves them), to check
# our table against transformers' own rules.
FAMILY_DISK_NAMES = {
    ("vit", "ViTForImageClassification"): [
        "vit.encoder.layer.3.attention.attention.query.weight", "vit.encoder.layer.3.attention.attention.key.bias",
        "vit.encoder.layer.3.attention.attention.value.weight", "vit.encoder.layer.3.attention.output.dense.weight",
        "vit.encoder.layer.3.intermediate.dense.weight", "vit.encoder.layer.3.output.dense.bias",
        "vit.encoder.layer.3.layernorm_before.weight", "vit.layernorm.weight", "classifier.weight",
        "vit.embeddings.patch_embeddings.projection.weight"],
    ("deit", "DeiTForImageClassificationWithTeacher"): [
        "deit.encoder.layer.0.attention.attention.query.weight", "deit.encoder.layer.0.output.dense.weight",
        "deit.encoder.layer.0.intermediate.dense.bias", "cls_classifier.weight"],
    ("beit", "BeitForImageClassification"): [
        "beit.encoder.layer.2.attention.attention.query.weight", "beit.encoder.layer.2.attention.attention.q_bias",
        "beit.encoder.layer.2.attention.output.dense.weight", "beit.encoder.layer.2.intermediate.dense.weight",
        "beit.encoder.layer.2.output.dense.weight", "beit.encoder.layer.2.lambda_1", "classifier.weight"],
    ("vit_mae", "ViTMAEForPreTraining"): [
        "vit.encoder.layer.0.attention.attention.key.weight", "vit.encoder.layer.0.output.dense.weight",
        "decoder.decoder_layers.0.attention.attention.query.weight", "decoder.decoder_pred.weight"],
    ("dinov2", "Dinov2Model"): [
        "encoder.layer.1.attention.attention.query.weight", "encoder.layer.1.attention.attention.value.bias",
        "encoder.layer.1.attention.output.dense.weight", "encoder.layer.1.mlp.fc1.weight",
        "encoder.layer.1.mlp.weights_out.weight", "encoder.layer.1.layer_scale1.lambda1", "layernorm.weight"],
    ("swin", "SwinForImageClassification"): [
        "swin.encoder.layers.0.blocks.1.attention.self.query.weight",
        "swin.encoder.layers.0.blocks.1.attention.self.relative_position_bias_table",
        "swin.encoder.layers.0.blocks.1.attention.output.dense.weight",
        "swin.encoder.layers.0.blocks.1.intermediate.dense.weight", "swin.encoder.layers.0.blocks.1.output.dense.bias",
        "swin.encoder.layers.1.downsample.reduction.weight", "classifier.weight"],
}
