"""Frozen values passed between stages: headers, adapters, the plan, results.

Kept free of logic beyond derived fields so that `plan` can import it without importing any IO module, and
so that a plan can be printed as JSON and fingerprinted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Every dtype of the safetensors format (its Rust `Dtype` enum, safetensors 0.7) -> bits per element. A tensor
# that is only copied needs nothing more than its byte length; sub-byte dtypes (F4, F6_*) pack elements, and
# the format requires the packed bits to fill whole bytes.
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# bytes per element of the whole-byte dtypes (the ones a tensor can be read row by row in)
DTYPE_SIZES: Mapping[str, int] = {k: bits // 8 for k, bits in DTYPE_BITS.items() if bits % 8 == 0}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
FP8_DTYPES = frozenset({"F8_E4M3"})


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of a tensor's data, or None when the dtype is unknown or its packed bits do not fill whole bytes."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None or numel(shape) * bits % 8:
        return None
    return numel(shape) * bits // 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    """A parsed safetensors header. `tensors` keeps the header's JSON order. A reader of another format
    (torch.save's zip, `pickle_io`) sets `data_start=0` and gives absolute offsets in its TensorInfos."""

    file: str
    size: int
    header_len: int
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] | None = None
    data_start: int | None = None  # None: a safetensors file (data after the 8-byte length and the header)

    @property
    def data_offset(self) -> int:
        """Where the offsets of `tensors` count from: the one place that says so."""
        return 8 + self.header_len if self.data_start is None else self.data_start

    @property
    def safetensors(self) -> bool:
        """Whether the file is safetensors (its own header bytes can be copied to an output)."""
        return self.data_start is None

    @property
    def output_name(self) -> str:
        """The name of this shard's output in the base's layout: its own for safetensors; for a PyTorch
        `.bin` the safetensors name transformers gives it (`pytorch_model.bin` -> `model.safetensors`,
        `pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`)."""
        if self.safetensors:
            return self.file
        stem = self.file.removesuffix(".bin")
        return ("model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem) + ".safetensors"

    @cached_property
    def by_name(self) -> Mapping[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


@dataclass(frozen=True)
class BaseIndex:
    """The base checkpoint as planning sees it: shard headers, weight map and config.json."""

    root: str
    shards: tuple[ShardHeader, ...]
    weight_map: Mapping[str, str]
    single_file: bool
    config: Mapping[str, Any] | None
    index_metadata: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return {t.name: t for s in self.shards for t in s.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)


@dataclass(frozen=True)
class AdapterTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraSettings:
    """The merge-relevant fields of adapter_config.json, validated."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    use_dora: bool = False
    target_modules: Any = None
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    ensure_weight_tying: bool = False


@dataclass(frozen=True)
class AdapterSpec:
    """One PEFT adapter: where it is, its settings and the tensors its weight file holds (no data)."""

    path: str
    config_file: str
    weights_file: str
    settings: LoraSettings
    tensors: tuple[AdapterTensor, ...]
    raw_config: Mapping[str, Any]
    weight: float = 1.0
    label: str = ""

    @cached_property
    def by_key(self) -> Mapping[str, AdapterTensor]:
        return {t.key: t for t in self.tensors}


@dataclass(frozen=True)
class LoraPatch:
    """One adapter module's low-rank contribution to one base tensor.

    kind: "linear" (W is (out,in)), "conv1d" (HF Conv1D, W is (in,out)), "embedding" (W is (vocab,dim)),
    "conv" (ConvNd, W is (out,in,*k)), "bias" (lora_bias: b += lora_B.bias * scale) or "param" (LoRA on a
    raw parameter, `target_parameters`: A is (r·E, in), B is (out, r·E); the target is the whole (E,out,in)
    tensor, or expert `expert`'s rows starting at `row_offset` of the fused delta when experts are stored one
    by one on disk; `transposed`: the fused target is stored (E, in, out), GPT-OSS style, and each expert's
    delta is (B_e @ A_e)ᵀ). `magnitude_key` makes it a DoRA patch.
    """

    module: str
    target: str
    kind: str
    adapter: int
    a_key: str | None
    b_key: str
    rank: int
    alpha: float
    scale: float
    weight: float = 1.0
    double_round: bool = False
    magnitude_key: str | None = None
    experts: int = 0
    expert: int | None = None
    row_offset: int = 0
    transposed: bool = False


@dataclass(frozen=True)
class Replacement:
    """A full tensor from the adapter file that replaces the base tensor (modules_to_save, biases, saved
    embedding layers); applied before any patch, cast to the output dtype."""

    target: str
    adapter: int
    key: str
    reason: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QuantSpec:
    """An fp8 block-quantized weight (or its scale tensor) that the merge must decode and re-encode.

    mode "requant": the patched weight is re-quantized with fresh block scales; role "weight" writes the fp8
    values, role "scale" writes the new `weight_scale_inv` (recomputed from the same blocks).
    mode "dequant": the weight is written as bf16 (its scale tensor is dropped from the output).
    `partner` is the other tensor of the pair (the scale for a weight, the weight for a scale), stored in
    `partner_file` when that is another shard.
    """

    mode: str
    role: str
    partner: TensorInfo
    block: tuple[int, int]
    partner_file: str | None = None  # the partner's shard when it is not this tensor's (DeepSeek-V3 does this)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor. `source` is the base tensor it starts from, stored in base shard `source_file`
    (set by the planner when it assembles the shards; empty: the shard plan's own file); for a tensor the
    merge adds (an untied lm_head) the name differs from the source's."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    replace: Replacement | None = None
    patches: tuple[LoraPatch, ...] = ()
    quant: QuantSpec | None = None
    source_file: str = ""

    @property
    def action(self) -> str:
        if self.patches or self.quant:
            return "merge"
        return "replace" if self.replace else "copy"

    @property
    def out_nbytes(self) -> int:
        n = tensor_nbytes(self.dtype, self.shape)
        assert n is not None, (self.name, self.dtype, self.shape)  # headers are validated when parsed
        return n


@dataclass(frozen=True)
class ShardPlan:
    """One OUTPUT shard: its file name (what the journal, resume, push, the index and verify key on), its
    tensors in header order, each read from the base shard its `source_file` names (`inputs`: those files in
    data order). Without --max-shard-size an output shard is the base shard of the same name, tensors in the
    same order. `in_bytes`: the bytes this shard's output costs to produce, header included (the base shard's
    size when the layout is unchanged). `header_unchanged`: the output header is the input's own bytes (one
    input, same names, dtypes and shapes). `metadata`: the output header's `__metadata__`."""

    file: str
    tensors: tuple[TensorPlan, ...]
    in_bytes: int
    header_unchanged: bool
    metadata: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if any(not t.source_file for t in self.tensors):  # a hand-built plan: every tensor from `file`
            object.__setattr__(self, "tensors", tuple(t if t.source_file else dataclasses.replace(
                t, source_file=self.file) for t in self.tensors))

    @property
    def inputs(self) -> tuple[str, ...]:
        """The distinct base shards this output shard reads, in the order its data needs them."""
        return tuple(dict.fromkeys(t.source_file for t in self.data_order))

    @property
    def data_order(self) -> tuple[TensorPlan, ...]:
        """Output data order: by input file (first use in header order), then by offset in it, so that an
        added tensor (untied head) follows its source and neighbours in one input stay neighbours."""
        first: dict[str, int] = {}
        for t in self.tensors:
            first.setdefault(t.source_file, len(first))
        return tuple(sorted(self.tensors, key=lambda t: (first[t.source_file], t.source.start, t.source.end)))

    @property
    def layout_changed(self) -> bool:
        """Whether this output shard is not simply the base shard of the same name (--max-shard-size)."""
        return any(t.source_file != self.file for t in self.tensors)

    @property
    def out_data_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)

    @property
    def touched(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.action != "copy")


