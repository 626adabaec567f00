"""Where inputs come from: a local folder now; Hub repos (`org/name[@revision]`) plug in here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s]+)?$")


@dataclass(frozen=True)
class Source:
    """A resolved input: what the user typed, the local folder, and the pinned revision (Hub only)."""

    spec: str
    path: Path
    revision: str | None = None
    kind: str = "local"


def resolve_source(spec: str, what: str) -> Source:
    path = Path(spec).expanduser()
    if path.exists():
        return Source(spec=spec, path=path.resolve())
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        raise InputError(f"{what} {spec!r} is not a local folder, and downloading from the Hub is not supported "
                         "in this version", fix="download it first (huggingface-cli download) and pass the folder")
    raise InputError(f"{what} folder not found", file=spec, fix="check the path")
