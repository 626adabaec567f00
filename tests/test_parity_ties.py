"""PEFT parity for tied weights beyond lm_head / embed_tokens (issue 12 items 2 and 3).

Tiny real transformers models (bf16, one shard), adapters saved by PEFT itself, then ``stream_merge.merge``
compared tensor by tensor and by logits after ``from_pretrained(OUT)``:

- T5 / BART with a LoRA on the shared embedding: refused without --untie, like a tied decoder-only base;
  --untie is refused for T5 (the decoder output scale depends on the tie) and works for BART.
- BERT masked LM: --untie writes ``cls.predictions.decoder.weight`` / ``.bias``, the names BertForMaskedLM loads.
- Sequence classifiers with a LoRA on the input embedding: nothing is tied, the merge equals PEFT's bitwise.
- Tied Llama + added tokens (modules_to_save copies of embed_tokens and/or lm_head, resized vocabulary): both
  copies written separately with ``tie_word_embeddings: false``, bitwise equal to PEFT's saved merge.

Which oracle: where a LoRA delta reaches a tensor that several tied members share, PEFT 0.21.2's merge adds it
to the shared tensor, so every member changes (PEFT_SEMANTICS §7.1) and its merged model computes something
else than the adapter it merged (asserted here). Those cases follow the UNMERGED forward (each member gets only
its own delta); PEFT's merge is still the oracle for every other tensor. Where no delta reaches a shared
tensor (classifiers, trained copies), PEFT's merge equals the unmerged forward and is the oracle throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from oracle import (assert_bitwise_equal, load_folder_tensors, lora_delta, merge_once, merge_twice,
                    peft_merged_pretrained)
from oracle_ties import (folder_logits, inputs_for, make_peft_adapter, make_tiny, model_class, peft_merged_folder,
                         peft_merged_logits, to_fp32_pair, unmerged_logits)

BF16 = torch.bfloat16


def _merge(base: Path, adapter: Path, out: Path, **kwargs: Any) -> Any:
    from stream_merge import merge

    return merge(str(base), str(adapter), str(out), device="cpu", **kwargs)


def _refuses(base: Path, adapter: Path, out: Path, match: str, **kwargs: Any) -> None:
    from stream_merge.errors import StreamMergeError

    with pytest.raises(StreamMergeError, match=match):
        _merge(base, adapter, out, **kwargs)
    assert not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


def _emb_delta(adapter: Path, module: str) -> torch.Tensor:
    """PEFT's fp32 Embedding delta ``(B @ A).T * s`` for ``module`` of a PEFT-saved adapter."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ad = load_file(adapter / "adapter_model.safetensors")
    a, b = (ad[f"base_model.model.{module}.lora_embedding_{x}"].float() for x in "AB")
    return (b @ a).T * (cfg["lora_alpha"] / cfg["r"])


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# encoder-decoders tied through `shared`
# ---------------------------------------------------------------------------------------------------------

