"""Synthetic Mixtral-shaped (sparse MoE) checkpoints: tensor names, shapes, config and shard split as stored.

Mixtral checkpoints on the Hub keep one 2-D tensor per expert and projection
(`model.layers.{n}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`) and the router as
`block_sparse_moe.gate.weight` (experts x hidden); transformers v5 fuses the experts only in memory and still
saves this layout. The tensor order is the module's registration order (attention, router, experts, norms),
which is what `save_pretrained` walks when huggingface_hub cuts the state dict into shards
(`plan_layout.split_sizes` at HF_MAX_SHARD_BYTES). The shape plugs into `synthetic.write_checkpoint` /
`write_adapter` and the procedural Hub repos like a `LlamaShape`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .synthetic import LlamaShape

# A LoRA on attention and every expert's three projections (the router `gate` is left alone), as
# PEFT's `target_modules` names them for a Mixtral model.
MIXTRAL_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
HF_MAX_SHARD_BYTES = 5 * 10**9  # huggingface_hub's MAX_SHARD_SIZE "5GB", the save_pretrained default


@dataclass(frozen=True)
class MixtralShape(LlamaShape):
    """A Mixtral model's widths: the Llama fields (intermediate = one expert's width) plus the experts."""

    experts: int = 8
    experts_per_tok: int = 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the model's state-dict order."""
        h, i, kv = self.hidden, self.intermediate, self.hidden * self.kv_heads // self.heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "block_sparse_moe.gate.weight", (self.experts, h))]
            for e in range(self.experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                out += [(x + "w1.weight", (i, h)), (x + "w2.weight", (h, i)), (x + "w3.weight", (i, h))]
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def config(self, dtype: str) -> dict:
        """config.json as Mixtral-8x22B-v0.1 ships it (transformers 4.38 keys), with this shape's sizes."""
        return {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": self.hidden, "initializer_range": 0.02,
                "intermediate_size": self.intermediate, "max_position_embeddings": 65536, "model_type": "mixtral",
                "num_attention_heads": self.heads, "num_experts_per_tok": self.experts_per_tok,
                "num_hidden_layers": self.layers, "num_key_value_heads": self.kv_heads,
                "num_local_experts": self.experts, "output_router_logits": False, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "router_aux_loss_coef": 0.001, "sliding_window": None,
                "tie_word_embeddings": False,
                "torch_dtype": {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32"),
                "transformers_version": "4.38.0", "use_cache": True, "vocab_size": self.vocab}


MIXTRAL_8X22B = MixtralShape(hidden=6144, intermediate=16384, layers=56, vocab=32768, heads=48, kv_heads=8,
                             experts=8, experts_per_tok=2)

