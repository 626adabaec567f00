"""The plan as text, answering "will it work?": the per-shard table and module mapping, the totals (bytes to
read and write, tensors patched and copied, disk needed against free), one diagnosis line when the adapter
plainly belongs to another model, the problems (capped), and last a one-line verdict. Pure: the free space
comes in as `DiskNeed`s measured by `disk_space`; `cli` prints these lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .compat import adapter_hidden_size, base_hidden_size
from .keymap import ParsedKey, parse_key
from .records import MergePlan

GIB = 2**30
PROBLEM_CAP = 20  # problems listed before "... and N more"
NOT_FOUND = re.compile(r"module '([^']+)': matched no base tensor")
MISMATCH_MARKERS = ("shape mismatch", "fit none of the base")
MODULE_ROLES = frozenset({"A", "B", "emb_A", "emb_B"})
FULL_LIST_HINT = "all of them: `stream-merge plan BASE ADAPTER --json`"


@dataclass(frozen=True)
class DiskNeed:
    """What a merge needs on one file system: `need` bytes at most at once, `downloads` of them base shards
    fetched from the Hub; `free` measured on `path` (None: not measured, e.g. `plan` has no OUT)."""

    path: str
    need: int
    downloads: int = 0
    free: int | None = None

    @property
    def short(self) -> bool:
        return self.free is not None and self.free < self.need


def gib(n: int) -> str:
    """Bytes in GiB, as progress and the summary print them."""
    return f"{n / GIB:.1f} GiB"


def output_sizes(plan: MergePlan) -> dict[str, int]:
    """Each output shard's size: its input size with the tensor data replaced by what the plan writes."""
    return {s.file: s.in_bytes - sum(t.source.nbytes for t in s.tensors) + s.out_data_bytes for s in plan.shards}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def capped(lines: Sequence[str], cap: int = PROBLEM_CAP, hint: str = FULL_LIST_HINT) -> list[str]:
    """The first `cap` lines, then one "... and N more" line naming where the full list is."""
    if len(lines) <= cap:
        return list(lines)
    return [*lines[:cap], f"... and {len(lines) - cap} more ({hint})"]


def _adapter_modules(plan: MergePlan) -> set[tuple[int, str]]:
    modules = set()
    for idx, spec in enumerate(plan.adapters):
        for t in spec.tensors:
            pk = parse_key(t.key)
            if isinstance(pk, ParsedKey) and pk.role in MODULE_ROLES:
                modules.add((idx, pk.module))
    return modules


def _generic(name: str) -> str:
    """A module or tensor name with its layer numbers as N: `model.layers.N.self_attn.q_proj`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", name)


def _base_example(plan: MergePlan, module: str) -> str:
    """A BASE tensor name to show beside an adapter module: one with the same last part when there is one."""
    names = [n[: -len(".weight")] for n, t in plan.base.tensors.items() if n.endswith(".weight") and len(t.shape) >= 2]
    leaf = module.rsplit(".", 1)[-1]
    for pick in ([n for n in names if n.rsplit(".", 1)[-1] == leaf], [n for n in names if re.search(r"\.\d+\.", n)],
                 names, list(plan.base.tensors)):
        if pick:
            return _generic(pick[0])
    return "(none)"


def _names_diagnosis(plan: MergePlan, modules: int, missing: Sequence[str]) -> str:
    what = "none" if len(missing) == modules else f"{len(missing)}"
    return (f"{what} of the adapter's {modules} modules exist in BASE (adapter modules look like "
            f"`{_generic(missing[0])}`, BASE tensors like `{_base_example(plan, missing[0])}`): it was trained "
            "on another model, or its names need a key_map rule")


def _shapes_diagnosis(plan: MergePlan, mismatched: int, found: int) -> str:
    theirs = base_hidden_size(plan.base)
    many = len(plan.adapters) > 1
    for idx, spec in enumerate(plan.adapters):
        mine = adapter_hidden_size(spec)
        if mine is not None and theirs is not None and mine != theirs:
            who = f"adapter {idx}" if many else "the adapter"
            return (f"{who} was trained on a model with hidden size {mine}; BASE has {theirs} ({mismatched} of "
                    f"the {found} modules found in BASE do not fit their shapes)")
    same = f" (same hidden size {theirs}, other layer sizes)" if theirs is not None else ""
    return f"{mismatched} of the {found} adapter modules found in BASE do not fit their shapes: the adapter was " \
           f"trained on another model{same}"


def diagnosis(plan: MergePlan) -> str | None:
    """One line when the adapter plainly belongs to another model: most of its modules are not in BASE, or
    most of those that are do not fit their shapes. None otherwise (the problems then speak for themselves)."""
    n = len(_adapter_modules(plan))
    if not n or not plan.problems:
        return None
    missing = [m.group(1) for p in plan.problems if (m := NOT_FOUND.search(p))]
    if len(missing) * 2 > n:
        return _names_diagnosis(plan, n, missing)
    found = n - len(missing)
    mismatched = sum(any(k in p for k in MISMATCH_MARKERS) for p in plan.problems)
    if found and mismatched * 2 > found:
        return _shapes_diagnosis(plan, mismatched, found)
    return None


def problem_lines(problems: Sequence[str], plan: MergePlan | None, cap: int = PROBLEM_CAP) -> list[str]:
    """What to show of a plan's problems: the diagnosis first (when there is one), then at most `cap`."""
    diag = diagnosis(plan) if plan is not None else None
    return ([f"diagnosis: {diag}"] if diag else []) + capped(problems, cap)


