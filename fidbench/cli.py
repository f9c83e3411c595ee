"""The ``fidbench`` command: list the registered methods, print a saved report, convert the original
scripts' run configs, train Medusa heads.

Fidelity runs themselves are pytest: ``pytest tests/methods -k "llama and topk"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import medusa_train, report
from .legacy import runs
from .methods import REGISTRY
from .suite import DatasetSpec


def _type(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def describe_methods() -> str:
    """Every registered method: name, how it is teacher-forced, description, parameters with defaults."""
    lines = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        mode = "parallel" if cls.parallel_exact else "stepwise"
        lines.append(f"{name}  ({mode})  {cls.description}")
        fields = [f for f in dataclasses.fields(cls) if f.init]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    {f.name}: {_type(f.type)} = {default!r}")
        if not fields:
            lines.append("    (no parameters)")
    return "\n".join(lines)


def _dataset(arg: str) -> DatasetSpec:
    """``[NAME=]PATH`` of a conversations JSONL file (the name defaults to the file's stem)."""
    name, _, path = arg.rpartition("=")
    path = Path(path)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"dataset file {path} does not exist")
    return DatasetSpec(name or path.stem, path, "conversations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fidbench", description=__doc__.splitlines()[0])
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
    imp.add_argument("-o", "--output", type=Path, default=Path("fidbench.yaml"), help="suite file to write (default: fidbench.yaml)")
    imp.add_argument("--datasets", nargs="+", type=_dataset, metavar="[NAME=]PATH",
                     help="conversation JSONL files to evaluate on (default: the datasets of fidbench's default suite)")
    imp.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    med = sub.add_parser("train-medusa", help="fit Medusa heads on a model's own greedy outputs (Medusa's format)",
                         description=medusa_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    med.add_argument("model", help="a model directory, a hub id in the local cache, or an embedded name (smollm2-135m)")
    med.add_argument("out", type=Path, help="directory to write medusa_lm_head.safetensors and config.json to")
    defaults = medusa_train.Settings()
    for name, kind, what in [("heads", int, "heads to train (1-3 in minutes on a CPU)"), ("layers", int, "ResBlocks per head"),
                             ("steps", int, "optimizer steps"), ("batch", int, "positions per step"),
                             ("lr", float, "peak learning rate"), ("seed", int, "seed of the initialisation and the batches"),
                             ("max-new-tokens", int, "tokens generated per training prompt")]:
        default = getattr(defaults, name.replace("-", "_"))
        med.add_argument(f"--{name}", type=kind, default=default, help=f"{what} (default {default})")
    med.add_argument("--data", type=Path, default=Path(defaults.data), help="training prompts, conversations JSONL "
                     "(default: data/medusa_train.jsonl, written for training, never scored)")
    med.add_argument("--tokenizer", help="tokenizer directory, if the model's has none")
    med.add_argument("--dtype", default="fp32", help="the model's dtype (default fp32)")
    med.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    med.add_argument("--force", action="store_true", help="overwrite heads already in OUT")
    args = parser.parse_args(argv)

    if args.command == "methods":
        print(describe_methods())
        return 0
    if args.command == "report":
        try:
            cases = report.read(args.path)["cases"]
        except report.ReportError as e:
            print(f"fidbench report: error: {e}", file=sys.stderr)
            return 2
        print(report.table(cases, datasets=not args.overall, markdown=args.markdown))
        return 0
    if args.command == "train-medusa":
        try:
            return medusa_train.main(args)
        except (ValueError, OSError) as e:
            print(f"fidbench train-medusa: error: {e}", file=sys.stderr)
            return 2
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; use --force to overwrite it")
    try:
        suite = runs.write(args.dir, args.output, args.datasets)
    except runs.RunsError as e:
        print(f"fidbench import-runs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(suite['models'])} model(s), {len(suite['methods'])} variant(s), "
          f"{len(suite['datasets'])} dataset(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
