"""A real S3 API server for tests (moto's server mode), on loopback, started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from testkit import wait_for_port

from tunefleet.launcher.launch import free_port


class LocalS3:
    def __init__(self, authenticate: bool = False):
        """`authenticate`: the server checks credentials as S3 does (moto's IAM mode), so unknown keys are refused."""
        self.port = free_port()
        self.authenticate = authenticate
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What any S3 client needs to find it: the standard AWS variables (no real credentials exist here)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
        }

    def start(self) -> LocalS3:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.authenticate else None,
        )
        try:
            wait_for_port(self.port, "the local S3 server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def make_bucket(self, name: str) -> str:
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
        fs.mkdir(name)
        return f"s3://{name}"

    def pause(self) -> None:
        """The server stops answering (as a store whose endpoint hangs does); it keeps its objects."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server would not act on SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
