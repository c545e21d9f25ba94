"""What every command-line entry point shares: exit codes, logging set-up, signals, error mapping.

``label-pipeline``, ``python -m label_pipeline.download``, ``… .prepare`` and ``python -m
prismer_trainer`` all run their command through :func:`run_command`, so an expected failure is one
line and the same exit code everywhere, and SIGTERM behaves like Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO

from label_pipeline.core.signals import EXIT_TERMINATED, Terminated, sigterm_as_interrupt, sigterm_received

EXIT_OK = 0  # done, nothing failed
EXIT_FAILURES = 1  # finished, but failures are recorded (or an unexpected error)
EXIT_USAGE = 2  # usage or configuration error: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C
__all__ = ["EXIT_OK", "EXIT_FAILURES", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "run_command"]

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logger = logging.getLogger("label_pipeline")


class OneLineFormatter(logging.Formatter):
    """Drops tracebacks from the terminal; file handlers still get them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            record.stack_info = None
        return super().format(record)


def setup_console(
    verbose: bool = False,
    debug: bool = False,
    quiet: bool = False,
    fmt: str = CONSOLE_FORMAT,
    stream: IO[str] | None = None,
) -> None:
    """Configure the root logger for a CLI process (idempotent: replaces our earlier handler).

    ``debug`` shows tracebacks on the terminal; ``quiet`` (e.g. a non-zero DDP rank) keeps warnings only.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_label_pipeline_console", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(fmt) if debug else OneLineFormatter(fmt))
    handler._label_pipeline_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    level = logging.DEBUG if (verbose or debug) else logging.INFO
    root.setLevel(logging.WARNING if quiet else level)


def run_command(
    command: Callable[[], int],
    usage_errors: tuple[type[BaseException], ...],
    resume_hint: str = "run the same command again to resume",
) -> int:
    """Run ``command`` and map how it ends to an exit code, logging one line for expected failures.

    ``usage_errors`` are the exceptions that mean "the user asked for something that cannot be done"
    (exit 2). Ctrl-C is 130 and SIGTERM 143, each with ``resume_hint``. Anything else is a bug: one
    line and exit 1, the traceback at debug level (on the terminal with ``--debug``).
    """
    try:
        with sigterm_as_interrupt():
            return command()
    except usage_errors as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    except Terminated:
        logger.error("stopped by SIGTERM: %s", resume_hint)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        if sigterm_received():  # a library re-raised our Terminated as a plain KeyboardInterrupt
            logger.error("stopped by SIGTERM: %s", resume_hint)
            return EXIT_TERMINATED
        logger.error("interrupted: %s", resume_hint)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        logger.error(
            "unexpected error: %s: %s (rerun with --debug for the traceback)", type(exc).__name__, exc
        )
        logger.debug("traceback", exc_info=exc)
        return EXIT_FAILURES
