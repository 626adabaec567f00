"""The output's model card (`README.md`), fit for the Hub.

Its YAML front matter names the base by its Hub id (the repo given as BASE, or, for a local copy of a Hub model,
the adapters' `base_model_name_or_path`) with `base_model_relation: finetune`: the Hub knows four relations
(adapter, merge, quantized, finetune); `merge` is for a model made from several models listed as base
models, while LoRA weights merged into one base are a fine-tune of that base, which is how the Hub's model
tree should list it. The base card's licence (`license`, `license_name`, `license_link`), its gating terms
(`extra_gated_*`) and its languages are carried over, since the merged weights are bound by them. The body
names each adapter with its revision and weight and the exact command (a `--token` value is redacted), and
keeps the base's own card text below ours, as other merge tools do.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .extras import MAX_SIDE_FILE, RECORD_NAME, checked_side_file
from .records import MergePlan

CARD_NAME = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARRIED_KEYS = ("license", "license_name", "license_link", "language")
RELATION = "finetune"
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(front matter as a dict, body) of a model card; a card without valid front matter is all body."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text[m.end():]
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


def read_base_card(base_dir: Path | None) -> tuple[dict[str, Any], str]:
    """The base's own card, if it has a readable one (a link out of the base folder is refused)."""
    path = None if base_dir is None else base_dir / CARD_NAME
    if path is None or not path.is_file() or path.stat().st_size > MAX_SIDE_FILE:
        return {}, ""
    checked_side_file(base_dir, path)  # type: ignore[arg-type]
    try:
        return split_card(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"the base's {CARD_NAME} cannot be read as UTF-8 text ({exc})", file=str(path),
                         fix="fix or remove the file") from None


def base_hub_id(inputs: Mapping[str, Any], plan: MergePlan) -> tuple[str | None, str | None]:
    """(Hub id, revision) of the base: the repo given as BASE, else the first adapter's
    `base_model_name_or_path` that is a Hub id and not a local folder."""
    base = inputs.get("base", {})
    if base.get("revision"):
        return str(base["spec"]).split("@", 1)[0], str(base["revision"])
    for spec in plan.adapters:
        name = spec.raw_config.get("base_model_name_or_path")
        if isinstance(name, str) and HUB_ID.match(name) and not Path(name).expanduser().exists():
            return name, None
    return None, None


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that made the merge, with a token value redacted; for library calls, a note saying so."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]) if argv else Path()
    if not (prog.name in ("stream-merge", "stream_merge") or prog.parts[-2:] == ("stream_merge", "__main__.py")):
        return "(stream_merge called from Python)"
    words = ["stream-merge"]
    hide = False
    for word in argv[1:]:
        if hide:
            words.append("***")
            hide = False
        elif word == "--token":
            words.append(word)
            hide = True
        elif word.startswith("--token="):
            words.append("--token=***")
        else:
            words.append(word)
    return " ".join(_quote(w) for w in words)


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./*-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def _front_matter(base_id: str | None, base_label: str, base_meta: Mapping[str, Any]) -> str:
    """The YAML header. Without a Hub id for the base, `base_model:` is written as a comment naming the local
    folder: a folder path is not a valid Hub id, and the Hub would refuse the card on push."""
    meta: dict[str, Any] = {}
    unknown = ""
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = RELATION
    else:
        unknown = (f"# base_model: unknown, BASE was the local folder {json.dumps(base_label)}, which names no Hub "
                   "model; set base_model (and base_model_relation: finetune) to its Hub id before pushing\n")
    for key in CARRIED_KEYS:
        if base_meta.get(key) is not None:
            meta[key] = base_meta[key]
    for key, value in base_meta.items():
        if isinstance(key, str) and key.startswith("extra_gated"):
            meta[key] = value
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "lora", "stream-merge"]
    return "---\n" + unknown + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _link(name: str, revision: str | None, hub: bool) -> str:
    at = f" at revision `{revision}`" if revision else ""
    return f"[`{name}`](https://huggingface.co/{name}){at}" if hub else f"`{name}` (a local folder){at}"


def model_card(plan: MergePlan, base_label: str, adapter_labels: Sequence[str], *, base_dir: Path | None = None,
               inputs: Mapping[str, Any] | None = None, argv: Sequence[str] | None = None) -> bytes:
    """The card as bytes. `base_dir`: the base's folder (its card is read from there); `inputs`: the record's
    inputs (revisions); `argv`: the command line (default: this process's)."""
    inputs = inputs or {"base": {"spec": base_label}, "adapters": []}
    base_id, base_rev = base_hub_id(inputs, plan)
    base_meta, base_body = read_base_card(base_dir)
    recorded = list(inputs.get("adapters", []))
    lines = []
    for i, (label, spec) in enumerate(zip(adapter_labels, plan.adapters)):
        rev = recorded[i].get("revision") if i < len(recorded) else None
        lines.append(f"- {_link(label.split('@', 1)[0], rev, bool(rev))} (weight {spec.weight:g})")
    base_text = (_link(base_id, base_rev, True) if base_id and base_rev else
                 f"`{base_label}` (a local copy of {_link(base_id, None, True)})" if base_id else f"`{base_label}`")
    body = (f"# Merged model\n\nThis checkpoint is {base_text} with these LoRA adapters merged into its weights "
            f"(W' = W + scale·B·A) by stream-merge:\n\n" + "\n".join(lines) + "\n\n"
            f"{plan.patched_tensors} tensors were changed and {plan.copied_tensors} copied unchanged. "
            f"See `{RECORD_NAME}` for the exact inputs, options and output shards.\n\n"
            f"Made with:\n\n```sh\n{command_line(argv)}\n```\n")
    if base_body.strip():
        body += f"\n## The base model's card\n\n{base_body.strip()}\n"
    return (_front_matter(base_id, base_label, base_meta) + "\n" + body).encode()

