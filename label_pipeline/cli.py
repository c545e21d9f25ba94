"""``label-pipeline`` (also ``python -m label_pipeline``).

Exit codes: 0 = the output is complete with no failed sample or shard; 1 = failures are recorded in
the output (on every rerun, until they are gone); 2 = usage or configuration error, nothing labelled;
130 = interrupted by Ctrl-C, 143 = stopped by SIGTERM (both leave a resumable output).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from expert_zoo.registry import ExpertUnavailable, available
from label_pipeline.config import ConfigError, load_manifest
from label_pipeline.core.entry import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, run_command, setup_console
from label_pipeline.output import OutputLocked
from label_pipeline.run import RunOptions, RunSummary

if TYPE_CHECKING:
    from expert_zoo.base import Expert
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

examples:
  label-pipeline run demo                                   # manifests/demo.yaml, in this process
  label-pipeline run manifests/cc12m.yaml --limit-shards 2 --experts edge:canny,depth
  label-pipeline run cc12m --out s3://bucket/labels/cc12m --runner ray --address auto
  label-pipeline run coco --relabel depth                   # a changed depth expert may overwrite labels
"""

MAIN_EPILOG = """examples:
  label-pipeline run demo && label-pipeline inspect labels/demo --out sheet.png
  label-pipeline status labels/demo
  label-pipeline experts                       # backends, defaults, weights, licences
  label-pipeline weights --experts depth,normal
  label-pipeline SUBCOMMAND --help             # each subcommand's options, examples and exit codes

exit codes: 0 ok; 1 failures recorded in the output; 2 usage or configuration error (nothing done);
130 interrupted by Ctrl-C, 143 stopped by SIGTERM (rerun the same command to resume).
"""

