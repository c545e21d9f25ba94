"""``label-pipeline`` (also ``python -m label_pipeline``).

Exit codes: 0 = the output is complete with no failed sample or shard; 1 = failures are recorded in
the output (on every rerun, until they are gone); 2 = usage or configuration error, nothing labelled;
130 = interrupted by Ctrl-C, 143 = stopped by SIGTERM (both leave a resumable output).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from expert_zoo.registry import ExpertUnavailable, available
from label_pipeline.config import ConfigError, load_manifest
from label_pipeline.core.entry import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, run_command, setup_console
from label_pipeline.output import OutputLocked
from label_pipeline.run import RunOptions, RunSummary

if TYPE_CHECKING:
    from label_pipeline.verify import VerifyReport

logger = logging.getLogger("label_pipeline")
GLOBAL_FLAGS = ("-v", "--verbose", "--debug")
USAGE_ERRORS = (ConfigError, ExpertUnavailable, OutputLocked, FileNotFoundError)
# Subcommands whose arguments belong to another module's parser: everything after the name is
# handed to it, so ``label-pipeline train --help`` shows the trainer's own help.
DELEGATED = {
    "download": ("label_pipeline.download", "turn published URL lists into input shards (img2dataset)"),
    "prepare": ("label_pipeline.prepare", "check the COCO / Visual Genome files you downloaded"),
    "train": ("prismer_trainer.__main__", "train Prismer on label shards"),
    "eval": ("prismer_trainer.__main__", "caption CIDEr / VQA accuracy of a trainer checkpoint"),
}


RUN_EPILOG = """\
exit codes:
  0    the output is complete for these shards, with no failed sample or shard
  1    failures remain in the output (failed samples, failed or missing input shards); on every rerun
  2    usage or configuration error, no input found, output locked or overlapping the input
  130  interrupted by Ctrl-C; 143 stopped by SIGTERM (committed shards are kept: rerun to resume)

