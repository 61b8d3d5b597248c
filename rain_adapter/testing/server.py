"""Run the app in a background thread on 127.0.0.1 with a free port (tests, examples, notebooks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_server_group(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Stop a ``rain serve`` started with ``start_new_session=True``: SIGINT (a clean shutdown, the
    log flushed), up to ``timeout`` s for it, then SIGKILL to its whole process group (whatever of
    its children, e.g. vLLM's engine core, outlived it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_healthy(base_url: str, timeout: float = 60.0, proc=None) -> None:
    """Poll ``GET /health`` until it answers 200 (raise after ``timeout`` s, or when ``proc`` died)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.05)  # polling interval, not synchronisation
    raise TimeoutError(f"{base_url}/health did not answer within {timeout}s ({last})")


class ServerThread:
    """``with ServerThread(app) as srv: srv.base_url`` — uvicorn in a thread, graceful stop on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, name="rain-serve", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        wait_healthy(self.base_url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