# Each subcommand's epilog: examples, then what its exit codes mean.
EPILOGS = {
    "status": """examples:
  label-pipeline status labels/demo
  label-pipeline status s3://bucket/labels/cc12m --json          # the same, for scripts
  label-pipeline status labels/demo --failures --limit 20        # shard, key, expert, reason

exit codes:
  0  no shard is damaged or failed (failed samples are listed, not an error here)
  1  a shard is damaged or failed
  2  not an output root (no _run.json / records), or a bad option
""",
    "verify": """examples:
  label-pipeline verify labels/demo
  label-pipeline verify labels/demo --repair --device cuda

exit codes:
  0  every shard reads back intact (after --repair: once repaired)
  1  problems found (one PROBLEM line each; also for a folder that is not an output root), or a
     shard could not be repaired
  2  bad option
""",
    "inspect": """examples:
  label-pipeline inspect labels/demo --out sheet.png                  # first done shard, 4 samples
  label-pipeline inspect labels/demo --shard 00003 --key 000030007 --out one.png
  label-pipeline inspect labels/demo/shards/00000.tar --limit 8 --out sheet.png

Depth gets a colour bar, seg/detection/OCR legends a swatch per class or instance, edge maps keep
1-px lines when shrunk; an undecodable image or label is a grey panel with its status.

exit codes:
  0  sheet written
  1  the tar is damaged: the samples before the damage are drawn, the error is printed
  2  path, shard or key not found, or nothing to show
""",
    "weights": """examples:
  label-pipeline weights --experts depth,normal,edge,seg_coco       # (make weights EXPERTS=...)
  HF_HOME=/cache/huggingface label-pipeline weights --experts obj_detection

Hub weights go to the standard Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub), shared with `hf download` and transformers; URL weights go to
$LABEL_PIPELINE_CACHE/url (default ~/.cache/label_pipeline). Every expert is tried; all missing
weights are one message. With HF_HUB_OFFLINE=1 nothing is fetched: only the caches are checked.

exit codes:
  0  every expert's weights are on this machine and load
  2  an unknown expert, or weights missing or unreadable (each named, with what to do)
""",
    "experts": """examples:
  label-pipeline experts

Columns: task, backend, default (the backend a bare task name picks), weights (whether it loads
weights), cached (whether its default weights are already on this machine), licence (as upstream
states it; see docs/EXPERTS.md).

exit codes:
  0  always
""",
    "import-prismer-tables": """examples:
  git clone https://github.com/NVlabs/prismer
  label-pipeline import-prismer-tables prismer labels/coco/embeddings

exit codes:
  0  tables written
  2  not a Prismer checkout, or its files do not read as tables
""",
    "fit-pca": """examples:
  label-pipeline fit-pca words.txt pca.npz
  label-pipeline fit-pca words.txt pca.npz --encoder hf-hub:openai/clip-vit-base-patch32 --device cuda

exit codes:
  0  PCA written
  2  too few words for a 64-component PCA, or the encoder is unavailable
""",
    "export-prismer": """examples:
  label-pipeline export-prismer labels/coco /data/prismer_labels
  label-pipeline export-prismer labels/coco /data/prismer_labels --images /data/prismer_images

exit codes:
  0  every sample exported
  1  samples were left out (failed or damaged; counted in the summary)
  2  not an output root, or DEST inside it
""",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (where there is one to show), epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)", "(default: False)" and "(default: [])" say nothing: only real defaults are
        # appended (identity checks: a default of 0 is a real one, though 0 == False).
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _apply_help(sub: argparse._SubParsersAction) -> None:
    """The same formatter for every subcommand (those others add included), and its epilog."""
    for name, parser in sub.choices.items():
        if name in DELEGATED:
            continue  # the delegated module's own parser prints its help
        parser.formatter_class = HelpFormatter
        parser.epilog = EPILOGS.get(name, parser.epilog)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label-pipeline",
        description="Prismer expert labels at dataset scale, into WebDataset shards.",
        epilog=MAIN_EPILOG,
        formatter_class=HelpFormatter,
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
        "run", help="label a dataset (manifest path or name in manifests/)", epilog=RUN_EPILOG
    )
    run.add_argument(
        "manifest", help="a manifest YAML, or the name of one in manifests/ (demo, cc12m, coco, …)"
    )
    run.add_argument("--out", metavar="DIR", help="output root (fsspec URL); default: the manifest's output")
    run.add_argument(
        "--experts",
        type=_csv,
        metavar="LIST",
        help="comma-separated task[:backend] list, replacing the manifest's",
    )
    run.add_argument(
        "--relabel",
        type=_csv,
        default=[],
        metavar="TASKS",
        help="comma-separated tasks whose changed expert may overwrite labels (default: none)",
    )
    run.add_argument("--limit-shards", type=int, metavar="N", help="only the first N input shards")
    run.add_argument(
        "--runner", choices=["local", "ray"], default="local", help="in this process, or on a Ray cluster"
    )
    run.add_argument(
        "--address", metavar="ADDR", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    run.add_argument("--device", default="auto", help="torch device for in-process experts (auto/cpu/cuda)")
    run.add_argument(
        "--force-unlock", action="store_true", help="take over a lock left by a run that is gone"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar or periodic progress lines")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    status = sub.add_parser("status", help="summarise an output root")
    status.add_argument("output", help="an output root (OUT of `label-pipeline run`; fsspec URL)")
    status.add_argument(
        "--json", action="store_true", help="print the status (or with --failures, the failures) as JSON"
    )
    status.add_argument(
        "--failures",
        action="store_true",
        help="list failed shards, samples and experts (shard, key, expert, status, reason) from the records",
    )
    status.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help="with --failures: show the first N failures, 0 for all (default: %(default)s)",
    )

    verify = sub.add_parser("verify", help="re-read every shard: checksums, keys, decodable members")
    verify.add_argument("output", help="an output root (OUT of `label-pipeline run`; fsspec URL)")
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

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page: run summary, label statistics per expert, contact sheets",
        epilog=REPORT_EPILOG,
    )
    report.add_argument(
        "output", metavar="OUT", help="an output root (OUT of `label-pipeline run`; fsspec URL)"
    )
    report.add_argument("--out", default="report.html", metavar="HTML", help="file to write (fsspec URL)")
    for flag, default, text in (
        ("--samples", 1000, "labels decoded for the statistics, at most"),
        ("--shards", 16, "shards those labels are read from, at most"),
        ("--gallery", 6, "ok samples drawn at random as contact sheets"),
        ("--failures", 6, "failed samples drawn as contact sheets"),
        ("--seed", 0, "seed of the shard and sample draws"),
    ):
        report.add_argument(flag, type=int, default=default, metavar="N", help=text)

    weights = sub.add_parser(
        "weights", help="fetch the weights of experts into the cache and check that they load"
    )
    weights.add_argument(
        "--experts",
        type=_csv,
        required=True,
        metavar="LIST",
        help="comma-separated task[:backend] list, e.g. depth,normal",
    )

    sub.add_parser("experts", help="table of experts: default backend, weights, cached, licence")

    plan = sub.add_parser(
        "plan", help="replicas per expert, images/s and hours for a dataset on N GPUs", epilog=PLAN_EPILOG
    )
    plan.add_argument("manifest", help="a manifest YAML, or the name of one in manifests/ (cc12m, coco, …)")
    plan.add_argument("--gpus", type=float, required=True, help="GPUs of the cluster")
    plan.add_argument(
        "--stats",
        metavar="FILE",
        help="per-expert throughput from a run's OUT/stats/*.json or bench/gpu_check.sh's JSON "
        "(default: the relative costs recorded in docs/BENCHMARKS.md)",
    )
    plan.add_argument(
        "--experts", type=_csv, metavar="LIST", help="task[:backend] list, replacing the manifest's"
    )
    plan.add_argument(
        "--cpus", type=float, default=0, help="CPUs for the shard tasks' bound (0: leave it out)"
    )
    plan.add_argument("--samples-per-shard", type=int, metavar="N", help="when the manifest does not say")
    plan.add_argument("--images", type=int, metavar="N", help="the dataset's size, instead of counting it")

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
    fit.add_argument("--device", default="auto", help="torch device for the encoder (auto/cpu/cuda)")

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
    _apply_help(sub)  # last: it covers every subcommand added above
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