@dataclass(frozen=True)
class ModuleMapping:
    adapter: int
    module: str
    target: str
    kind: str
    rank: int
    alpha: float
    scale: float
    via: str


@dataclass(frozen=True)
class MergePlan:
    base: BaseIndex
    adapters: tuple[AdapterSpec, ...]
    shards: tuple[ShardPlan, ...]
    mapping: tuple[ModuleMapping, ...]
    config_updates: Mapping[str, Any]
    warnings: tuple[str, ...]
    problems: tuple[str, ...]

    def inputs_of(self, outputs: Iterable[str]) -> list[str]:
        """The base shards that the output shards `outputs` read, each once, in plan order (what a Hub base
        downloads for them)."""
        wanted = set(outputs)
        return list(dict.fromkeys(b for s in self.shards if s.file in wanted for b in s.inputs))

    @property
    def patched_tensors(self) -> int:
        return sum(len(s.touched) for s in self.shards)

    @property
    def copied_tensors(self) -> int:
        return sum(len(s.tensors) - len(s.touched) for s in self.shards)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (what `stream-merge plan --json` prints)."""
        return {
            "base": self.base.root,
            "adapters": [{"path": a.path, "weight": a.weight, "weights_file": a.weights_file}
                         for a in self.adapters],
            "shards": [
                {
                    "file": s.file,
                    "bytes": s.in_bytes,
                    "tensors": len(s.tensors),
                    "patched": [t.name for t in s.touched],
                    "copied": len(s.tensors) - len(s.touched),
                }
                for s in self.shards
            ],
            "mapping": [dataclasses.asdict(m) for m in self.mapping],
            "config_updates": dict(self.config_updates),
            "warnings": list(self.warnings),
            "problems": list(self.problems),
        }

    def fingerprint(self) -> str:
        """sha256 of everything that decides the output bytes, for the journal."""
        payload: dict[str, Any] = {
            "shards": [[s.file, [[t.name, t.dtype, list(t.shape), t.source.start, t.source.end,
                                  dataclasses.asdict(t.replace) if t.replace else None,
                                  [dataclasses.asdict(p) for p in t.patches],
                                  dataclasses.asdict(t.quant) if t.quant else None] for t in s.tensors]]
                       for s in self.shards],
            "config_updates": dict(self.config_updates),
        }
        if any(s.layout_changed for s in self.shards):  # absent otherwise: earlier records keep their digest
            payload["sources"] = [[t.source_file for t in s.tensors] for s in self.shards]
            payload["metadata"] = [dict(s.metadata or {}) for s in self.shards]
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ShardResult:
    file: str
    size: int
    sha256: str | None  # None unless asked for (--checksums, --push-to-hub)
    patched: int
    copied: int
    seconds: float
    xxh3_128: str | None = None  # the writer's XXH3-128: every merge records it; None in older records


@dataclass(frozen=True)
class MergeReport:
    output: str
    plan: MergePlan
    shards: tuple[ShardResult, ...]
    seconds: float
    peak_rss_bytes: int
    dry_run: bool = False
    resumed_shards: int = 0
    pending: tuple[str, ...] = ()  # shards other workers still have to finish (partitioned runs)
    disk: tuple[Any, ...] = ()  # a dry run's plan_report.DiskNeed per file system: needed and free bytes

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)
