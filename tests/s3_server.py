"""A local S3 endpoint for tests: moto's server on 127.0.0.1 that also counts the requests it serves.

The count is taken at the server, so every request is seen whichever client (s3fs, boto3, a Ray
worker) sends it; ``requests`` holds ``(method, path?query)`` in arrival order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class CountingApp:
    """A WSGI wrapper that notes each request before moto answers it."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING")
        path = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
        with self._lock:
            self.requests.append((environ.get("REQUEST_METHOD", ""), path))
        return self.app(environ, start_response)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()


@contextmanager
def s3_server() -> Iterator[tuple[str, CountingApp]]:
    """(endpoint URL, request counter) of a moto S3 server; the AWS variables point at it meanwhile."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from s3fs import S3FileSystem
    from werkzeug.serving import make_server

    counter = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    # fsspec caches filesystem instances by their arguments, not the endpoint they read from the
    # environment: one made against an earlier server (another test's) would still talk to it.
    S3FileSystem.clear_instance_cache()
    try:
        yield env["AWS_ENDPOINT_URL"], counter
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        S3FileSystem.clear_instance_cache()
        server.shutdown()
        thread.join()
