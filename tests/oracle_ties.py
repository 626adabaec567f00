"""Oracle helpers for tied-weight cases: tiny real transformers models of any class (T5, BART, BERT masked
LM, sequence classifiers, tied Llama), adapters saved by PEFT itself, and PEFT's unmerged forward.

Helpers only (no tests). Same conventions as ``oracle.py``: seeded random weights, ``init_lora_weights=False``,
adapter parameters randomised by ``oracle.randomize_adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oracle import load_peft_checked, randomize_adapter, randomize_module, save_model

VOCAB = 96
TINY: dict[str, dict[str, Any]] = {
    "t5": dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0),
    "bart": dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64),
    "bert": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=64),
    "llama": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
}


def model_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def make_tiny(dirpath: str | Path, cls_name: str, family: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
              **overrides: Any) -> Path:
    """Save a tiny seeded ``cls_name`` model of ``family`` in ``dtype`` (one ``model.safetensors``)."""
    from transformers import AutoConfig

    cls = model_class(cls_name)
    cfg = AutoConfig.for_model(family, **{**TINY[family], **overrides})
    model = randomize_module(cls(cfg).float(), seed)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return save_model(model.to(dtype).eval(), dirpath)


def make_peft_adapter(base_dir: str | Path, cls_name: str, out_dir: str | Path, seed: int = 1,
                      resize_vocab: int | None = None, **lora_kwargs: Any) -> Path:
    """A PEFT LoRA adapter on ``cls_name`` loaded from ``base_dir`` (optionally with the vocabulary resized
    first, as TRL / LLaMA-Factory / unsloth do for added tokens), parameters randomised, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    model = model_class(cls_name).from_pretrained(base_dir, dtype="auto")
    if resize_vocab is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(resize_vocab)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def to_fp32_pair(base_dir: Path, adapter_dir: Path, out_root: Path) -> tuple[Path, Path]:
    """fp32 copies of a base and its adapter (the adapter's saved base layers replaced by the fp32 base's
    tensors of the same name), for logits of the unmerged forward without bf16 noise."""
    base32, adapter32 = out_root / "base32", out_root / "adapter32"
    for src, dst in ((base_dir, base32), (adapter_dir, adapter32)):
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            if p.suffix != ".safetensors":
                dst.joinpath(p.name).write_bytes(p.read_bytes())
    w32 = {k: v.float() for k, v in load_file(base_dir / "model.safetensors").items()}
    save_file(w32, str(base32 / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base32 / "config.json").read_text())
    (base32 / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    ad = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: v.float() for k, v in ad.items()}, str(adapter32 / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return base32, adapter32


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _load(cls_name: str, base_dir: Path, resize_vocab: int | None) -> torch.nn.Module:
    model = model_class(cls_name).from_pretrained(base_dir, dtype="auto")
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab)  # the adapter's saved tensors overwrite every row
    return model


def unmerged_logits(cls_name: str, base_dir: Path, adapter_dir: Path, inputs: dict[str, torch.Tensor],
                    strict: bool = True, resize_vocab: int | None = None) -> torch.Tensor:
    """Logits of the adapter applied by PEFT without merging (what a semantically correct merge computes)."""
    return forward(load_peft_checked(_load(cls_name, base_dir, resize_vocab), adapter_dir, strict=strict), inputs)


def peft_merged_logits(cls_name: str, base_dir: Path, adapter_dir: Path, inputs: dict[str, torch.Tensor],
                       resize_vocab: int | None = None) -> torch.Tensor:
    """Logits of PEFT's own ``merge_and_unload`` (no save)."""
    model = load_peft_checked(_load(cls_name, base_dir, resize_vocab), adapter_dir, strict=False)
    return forward(model.merge_and_unload(), inputs)


def peft_merged_folder(cls_name: str, base_dir: Path, adapter_dir: Path, out: Path,
                       resize_vocab: int | None = None) -> Path:
    """PEFT's ``merge_and_unload`` saved with ``save_pretrained`` into ``out`` (config included)."""
    model = load_peft_checked(_load(cls_name, base_dir, resize_vocab), adapter_dir, strict=False)
    model.merge_and_unload().save_pretrained(out)
    return out


def folder_logits(cls_name: str, folder: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``from_pretrained(folder)``; fails if transformers reports a missing (re-initialised) weight."""
    model, info = model_class(cls_name).from_pretrained(folder, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"], f"re-initialised on load: {sorted(info['missing_keys'])}"
    return forward(model, inputs)


def inputs_for(family: str, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    if family in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)}
    return {"input_ids": ids}