A rerun skips shards whose done-record still matches their tar, records and input shard, and labels
the others again. Tracebacks go to OUT/logs/run-*.log (and to the terminal with --debug).
"""


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label-pipeline", description="Prismer expert labels at dataset scale, into WebDataset shards."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks on the terminal (they always go to the run's log in OUT/logs/)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, summary) in DELEGATED.items():
        delegated = sub.add_parser(name, help=summary, add_help=False)
        delegated.add_argument("rest", nargs=argparse.REMAINDER)

    run = sub.add_parser(
        "run",
        help="label a dataset (manifest path or name in manifests/)",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("manifest")
    run.add_argument("--out", help="output root (fsspec URL); default: the manifest's output")
    run.add_argument(
        "--experts", type=_csv, help="comma-separated task[:backend] list, replacing the manifest's"
    )
    run.add_argument(
        "--relabel", type=_csv, default=[], help="tasks whose changed expert may overwrite labels"
    )
    run.add_argument("--limit-shards", type=int, help="only the first N input shards")
    run.add_argument("--runner", choices=["local", "ray"], default="local")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--device", default="auto", help="torch device for in-process experts (auto/cpu/cuda)")
    run.add_argument(
        "--force-unlock", action="store_true", help="take over a lock left by a run that is gone"
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    status = sub.add_parser("status", help="summarise an output root")
    status.add_argument("output")

    verify = sub.add_parser("verify", help="re-read every shard: checksums, keys, decodable members")
    verify.add_argument("output")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="relabel the damaged shards from their input, as recorded in _run.json, then verify again",
    )
    verify.add_argument("--device", default="auto", help="torch device for --repair (auto/cpu/cuda)")

    inspect = sub.add_parser("inspect", help="render a contact sheet of a shard's samples")
    inspect.add_argument("path", metavar="SHARD_OR_OUTPUT", help="a shard tar, or an output root")
    inspect.add_argument("--shard", help="with an output root: the shard id (default: the first done shard)")
    inspect.add_argument("--key", help="one sample key (default: the first samples)")
    inspect.add_argument("--limit", type=int, default=4, help="samples to show without --key")
    inspect.add_argument("--out", required=True, help="PNG file to write")

    weights = sub.add_parser("weights", help="prefetch the weights of experts into the cache")
    weights.add_argument("--experts", type=_csv, required=True)

    sub.add_parser("experts", help="list registered experts")

    prismer = sub.add_parser(
        "import-prismer-tables", help="convert Prismer's CLIP-PCA tables (dataset/*.pt, clip_pca.pkl)"
    )
    prismer.add_argument("checkout", help="a clone of NVlabs/prismer")
    prismer.add_argument("out_dir", help="tables directory to write, e.g. OUT/embeddings of a label root")

    fit = sub.add_parser("fit-pca", help="fit a PCA-64 on the CLIP text embeddings of a word list")
    fit.add_argument("vocabulary", help="text file, one word or phrase per line")
    fit.add_argument("out", help=".npz to write: the `pca` option of ocr_features")
    fit.add_argument("--encoder", help="CLIP text encoder (default hf-hub:openai/clip-vit-large-patch14)")
    fit.add_argument("--sha256", help="expected sha256 of the encoder's weight file")
    fit.add_argument("--device", default="auto")

    export = sub.add_parser(
        "export-prismer",
        help="write a label output in Prismer's own folders ({expert}/{dataset}/{sub}/{stem}.png)",
    )
    export.add_argument("output", help="a label output root (OUT of `label-pipeline run`)")
    export.add_argument("dest", help="local folder to write: Prismer's label_path (not inside OUT)")
    export.add_argument(
        "--dataset", help="Prismer's dataset key (default: from the manifest name, coco → vqav2)"
    )
    export.add_argument(
        "--images", help="also copy the labelled images (and captions) to IMAGES/{dataset}/{sub}/"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    globals_end = next((i for i, token in enumerate(argv) if token not in GLOBAL_FLAGS), len(argv))
    if globals_end < len(argv) and argv[globals_end] in DELEGATED:
        return run_delegated(
            argv[globals_end], argv[globals_end + 1 :], debug="--debug" in argv[:globals_end]
        )
    args = build_parser().parse_args(argv)
    setup_console(verbose=args.verbose, debug=args.debug)
    return run_command(
        lambda: COMMANDS[args.command](args),
        USAGE_ERRORS,
        "committed shards are kept; run the same command again to resume",
    )


def run_delegated(command: str, rest: list[str], debug: bool) -> int:
    """``label-pipeline download|prepare|train|eval …``: the module's own entry point, same exit codes."""
    module = importlib.import_module(DELEGATED[command][0])
    prefix = [command] if command in ("train", "eval") else []
    prog = "label-pipeline" if prefix else f"label-pipeline {command}"
    return module.main([*(["--debug"] if debug else []), *prefix, *rest], prog=prog)


