"""``label-pipeline`` (also ``python -m label_pipeline``).

Exit codes: 0 = all done, 1 = finished with recorded failures, 2 = usage or configuration error,
130 = interrupted (Ctrl-C; the output is resumable).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from expert_zoo.registry import ExpertUnavailable, available
from label_pipeline.config import ConfigError, load_manifest
from label_pipeline.output import OutputLocked
from label_pipeline.run import RunOptions, RunSummary

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
logger = logging.getLogger("label_pipeline")


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="label a dataset (manifest path or name in manifests/)")
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

    status = sub.add_parser("status", help="summarise an output root")
    status.add_argument("output")

    verify = sub.add_parser("verify", help="re-read every shard: checksums, keys, decodable members")
    verify.add_argument("output")

    inspect = sub.add_parser("inspect", help="render a contact sheet of a shard's samples")
    inspect.add_argument("shard")
    inspect.add_argument("--key", help="one sample key (default: the first samples)")
    inspect.add_argument("--limit", type=int, default=4, help="samples to show without --key")
    inspect.add_argument("--out", required=True, help="PNG file to write")

    weights = sub.add_parser("weights", help="prefetch the weights of experts into the cache")
    weights.add_argument("--experts", type=_csv, required=True)

    sub.add_parser("experts", help="list registered experts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ExpertUnavailable, OutputLocked, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logger.error("interrupted: committed shards are kept; run the same command again to resume")
        return EXIT_INTERRUPTED


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
    for shard_id, error in summary.failed_shards.items():
        lines.append(f"{shard_id:<12} FAILED: {error}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from label_pipeline.status import format_status, output_status

    status = output_status(args.output)
    print(format_status(status))
    return EXIT_FAILURES if status.failed else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from label_pipeline.verify import verify_output

    report = verify_output(args.output)
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    verdict = "ok" if report.ok else "PROBLEMS FOUND"
    print(f"verified {report.shards} shards, {report.samples} samples: {verdict}")
    return EXIT_OK if report.ok else EXIT_FAILURES


def cmd_inspect(args: argparse.Namespace) -> int:
    from label_pipeline.inspect import inspect_shard

    try:
        sheet = inspect_shard(args.shard, key=args.key, limit=args.limit)
    except KeyError as exc:
        logger.error("%s", exc.args[0])
        return EXIT_USAGE
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    from expert_zoo.registry import build_expert

    for name in args.experts:
        build_expert(name, device="cpu")  # constructing an expert resolves (downloads) its weights
        print(f"{name}: weights ready")
    return EXIT_OK


def cmd_experts(args: argparse.Namespace) -> int:
    for name in available():
        print(name)
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "weights": cmd_weights,
    "experts": cmd_experts,
}


if __name__ == "__main__":
    sys.exit(main())
