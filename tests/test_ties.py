"""Tie detection (stream_merge.ties, tie_table, hf_ties): which tensors a model fills from another on load,
decided from the config's architecture and from what is on disk, and the plan's answer to each case.

Synthetic checkpoints (a few tiny tensors with real names) keep these fast; tests/test_parity_ties.py checks
the same rules on real transformers models against PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from stream_merge import hf_ties
from stream_merge.adapter import load_adapter
from stream_merge.checkpoint import read_index
from stream_merge.keymap import TargetResolver
from stream_merge.planner import PlanOptions, build_plan
from stream_merge.tie_table import ARCH_TIED_KEYS
from stream_merge.ties import TieGroup, arch_tied_keys, tie_groups

V, H = 40, 8  # vocabulary rows, hidden size


def _base(folder: Path, shapes: dict[str, tuple[int, ...]], **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"vocab_size": V, **config}))
    return folder


def _lora_adapter(folder: Path, modules: dict[str, str], r: int = 2) -> Path:
    """A PEFT-format adapter: module -> "linear" (lora_A/B) or "embedding" (lora_embedding_A/B), alpha 3."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for module, kind in modules.items():
        p = f"base_model.model.{module}"
        if kind == "embedding":
            sd[f"{p}.lora_embedding_A"] = torch.randn(r, V, generator=gen)
            sd[f"{p}.lora_embedding_B"] = torch.randn(H, r, generator=gen)
        else:
            sd[f"{p}.lora_A.weight"] = torch.randn(r, H, generator=gen)
            sd[f"{p}.lora_B.weight"] = torch.randn(H, r, generator=gen)
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 3, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none", "use_rslora": False, "fan_in_fan_out": False}))
    return folder


def _groups(shapes: dict[str, tuple[int, ...]], **config: Any) -> set[TieGroup]:
    from stream_merge.records import BaseIndex, ShardHeader, TensorInfo

    infos = tuple(TensorInfo(n, "BF16", s, 0, 0) for n, s in shapes.items())
    base = BaseIndex(root="", shards=(ShardHeader("model.safetensors", 0, 0, infos),),
                     weight_map=dict.fromkeys(shapes, "model.safetensors"), single_file=True,
                     config={"vocab_size": V, **config})
    return set(tie_groups(base, TargetResolver(shapes.keys())))


EMB, ROW = (V, H), (V,)
BERT_MLM = {"bert.embeddings.word_embeddings.weight": EMB, "cls.predictions.bias": ROW,
            "cls.predictions.transform.dense.weight": (H, H)}


@pytest.mark.parametrize("arch", sorted(ARCH_TIED_KEYS))
def test_table_matches_transformers(arch: str) -> None:
    """Every row of our table is what the installed transformers ties for that class (tying switched on)."""
    import transformers

    cfg = getattr(transformers, arch).config_class().to_dict()
    assert hf_ties.transformers_tied_keys({**cfg, "architectures": [arch]}) == dict(ARCH_TIED_KEYS[arch])


def test_architecture_rules() -> None:
    assert arch_tied_keys({"architectures": ["BertForMaskedLM"]}) == dict(ARCH_TIED_KEYS["BertForMaskedLM"])
    assert arch_tied_keys({"architectures": ["SomeNewModelForCausalLM"]}) is None  # the lm_head rule
    assert arch_tied_keys({}) is None
    for head in ("LlamaForSequenceClassification", "Qwen2ForTokenClassification", "BertModel"):
        assert arch_tied_keys({"architectures": [head]}) == {}
    # not in the table: transformers' own keys (Whisper's head is proj_out)
    assert arch_tied_keys({"architectures": ["ElectraForPreTraining"], "model_type": "electra"}) == {}
    assert arch_tied_keys({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}) == {
        "proj_out.weight": "model.decoder.embed_tokens.weight"}
    assert arch_tied_keys({"architectures": ["NoSuchModelForPretraining"]}) is None