def package_version() -> str:
    try:
        return importlib.metadata.version("prismer-label-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def cmd_run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if args.experts:
        manifest = manifest.with_experts(args.experts)
    options = RunOptions(
        output=args.out, limit_shards=args.limit_shards, relabel=args.relabel, force_unlock=args.force_unlock
    )
    if args.runner == "ray":
        from label_pipeline.runners.ray_runner import run_ray

        summary = run_ray(manifest, options, address=args.address, progress=not args.no_progress)
    else:
        from label_pipeline.runners.local import run_local

        summary = run_local(manifest, options, progress=not args.no_progress, device=args.device)
    print(format_summary(summary))
    return EXIT_FAILURES if summary.has_failures else EXIT_OK


def format_summary(summary: RunSummary) -> str:
    lines = [
        f"labels written to {summary.output}/shards/",
        f"shards: {len(summary.results)} labelled, {summary.shards_skipped} already done, "
        f"{len(summary.failed_shards)} failed (of {summary.shards_total})",
        "",
        f"{'shard':<12}{'samples':>8}{'ok':>6}{'failed':>8}  experts (ok/failed)",
    ]
    for result in summary.results:
        record = result.record
        experts = " ".join(f"{t}={e['ok']}/{e['failed']}" for t, e in record["experts"].items())
        lines.append(
            f"{record['shard']:<12}{record['samples']:>8}{record['ok']:>6}{record['failed']:>8}  {experts}"
        )
    missing = set(summary.missing_inputs)
    for shard_id, error in summary.failed_shards.items():
        if error != "input shard missing":
            lines.append(f"{shard_id:<12} FAILED: {error}")
    if missing:
        lines.append(f"{len(missing)} input shards missing, recorded as failed (first: {min(missing)})")
    if summary.skipped_with_failures:
        lines.append(
            f"{summary.skipped_with_failures} shards done earlier hold failed samples "
            "(`label-pipeline status` lists them)"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from label_pipeline.status import format_status, output_status

    status = output_status(args.output)
    print(format_status(status))
    return EXIT_FAILURES if status.has_problems else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from label_pipeline.verify import repair_output, verify_output

    report = verify_output(args.output)
    print_verify_report(report)
    if not args.repair or report.ok:
        return EXIT_OK if report.ok else EXIT_FAILURES
    if report.general:
        logger.error("cannot repair: %s", "; ".join(report.general))
        return EXIT_FAILURES
    repair = repair_output(args.output, report, device=args.device)
    for shard_id in repair.relabelled:
        print(f"REPAIRED {shard_id}: relabelled from its input")
    for shard_id, error in sorted(repair.failed.items()):
        print(f"NOT REPAIRED {shard_id}: {error}")
    print_verify_report(repair.after)
    return EXIT_OK if repair.after.ok else EXIT_FAILURES


def print_verify_report(report: VerifyReport) -> None:
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    for note in report.notes:
        print(f"NOTE {note}")
    verdict = (
        "ok"
        if report.ok
        else "PROBLEMS FOUND" + (f" in {len(report.damaged)} shard(s)" if report.damaged else "")
    )
    print(f"verified {report.shards} shards, {report.samples} samples: {verdict}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from label_pipeline.contact_sheet import inspect_path

    try:
        result = inspect_path(args.path, key=args.key, limit=args.limit, shard=args.shard)
    except KeyError as exc:
        logger.error("%s", exc.args[0])
        return EXIT_USAGE
    if result.sheet is not None:
        result.sheet.save(args.out)
        print(f"wrote {args.out} ({result.sheet.width}x{result.sheet.height}) from {result.shard}")
    if result.error:
        logger.error("%s", result.error)
        return EXIT_FAILURES
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    """Fetch and load every named expert's weights; each failure is one line, the others still run."""
    from expert_zoo.registry import build_expert

    failed = []
    for name in args.experts:
        try:
            # Constructing an expert resolves (downloads) and loads its weights: a broken file shows here.
            build_expert(name, device="cpu")
        except ExpertUnavailable as exc:
            logger.error("%s", exc)
            failed.append(name)
            continue
        print(f"{name}: weights ready")
    if failed:
        total = len(args.experts)
        logger.error("weights not ready for %d of %d experts: %s", len(failed), total, ", ".join(failed))
        return EXIT_USAGE
    return EXIT_OK


def cmd_experts(args: argparse.Namespace) -> int:
    for name in available():
        print(name)
    return EXIT_OK


def cmd_import_prismer_tables(args: argparse.Namespace) -> int:
    from label_pipeline.clip_tables import PRISMER_LICENCE, import_prismer_tables

    try:
        tables = import_prismer_tables(args.checkout, args.out_dir)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    for name, array in sorted(tables.arrays.items()):
        print(f"{name}: {array.dtype} {tuple(array.shape)}")
    print(f"wrote {args.out_dir} (tables, index.json, pca.npz); licence of these values: {PRISMER_LICENCE}")
    return EXIT_OK


def cmd_fit_pca(args: argparse.Namespace) -> int:
    from label_pipeline.clip_tables import fit_vocabulary_pca, read_vocabulary

    words = read_vocabulary(args.vocabulary)
    try:
        summary = fit_vocabulary_pca(
            words, args.out, weights=args.encoder, sha256=args.sha256, device=args.device
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    print(
        f"wrote {args.out}: PCA-{summary['components']} of {summary['texts']} texts "
        f"({summary['input_dim']}-d), explaining {summary['explained_variance']:.1%} of the variance"
    )
    return EXIT_OK


def cmd_export_prismer(args: argparse.Namespace) -> int:
    from label_pipeline.export_prismer import export_prismer, format_summary

    summary = export_prismer(args.output, args.dest, dataset=args.dataset, images=args.images)
    print(format_summary(summary))
    return EXIT_FAILURES if summary.incomplete else EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "weights": cmd_weights,
    "experts": cmd_experts,
    "import-prismer-tables": cmd_import_prismer_tables,
    "fit-pca": cmd_fit_pca,
    "export-prismer": cmd_export_prismer,
}


if __name__ == "__main__":
    sys.exit(main())