SUMMARY_SHARD_LINES = 30  # per-shard lines of a run's summary; `status` lists every shard


def format_summary(summary: RunSummary) -> str:
    results = summary.results
    lines = [
        f"labels written to {summary.output}/shards/",
        f"shards: {len(results)} labelled, {summary.shards_skipped} already done, "
        f"{len(summary.failed_shards)} failed (of {summary.shards_total})",
        "",
        f"{'shard':<12}{'samples':>8}{'ok':>6}{'failed':>8}  experts (ok/failed)",
    ]
    for result in results[:SUMMARY_SHARD_LINES]:
        record = result.record
        experts = " ".join(f"{t}={e['ok']}/{e['failed']}" for t, e in record["experts"].items())
        lines.append(
            f"{record['shard']:<12}{record['samples']:>8}{record['ok']:>6}{record['failed']:>8}  {experts}"
        )
    if len(results) > SUMMARY_SHARD_LINES:
        ok = sum(r.record["ok"] for r in results)
        more = len(results) - SUMMARY_SHARD_LINES
        lines.append(f"… {more} more shards (`label-pipeline status` lists them)")
        lines.append(f"{'all':<12}{summary.samples:>8}{ok:>6}{summary.samples - ok:>8}")
    missing = set(summary.missing_inputs)
    failed = [(s, e) for s, e in summary.failed_shards.items() if e != "input shard missing"]
    for shard_id, error in failed[:SUMMARY_SHARD_LINES]:
        lines.append(f"{shard_id:<12} FAILED: {error}")
    if len(failed) > SUMMARY_SHARD_LINES:
        more = len(failed) - SUMMARY_SHARD_LINES
        lines.append(f"… {more} more failed shards (`label-pipeline status --failures`)")
    if missing:
        lines.append(f"{len(missing)} input shards missing, recorded as failed (first: {min(missing)})")
    if summary.skipped_with_failures:
        lines.append(
            f"{summary.skipped_with_failures} shards done earlier hold failed samples "
            "(`label-pipeline status` lists them)"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from label_pipeline.status import (
        format_failures,
        format_status,
        list_failures,
        output_status,
        status_as_dict,
    )

    if args.limit < 0:
        raise ConfigError(f"--limit {args.limit}: expected 0 (all) or a positive number")
    if args.failures:
        listing = list_failures(args.output, limit=args.limit or None)
        print(json.dumps(listing.as_dict(), indent=1) if args.json else format_failures(listing))
        return EXIT_FAILURES if listing.has_problems else EXIT_OK
    status = output_status(args.output)
    print(json.dumps(status_as_dict(status), indent=1) if args.json else format_status(status))
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


REPORT_EPILOG = """examples:
  label-pipeline report labels/demo                       # writes ./report.html
  label-pipeline report s3://bucket/labels/cc12m --out cc12m.html --samples 5000 --shards 50

Counts come from every record; label distributions from the first samples of --shards shards drawn
with --seed (at most --samples labels are decoded, so the time does not grow with the output).

exit codes:
  0  report written (flags about suspicious labels or failed shards are in the page, not the code)
  2  not an output root, or a bad option
"""


def cmd_report(args: argparse.Namespace) -> int:
    from label_pipeline.report import ReportOptions, report_flags, write_report

    options = ReportOptions(args.samples, args.shards, args.gallery, args.failures, args.seed)
    report, size = write_report(args.output, args.out, options)
    print(
        f"wrote {args.out} ({size / 1e6:.1f} MB): {report.records.samples} samples, "
        f"{sum(report.sampled.values())} labels read from {len(report.sampled)} shards, "
        f"{len(report_flags(report))} flags; open it in a browser"
    )
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    """Fetch every named expert's default weights (all that are missing in one message), then load each
    expert to check its files; each failure is named, the others still run."""
    from expert_zoo.registry import build_expert, expert_class, resolve_name, weight_sources
    from label_pipeline.core.expert_request import ExpertRequest
    from label_pipeline.core.weights import fetch_weights, missing_weights_message

    failed: list[str] = []
    names: list[str] = []
    for given in args.experts:
        try:
            names.append(resolve_name(ExpertRequest.parse(given)))
        except (ExpertUnavailable, ConfigError) as exc:
            logger.error("%s", exc)
            failed.append(given)
    sources = {}
    for name in names:
        try:
            sources[name] = weight_sources(expert_class(name))
        except ExpertUnavailable as exc:  # e.g. the expert's package is not installed
            logger.error("%s", exc)
            failed.append(name)
    missing = fetch_weights([source for found in sources.values() for source in found])
    if missing:
        logger.error("%s", missing_weights_message(missing))
    absent = {item.expert for item, _ in missing}
    for name in sources:
        if name in absent:
            failed.append(name)
        elif (ready := _check_loads(name, build_expert)) is not None:
            print(ready)
        else:
            failed.append(name)
    if failed:
        total = len(args.experts)
        logger.error("weights not ready for %d of %d experts: %s", len(failed), total, ", ".join(failed))
        return EXIT_USAGE
    return EXIT_OK


def _check_loads(name: str, build_expert: Callable[..., object]) -> str | None:
    """Load ``name`` on CPU (a truncated or foreign file shows here): the line to print, or None after
    logging why it does not load."""
    try:
        build_expert(name, device="cpu")
    except ConfigError as exc:
        # An option without a default (ocr_features' pca): the default weights are there all the same.
        return f"{name}: weights ready (not test-loaded: {exc})"
    except ExpertUnavailable as exc:
        logger.error("%s", exc)
        return None
    return f"{name}: weights ready"


def cmd_experts(args: argparse.Namespace) -> int:
    """A table of every registered expert: task, backend, default, weights, cached, licence."""
    from label_pipeline.core.weights import cache_root, hub_cache_dir

    rows, notes = expert_rows()
    header = ("task", "backend", "default", "weights", "cached", "licence")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    for note in notes:
        print(note)
    print(
        f"hub weights: {hub_cache_dir()} (the Hugging Face cache); URL weights: {cache_root() / 'url'}; "
        "fetch with `make weights EXPERTS=task[:backend],...`"
    )
    return EXIT_OK


def expert_rows() -> tuple[list[tuple[str, ...]], list[str]]:
    """One row per registered expert, and notes (options without a default, experts that cannot load)."""
    from expert_zoo.registry import expert_class, resolve_name, weight_sources
    from label_pipeline.core.expert_request import ExpertRequest
    from label_pipeline.core.weights import find_cached

    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for name in available():
        task, _, backend = name.partition(":")
        default = "yes" if resolve_name(ExpertRequest.parse(task)) == name else "no"
        try:
            cls = expert_class(name)
        except ExpertUnavailable as exc:
            rows.append((task, backend, default, "?", "?", "?"))
            notes.append(f"{name}: {exc}")
            continue
        sources = weight_sources(cls)
        cached = [find_cached(source.source) is not None for source in sources]
        rows.append(
            (
                task,
                backend,
                default,
                "yes" if sources else "no",
                ("yes" if all(cached) else "no" if not any(cached) else "partly") if sources else "-",
                cls.LICENCE or "?",
            )
        )
        required = _required_weight_options(cls)
        if required:
            notes.append(f"{name} also needs the option(s) {', '.join(required)} (no default)")
    return rows, notes


def _required_weight_options(cls: type[Expert]) -> list[str]:
    """The weight options of ``cls`` that have no default source: the manifest must give them."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    return [key for key, _ in getattr(cls.Options, "WEIGHT_FIELDS", ()) if not defaults.get(key)]


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


PLAN_EPILOG = """examples:
  label-pipeline plan cc12m --gpus 8                               # relative costs recorded in the docs
  label-pipeline plan cc12m --gpus 64 --stats labels/cc3m/stats/ray-20261201T101500Z-1a2b3c4d.json
  label-pipeline plan coco --gpus 8 --stats gpu_check/gpu_check.json --images 123287

Variables the manifest uses but the environment lacks (${DATA_ROOT}, …) stand for themselves: only
the shard pattern is read, not the files.

exit codes:
  0  plan printed
  2  bad manifest or stats file, an expert without a measured throughput, or the size unknown
"""


def cmd_plan(args: argparse.Namespace) -> int:
    """Replicas per expert and the predicted wall time for a dataset (``ray_planner.project``)."""
    from label_pipeline.runners import ray_planner

    manifest = load_manifest(args.manifest, env=_UnsetVariables())
    if args.experts:
        manifest = manifest.with_experts(args.experts)
    tasks = [request.task for request in manifest.experts]
    cpu_seconds, where = None, ray_planner.RECORDED_SOURCE
    seconds = dict(ray_planner.RECORDED_SECONDS_PER_IMAGE)
    if args.stats:
        seconds, cpu_seconds, where = ray_planner.seconds_from_stats(_read_json(args.stats))
    missing = [task for task in tasks if task not in seconds]
    if missing:
        raise ConfigError(f"no measured throughput for {missing} in {args.stats or where}")
    if args.images is not None:
        size = ray_planner.DatasetSize(args.images, 1, "--images")
    else:
        size = ray_planner.dataset_size(manifest.source, args.samples_per_shard)
    wanted = {task: seconds[task] for task in tasks}
    projection = ray_planner.project(wanted, args.gpus, size.images, args.cpus, cpu_seconds)
    print(ray_planner.format_projection(projection, size, where, manifest.name))
    return EXIT_OK


class _UnsetVariables(dict[str, str]):
    """The environment, where an unset ``${VAR}`` stands for itself (``plan`` reads no input)."""

    def __init__(self) -> None:
        import os

        super().__init__(os.environ)

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> str:
        return "${" + key + "}"


def _read_json(url: str) -> dict[str, object]:
    import json

    import fsspec

    try:
        with fsspec.open(url, "rb") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--stats {url}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--stats {url}: not a statistics file")
    return data


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "report": cmd_report,
    "weights": cmd_weights,
    "experts": cmd_experts,
    "plan": cmd_plan,
    "import-prismer-tables": cmd_import_prismer_tables,
    "fit-pca": cmd_fit_pca,
    "export-prismer": cmd_export_prismer,
}


if __name__ == "__main__":
    sys.exit(main())
