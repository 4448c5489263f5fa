"""A real S3 API on localhost for the tests: moto's server, started in-process on a free port (as s3fs's own
test suite does), with a switchboard of injected faults (a throttling 503 SlowDown reply, a connection
dropped mid-object) in front of it. Never assumed running: the `s3` fixture starts it once per session.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import pytest

# fake credentials, distinctive so that a test can look for them in every output
ACCESS_KEY = "AKIAMICONTESTKEY0001"
SECRET_KEY = "micon-test-secret-Do-Not-Print-0123456789"


@dataclass
class Fault:
    kind: str            # "slowdown" (503 SlowDown), "drop" (half the body, then the connection closes),
    #                      "missing" (404 NoSuchKey, for GET and HEAD alike)
    match: str           # substring of the request path (bucket/key)
    times: int = 1       # how many requests it hits
    method: str = "GET"  # or "*": any
    hits: int = 0


class FaultInjector:
    """WSGI middleware in front of moto: the first `times` requests matching a fault get it instead."""

    def __init__(self, app):
        self.app, self.faults, self.lock = app, [], threading.Lock()
        self.requests: list[tuple[str, str]] = []

    def add(self, kind: str, match: str, times: int = 1, method: str | None = None) -> Fault:
        f = Fault(kind, match, times, method or ("*" if kind == "missing" else "GET"))
        with self.lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.method in ("*", method) and f.match in path and f.hits < f.times:
                    f.hits += 1
                    return f
        return None

    def __call__(self, environ, start_response):
        fault = self._take(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
        if fault is not None and fault.kind == "slowdown":
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b'<Message>Please reduce your request rate.</Message></Error>')
            start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if fault is not None and fault.kind == "missing":
            body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>'
            start_response("404 Not Found", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(0 if environ["REQUEST_METHOD"] == "HEAD" else len(body)))])
            return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]
        result = self.app(environ, start_response)
        if fault is None or fault.kind != "drop":
            return result
        body = b"".join(result)

        def cut():
            yield body[: len(body) // 2]
            raise ConnectionAbortedError("injected: connection dropped mid-object")
        return cut()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer with the FaultInjector in front; `endpoint`, `env` for jobs, `fs()`."""

    def __init__(self):
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        injector = self.faults

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.threaded_moto_server import MotoRequestHandler

                class Quiet(MotoRequestHandler):
                    def log(self, *args, **kwargs):     # no line per request on the test's output
                        pass

                self._server = make_server(self._ip_address, self._port, injector, True, request_handler=Quiet)
                self._server_ready_event.set()
                self._server.serve_forever()

        self.port = free_port()
        self.server = Server(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        """What a job needs to reach this server: the standard variables, and fast retries for the tests."""
        return dict(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                    AWS_DEFAULT_REGION="us-east-1", MICON_STORAGE_BACKOFF_S="0.05")

    def start(self) -> "S3Server":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def bucket(self, name: str) -> str:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY, region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3():
    """The server, started once per session; the environment points this process's storage at it."""
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
