"""The local runtime: the same workload programs as local processes, for a laptop or CI
without containers. The Kubernetes API stays real (Tailor's resources, ConfigMaps,
Secrets and status live there); only Jobs and Deployments are replaced by processes.

Every volume a pod would mount is mirrored by a folder under the state directory
(``<state>/<namespace>/``): ConfigMaps and Secrets are written out from the API, PVCs are
folders (``volumes/<claim>``), and the workload's spec file has its pod paths rewritten to
those folders, so a workload cannot tell the difference. Processes get the Job semantics:
``backoffLimit`` retries with exponential backoff, exit code 2 fails at once (the pod
failure policy), ``activeDeadlineSeconds`` kills the run, ``suspend`` stops it and a resume
starts it again (the trainer resumes from its checkpoint). Servers get a free local port
and are ready when ``/readyz`` answers. Run records are files, so a restarted operator
adopts its running processes instead of starting duplicates.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from tailor.api.settings import OperatorSettings
from tailor.builders.common import SPEC_DIR, SPEC_FILE, Manifest, Program, Workload
from tailor.runtime import rest
from tailor.runtime.base import ReplicaReport, RunState, ServerState
from tailor.runtime.kubernetes import KubernetesRuntime, ask_replica

log = logging.getLogger("tailor.runtime.local")

WORKLOAD_KINDS = {"Job", "Deployment", "Service", "HorizontalPodAutoscaler"}
POD_ONLY_KINDS = {"ServiceAccount", "Role", "RoleBinding"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def training_processes(workload: Workload) -> int:
    """All ranks of a training run on this host: nodes x GPUs (1 for a CPU node)."""
    if workload.module != Program.TRAINER:
        return 1
    resources = workload.run.spec.resources
    return int(resources.nodes * max(resources.gpus, 1))


def workload_argv(record: RunRecord, run_dir: Path) -> list[str]:
    """The workload's command: the module, under torchrun when it has several processes
    (as the training Job's pods run it)."""
    argv = [sys.executable, "-m"]
    if record.processes > 1:
        argv += ["torch.distributed.run", "--standalone", "--nnodes=1"]
        argv += [f"--nproc-per-node={record.processes}", "-m"]
    argv += [f"tailor.workloads.{record.module}", "--spec", str(run_dir / SPEC_FILE)]
    return argv + record.args


@dataclass
class RunRecord:
    """What the local runtime knows about one workload, persisted as JSON."""

    namespace: str
    name: str
    module: str
    server: bool
    revision: str = ""
    pid: int | None = None
    port: int | None = None
    metrics_port: int | None = None
    phase: str = "Pending"
    reason: str = ""
    message: str = ""
    attempts: int = 0
    failures: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    started_at: float = 0.0
    first_started_at: float = 0.0
    next_start: float = 0.0
    backoff_limit: int = 0
    deadline: int | None = None
    suspended: bool = False
    exit_codes: list[int] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    processes: int = 1
    """Training processes on this host (torchrun) for a run of several GPUs or nodes."""
    result: dict[str, Any] | None = None
    """The termination message of a run that exited 0 (a pod's, in a cluster)."""


class LocalRuntime(KubernetesRuntime):
    """Runs workloads as processes; everything else goes to the real API server."""

    def __init__(self, settings: OperatorSettings, api_client: client.ApiClient | None = None):
        super().__init__(settings, api_client)
        root = settings.local_state_dir or os.path.expanduser("~/.local/state/tailor/local")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backoff = float(os.environ.get("TAILOR_LOCAL_BACKOFF_SECONDS", "10"))
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- the API side -------------------------------------------------------------------

    def prepare_namespace(self, namespace: str) -> None:
        (self.root / namespace / "volumes" / self.settings.artifacts_pvc).mkdir(
            parents=True, exist_ok=True
        )

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        if manifest["kind"] in WORKLOAD_KINDS | POD_ONLY_KINDS:
            return manifest
        return super().apply(manifest)

    def volume_dir(self, namespace: str, claim: str) -> Path:
        """The folder standing in for a PersistentVolumeClaim."""
        return self.root / namespace / "volumes" / claim

    # -- records ------------------------------------------------------------------------

    def _record_path(self, namespace: str, name: str) -> Path:
        return self.root / namespace / "runs" / f"{name}.json"

    def _load(self, namespace: str, name: str) -> RunRecord | None:
        path = self._record_path(namespace, name)
        if not path.exists():
            return None
        return RunRecord(**json.loads(path.read_text()))

    def _save(self, record: RunRecord) -> None:
        path = self._record_path(record.namespace, record.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=1))
        tmp.replace(path)

    # -- workloads ----------------------------------------------------------------------

    def start(self, workload: Workload) -> None:
        namespace = workload.run.owner.namespace
        with self._lock:
            record = self._load(namespace, workload.name)
            if record and workload.server and record.revision != workload.revision:
                self._kill(record)
                record = None
            if record is None:
                record = RunRecord(
                    namespace=namespace,
                    name=workload.name,
                    module=workload.module,
                    server=workload.server,
                    revision=workload.revision,
                    backoff_limit=workload.backoff_limit,
                    deadline=workload.active_deadline_seconds,
                    suspended=workload.suspend,
                    args=list(workload.extra_args),
                    processes=training_processes(workload),
                )
                self._prepare_files(workload, record)
            # a server scaled to zero runs no process, as a Deployment of 0 replicas
            record.suspended = workload.suspend or (workload.server and _replicas(workload) == 0)
            self._save(record)
            self._advance(record)

    def _pod(self, workload: Workload) -> Manifest:
        for manifest in workload.manifests:
            if manifest["kind"] == "Job":
                return dict(manifest["spec"]["template"]["spec"])
            if manifest["kind"] == "Deployment":
                return dict(manifest["spec"]["template"]["spec"])
        raise ValueError(f"workload {workload.name} has no pod")

    def _prepare_files(self, workload: Workload, record: RunRecord) -> None:
        """Mirror the pod's volumes as folders and write the rewritten spec file."""
        namespace = record.namespace
        pod = self._pod(workload)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        prefixes: dict[str, str] = {}
        run_dir = self.root / namespace / "runs" / record.name
        for mount in pod["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if mount["mountPath"] == SPEC_DIR:
                continue
            if "configMap" in volume:
                local = self._write_config_map(namespace, volume["configMap"]["name"])
            elif "secret" in volume:
                local = self._write_secret(namespace, volume["secret"]["secretName"])
            elif "persistentVolumeClaim" in volume:
                local = self.volume_dir(namespace, volume["persistentVolumeClaim"]["claimName"])
                local.mkdir(parents=True, exist_ok=True)
            else:
                local = run_dir / "scratch" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
            prefixes[mount["mountPath"]] = str(local)
        # One pass, longest mount first, so that a rewritten path (which may start with
        # /tmp) is never rewritten again by a shorter mount such as /tmp.
        ordered = sorted(prefixes, key=len, reverse=True)
        pattern = re.compile('"(' + "|".join(re.escape(p) for p in ordered) + ')(?=[/"])')
        spec = pattern.sub(lambda m: '"' + prefixes[m.group(1)], json.dumps(workload.run.wire()))
        data = json.loads(spec)
        data["paths"] = {  # the roots the workload joins names to
            # the claim's folder, or with the s3 store the run's scratch folder
            "artifacts": prefixes.get(
                self.settings.artifacts_mount,
                str(self.volume_dir(namespace, self.settings.artifacts_pvc)),
            ),
            "configMaps": str(self.root / namespace / "configmaps"),
            "pvcs": str(self.root / namespace / "volumes"),
            "secrets": str(self.root / namespace / "secrets"),
            "store": data["paths"].get("store"),  # its credentialsDir rewritten above
            "s3": data["paths"].get("s3"),
        }
        if data.get("metricsPort"):  # many workloads share one host: no fixed ports
            record.metrics_port = record.metrics_port or _free_port()
            data["metricsPort"] = record.metrics_port
        if workload.server:
            record.port = record.port or _free_port()
            data["host"], data["port"] = "127.0.0.1", record.port
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (SPEC_FILE + ".tmp")  # replaced in one step, as the kubelet does
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(run_dir / SPEC_FILE)

    def update_config(self, workload: Workload) -> None:
        """The ConfigMaps to the API, and the running server's spec file rewritten in
        place (same ports): the process picks the change up itself."""
        super().update_config(workload)
        with self._lock:
            record = self._load(workload.run.owner.namespace, workload.name)
            if record is not None:
                self._prepare_files(workload, record)
                self._save(record)

    def replica_reports(self, namespace: str, name: str) -> list[ReplicaReport]:
        with self._lock:
            record = self._load(namespace, name)
        if record is None or record.pid is None or not record.metrics_port:
            return []
        if not self._ready(record.port):
            return []
        replica = f"{name}-pid{record.pid}"
        return [ask_replica(replica, f"http://127.0.0.1:{record.metrics_port}")]

    def _write_config_map(self, namespace: str, name: str) -> Path:
        target = self.root / namespace / "configmaps" / name
        cm = rest.request(self.api_client, "GET", rest.path("v1", "configmaps", namespace, name))
        target.mkdir(parents=True, exist_ok=True)
        for key, text in (cm.get("data") or {}).items():
            (target / key).write_text(text)
        for key, blob in (cm.get("binaryData") or {}).items():
            (target / key).write_bytes(base64.b64decode(blob))
        return target

    def _write_secret(self, namespace: str, name: str) -> Path:
        target = self.root / namespace / "secrets" / name
        secret = rest.request(self.api_client, "GET", rest.path("v1", "secrets", namespace, name))
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for key, value in (secret.get("data") or {}).items():
            path = target / key
            path.write_bytes(base64.b64decode(value))
            path.chmod(0o600)
        return target

    def _spawn(self, record: RunRecord) -> None:
        run_dir = self.root / record.namespace / "runs" / record.name
        record.attempts += 1
        log_path = run_dir / f"attempt-{record.attempts}.log"
        termination = run_dir / "termination-log"
        termination.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TAILOR_TERMINATION_LOG": str(termination),
            "TAILOR_RUN_ATTEMPT": str(record.attempts),
        }
        exit_file = run_dir / "exit-code"
        exit_file.unlink(missing_ok=True)
        # A shell keeps the exit code in a file, so that an operator restarted while the
        # workload runs can still learn how it ended.
        script = 'exit_file="$1"; shift; "$@"; code=$?; echo $code > "$exit_file"; exit $code'
        argv = ["/bin/sh", "-c", script, "sh", str(exit_file), *workload_argv(record, run_dir)]
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._children[proc.pid] = proc
        record.pid = proc.pid
        record.started_at = time.time()
        record.first_started_at = record.first_started_at or record.started_at
        record.start_time = record.start_time or _now()
        record.phase = "Running"
        record.reason = "Running"
        log.info(
            "started %s/%s (attempt %d): %s",
            record.namespace,
            record.name,
            record.attempts,
            log_path,
        )

    def _exit_code(self, record: RunRecord) -> int | None:
        """The exit code of a finished run, None while it runs."""
        assert record.pid is not None
        proc = self._children.get(record.pid)
        if proc is not None:
            code = proc.poll()
            if code is not None:
                self._children.pop(record.pid, None)
            return code
        if _alive(record.pid):
            return None
        exit_file = self.root / record.namespace / "runs" / record.name / "exit-code"
        try:  # adopted from a previous operator process
            return int(exit_file.read_text().strip())
        except (OSError, ValueError):
            return -1

    def _kill(self, record: RunRecord) -> None:
        if record.pid and _alive(record.pid):
            try:
                os.killpg(record.pid, signal.SIGTERM)
            except OSError:
                pass
            for _ in range(50):
                if self._exit_code(record) is not None:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(record.pid, signal.SIGKILL)
                except OSError:
                    pass
        record.pid = None

    def _advance(self, record: RunRecord) -> None:
        """Move a record along: notice exits, retry, enforce deadline and suspension."""
        now = time.time()
        if record.phase in ("Succeeded", "Failed"):
            return
        if record.suspended:
            if record.pid:
                self._kill(record)
            record.phase, record.reason, record.message = (
                "Suspended",
                "Suspended",
                "the run is suspended",
            )
            self._save(record)
            return
        if record.pid:
            code = self._exit_code(record)
            if code is None:
                if not record.server and record.deadline:
                    if now - record.first_started_at > record.deadline:
                        self._kill(record)
                        self._finish(
                            record,
                            "Failed",
                            "DeadlineExceeded",
                            "Job was active longer than specified deadline",
                        )
                self._save(record)
                return
            record.exit_codes.append(code)
            record.pid = None
            if code == 0 and not record.server:
                record.result = self._termination_data(record) or None
                self._finish(record, "Succeeded", "Completed", "")
                self._save(record)
                return
            reason, message = self._termination(record)
            record.failures += 1
            if code == 2:
                self._finish(record, "Failed", reason or "WorkloadError", message)
                self._save(record)
                return
            if not record.server and record.failures > record.backoff_limit:
                self._finish(
                    record,
                    "Failed",
                    "BackoffLimitExceeded",
                    f"Job has reached the specified backoff limit; last: {message or f'exit code {code}'}",
                )
                self._save(record)
                return
            delay = min(self.backoff * 2 ** (record.failures - 1), 360.0)
            record.next_start = now + delay
            record.phase, record.reason = "Pending", "BackOff"
            record.message = f"restarting in {delay:.0f}s after exit code {code}"
        if record.pid is None and now >= record.next_start:
            self._spawn(record)
        self._save(record)

    def _termination(self, record: RunRecord) -> tuple[str, str]:
        data = self._termination_data(record)
        return str(data.get("reason", "")), str(data.get("message", ""))

    def _termination_data(self, record: RunRecord) -> dict[str, Any]:
        """What the workload wrote to its termination log (as a pod's container would)."""
        path = self.root / record.namespace / "runs" / record.name / "termination-log"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _finish(self, record: RunRecord, phase: str, reason: str, message: str) -> None:
        record.phase, record.reason, record.message = phase, reason, message
        record.completion_time = _now()

    def run_state(self, namespace: str, name: str) -> RunState | None:
        with self._lock:
            record = self._load(namespace, name)
            if record is None:
                return None
            self._advance(record)
            phase = (
                record.phase
                if record.phase in ("Pending", "Running", "Succeeded", "Failed", "Suspended")
                else "Pending"
            )
            return RunState(
                phase,  # type: ignore[arg-type]
                record.reason,
                record.message,
                record.start_time,
                record.completion_time,
                record.attempts,
                record.result,
            )

    def server_state(self, namespace: str, name: str) -> ServerState | None:
        with self._lock:
            record = self._load(namespace, name)
            if record is None:
                return None
            self._advance(record)
            endpoint = f"http://127.0.0.1:{record.port}/v1"
            ready = record.pid is not None and self._ready(record.port)
            wanted = 0 if record.suspended else 1
            return ServerState(
                replicas=wanted,
                ready_replicas=1 if ready and wanted else 0,
                updated_replicas=wanted,
                endpoint=endpoint,
                revision=record.revision,
                message=record.message or ("loading the model" if record.pid else ""),
            )

    @staticmethod
    def _ready(port: int | None) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, namespace: str, name: str) -> None:
        with self._lock:
            record = self._load(namespace, name)
            if record:
                self._kill(record)
                self._record_path(namespace, name).unlink(missing_ok=True)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        if kind in ("Job", "Deployment"):
            self.stop(namespace, name)
        elif kind not in WORKLOAD_KINDS | POD_ONLY_KINDS:
            super().delete(api_version, kind, namespace, name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind in WORKLOAD_KINDS:
            return None
        return super().get(api_version, kind, namespace, name)

    def stop_all(self) -> None:
        """Stop every process this runtime started (``tailor down``)."""
        with self._lock:
            for path in self.root.glob("*/runs/*.json"):
                record = RunRecord(**json.loads(path.read_text()))
                if record.pid:
                    self._kill(record)
                    if record.phase not in ("Succeeded", "Failed"):
                        record.phase = "Pending"
                    self._save(record)


def _replicas(workload: Workload) -> int | None:
    """The replicas a server workload's Deployment asks for (None: left to an HPA)."""
    for manifest in workload.manifests:
        if manifest["kind"] == "Deployment":
            value = manifest["spec"].get("replicas")
            return None if value is None else int(value)
    return None
