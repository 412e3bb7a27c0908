"""A local S3-compatible server for the dev cluster: SeaweedFS (Apache-2.0), built from
the Go module proxy like the control plane (``go/seaweedfs``), run as ``weed server``
with its master, volume server, filer and S3 gateway in one process on 127.0.0.1.

``S3Server(dir).up()`` starts it (or finds it running), with one identity whose keys are
generated once and kept in ``<dir>/credentials.json``, and creates the buckets asked for.
The S3 gateway checks signatures: a wrong key is refused, as on AWS.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.devcluster import build
from tailor.devcluster.cluster import (
    ClusterError,
    _alive,
    _children,
    _free_port,
    _port_free,
    _terminate,
    state_root,
)

PORTS = ("master", "volume", "filer", "s3")
"""Each also listens on port + 10000 for gRPC (SeaweedFS's convention)."""


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str


class S3Server:
    """The SeaweedFS whose data, keys, log and pid live in ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = (directory or state_root() / "s3" / "default").expanduser().resolve()
        self.state_file = self.dir / "state.json"
        self.log_file = self.dir / "weed.log"
        self.pid_file = self.dir / "weed.pid"

    # ----- public API -------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._state()['ports']['s3']}"

    @property
    def credentials(self) -> S3Credentials:
        saved = json.loads((self.dir / "credentials.json").read_text())
        return S3Credentials(saved["accessKeyId"], saved["secretAccessKey"])

    def up(self, buckets: tuple[str, ...] = (), timeout: float = 120.0) -> None:
        """Start the server unless it runs and answers; then create ``buckets``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.is_healthy():
            self.down()
            binary = build.ensure_binaries(components=(build.SEAWEEDFS,))["weed"]
            self._start(binary)
            deadline = time.monotonic() + timeout
            while not self.is_healthy():
                if time.monotonic() > deadline or not _alive(self._pid() or -1):
                    log = self.log_file.read_text(errors="replace")[-3000:]
                    self.down()
                    raise ClusterError(f"SeaweedFS did not become ready:\n{log}")
                time.sleep(0.3)
        for bucket in buckets:
            self.create_bucket(bucket)

    def down(self, grace: float = 3.0) -> None:
        # The volume server and filer stop at once on SIGTERM (their data flushed); the
        # master alone keeps retrying its volume growth until killed, so a short grace.
        pid = self._pid()
        if pid is not None and _alive(pid):
            _terminate(pid, grace)
        self.pid_file.unlink(missing_ok=True)

    def is_healthy(self) -> bool:
        pid = self._pid()
        if pid is None or not _alive(pid) or not self.state_file.exists():
            return False
        try:  # the gateway answers an unsigned request with 403 once it serves
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
        except urllib.error.HTTPError as exc:
            return exc.code in (400, 403)
        except OSError:
            return False
        return True

    def client(self, credentials: S3Credentials | None = None) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        creds = credentials or self.credentials
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    def delete_bucket(self, bucket: str) -> None:
        """Remove a bucket and everything in it (its volumes go with it)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents") or []]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)

    # ----- process ----------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        return state

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _previous_ports(self) -> dict[str, int] | None:
        """The ports of the last start, when they are all free again (data kept)."""
        try:
            ports: dict[str, int] = self._state()["ports"]
        except (OSError, ValueError, KeyError):
            return None
        free = all(_bindable(p) and _bindable(p + 10000) for p in ports.values())
        return ports if free and set(ports) == set(PORTS) else None

    @staticmethod
    def _new_ports() -> dict[str, int]:
        taken: set[int] = set()
        ports: dict[str, int] = {}
        for name in PORTS:  # a port and port + 10000 both free
            while True:
                port = _free_port(taken)
                taken.add(port)
                if port + 10000 < 65536 and _port_free(port + 10000):
                    ports[name] = port
                    taken.add(port + 10000)
                    break
        return ports

    def _keys(self) -> S3Credentials:
        path = self.dir / "credentials.json"
        if not path.exists():
            path.write_text(
                json.dumps(
                    {
                        "accessKeyId": "tailor" + secrets.token_hex(6),
                        "secretAccessKey": secrets.token_urlsafe(30),
                    }
                )
            )
            path.chmod(0o600)
        return self.credentials

    def _start(self, binary: Path) -> None:
        keys = self._keys()
        config = self.dir / "s3.json"
        identity = {
            "name": "tailor",
            "credentials": [{"accessKey": keys.access_key_id, "secretKey": keys.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        data = self.dir / "data"
        ports = self._previous_ports()
        if ports is None:
            # SeaweedFS's master keeps its state per address: on new ports the old data
            # would be frozen (no new volumes), so a dev server on new ports starts empty.
            shutil.rmtree(data, ignore_errors=True)
            ports = self._new_ports()
        data.mkdir(exist_ok=True)
        argv = [
            str(binary),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-filer",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own (7 grown at once):
            # small volumes, and room for many buckets.
            "-master.volumeSizeLimitMB=256",
            "-volume.max=500",
            # One master: no election to wait for after a restart (10 s by default), no
            # load balancer to drain before the volume server stops (another 10 s).
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
            # Offline by default: no usage statistics sent anywhere.
            "-master.telemetry=false",
        ]
        self.state_file.write_text(json.dumps({"ports": ports, "argv": argv}))
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                env={**os.environ, "GOMAXPROCS": "2"},
            )
        _children[process.pid] = process  # reaped when it stops
        self.pid_file.write_text(str(process.pid))


def _bindable(port: int) -> bool:
    """Whether a server can listen on the port now: with SO_REUSEADDR, as Go's servers do,
    so a port still in TIME_WAIT from the last run counts as free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
