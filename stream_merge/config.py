"""Merge options: the one table of options (`MergeConfig`), and YAML file and/or keywords -> a checked config.

The YAML keys are the field names (the CLI flag names with underscores); flags win over the file. Unknown keys
are errors with a "did you mean", never silently ignored. Every check of a value and of a combination of
options runs in `build_config`, before any side effect (an output folder created, a journal written, a Hub
repo created). `stream_merge.options` explains the metadata each field carries.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import options as o
from .errors import ConfigError
from .options import MAX_BLOCK_SIZE_MB, MAX_PREFETCH, Conflict, Declared, opt

_WORKER_FIX = "run --fresh once without --worker (or empty OUT), then start the workers"


@dataclass(frozen=True)
class MergeConfig:
    """Everything that decides a merge. `base`/`adapters` are local folders or Hub ids `org/name[@revision]`."""

    base: str = opt(coerce=o.string, cli={"nargs": "?", "metavar": "BASE"},
                    help="base checkpoint folder (model.safetensors.index.json + shards, or model.safetensors), or "
                         "Hub repo id ORG/NAME[@REVISION]")
    adapters: tuple[str, ...] = opt(coerce=o.strings, cli={"nargs": "*", "metavar": "ADAPTER"}, aliases=("adapter",),
                                    help="PEFT LoRA adapter folder(s) or Hub repo id(s) ORG/NAME[@REVISION]")
    weights: tuple[float, ...] = opt((), coerce=o.finite_numbers, flags=("--weights",), aliases=("weight",),
                                     cli={"nargs": "+", "type": float, "metavar": "W"}, record=True, fingerprint=True,
                                     help="one weight per adapter (default 1.0)")
    key_map: tuple[tuple[str, str], ...] = opt(
        (), coerce=o.key_map, flags=("--key-map",), from_cli=o.key_map_from_cli, record=True, fingerprint=True,
        cli={"action": "append", "metavar": "REGEX=REPLACEMENT"},
        help="extra rule mapping adapter module names to base tensor names (repeatable)")
    strict: bool = opt(False, coerce=o.flag, flags=("--strict",), record=True, fingerprint=True,
                       help="treat compatibility warnings (adapter trained on another model) as errors")
    untie: bool = opt(False, coerce=o.flag, flags=("--untie",), record=True, fingerprint=True,
                      help="for bases with tied weights (lm_head and embed_tokens, T5/BART shared, BERT MLM head): "
                           "write each tied tensor separately so an adapter may change one (sets "
                           "tie_word_embeddings=false)")
    dequantize: bool = opt(False, coerce=o.flag, flags=("--dequantize",), record=True, fingerprint=True,
                           help="fp8 block-quantized bases: write every fp8 weight as bf16 and drop the scales, "
                                "instead of re-quantizing the patched weights")
    dtype: str = opt("auto", coerce=o.matching(r"auto|bf16|fp16|fp32", "auto, bf16, fp16 or fp32"), flags=("--dtype",),
                     record=True, fingerprint=True, cli={"choices": ("auto", "bf16", "fp16", "fp32")},
                     help="output dtype of floating tensors (default auto: each tensor keeps the base's dtype); "
                          "integer and fp8 tensors are left alone")
    max_shard_size: int | None = opt(None, coerce=o.file_size, flags=("--max-shard-size",), record=True,
                                     fingerprint=True, cli={"metavar": "SIZE"},
                                     help="re-shard the output like transformers' save_pretrained: shards of at most "
                                          "SIZE (5GB = 5*10^9 bytes, 5GiB = 5*2^30, 500MB, or bytes; a bigger tensor "
                                          "gets a shard of its own), named model-0000i-of-0000n.safetensors "
                                          "(default: the base's own shards)")
    allow_pickle: bool = opt(False, coerce=o.flag, flags=("--allow-pickle",), record=True, fingerprint=True,
                             help="accept PyTorch pickle weights: adapter_model.bin (torch.load(weights_only=True)) "
                                  "and pytorch_model*.bin bases (parsed without running the pickle, read tensor by "
                                  "tensor; the output is safetensors)")
    token: str | None = opt(None, coerce=o.string, flags=("--token",), repr=False, cli={"metavar": "TOKEN"},
                            help="Hugging Face token for gated or private repos (default: HF_TOKEN or the saved login)")
    output: str | None = opt(None, coerce=o.string, flags=("-o", "--output"), commands=("merge",), aliases=("out",),
                             cli={"metavar": "OUT"}, help="output folder (required unless --dry-run)")
    device: str = opt("auto", coerce=o.matching(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
                      flags=("--device",), commands=("merge",), record=True, fingerprint=True,
                      help="auto (default), cpu, cuda or cuda:N (the journal records the kind, cpu or cuda: a "
                           "merge resumes on the same kind)")
    dry_run: bool = opt(False, coerce=o.flag, flags=("--dry-run",), commands=("merge",),
                        help="plan and check only; write nothing")
    fresh: bool = opt(False, coerce=o.flag, flags=("--fresh",), commands=("merge",),
                      help="discard a previous partial output in OUT")
    block_size_mb: int = opt(2, coerce=o.whole_number(1, MAX_BLOCK_SIZE_MB, "a row block is held in memory per "
                                                      "compute thread; bigger blocks only add memory"),
                             flags=("--block-size-mb",), commands=("merge",), cli={"type": int, "metavar": "MB"},
                             help=f"fp32 row-block budget per patched tensor, 1 to {MAX_BLOCK_SIZE_MB} (default 2)")
    check_finite: bool = opt(True, coerce=o.flag, flags=("--no-check-finite",), commands=("merge",), record=True,
                             fingerprint=True, help="skip the NaN/Inf check on merged tensors")
    checksums: bool = opt(False, coerce=o.flag, flags=("--checksums",), commands=("merge",),
                          help="also record the sha256 of each local BASE file (one more read of the base), so "
                               "a copied base is recognised by content on resume, and the sha256 of every output "
                               "shard (computed while writing; with --push-to-hub always); every shard's XXH3-128 "
                               "is always recorded")
    prefetch: int = opt(1, coerce=o.whole_number(0, MAX_PREFETCH, "each shard fetched ahead is a whole base shard "
                                                 "on disk at once"),
                        flags=("--prefetch",), commands=("merge",), base_kind="hub", cli={"type": int, "metavar": "N"},
                        help=f"Hub BASE: download up to N shards ahead of the one being merged (default 1; 0 = none; "
                             f"at most {MAX_PREFETCH})")
    keep_downloads: bool = opt(False, coerce=o.flag, flags=("--keep-downloads",), commands=("merge",), base_kind="hub",
                               help="Hub BASE: download shards into the HF cache and keep them (default: into OUT, "
                                    "deleted once merged)")
    push_to_hub: str | None = opt(None, coerce=o.matching(r"[A-Za-z0-9][\w.-]*/[\w.-]+", "a repo id ORG/NAME (no "
                                                          "@revision)"),
                                  flags=("--push-to-hub",), commands=("merge",), cli={"metavar": "ORG/NAME"},
                                  help="upload OUT to this Hub model repo, each shard as soon as it is written (re-run "
                                       "to resume)")
    private: bool = opt(False, coerce=o.flag, flags=("--private",), commands=("merge",), requires="push_to_hub",
                        help="with --push-to-hub: create the repo private")
    local_copy: bool = opt(True, coerce=o.flag, flags=("--no-local-copy",), commands=("merge",),
                           requires="push_to_hub", help="with --push-to-hub: delete each shard from OUT once it is "
                                                        "uploaded")
    worker: str | None = opt(None, coerce=o.worker_spec, flags=("--worker",), commands=("merge",),
                             cli={"metavar": "I/N"}, conflicts=(
        Conflict("ray", "--worker and --ray are two ways to split a merge; use one", "drop --worker or --ray"),
        Conflict("fresh", "--fresh cannot be combined with --worker: one worker would delete the others' shards",
                 _WORKER_FIX),
        Conflict("push_to_hub", "--push-to-hub cannot be combined with --worker: no worker holds every shard",
                 "use one process, or run the --worker runs and `stream-merge finalize OUT`, then the merge "
                 "command again without --worker and with --push-to-hub"),
    ), help="merge only partition I of N (0-based, balanced by bytes) into the shared OUT; the last worker to "
            "finish writes the index (or run `stream-merge finalize OUT`)")
    ray: str | None = opt(None, coerce=o.string, flags=("--ray",), commands=("merge",), base_kind="local",
                          cli={"nargs": "?", "const": "local", "metavar": "ADDRESS"},
                          help="run one Ray task per shard (a local Ray instance, or the cluster at ADDRESS); "
                               "needs stream-merge[ray] and BASE/OUT on a shared file system")

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        return self.weights or tuple(1.0 for _ in self.adapters)


OPTIONS: dict[str, Declared] = {d.name: d for d in o.declared(MergeConfig)}
ALIASES = {alias: d.name for d in OPTIONS.values() for alias in d.option.aliases}
REQUIRED = ("base", "adapters")


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, tuple(OPTIONS) + tuple(ALIASES), n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(OPTIONS)}"
    return ConfigError(f"unknown config key {key!r}", key=key, fix=hint)


def normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and types of raw options; drop None values (= not given)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in OPTIONS:
            raise _unknown(key)
        if value is None:
            continue
        out[name] = OPTIONS[name].option.coerce(name, value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into checked options (ConfigError naming the file on any problem)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file cannot be read ({exc})", file=str(p)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML ({str(exc).splitlines()[0]})", file=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file must be a YAML mapping of option names to values", file=str(p))
    try:
        return normalise(data)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=str(p), key=exc.key, fix=exc.fix) from None


def build_config(file_options: Mapping[str, Any] | None = None, **overrides: Any) -> MergeConfig:
    """YAML values, then keyword overrides (None = not given) -> a MergeConfig whose values and combinations
    are all checked. Raises ConfigError; touches nothing (the only file-system access is asking whether
    BASE exists, to tell a folder from a Hub repo id)."""
    merged = dict(file_options or {})
    merged.update(normalise(overrides))
    missing = [k for k in REQUIRED if k not in merged]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)}", fix="give them on the command line or in --config")
    cfg = MergeConfig(**merged)
    check_combinations(cfg, {k for k, v in merged.items() if OPTIONS[k].given(v)})
    return cfg


def check_combinations(cfg: MergeConfig, given: set[str]) -> None:
    """The checks between options (`given`: the options set to something other than their default)."""
    if cfg.weights and len(cfg.weights) != len(cfg.adapters):
        raise ConfigError(f"{len(cfg.weights)} weights for {len(cfg.adapters)} adapters", key="weights",
                          fix="give one weight per adapter")
    for name in sorted(given, key=list(OPTIONS).index):
        d = OPTIONS[name]
        if d.option.requires and d.option.requires not in given:
            need = OPTIONS[d.option.requires]
            raise ConfigError(f"{d.flag} ({name}: {_yaml(getattr(cfg, name))}) only applies with {need.flag}", key=name,
                              fix=f"add {need.flag} or drop {d.flag}")
        for c in d.option.conflicts:
            if c.other in given:
                raise ConfigError(c.message, key=name, fix=c.fix)
        if d.option.base_kind is not None:
            _check_base_kind(cfg.base, d)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def is_hub_repo_id(spec: str) -> bool:
    """Whether a BASE / ADAPTER spec names a Hub repo, decided as `sources.resolve_source` does: not an
    existing path, and of the form `org/name[@revision]`."""
    from .sources import HUB_ID

    return not Path(spec).expanduser().exists() and bool(HUB_ID.match(spec)) \
        and not spec.startswith((".", "/", "~"))


def _check_base_kind(base: str, d: Declared) -> None:
    hub = is_hub_repo_id(base)
    if d.option.base_kind == "local" and hub:
        raise ConfigError(f"{d.flag} needs BASE on a file system every node can read, and {base!r} is a Hub repo "
                          "id", key=d.name, fix=f"download the base first and pass its folder, or drop {d.flag}")
    if d.option.base_kind == "hub" and not hub:
        raise ConfigError(f"{d.flag} only applies to a Hub BASE, and {base!r} is a local folder", key=d.name,
                          fix=f"drop {d.flag}")


def recorded_options(cfg: MergeConfig, device_kind: str) -> dict[str, Any]:
    """The options written to the journal and to stream_merge.json (`device` as its kind, cpu or cuda: the
    kind decides the last bits of a GEMM, the index does not). An option left unset (None, e.g. no
    --max-shard-size) is left out, so a record keeps the digest it had before that option existed."""
    return {n: device_kind if n == "device" else getattr(cfg, n) for n, d in OPTIONS.items()
            if d.option.record and getattr(cfg, n) is not None}


def fingerprint_options(cfg: MergeConfig, device_kind: str) -> dict[str, Any]:
    """The options that enter the resume fingerprint: a change to any of them changes the output bytes."""
    return {n: v for n, v in recorded_options(cfg, device_kind).items() if OPTIONS[n].option.fingerprint}


def config_from_record(inputs: Mapping[str, Any], options: Mapping[str, Any], output: str | None = None) -> MergeConfig:
    """The MergeConfig that produced a journal / stream_merge.json record: Hub inputs pinned to their recorded
    commits, each adapter's recorded weight, and the recorded options. A record is untrusted input: an
    option this version does not record is a ConfigError."""
    def spec(entry: Mapping[str, Any]) -> str:
        if entry.get("revision"):
            return f"{entry['spec'].split('@')[0]}@{entry['revision']}"
        return entry["path"]

    unknown = [k for k in options if k not in OPTIONS or not OPTIONS[k].option.record]
    if unknown:
        raise ConfigError(f"the record holds option {unknown[0]!r}, which this version of stream-merge does not "
                          "record", key=unknown[0], fix="use the stream-merge version that wrote it")
    recorded = {k: v for k, v in options.items() if k != "weights"}
    return build_config(base=spec(inputs["base"]), adapters=[spec(a) for a in inputs["adapters"]],
                        weights=[a["weight"] for a in inputs["adapters"]], output=output, **recorded)
