"""The ``fidbench`` command: list the registered methods; print, compare, merge and plot saved reports;
propose floors from a measured run; convert the original scripts' run configs; train Medusa heads.

Fidelity runs themselves are pytest: ``pytest tests/methods -k "llama and topk"``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from . import attribution, compare, floors, frontier, medusa_train, merge, plot, provenance, report, stats
from .legacy import runs
from .methods import REGISTRY, kvpress
from .suite import DatasetSpec, SuiteError
from .suite import load as load_suite


def _type(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def describe_methods() -> str:
    """Every registered method: name, how it is teacher-forced (and whether its prefill is the base model's,
    which a suite may share: ``share_prefill_gib``), description, where its defaults come from, parameters with
    defaults."""
    lines = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        # A property decides per instance (StreamingLLM's parameters say whether the prefill is dense; a stack's
        # members decide): its docstring says how, if it has one.
        mode = {True: "parallel", False: "stepwise"}.get(cls.parallel_exact, getattr(cls.parallel_exact, "__doc__", ""))
        shared = {True: ", base prefill", False: ""}.get(
            cls.base_prefill, f", {getattr(cls.base_prefill, '__doc__', None) or 'base prefill by default'}")
        role = f", role {cls.role}" if cls.role else ""
        lines.append(f"{name}  ({mode}{shared}{role})  {cls.description}")
        lines.append(f"    defaults from: {cls.defaults_from}")
        fields = [f for f in dataclasses.fields(cls) if f.init]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    {f.name}: {_type(f.type)} = {default!r}")
        if not fields:
            lines.append("    (no parameters)")
        if name == "kvpress":  # its presses are parameters too
            lines.append(kvpress.describe())
    return "\n".join(lines)


def _dataset(arg: str) -> DatasetSpec:
    """``[NAME=]PATH`` of a conversations JSONL file (the name defaults to the file's stem)."""
    name, _, path = arg.rpartition("=")
    path = Path(path)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"dataset file {path} does not exist")
    return DatasetSpec(name or path.stem, path, "conversations")


