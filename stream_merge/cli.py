"""`stream-merge` command line: a thin layer over the Python API. The only module that prints.

The merge and plan flags are generated from the option table (`config.MergeConfig`). Exit codes: 0 ok,
1 verification failed, 2 bad input, config or not enough memory, 130 interrupted, 3 a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, interrupts
from .errors import CompatibilityError, MergeInterrupted, PlanError, StreamMergeError, memory_error
from .limits import check_address_space
from .platform_support import guard_base_files

MERGE_EXAMPLES = """\
examples:
  # a local adapter into a local checkpoint, then check the result
  stream-merge merge ./Llama-3.1-8B-Instruct ./my-lora -o ./merged
  stream-merge verify ./merged

  # from the Hub to the Hub: shards are downloaded, merged and uploaded one at a time
  stream-merge merge meta-llama/Llama-3.1-8B-Instruct me/my-lora -o ./merged --push-to-hub me/llama-3.1-8b-my-lora
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps help text as usual but keeps multi-line blocks (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """One argument per option of the table that `command` takes; every default is None (= not given), so
    the YAML file's value stands unless the flag is on the command line."""
    from .config import OPTIONS

    for d in OPTIONS.values():
        if command not in d.option.commands:
            continue
        kwargs = dict(d.option.cli)
        if not d.option.flags:
            parser.add_argument(d.name, help=d.option.help, **kwargs)
            continue
        if isinstance(d.default, bool):
            kwargs.setdefault("action", "store_false" if d.default else "store_true")
        parser.add_argument(*d.option.flags, dest=d.name, default=None, help=d.option.help, **kwargs)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with the same keys as these flags (flags win)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="stream-merge",
        description="Merge PEFT LoRA adapters into huge safetensors checkpoints, one shard at a time.")
    parser.add_argument("--version", action="version", version=f"stream-merge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge adapters into the base and write OUT (re-run to resume)",
                       description="Merge ADAPTER(s) into BASE and write a complete checkpoint folder to OUT. "
                                   "Re-running the same command on the same OUT resumes.",
                       epilog=MERGE_EXAMPLES, formatter_class=_Formatter)
    _add_options(m, "merge")
    m.add_argument("--quiet", action="store_true", help="no progress (warnings and the summary are still printed)")
    p = sub.add_parser("plan", help="show what a merge would do, without writing anything",
                       description="Print the plan: per shard the tensors patched and copied, the module -> tensor "
                                   "mapping, and every problem found.")
    _add_options(p, "plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    v = sub.add_parser("verify", help="check an output folder against its record (exit 1 on a mismatch)",
                       description="Check every shard's size and digest (its sha256 where recorded, else its "
                                   "xxh3_128) against stream_merge.json (reading each shard once; the inputs are not "
                                   "needed) and every header against the index. "
                                   "Shards without a recorded digest (older merges) are recomputed from the recorded "
                                   "inputs; --full recomputes every shard and names the first differing tensor.")
    v.add_argument("output", metavar="OUT", help="a folder written by stream-merge merge")
    v.add_argument("--full", action="store_true", help="recompute all tensors from the recorded BASE and ADAPTERs")
    v.add_argument("--quiet", action="store_true", help="no progress (the result is still printed)")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    f = sub.add_parser("finalize", help="after partitioned --worker runs: check every shard, write the index",
                       description="Check that every shard of a partitioned merge is finished and matches the "
                                   "journal (size and mtime, or its digest), then write the side files, the record "
                                   "and the index. Refuses (exit 2) while shards are missing.")
    f.add_argument("output", metavar="OUT", help="the shared output folder of the --worker runs")
    f.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _config(args: argparse.Namespace) -> Any:
    """The checked MergeConfig of a merge / plan command line (its --config file, then its flags)."""
    from .config import OPTIONS, build_config, load_yaml

    given: dict[str, Any] = {}
    for d in OPTIONS.values():
        if args.command in d.option.commands:
            value = getattr(args, d.name)
            if value is not None and value != [] and d.option.from_cli is not None:
                value = d.option.from_cli(value)
            given[d.name] = None if value == [] else value
    return build_config(load_yaml(args.config) if args.config else None, **given)


def _print_plan(plan: Any, disks: Any, warnings: Sequence[str] | None = None, notes: Sequence[str] = (),
                quiet: bool = False, refused: str | None = None) -> None:
    """The plan with its totals and, last, its verdict (plan_report); `disks` None: not computed. `quiet`
    (merge --dry-run --quiet): only the warnings, the notes, the totals and the verdict."""
    from .plan_report import report_lines

    for line in report_lines(plan, disks, warnings, notes, refused):
        if not quiet or line.startswith(("warning:", *notes, "totals:", "verdict:")):
            print(line)