def planned_need(plan: MergePlan, files: Sequence[str], hub_base: bool, prefetch: int) -> DiskNeed:
    """The disk a merge of `files` needs when OUT is not known (`plan`): the output plus one shard of headroom,
    and for a Hub base the (prefetch + 1) biggest base shards downloaded at once; free space unknown."""
    sizes = output_sizes(plan)
    need = sum(sizes[f] for f in files) + max(sizes.values(), default=0)
    base_sizes = {h.file: h.size for h in plan.base.shards}
    inputs = plan.inputs_of(files) if hub_base else []
    fetched = sum(sorted((base_sizes[f] for f in inputs), reverse=True)[:prefetch + 1])
    return DiskNeed("", need + fetched, fetched)


def totals_line(plan: MergePlan, disks: Sequence[DiskNeed] | None) -> str:
    """shards, bytes to read and write, tensors patched / copied, disk needed against free (`disks` None: not
    computed, e.g. for a plan with problems)."""
    read = sum(s.in_bytes for s in plan.shards)
    write = sum(output_sizes(plan).values())
    text = (f"totals: {_plural(len(plan.shards), 'shard')}, {gib(read)} to read, {gib(write)} to write; "
            f"{plan.patched_tensors} tensors patched, {plan.copied_tensors} copied")
    return text if disks is None else f"{text}; disk: {_disk_text(disks)}"


def _disk_text(disks: Sequence[DiskNeed]) -> str:
    if not disks:
        return "nothing left to write"
    parts = []
    for d in disks:
        free = "free space not checked (no OUT: `merge --dry-run -o OUT` checks it)" if d.free is None \
            else f"{gib(d.free)} free on {d.path}"
        fetched = f" (of which {gib(d.downloads)} base shards downloaded at once)" if d.downloads else ""
        parts.append(f"needs {gib(d.need)}{fetched}, {free}")
    return "; ".join(parts)


def verdict(plan: MergePlan, disks: Sequence[DiskNeed] | None, warnings: int = 0, refused: str | None = None
            ) -> str:
    """The last line: OK (with what is merged and the disk), WILL FAIL (the diagnosis or first problem, or
    `refused`: why a plan without problems is refused, e.g. --strict's compatibility finding), or not enough
    disk."""
    if refused and not plan.problems:
        return f"verdict: WILL FAIL — {refused}"
    if plan.problems:
        diag, n = diagnosis(plan), len(plan.problems)
        if diag:
            return f"verdict: WILL FAIL — {diag}; {_plural(n, 'problem')} listed above"
        more = f"; and {_plural(n - 1, 'more problem')} above" if n > 1 else ""
        return f"verdict: WILL FAIL — {plan.problems[0]}{more}"
    disks = disks or ()
    short = next((d for d in disks if d.short), None)
    if short is not None:
        assert short.free is not None
        return f"verdict: not enough disk: needs {gib(short.need)}, {gib(short.free)} free on {short.path}"
    targets = len({m.target for m in plan.mapping})
    text = (f"verdict: OK — {_plural(len(plan.adapters), 'adapter')}, {_plural(len(plan.mapping), 'module')} onto "
            f"{_plural(targets, 'tensor')}")
    need = sum(d.need for d in disks)
    if disks and all(d.free is not None for d in disks):
        text += f"; needs {gib(need)}, " + ", ".join(f"{gib(d.free or 0)} free" for d in disks)
    else:
        text += f"; needs {gib(need)} (free space not checked)"
    return text + (f"; {_plural(warnings, 'warning')} above" if warnings else "")


def report_lines(plan: MergePlan, disks: Sequence[DiskNeed] | None, warnings: Sequence[str] | None = None,
                 notes: Sequence[str] = (), refused: str | None = None) -> list[str]:
    """The whole plan as text (what `stream-merge plan` and `merge --dry-run` print): the tables, the
    warnings (`warnings`, else the plan's own), the problems, `notes`, the totals and, last, the verdict."""
    s: dict[str, Any] = plan.summary()
    lines = [f"base: {s['base']}"]
    lines += [f"adapter {i}: {a['path']} (weight {a['weight']:g})" for i, a in enumerate(s["adapters"])]
    lines += ["", f"{'shard':<40} {'bytes':>14} {'tensors':>8} {'patched':>8} {'copied':>8}"]
    lines += [f"{sh['file']:<40} {sh['bytes']:>14,} {sh['tensors']:>8} {len(sh['patched']):>8} {sh['copied']:>8}"
              for sh in s["shards"]]
    lines += ["", f"{'adapter module':<56} -> {'base tensor':<56} {'kind':<9} {'r':>4} {'scale':>9}  via"]
    lines += [f"{m['module']:<56} -> {m['target']:<56} {m['kind']:<9} {m['rank']:>4} {m['scale']:>9.4g}  {m['via']}"
              for m in s["mapping"]]
    lines += [f"config.json: {u} -> {v}" for u, v in s["config_updates"].items()]
    warnings = list(plan.warnings) if warnings is None else list(warnings)
    lines += [f"warning: {w}" for w in warnings]
    shown = problem_lines(plan.problems, plan)
    lines += [line if line.startswith(("diagnosis:", "... and")) else f"problem: {line}" for line in shown]
    lines += ["", *notes, totals_line(plan, disks), verdict(plan, disks, len(warnings), refused)]
    return lines
