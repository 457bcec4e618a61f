"""A real Google Cloud Storage API server for tests (gcp-storage-emulator), on loopback, started and stopped by PID."""

from __future__ import annotations

import subprocess
import sys

from testkit import wait_for_port

from tunefleet.launcher.launch import free_port


class LocalGCS:
    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a GCS client (gcsfs) needs to use it: the emulator's address, the standard variable for it. gcsfs's
        experimental bucket-type lookup asks a gRPC control API first, which the emulator lacks: off."""
        return {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self) -> LocalGCS:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--in-memory",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, "the local GCS server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def make_bucket(self, name: str) -> str:
        import json
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).close()
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