def _print_json(plan: Any, disks: Any, warnings: Sequence[str] | None = None, refused: str | None = None) -> None:
    """plan --json: the plan's summary plus its diagnosis, totals and verdict."""
    from .plan_report import diagnosis, totals_line, verdict

    shown = list(plan.warnings) if warnings is None else list(warnings)
    summary = {**plan.summary(), "warnings": shown, "diagnosis": diagnosis(plan),
               "totals": totals_line(plan, disks), "verdict": verdict(plan, disks, len(shown), refused)}
    print(json.dumps(summary, indent=2))


class _HeldWarnings(logging.Filter):
    """While `plan` / `--dry-run` runs: the library's warnings are kept for the printed plan (which shows each
    once, before its verdict) instead of going to stderr as well."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)
        return False

    def __enter__(self) -> _HeldWarnings:
        logging.getLogger("stream_merge").addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("stream_merge").removeFilter(self)


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (exit 0), or the plan with its problems and a WILL FAIL verdict (exit 2, like a merge
    that would refuse). Without OUT the free disk space is not measured: `merge --dry-run -o OUT` does."""
    from .plan_report import planned_need
    from .planning import plan_merge

    cfg = _config(args)
    show = _print_json if args.json else _print_plan
    with _HeldWarnings() as held:
        try:
            plan, base_src = plan_merge(cfg)[:2]
        except PlanError as exc:
            if exc.plan is not None:  # show the whole plan with its problems, then fail
                show(exc.plan, None)
            raise
        except CompatibilityError as exc:  # --strict
            if exc.plan is not None:
                show(exc.plan, None, refused=exc.message)
            raise
    need = planned_need(plan, [s.file for s in plan.shards], base_src.kind == "hub", cfg.prefetch)
    show(plan, [need], held.messages)
    return 0