def test_transformers_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without transformers an unknown architecture falls back to our rules; nothing raises."""
    def no_module(name: str) -> Any:
        raise ImportError(name)

    monkeypatch.setattr(hf_ties.importlib, "import_module", no_module)
    assert hf_ties.transformers_tied_keys({"architectures": ["ElectraForPreTraining"]}) is None
    assert arch_tied_keys({"architectures": ["ElectraForPreTraining"]}) is None
    assert arch_tied_keys({"architectures": ["Qwen3MoeForSequenceClassification"]}) == {}
    assert arch_tied_keys({"architectures": ["Qwen3MoeForCausalLM"]}) is None
    assert _groups({"model.embed_tokens.weight": EMB}, architectures=["ElectraForPreTraining"]) == {
        TieGroup("model.embed_tokens.weight", ("lm_head.weight",))}


GROUP_CASES: dict[str, tuple[dict, dict, set[TieGroup]]] = {
    "llama": ({"model.embed_tokens.weight": EMB}, {"architectures": ["LlamaForCausalLM"]},
              {TieGroup("model.embed_tokens.weight", ("lm_head.weight",))}),
    "llama-no-flag-defaults-to-tied": ({"model.embed_tokens.weight": EMB}, {},
                                       {TieGroup("model.embed_tokens.weight", ("lm_head.weight",))}),
    "llama-untied-flag": ({"model.embed_tokens.weight": EMB},
                          {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}, set()),
    "llama-head-on-disk": ({"model.embed_tokens.weight": EMB, "lm_head.weight": EMB},
                           {"architectures": ["LlamaForCausalLM"]}, set()),
    "llama-only-head-on-disk": ({"lm_head.weight": EMB}, {"architectures": ["LlamaForCausalLM"]},
                                {TieGroup("lm_head.weight", ("model.embed_tokens.weight",))}),
    "legacy-vlm": ({"language_model.model.embed_tokens.weight": EMB, "vision_tower.x.weight": (H, H)},
                   {"architectures": ["LlavaForConditionalGeneration"]},
                   {TieGroup("language_model.model.embed_tokens.weight", ("language_model.lm_head.weight",))}),
    "llama-classifier": ({"model.embed_tokens.weight": EMB, "score.weight": (3, H)},
                         {"architectures": ["LlamaForSequenceClassification"]}, set()),
    "bert-classifier": ({"bert.embeddings.word_embeddings.weight": EMB, "classifier.weight": (3, H)},
                        {"architectures": ["BertForSequenceClassification"]}, set()),
    "bert-mlm": (BERT_MLM, {"architectures": ["BertForMaskedLM"]},
                 {TieGroup("bert.embeddings.word_embeddings.weight", ("cls.predictions.decoder.weight",)),
                  TieGroup("cls.predictions.bias", ("cls.predictions.decoder.bias",))}),
    "t5": ({"shared.weight": EMB}, {"architectures": ["T5ForConditionalGeneration"]},
           {TieGroup("shared.weight", ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                       "lm_head.weight"))}),
    "bart-classifier": ({"model.shared.weight": EMB}, {"architectures": ["BartForSequenceClassification"]},
                        {TieGroup("model.shared.weight", ("model.encoder.embed_tokens.weight",
                                                          "model.decoder.embed_tokens.weight"))}),
    "gpt2": ({"transformer.wte.weight": EMB, "transformer.wpe.weight": (16, H)},
             {"architectures": ["GPT2LMHeadModel"]}, {TieGroup("transformer.wte.weight", ("lm_head.weight",))}),
    "gpt2-unprefixed": ({"wte.weight": EMB, "wpe.weight": (16, H)}, {"architectures": ["GPT2LMHeadModel"]},
                        {TieGroup("wte.weight", ("lm_head.weight",))}),
    "roberta-mlm": ({"roberta.embeddings.word_embeddings.weight": EMB, "lm_head.bias": ROW,
                     "lm_head.dense.weight": (H, H)}, {"architectures": ["RobertaForMaskedLM"]},
                    {TieGroup("roberta.embeddings.word_embeddings.weight", ("lm_head.decoder.weight",)),
                     TieGroup("lm_head.bias", ("lm_head.decoder.bias",))}),
    "distilbert-mlm": ({"distilbert.embeddings.word_embeddings.weight": EMB, "vocab_projector.bias": ROW},
                       {"architectures": ["DistilBertForMaskedLM"]},
                       {TieGroup("distilbert.embeddings.word_embeddings.weight", ("vocab_projector.weight",))}),
    "tie_encoder_decoder": ({"encoder.layer.0.q.weight": (H, H), "decoder.layer.0.x.weight": (H, H)},
                            {"architectures": ["EncoderDecoderModel"], "tie_encoder_decoder": True},
                            {TieGroup("encoder.layer.0.q.weight", ("decoder.layer.0.q.weight",))}),
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_tie_groups(case: str) -> None:
    shapes, config, want = GROUP_CASES[case]
    assert _groups(shapes, **config) == want


def test_tie_encoder_decoder_refused_then_untied(tmp_path: Path) -> None:
    """A transformers-4 `tie_encoder_decoder` base stores only the encoder twin of each decoder weight: a LoRA
    on it is refused without --untie; --untie writes the decoder twin (the unchanged base tensor) and turns
    both tie flags off."""
    from stream_merge import merge
    from stream_merge.errors import StreamMergeError

    q = "encoder.layer.0.q"
    base = _base(tmp_path / "base", {f"{q}.weight": (H, H), "decoder.layer.0.x.weight": (H, H)},
                 architectures=["EncoderDecoderModel"], tie_encoder_decoder=True)
    adapter = _lora_adapter(tmp_path / "adapter", {q: "linear"})
    plan = build_plan(read_index(base), [load_adapter(adapter)])
    assert len(plan.problems) == 1 and "decoder.layer.0.q.weight" in plan.problems[0]
    with pytest.raises(StreamMergeError, match="--untie"):
        merge(str(base), str(adapter), str(tmp_path / "refused"), device="cpu")
    out = tmp_path / "out"
    merge(str(base), str(adapter), str(out), device="cpu", untie=True)
    got, w = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(got["decoder.layer.0.q.weight"], w[f"{q}.weight"])
    assert not torch.equal(got[f"{q}.weight"], w[f"{q}.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_encoder_decoder"] is False and cfg["tie_word_embeddings"] is False


def test_bert_refusal_names_the_head_on_the_command_line(tmp_path: Path) -> None:
    """Exit 2 and one line naming the tied head BertForMaskedLM loads, not lm_head."""
    base = _base(tmp_path / "base", BERT_MLM, architectures=["BertForMaskedLM"], model_type="bert")
    adapter = _lora_adapter(tmp_path / "adapter", {"bert.embeddings.word_embeddings": "embedding"})
    proc = run_cli("merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "cls.predictions.decoder.weight" in proc.stderr and "--untie" in proc.stderr
    assert "Traceback" not in proc.stderr and "lm_head" not in proc.stderr


def test_untie_with_nothing_tied_touched_changes_nothing(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", {**BERT_MLM}, architectures=["BertForMaskedLM"])
    adapter = _lora_adapter(tmp_path / "adapter", {"cls.predictions.transform.dense": "linear"})
    plan = build_plan(read_index(base), [load_adapter(adapter)], PlanOptions(untie=True))
    assert not plan.problems and not plan.config_updates
    assert [t.name for s in plan.shards for t in s.tensors] == list(BERT_MLM)


def test_untie_with_two_candidate_embeddings_is_refused(tmp_path: Path) -> None:
    """The lm_head rule cannot pick between two vocabulary-row embeddings: refused, naming both."""
    shapes = {"model.embed_tokens.weight": EMB, "model.embed_tokens_2.weight": EMB}
    base = _base(tmp_path / "base", shapes, architectures=["SomeNewModelForCausalLM"])
    adapter = _lora_adapter(tmp_path / "adapter", {"model.embed_tokens": "embedding"})
    plan = build_plan(read_index(base), [load_adapter(adapter)], PlanOptions(untie=True))
    assert len(plan.problems) == 1 and "cannot tell" in plan.problems[0]
    assert all(n in plan.problems[0] for n in shapes)


def test_only_hf_ties_imports_transformers() -> None:
    """transformers is optional: no other module of the package imports it (load_renames reads its load-time
    renames the same way, optionally)."""
    import ast

    pkg = Path(hf_ties.__file__).parent
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  and not n.level}
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        uses = "transformers" in names or ("transformers" in strings and "import_module" in path.read_text())
        assert uses == (path.stem in ("hf_ties", "load_renames")), path.name
