"""A run's log file: full detail, tracebacks included, in ``OUT/logs/``.

Expected failures (a bad sample, a missing input shard, a shard that failed) are logged with their
traceback; the terminal shows only the message unless ``--debug`` is given (``core.entry``), while
the run's log file keeps every traceback for later.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile

import fsspec

from label_pipeline.inputs import is_local

FILE_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
logger = logging.getLogger(__name__)


class RunLog:
    """A DEBUG-level log file for one run, kept under ``OUT/logs/`` (uploaded at the end if remote)."""

    def __init__(self, output_url: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.url = f"{output_url.rstrip('/')}/logs/run-{stamp}-{os.getpid()}.log"
        fs, path = fsspec.core.url_to_fs(self.url)
        self._remote = None if is_local(fs) else (fs, path)
        if self._remote is None:
            fs.makedirs(path.rpartition("/")[0], exist_ok=True)
            self._local_path = path
        else:
            handle, self._local_path = tempfile.mkstemp(suffix=".log")
            os.close(handle)
        self.handler = logging.FileHandler(self._local_path, encoding="utf-8")
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(logging.Formatter(FILE_FORMAT))
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        if self._remote is not None:
            fs, path = self._remote
            try:
                fs.put_file(self._local_path, path)
            except OSError as exc:  # the labels are committed; a lost log must not fail the run
                logger.warning("could not upload the run log to %s: %s", self.url, exc)
            finally:
                os.unlink(self._local_path)