class _Warnings(logging.Handler):
    """Collects the library's warnings while a command runs, to repeat them in the summary."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .planning import merge_planned
    from .progress import Reporter

    cfg = _config(args)
    if cfg.output is None and not cfg.dry_run:
        raise ConfigError("no output folder", fix="pass -o OUT (or --dry-run to only check)")
    if cfg.dry_run:
        return _dry_run(cfg, args.quiet)
    reporter = Reporter(quiet=args.quiet)
    warnings = _Warnings()
    logging.getLogger("stream_merge").addHandler(warnings)
    try:
        report = merge_planned(cfg, progress=reporter)
    finally:
        logging.getLogger("stream_merge").removeHandler(warnings)
        reporter.close()
    _summary(cfg, report, reporter, warnings.messages, args.quiet)
    return 0


def _dry_run(cfg: Any, quiet: bool) -> int:
    """merge --dry-run: the plan, its totals with the disk check, and the verdict last; exit 2 when the verdict
    is a failure (problems, or not enough disk), with the error on stderr. With --quiet only the warnings, the
    totals and the verdict."""
    from .errors import DiskSpaceError
    from .runner import run

    note = ["dry run: nothing written"]
    with _HeldWarnings() as held:
        try:
            report = run(cfg)
        except (PlanError, CompatibilityError) as exc:
            if exc.plan is not None:
                refused = exc.message if isinstance(exc, CompatibilityError) else None
                _print_plan(exc.plan, None, notes=note, quiet=quiet, refused=refused)
            raise
        except DiskSpaceError as exc:
            if exc.report is not None:
                _print_plan(exc.report.plan, exc.report.disk, held.messages, note, quiet)
            raise
    _print_plan(report.plan, report.disk, held.messages, ["dry run: plan is valid, nothing written"], quiet)
    return 0


def _summary(cfg: Any, report: Any, reporter: Any, warnings: Sequence[str], quiet: bool) -> None:
    """What happened, on stdout: the totals, what a resume kept, the config changes, the warnings again, the
    Hub URL and the next step. Printed with --quiet too (which silences only progress)."""
    p = report.plan
    gib = 2**30
    written = reporter.written(report.shards) if report.resumed_shards else report.bytes_written
    if report.pending:
        print(f"worker {cfg.worker}: {len(report.shards)} shards done ({report.resumed_shards} resumed), "
              f"{report.bytes_written / gib:.2f} GiB in {report.seconds:.1f} s; {len(report.pending)} shards are "
              "left to other workers (the last one writes the index, or run `stream-merge finalize OUT`)")
    else:
        print(f"merged {len(p.adapters)} adapter(s) into {report.output}: {p.patched_tensors} tensors patched, "
              f"{p.copied_tensors} copied, {len(report.shards)} shards ({report.resumed_shards} resumed), "
              f"{report.bytes_written / gib:.2f} GiB written in {report.seconds:.1f} s, peak RSS "
              f"{report.peak_rss_bytes / gib:.2f} GiB")
    if report.resumed_shards:
        print(f"resumed: {written / gib:.2f} GiB written by this run, {(report.bytes_written - written) / gib:.2f} "
              f"GiB ({report.resumed_shards} shards) kept from an earlier run")
    for key, value in p.config_updates.items():
        print(f"config.json: {key} -> {value}")
    if warnings:
        print(f"warnings ({len(warnings)}, also shown above):")
        for w in warnings:
            print(f"  - {w}")
    if report.pending:
        return
    if cfg.push_to_hub:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        print(f"pushed to {cfg.push_to_hub}: {endpoint}/{cfg.push_to_hub}")
    print(f"next: stream-merge verify {report.output}  (then load it like the base, e.g. "
          f"AutoModelForCausalLM.from_pretrained({report.output!r}))")


def _cmd_finalize(args: argparse.Namespace) -> int:
    from .runner import finalize

    report = finalize(args.output)
    print(f"finalized {report.output}: {len(report.shards)} shards verified, index written")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .verify import verify

    reporter = Reporter(quiet=args.quiet)
    try:
        report = verify(args.output, full=args.full, progress=reporter)
    finally:
        reporter.close()
    for p in report.problems:
        print(f"mismatch: {p}", file=sys.stderr)
    if not report.ok:
        print(f"error: {args.output}: verification failed ({len(report.problems)} problem(s))", file=sys.stderr)
        return 1
    for line in report.summary():
        print(line)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "merge": _cmd_merge, "plan": _cmd_plan, "verify": _cmd_verify, "finalize": _cmd_finalize}


def _report_error(exc: StreamMergeError) -> int:
    """Print a StreamMergeError as one line (a plan's problems as a list) and return its exit code."""
    problems = getattr(exc, "problems", ())
    if len(problems) > 1:
        from .plan_report import problem_lines

        print(f"error: the merge plan has {len(problems)} problems; nothing was written:", file=sys.stderr)
        for p in problem_lines(problems, getattr(exc, "plan", None)):
            print(f"  - {p}", file=sys.stderr)
    else:
        print(f"error: {exc.one_line()}", file=sys.stderr)
    return exc.exit_code


def _std_streams() -> None:
    """Give a closed stdin / stdout / stderr (`merge ... >&-`) /dev/null. Otherwise the first file opened
    takes descriptor 1 and anything written to "stdout" lands in it, and Python's stdout is None, so a merge
    that succeeded would end in a traceback."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name in ("stdin", "stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit code. Every error is one line on stderr (--debug: a traceback)."""
    _std_streams()
    # torch imports numpy, whose OpenBLAS starts a spinning thread per core that we never use; the merge's
    # own math runs on torch/MKL
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    bars_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        # huggingface_hub's own bars: none in logs (raw carriage returns) and none when asked for quiet
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    restore_signals = interrupts.install()
    old_io = guard_base_files() if args.command in ("merge", "verify", "finalize") else None
    try:
        check_address_space()  # before torch is imported: below this, loading it aborts the process
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `stream-merge plan ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return MergeInterrupted.exit_code
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            raise
        oom = memory_error(exc, getattr(args, "block_size_mb", None))
        if oom is not None:
            return _report_error(oom)
        if isinstance(exc, StreamMergeError):
            return _report_error(exc)
        print(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for a traceback, and please "
              "report it)", file=sys.stderr)
        return 3
    finally:
        restore_signals()
        if old_io is not None:  # an in-process caller gets its own SIGIO handling back
            signal.signal(signal.SIGIO, old_io)
        if bars_env is None:  # ... and its environment
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)


def entry() -> None:
    """The `stream-merge` / `python -m stream_merge` entry point: `main`, then a fast exit. Once main has
    returned, every output is fsynced and every thread of ours joined; tearing down an interpreter that
    holds torch only costs time. An exception still takes the normal way out, with its traceback."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a pipe closed by its reader: what was printed is lost, the merge is not
            pass
    os._exit(code)