def _print(text: str) -> None:
    """Print, and when the reader has gone (``fidbench report r.json | head``) stop writing without a traceback;
    the command goes on, so its exit status (a gate's verdict) is kept."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush goes nowhere


def _allowance(direction: str):
    def parse(text: str) -> compare.Allowance:
        try:
            return compare.allowance(text, direction)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of prompts per dataset, or all")
    return int(text)


def _level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = -1.0
    if not 0 < level < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a confidence level between 0 and 1, e.g. 0.95")
    return level


def _described(module) -> dict:
    """A subcommand's description: its module's docstring, as written."""
    return {"description": module.__doc__.replace("``", ""), "formatter_class": argparse.RawDescriptionHelpFormatter}


def _parser() -> argparse.ArgumentParser:
    summary, _, epilog = __doc__.replace("``", "").partition("\n\n")
    parser = argparse.ArgumentParser(prog="fidbench", description=" ".join(summary.split()), epilog=epilog.strip())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list every registered method with its parameters and defaults")
    rep = sub.add_parser("report", help="print the results table of a --fidbench-report JSON file")
    rep.add_argument("path", type=Path, help="the report written by pytest --fidbench-report")
    rep.add_argument("--overall", action="store_true", help="one row per case, without the per-dataset rows")
    rep.add_argument("--markdown", action="store_true", help="a Markdown table")
    imp = sub.add_parser(
        "import-runs", help="write the suite equivalent to the original runs/{model}-{method}.json configs",
        description=runs.__doc__,
    )
    imp.add_argument("dir", type=Path, help="the original scripts' directory (holding runs/) or the runs directory")
    imp.add_argument("-o", "--output", type=Path, default=Path("fidbench.yaml"),
                     help="suite file to write (default: fidbench.yaml)")
    imp.add_argument("--datasets", nargs="+", type=_dataset, metavar="[NAME=]PATH",
                     help="conversation JSONL files to evaluate on (default: the datasets of fidbench's default suite)")
    imp.add_argument("--force", action="store_true", help="overwrite the output file if it exists")

    cmp = sub.add_parser("compare", help="paired per-sample changes between two reports, with intervals and a gate",
                         **_described(compare))
    cmp.add_argument("base", type=Path, help="the baseline report")
    cmp.add_argument("new", type=Path, help="the report to judge against it")
    cmp.add_argument("--max-drop", action="append", default=[], type=_allowance("drop"), metavar="METRIC=X",
                     help="allowed drop of acc1, acc5 or a free-running score (rouge_l, rouge_l_ids, common_prefix, "
                          "answer_recall), absolute (acc1=0.01) or relative to the base (acc1=2%%)")
    cmp.add_argument("--max-rise", action="append", default=[], type=_allowance("rise"), metavar="METRIC=X",
                     help="allowed rise of kl_mean or edit_distance, absolute (kl_mean=0.05) or relative to the base "
                          "(kl_mean=10%%)")
    cmp.add_argument("--gate", choices=compare.RULES, default="interval",
                     help="fail when the whole interval is beyond the allowance (interval, default) "
                          "or when the measured change is (point)")
    cmp.add_argument("--level", type=_level, default=stats.LEVEL, help="confidence of the intervals (default 0.95)")
    cmp.add_argument("--allow-mismatch", action="store_true",
                     help="compare reports of other base model weights, settings or references anyway")
    cmp.add_argument("--json", type=Path, metavar="OUT", help="also write the comparison as JSON")

    mrg = sub.add_parser("merge", help="merge the reports of shards of one run into one report",
                         **_described(merge))
    mrg.add_argument("reports", type=Path, nargs="+", help="the shards' reports")
    mrg.add_argument("-o", "--output", type=Path, required=True, help="the merged report to write")
    mrg.add_argument("--force", action="store_true",
                     help="merge reports of other model weights, settings, library versions or commits anyway")

    flo = sub.add_parser("floors", help="propose floors from a measured run, as YAML for a suite",
                         **_described(floors))
    flo.add_argument("path", type=Path, help="a report of the run to learn from (ideally of every prompt)")
    flo.add_argument("--at-limit", nargs="+", type=_limit, default=[None], metavar="N",
                     help="run sizes the floors must hold at: prompts per dataset, or all (default: the report's own)")
    flo.add_argument("--level", type=_level, default=floors.LEVEL,
                     help="one-sided confidence of each floor (default 0.99)")

    plt = sub.add_parser("plot", help="figures (PNG, SVG) and an HTML page of a report",
                         **_described(plot))
    plt.add_argument("path", type=Path, help="the report to plot")
    plt.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                     help="directory for the figures and index.html")

    fro = sub.add_parser("frontier", help="the most aggressive value of a parameter whose run still meets floors",
                         **_described(frontier))
    fro.add_argument("suite", type=Path, help="the suite file holding the variants (its first model is used)")
    fro.add_argument("--variant", action="append", required=True, help="a variant to search (repeatable)")
    fro.add_argument("--param", required=True, help="the numeric parameter to search: ratio, budget, keep, bits, ...")
    fro.add_argument("--range", nargs=2, type=float, required=True, metavar=("LOW", "HIGH"), help="values searched")
    fro.add_argument("--tolerance", type=float, required=True,
                     help="stop when a passing and a failing value are this close")
    fro.add_argument("--floor", action="append", required=True, type=_floor, metavar="METRIC=BOUND",
                     help="acc1=0.9 (a minimum), kl_mean=0.1 (a maximum); acc1, acc5, kl_mean (repeatable)")
    fro.add_argument("--aggressive", choices=("low", "high"), default="low",
                     help="which end compresses more (default low: ratio, budget, keep, bits)")
    fro.add_argument("--grid", type=int, default=0, help="evenly spaced values probed between the ends first, to "
                     "find non-monotone cases (default 0)")
    fro.add_argument("--by-dataset", action="store_true", help="also the frontier of each dataset")
    fro.add_argument("--limit", type=_limit, default=None, help="prompts per dataset (default: all)")
    fro.add_argument("--level", type=_level, default=stats.LEVEL, help="bootstrap interval level (default 0.95)")
    fro.add_argument("-o", "--output", type=Path,
                     help="write the probes' case records and the frontier (report format)")

    med = sub.add_parser("train-medusa", help="fit Medusa heads on a model's own greedy outputs (Medusa's format)",
                         description=medusa_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    med.add_argument("model", help="a model directory, a hub id in the local cache, or an embedded name (smollm2-135m)")
    med.add_argument("out", type=Path, help="directory to write medusa_lm_head.safetensors and config.json to")
    defaults = medusa_train.Settings()
    for name, kind, what in [("heads", int, "heads to train (1-3 in minutes on a CPU)"),
                             ("layers", int, "ResBlocks per head"),
                             ("steps", int, "optimizer steps"), ("batch", int, "positions per step"),
                             ("lr", float, "peak learning rate"),
                             ("seed", int, "seed of the initialisation and the batches"),
                             ("max-new-tokens", int, "tokens generated per training prompt")]:
        default = getattr(defaults, name.replace("-", "_"))
        med.add_argument(f"--{name}", type=kind, default=default, help=f"{what} (default {default})")
    med.add_argument("--data", type=Path, default=Path(defaults.data), help="training prompts, conversations JSONL "
                     "(default: data/train.jsonl, written for training, never scored)")
    med.add_argument("--tokenizer", help="tokenizer directory, if the model's has none")
    med.add_argument("--dtype", default="fp32", help="the model's dtype (default fp32)")
    med.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    med.add_argument("--force", action="store_true", help="overwrite heads already in OUT")
    return parser


def _write(command: str, path: Path, doc: dict) -> bool:
    """Write ``doc`` as strict JSON (a non-finite number as null) to ``path`` atomically, creating missing
    parent directories; False, with the reason on stderr, when it cannot be written."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report.finite(doc), indent=1, allow_nan=False))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a partial file, if one was started
            tmp.unlink()
        print(f"fidbench {command}: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def _floor(text: str) -> tuple[str, float]:
    metric, sep, value = text.partition("=")
    try:
        return metric, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METRIC=BOUND (acc1=0.9), got {text!r}") from None


def _frontier(args) -> int:
    try:
        doc = frontier.run(load_suite(args.suite), args.variant, args.param, *args.range, args.tolerance,
                           dict(args.floor), args.aggressive, args.grid, args.by_dataset, args.limit, args.level,
                           log=lambda line: print(f"fidbench frontier: {line}", file=sys.stderr, flush=True))
    except (frontier.FrontierError, SuiteError) as e:
        print(f"fidbench frontier: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        frontier.write(doc, args.output)
    _print(frontier.table(doc))
    return 0


def _read(command: str, path: Path) -> dict | None:
    try:
        return provenance.read(path)
    except provenance.ReportError as e:
        print(f"fidbench {command}: error: {e}", file=sys.stderr)
        return None


ERROR, CRASH = 2, 3  # exit statuses beside 0 (done) and 1 (compare's gate failed): see main


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: done (``compare``: the gate passed, or none was given); 1: ``compare``'s gate failed (no other
    command returns 1); 2: a usage error, a report that cannot be read or is not as written, an output that
    cannot be written, reports that cannot be compared or merged; 3: fidbench itself failed (a bug: the
    traceback is printed), never read as a gate's verdict."""
    try:
        return _main(argv)
    except Exception:
        traceback.print_exc()
        print(f"fidbench: internal error (exit status {CRASH}): please report it with the traceback above",
              file=sys.stderr)
        return CRASH


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    if args.command == "methods":
        _print(describe_methods())
        return 0
    if args.command == "report":
        if (doc := _read("report", args.path)) is None:
            return ERROR
        # then, where the report holds stacks, each member's share of a stack's loss
        _print(report.table(doc["cases"], datasets=not args.overall, markdown=args.markdown)
               + attribution.table(doc["cases"], markdown=args.markdown))
        for error in doc.get("errors") or []:  # a run that could not collect its cases: its report says why
            print(f"fidbench report: {args.path}: the run collected no case: {error}", file=sys.stderr)
        return 0
    if args.command == "frontier":
        return _frontier(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "floors":
        if (doc := _read("floors", args.path)) is None:
            return ERROR
        proposals, warnings = floors.propose(doc, args.at_limit, args.level)
        for warning in dict.fromkeys(warnings):  # also in the YAML's comments; here where a reader sees them
            print(f"fidbench floors: warning: {warning}", file=sys.stderr)
        _print(floors.yaml(proposals, warnings, str(args.path), args.at_limit, args.level))
        return 0
    if args.command == "plot":
        if (doc := _read("plot", args.path)) is None:
            return ERROR
        try:
            paths = plot.write(doc, args.output, args.path.name)
        except plot.PlotError as e:
            print(f"fidbench plot: error: {e}", file=sys.stderr)
            return ERROR
        except OSError as e:  # the directory cannot be made or written
            print(f"fidbench plot: error: cannot write to {args.output}: {e.strerror or e}", file=sys.stderr)
            return ERROR
        _print(f"wrote {len(paths)} files to {args.output}: open {args.output / 'index.html'}")
        return 0
    if args.command == "train-medusa":
        try:
            return medusa_train.main(args)
        except (ValueError, OSError) as e:
            print(f"fidbench train-medusa: error: {e}", file=sys.stderr)
            return ERROR
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; use --force to overwrite it")
    try:
        suite = runs.write(args.dir, args.output, args.datasets)
    except runs.RunsError as e:
        print(f"fidbench import-runs: error: {e}", file=sys.stderr)
        return ERROR
    _print(f"wrote {args.output}: {len(suite['models'])} model(s), {len(suite['methods'])} variant(s), "
           f"{len(suite['datasets'])} dataset(s)")
    return 0


def _compare(args) -> int:
    """Exit status 0: the gate passed (or none was given); 1: it failed; 2: the reports cannot be compared."""
    base, new = _read("compare", args.base), _read("compare", args.new)
    if base is None or new is None:
        return ERROR
    try:
        result = compare.compare(base, new, (str(args.base), str(args.new)), args.max_drop + args.max_rise,
                                 args.gate, args.allow_mismatch, args.level)
    except compare.CompareError as e:
        print(f"fidbench compare: error: {e}", file=sys.stderr)
        return ERROR
    if args.json and not _write("compare", args.json, result):
        return ERROR
    _print(compare.table(result))
    return 0 if result["passed"] else 1


def _merge(args) -> int:
    docs = {}
    for path in args.reports:
        if (doc := _read("merge", path)) is None:
            return ERROR
        if str(path) in docs:
            print(f"fidbench merge: error: {path} is given twice", file=sys.stderr)
            return ERROR
        docs[str(path)] = doc
    try:
        merged, notes = merge.merge(docs, args.force)
    except merge.MergeError as e:
        print(f"fidbench merge: error: {e}", file=sys.stderr)
        return ERROR
    if not _write("merge", args.output, merged):
        return ERROR
    for note in notes:
        print(f"fidbench merge: {note}", file=sys.stderr)
    _print(f"wrote {args.output}: {len(merged['cases'])} case(s) from {len(docs)} reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