SHARED_CASES = {
    "t5-shared": ("T5ForConditionalGeneration", "t5", ["shared", "q"]),
    "bart-shared": ("BartForConditionalGeneration", "bart", ["shared", "q_proj"]),
    "bart-embed_tokens": ("BartForConditionalGeneration", "bart", ["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", list(SHARED_CASES))
def test_shared_embedding_lora_is_refused_without_untie(case: str, tmp_path: Path) -> None:
    """A LoRA on T5's / BART's shared embedding (or on the encoder/decoder embed_tokens tied to it) changes every
    tied member in PEFT's merge, which then deviates from the adapter's forward: refused like lm_head ties."""
    cls, family, targets = SHARED_CASES[case]
    base = make_tiny(tmp_path / "base", cls, family)
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", r=4, lora_alpha=6, target_modules=targets)
    _refuses(base, adapter, tmp_path / "out", match=r"ties .*shared\.weight.*--untie")
    if family == "t5":
        _refuses(base, adapter, tmp_path / "out-untie", match=r"d_model\*\*-0\.5", untie=True)

    ids = inputs_for(family)
    base32, adapter32 = to_fp32_pair(base, adapter, tmp_path / "fp32")
    want = unmerged_logits(cls, base32, adapter32, ids)
    if case != "bart-shared":  # BART's forward reads encoder/decoder embed_tokens, never `shared` itself
        assert (peft_merged_logits(cls, base32, adapter32, ids) - want).abs().max() > 1e-3, \
            "PEFT's merge of a tied embedding was expected to deviate (§7.1)"


def _untied_logits_match_unmerged(cls: str, family: str, base: Path, adapter: Path, tmp_path: Path, **unmerged):
    """Merge fp32 copies with --untie and require the unmerged adapter's fp32 logits; returns the fp32 pair,
    the inputs and those logits for further checks."""
    ids = inputs_for(family)
    base32, adapter32 = to_fp32_pair(base, adapter, tmp_path / "fp32")
    out32 = tmp_path / "out32"
    _merge(base32, adapter32, out32, untie=True)
    want = unmerged_logits(cls, base32, adapter32, ids, **unmerged)
    torch.testing.assert_close(folder_logits(cls, out32, ids), want, rtol=1e-5, atol=1e-4)
    return base32, adapter32, ids, want


def test_bart_untie_writes_every_tied_member(tmp_path: Path) -> None:
    """--untie on BART: ``model.shared``, both ``embed_tokens`` and ``lm_head`` become separate tensors (with
    tie_word_embeddings false transformers ties none of them), each with only its own delta. Every other tensor
    is PEFT's merge bit for bit; fp32 logits match the unmerged adapter."""
    cls = "BartForConditionalGeneration"
    base = make_tiny(tmp_path / "base", cls, "bart")
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", r=4, lora_alpha=6,
                                target_modules=["embed_tokens", "q_proj"])
    peft = peft_merged_pretrained(model_class(cls), base, adapter, BF16)
    w = load_folder_tensors(base)
    shared = w["model.shared.weight"]
    expected = {**peft, "model.shared.weight": shared, "lm_head.weight": shared}
    for part in ("encoder", "decoder"):
        module = f"model.{part}.embed_tokens"
        expected[f"{module}.weight"] = merge_twice(shared, _emb_delta(adapter, module))
    out = tmp_path / "out"
    _merge(base, adapter, out, untie=True)
    assert_bitwise_equal(load_folder_tensors(out), expected)
    assert _config(out) == {**_config(base), "tie_word_embeddings": False}

    _untied_logits_match_unmerged(cls, "bart", base, adapter, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# BERT masked LM
# ---------------------------------------------------------------------------------------------------------

def test_bert_masked_lm_untie_writes_the_head_bert_loads(tmp_path: Path) -> None:
    """BertForMaskedLM ties ``cls.predictions.decoder`` (weight and bias) to the word embeddings and to
    ``cls.predictions.bias``. --untie writes both under those names, so the loaded head is the base's (no
    re-initialised weight) and the fp32 logits are the unmerged adapter's."""
    cls = "BertForMaskedLM"
    base = make_tiny(tmp_path / "base", cls, "bert")
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", r=4, lora_alpha=6,
                                target_modules=["word_embeddings", "query"])
    peft = peft_merged_pretrained(model_class(cls), base, adapter, BF16)
    w = load_folder_tensors(base)
    emb = "bert.embeddings.word_embeddings"
    expected = {**peft, f"{emb}.weight": merge_twice(w[f"{emb}.weight"], _emb_delta(adapter, emb)),
                "cls.predictions.decoder.weight": w[f"{emb}.weight"],
                "cls.predictions.decoder.bias": w["cls.predictions.bias"]}
    out = tmp_path / "out"
    _merge(base, adapter, out, untie=True)
    assert_bitwise_equal(load_folder_tensors(out), expected)
    assert "lm_head.weight" not in load_folder_tensors(out)

    base32, adapter32, ids, want = _untied_logits_match_unmerged(cls, "bert", base, adapter, tmp_path)
    assert (peft_merged_logits(cls, base32, adapter32, ids) - want).abs().max() > 1e-3, \
        "PEFT's tied merge was expected to deviate (§7.1)"
    _refuses(base, adapter, tmp_path / "refused", match=r"cls\.predictions\.decoder\.weight.*--untie")


# ---------------------------------------------------------------------------------------------------------
# sequence classifiers: no output head, nothing tied
# ---------------------------------------------------------------------------------------------------------

CLASSIFIERS = {
    "llama": ("LlamaForSequenceClassification", ["embed_tokens", "q_proj"]),
    "bert": ("BertForSequenceClassification", ["word_embeddings", "query"]),
}


@pytest.mark.parametrize("family", list(CLASSIFIERS))
def test_sequence_classifier_with_lora_on_the_embedding_merges(family: str, tmp_path: Path) -> None:
    """``tie_word_embeddings`` is true (the default) but the classifier has no vocabulary head: nothing is
    tied, so the merge is PEFT's, bitwise, and so are the logits of the loaded output."""
    cls, targets = CLASSIFIERS[family]
    base = make_tiny(tmp_path / "base", cls, family, tie_word_embeddings=True, num_labels=3)
    assert _config(base)["tie_word_embeddings"] is True
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", r=4, lora_alpha=6, task_type="SEQ_CLS",
                                target_modules=targets)
    peft_dir = tmp_path / "peft"
    peft = peft_merged_pretrained(model_class(cls), base, adapter, BF16, save_to=peft_dir)
    out = tmp_path / "out"
    _merge(base, adapter, out)
    assert_bitwise_equal(load_folder_tensors(out), peft)
    assert _config(out) == _config(base)
    ids = inputs_for(family)
    assert torch.equal(folder_logits(cls, out, ids), folder_logits(cls, peft_dir, ids))


