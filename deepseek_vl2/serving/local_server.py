"""Starting Cog's HTTP server (coglet) on this machine, for `make demo` and the HTTP tests.

In production the Cog container starts the server; here we run the same command from the project
root: `COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=... python -m cog.server.http`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from ..engine.settings import CONCURRENCY_ENV, planned_max_batch

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # deepseek_vl2/serving/ -> the project
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """The server did not become ready, or stopped answering."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class LocalCogServer:
    """The Cog HTTP server as a child process; use as a context manager (always stopped)."""

    def __init__(self, extra_env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        # coglet starts its worker with the first `python` on PATH, so this interpreter's bin
        # directory (the venv) must come first or the worker cannot import cog and the project.
        python_bin = str(Path(sys.executable).parent)
        self._env = {
            **os.environ,
            "PATH": python_bin + os.pathsep + os.environ.get("PATH", ""),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            **(extra_env or {}),
        }
        # A server started by hand ignores @cog.concurrent; its limit is this variable, and the
        # engine batches as many requests. Default: DEEPSEEK_VL2_MAX_BATCH, else 4 on the CPU.
        if not self._env.get(CONCURRENCY_ENV):
            self._env[CONCURRENCY_ENV] = str(planned_max_batch(torch.cuda.is_available(), self._env))
        self._log = tempfile.NamedTemporaryFile(prefix="cog-server-", suffix=".log", delete=False)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", HOST],
            cwd=PROJECT_ROOT,
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(f"the server exited early:\n{self.log_text()}")
            status = self.health_status()
            if status == "READY":
                return
            if status == "SETUP_FAILED":
                raise ServerError(f"setup() failed:\n{self.health().get('setup', {}).get('logs')}")
            time.sleep(0.2)
        raise ServerError(f"not READY after {ready_timeout_s:.0f} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> LocalCogServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The server's process id (its worker, which holds the model, is a child)."""
        if self._process is None:
            raise ServerError("the server is not started")
        return self._process.pid

    def log_text(self) -> str:
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/health-check", timeout=5) as response:
            return json.load(response)

    def health_status(self) -> str | None:
        try:
            return self.health().get("status")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None  # not listening yet

    def settled_status(self, timeout_s: float = 10.0) -> str | None:
        """The health status once the server has finished its last prediction.

        It can still say BUSY for a moment after a synchronous response has been sent.
        """
        deadline = time.monotonic() + timeout_s
        status = self.health_status()
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.health_status()
        return status

    def wait_for_log(self, text: str, count: int, timeout_s: float = 10.0) -> bool:
        """Whether the server's log holds `text` at least `count` times within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.log_text().count(text) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def predict(
        self, inputs: dict[str, Any], prediction_id: str | None = None, timeout_s: float = 300.0
    ) -> tuple[int, Any]:
        """Run a prediction and wait for it: POST /predictions, or PUT /predictions/<id> when an
        id is given (so that it can be cancelled). Returns (HTTP status, decoded JSON body), also
        for 4xx answers."""
        if prediction_id is None:
            return self._request("POST", "/predictions", {"input": inputs}, timeout_s)
        return self._request("PUT", f"/predictions/{prediction_id}", {"input": inputs}, timeout_s)

    def cancel(self, prediction_id: str) -> int:
        """POST /predictions/<id>/cancel; the HTTP status."""
        return self._request("POST", f"/predictions/{prediction_id}/cancel", None, 10.0)[0]

    def _request(self, method: str, path: str, body: Any, timeout_s: float) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode() if body is not None else b"",
            headers={"Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")
