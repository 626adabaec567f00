"""Which tensors a model class fills from another one on load (tied weights), per architecture. Pure data.

Keys are transformers' in-memory names: `target -> source`, as transformers 5 expands them for a whole model
(every sub-model's `_tied_weights_keys`, prefixed) when `tie_word_embeddings` is true. `tests/test_ties.py`
checks every row against the installed transformers.
"""

from __future__ import annotations

from collections.abc import Mapping

_LM = {"lm_head.weight": "model.embed_tokens.weight"}
_T5 = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
_BART = {"model.encoder.embed_tokens.weight": "model.shared.weight",
         "model.decoder.embed_tokens.weight": "model.shared.weight"}
_BART_LM = {**_BART, "lm_head.weight": "model.shared.weight"}


def _mlm(head: str, emb: str, bias: str | None) -> dict[str, str]:
    out = {f"{head}.weight": emb}
    if bias is not None:
        out[f"{head}.bias"] = bias
    return out


_BERT = _mlm("cls.predictions.decoder", "bert.embeddings.word_embeddings.weight", "cls.predictions.bias")
_ROBERTA = _mlm("lm_head.decoder", "roberta.embeddings.word_embeddings.weight", "lm_head.bias")
_ALBERT = _mlm("predictions.decoder", "albert.embeddings.word_embeddings.weight", "predictions.bias")

ARCH_TIED_KEYS: Mapping[str, Mapping[str, str]] = {
    # decoder-only language models
    **{f"{n}ForCausalLM": _LM for n in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Phi3")},
    "GPT2LMHeadModel": {"lm_head.weight": "transformer.wte.weight"},
    # encoder-decoders tied through `shared`
    **{f"{n}ForConditionalGeneration": {**_T5, "lm_head.weight": "shared.weight"}
       for n in ("T5", "MT5", "UMT5", "LongT5")},
    "T5Model": _T5, "MT5Model": _T5, "UMT5Model": _T5,
    "T5EncoderModel": {"encoder.embed_tokens.weight": "shared.weight"},
    "T5ForSequenceClassification": {f"transformer.{k}": f"transformer.{v}" for k, v in _T5.items()},
    **{f"{n}ForConditionalGeneration": _BART_LM
       for n in ("Bart", "MBart", "Pegasus", "PLBart", "Blenderbot", "M2M100")},
    "MarianMTModel": _BART_LM,
    "BartModel": {k.removeprefix("model."): v.removeprefix("model.") for k, v in _BART.items()},
    "BartForSequenceClassification": _BART, "MBartForSequenceClassification": _BART,
    # masked-LM heads
    "BertForMaskedLM": _BERT, "BertForPreTraining": _BERT,
    "RobertaForMaskedLM": _ROBERTA, "XLMRobertaForMaskedLM": _ROBERTA,
    "DistilBertForMaskedLM": {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"},
    "AlbertForMaskedLM": _ALBERT, "AlbertForPreTraining": _ALBERT,
    "ElectraForMaskedLM": {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"},
    "DebertaV2ForMaskedLM": _mlm("cls.predictions.decoder", "deberta.embeddings.word_embeddings.weight",
                                 "cls.predictions.bias"),
    "ModernBertForMaskedLM": {"decoder.weight": "model.embeddings.tok_embeddings.weight"},
}

# Without transformers (or for a class it does not know): heads that read hidden states, not vocabulary rows,
# tie nothing (unless their base model does, which the table above lists) ...
HEADLESS_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                     "ForMultipleChoice", "ForImageClassification", "Model")

# ... and every other class gets the Llama-like rule: `lm_head.weight` filled from the input embedding.
LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

# model_type -> why untying cannot keep the logits.
UNTIE_REFUSED = {
    m: "T5-family models scale the decoder output by d_model**-0.5 only while the head is tied "
       "(transformers 5 forces tie_word_embeddings=true for them), so a separate head changes the logits"
    for m in ("t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano", "udop")
}