# ---------------------------------------------------------------------------------------------------------
# tied base + added tokens: trained copies of embed_tokens and/or lm_head
# ---------------------------------------------------------------------------------------------------------

ADDED_TOKENS = {
    "both-resized": (["embed_tokens", "lm_head"], 104),
    "both": (["embed_tokens", "lm_head"], None),
    "lm_head": (["lm_head"], None),
    "embed_tokens": (["embed_tokens"], None),
}


@pytest.mark.parametrize("case", list(ADDED_TOKENS))
def test_tied_base_with_trained_embedding_copies(case: str, tmp_path: Path) -> None:
    """modules_to_save copies on a tied Llama (what TRL setup_chat_format, LLaMA-Factory new_special_tokens and
    unsloth add_new_tokens produce, often with a resized vocabulary): written as separate tensors with
    ``tie_word_embeddings: false``, exactly PEFT's saved merge, without --untie."""
    cls = "LlamaForCausalLM"
    save, resize = ADDED_TOKENS[case]
    base = make_tiny(tmp_path / "base", cls, "llama", tie_word_embeddings=True)
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", resize_vocab=resize, r=4, lora_alpha=6,
                                task_type="CAUSAL_LM", target_modules=["q_proj"], modules_to_save=save)
    peft_dir = peft_merged_folder(cls, base, adapter, tmp_path / "peft", resize)
    peft = load_folder_tensors(peft_dir)
    assert _config(peft_dir)["tie_word_embeddings"] is False and "lm_head.weight" in peft

    out = tmp_path / "out"
    _merge(base, adapter, out)
    assert_bitwise_equal(load_folder_tensors(out), peft)
    cfg = _config(out)
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == (resize or _config(base)["vocab_size"])
    ids = inputs_for("llama")
    assert torch.equal(folder_logits(cls, out, ids), folder_logits(cls, peft_dir, ids))


def test_tied_base_resized_vocabulary_lora_elsewhere(tmp_path: Path) -> None:
    """Added tokens with a LoRA on q_proj only: PEFT saves the resized shared tensor under both tied names
    (``model.embed_tokens.weight`` and ``lm_head.weight``); nothing is untied, exactly PEFT's saved merge."""
    cls = "LlamaForCausalLM"
    base = make_tiny(tmp_path / "base", cls, "llama", tie_word_embeddings=True)
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", resize_vocab=104, r=4, lora_alpha=6,
                                task_type="CAUSAL_LM", target_modules=["q_proj"])
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= \
        load_file(adapter / "adapter_model.safetensors").keys()
    peft_dir = peft_merged_folder(cls, base, adapter, tmp_path / "peft", 104)
    out = tmp_path / "out"
    _merge(base, adapter, out)
    assert_bitwise_equal(load_folder_tensors(out), load_folder_tensors(peft_dir))
    assert _config(out) == {**_config(base), "vocab_size": 104} and _config(peft_dir)["tie_word_embeddings"]
    ids = inputs_for("llama")
    assert torch.equal(folder_logits(cls, out, ids), folder_logits(cls, peft_dir, ids))


def test_tied_base_resized_vocabulary_lora_on_lm_head_untied(tmp_path: Path) -> None:
    """Added tokens with a LoRA on lm_head: PEFT saves only ``lm_head.base_layer.weight`` (the resized shared
    tensor). --untie writes it as the embedding and adds the head delta to the head only (the unmerged
    forward; PEFT's merge adds it to the shared tensor, §7.1)."""
    cls = "LlamaForCausalLM"
    base = make_tiny(tmp_path / "base", cls, "llama", tie_word_embeddings=True)
    adapter = make_peft_adapter(base, cls, tmp_path / "adapter", resize_vocab=104, r=4, lora_alpha=6,
                                task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"])
    ad = load_file(adapter / "adapter_model.safetensors")
    shared = ad["base_model.model.lm_head.base_layer.weight"]
    assert shared.shape[0] == 104 and "base_model.model.model.embed_tokens.weight" not in ad
    peft = load_folder_tensors(peft_merged_folder(cls, base, adapter, tmp_path / "peft", 104))
    head = merge_once(shared, lora_delta(ad["base_model.model.lm_head.lora_A.weight"],
                                         ad["base_model.model.lm_head.lora_B.weight"], 1.5))
    assert torch.equal(peft["model.embed_tokens.weight"], head)  # PEFT: the delta lands in the shared tensor
    _refuses(base, adapter, tmp_path / "refused", match="--untie")
    out = tmp_path / "out"
    _merge(base, adapter, out, untie=True)
    assert_bitwise_equal(load_folder_tensors(out), {**peft, "model.embed_tokens.weight": shared,
                                                    "lm_head.weight": head})
    assert _config(out) == {**_config(base), "vocab_size": 104, "tie_word_embeddings": False}

    _untied_logits_match_unmerged(cls, "llama", base, adapter, tmp_path, resize_vocab=104)
