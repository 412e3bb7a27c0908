"""Start, check and stop a local Kubernetes control plane made of real binaries.

A ``DevCluster`` owns one state directory (``pki/``, ``etcd/`` data, ``conf/``
component kubeconfigs, ``logs/<component>.log``, ``run/<component>.pid``,
``state.json`` and the admin ``kubeconfig``). ``up`` starts etcd,
kube-apiserver (TLS, RBAC, service-account token signing), kube-controller-manager,
kube-scheduler, kwok and a hostPath volume provisioner (with the default
StorageClass ``tailor-hostpath``) on free 127.0.0.1 ports, each detached in its own
process group, creates the fake nodes and waits until the API is ready, the
nodes are Ready and the default ServiceAccount exists. ``up`` on a healthy
cluster does nothing; ``down`` stops every process the directory's cluster
started, SIGTERM first and SIGKILL after a grace period.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.devcluster import build
from tailor.devcluster.nodes import FAKE_NODES
from tailor.devcluster.pki import Pki, ensure_pki

COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "hostpath-provisioner",
)
PORT_NAMES = (
    "etcd",
    "etcd-peer",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "hostpath-provisioner",
)
# The default StorageClass: claims without a class get one, and the dev cluster's
# provisioner (go/provisioner, SIG Storage's provisioner library) binds each to a new
# hostPath volume under <state dir>/volumes/, deleted with its claim.
STORAGE_CLASS = "tailor-hostpath"
PROVISIONER = "tailor.dev/hostpath"
PROVISIONER_USER = "tailor:hostpath-provisioner"
STORAGE_RBAC: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": PROVISIONER_USER},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["persistentvolumes"],
                "verbs": ["get", "list", "watch", "create", "delete"],
            },
            {
                "apiGroups": [""],
                "resources": ["persistentvolumeclaims"],
                "verbs": ["get", "list", "watch", "update"],
            },
            {
                "apiGroups": ["storage.k8s.io"],
                "resources": ["storageclasses"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "update", "patch"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": PROVISIONER_USER},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": PROVISIONER_USER,
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": PROVISIONER_USER}
        ],
    },
    {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    },
]  # fmt: skip
STAGES_DIR = Path(__file__).resolve().parent / "stages"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"

# Popen objects of the processes this Python process started, so they can be reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ClusterError(RuntimeError):
    """The cluster could not be started or is not healthy; the message says where to look."""


def state_root() -> Path:
    """``${XDG_STATE_HOME:-~/.local/state}/tailor/devcluster``: where named clusters live."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tailor" / "devcluster"


def default_dir(name: str = "default") -> Path:
    """``$TAILOR_DEVCLUSTER_DIR``, else ``<state_root()>/<name>``."""
    override = os.environ.get("TAILOR_DEVCLUSTER_DIR")
    return Path(override) if override else state_root() / name


@dataclass(frozen=True)
class ComponentStatus:
    """One line of ``status``: a component's process, health, memory and log file."""

    name: str
    pid: int | None
    healthy: bool
    detail: str
    rss_bytes: int
    log: Path


class DevCluster:
    """The control plane whose state lives in ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = (directory or default_dir()).expanduser().resolve()
        self.pki = Pki(self.dir / "pki")
        self.kubeconfig = self.dir / "kubeconfig"
        self.log_dir = self.dir / "logs"
        self.run_dir = self.dir / "run"
        self.conf_dir = self.dir / "conf"
        self.state_file = self.dir / "state.json"

    # ----- public API -------------------------------------------------------

    def up(self, timeout: float = 180.0, log: Callable[[str], None] | None = None) -> None:
        """Start the cluster, or return at once if it is already running and healthy.

        If starting fails, every process started so far is stopped again (the logs
        stay); a port taken by someone else in the meantime gets one retry on new ports.
        """
        say = log or _stderr
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self.is_healthy():
                say(f"dev cluster already running ({self.dir})")
                return
            self._stop_all(grace=10.0)
            binaries = build.ensure_binaries(say)
            ensure_pki(self.pki.dir)
            started = time.monotonic()
            for attempt in (1, 2):
                try:
                    self._start_all(binaries, started + timeout, reuse_ports=attempt == 1)
                    break
                except BaseException as error:
                    self._stop_all(grace=10.0)
                    clash = isinstance(error, ClusterError) and self._port_clash()
                    if attempt == 2 or not clash:
                        raise
                    say("a port was taken meanwhile; starting again on new ports")
            say(
                f"dev cluster ready in {time.monotonic() - started:.0f}s: "
                f"export KUBECONFIG={self.kubeconfig}"
            )

    def down(self, grace: float = 10.0, purge: bool = False) -> list[int]:
        """Stop every process of this cluster; returns the pids that were stopped.

        ``purge`` also deletes the state directory (etcd data, certificates, logs).
        """
        if not self.dir.exists():
            return []
        with self._locked():
            stopped = self._stop_all(grace)
            if purge:
                shutil.rmtree(self.dir)
            return stopped

    def restart(self, name: str, timeout: float = 120.0, grace: float = 10.0) -> float:
        """Stop one component and start it again on its ports; returns the seconds until it
        is healthy again (a chaos drill: ``restart("kube-apiserver")``)."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; choose from {list(COMPONENTS)}")
        started = time.monotonic()
        with self._locked():
            pid = self._pid(name)
            if pid is not None:
                _terminate(pid, grace)
            binaries = build.ensure_binaries(_stderr)
            self._start(name, self._command(name, binaries[name], self._ports()))
            check = (
                self._apiserver_ready
                if name == "kube-apiserver"
                else functools.partial(self._component_healthy, name)
            )
            self._wait(name, started + timeout, check)
        return time.monotonic() - started

    def status(self) -> list[ComponentStatus]:
        result = []
        for name in COMPONENTS:
            pid = self._pid(name)
            if pid is None:
                result.append(ComponentStatus(name, None, False, "not running", 0, self._log(name)))
                continue
            healthy = self._component_healthy(name)
            result.append(
                ComponentStatus(
                    name,
                    pid,
                    healthy,
                    "healthy" if healthy else "unhealthy",
                    _rss(pid),
                    self._log(name),
                )
            )
        return result

    def is_healthy(self) -> bool:
        return all(self._pid(n) is not None for n in COMPONENTS) and all(
            self._component_healthy(n) for n in COMPONENTS
        )

    def server(self) -> str:
        return f"https://127.0.0.1:{self._ports()['kube-apiserver']}"

    def pids(self) -> list[int]:
        """Every live process started for this cluster (by pid file or command line)."""
        found = {p for p in (self._pid(n) for n in COMPONENTS) if p is not None}
        return sorted(found | set(self._processes_by_command_line()))

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """Call the API server as the admin user and return the decoded JSON."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.server() + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5, context=self._admin_tls()) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip().startswith(b"{") else raw.decode()

    # ----- processes --------------------------------------------------------

    def _start_all(self, binaries: dict[str, Path], deadline: float, reuse_ports: bool) -> None:
        ports = self._choose_ports(reuse=reuse_ports)
        self._write_state(ports)
        self._write_kubeconfigs(ports["kube-apiserver"])
        for name in COMPONENTS:
            self._start(name, self._command(name, binaries[name], ports))
            if name == "etcd":
                self._wait("etcd", deadline, self._etcd_healthy)
            elif name == "kube-apiserver":
                self._wait("kube-apiserver", deadline, self._apiserver_ready)
                self._create_storage()
        for name in COMPONENTS[2:]:
            self._wait(name, deadline, functools.partial(self._component_healthy, name))
        self._create_nodes()
        self._wait("kwok", deadline, self._nodes_ready, "fake nodes Ready")
        self._wait(
            "kube-controller-manager",
            deadline,
            self._default_service_account,
            "default ServiceAccount in namespace default",
        )

    def _port_clash(self) -> bool:
        """Whether a component's latest start failed because its port was taken."""
        return any("address already in use" in self._latest_log(name) for name in COMPONENTS)

    def _latest_log(self, name: str) -> str:
        """The part of ``logs/<name>.log`` written since the component was last started."""
        try:
            text = self._log(name).read_text(errors="replace")
        except OSError:
            return ""
        return text.rsplit("\n=== ", 1)[-1]

    def _command(self, name: str, binary: Path, ports: dict[str, int]) -> list[str]:
        pki, conf = self.pki, self.conf_dir
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        if name == "etcd":
            return [
                str(binary),
                "--name=tailor",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=tailor={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]
        if name == "kube-apiserver":
            return [
                str(binary),
                "--advertise-address=127.0.0.1",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-apiserver']}",
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={pki.dir}",
                f"--tls-cert-file={pki.cert('kube-apiserver')}",
                f"--tls-private-key-file={pki.key('kube-apiserver')}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                # The "kubernetes" Service cannot point at 127.0.0.1; nothing in-cluster needs it.
                "--endpoint-reconciler-type=none",
                f"--requestheader-client-ca-file={pki.ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.cert('front-proxy-client')}",
                f"--proxy-client-key-file={pki.key('front-proxy-client')}",
                # Webhooks and aggregated APIs served by local processes (Kueue) are reached
                # through their Service's endpoints: there is no kube-proxy for cluster IPs.
                "--enable-aggregator-routing=true",
            ]
        kubeconfig = conf / f"{name}.kubeconfig"
        if name == "kwok":
            return [
                str(binary),
                f"--kubeconfig={kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--server-address=127.0.0.1:{ports['kwok']}",
                *(f"--config={stage}" for stage in sorted(STAGES_DIR.glob("*.yaml"))),
            ]
        if name == "hostpath-provisioner":
            return [
                str(binary),
                f"-kubeconfig={kubeconfig}",
                f"-dir={self.dir / 'volumes'}",
                f"-provisioner={PROVISIONER}",
                f"-metrics-port={ports[name]}",
            ]
        common = [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports[name]}",
            f"--cert-dir={pki.dir / name}",
            "--leader-elect=false",
            "--profiling=false",
        ]
        if name == "kube-controller-manager":
            return [
                *common,
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--cluster-name=tailor-dev",
                "--node-monitor-grace-period=90s",
                f"--flex-volume-plugin-dir={self.dir / 'flexvolume'}",
            ]
        return common

    def _start(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log(name), "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _children[process.pid] = process
        (self.run_dir / f"{name}.pid").write_text(f"{process.pid}\n")

    def _stop_all(self, grace: float) -> list[int]:
        """Stop the components in reverse start order, then any stray process of this directory.

        etcd goes last, so that the API server can shut down cleanly.
        """
        ordered = [p for p in (self._pid(n) for n in reversed(COMPONENTS)) if p is not None]
        ordered += [p for p in self._processes_by_command_line() if p not in ordered]
        for pid in ordered:
            _terminate(pid, grace)
        for pidfile in self.run_dir.glob("*.pid"):
            pidfile.unlink()
        for pid, child in list(_children.items()):
            if child.poll() is not None:
                del _children[pid]
        return ordered

    def _pid(self, name: str) -> int | None:
        """The pid in ``run/<name>.pid`` if that process is alive and is ours."""
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        child = _children.get(pid)
        if child is not None:  # started by this process: its exec may not have happened yet
            return pid if child.poll() is None else None
        return pid if _alive(pid) and self._owns(pid) else None

    def _owns(self, pid: int) -> bool:
        argv = _cmdline(pid)
        return (
            bool(argv)
            and str(build.cache_root()) in argv[0]
            and any(str(self.dir) in arg for arg in argv[1:])
        )

    def _processes_by_command_line(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _alive(int(entry.name)) and self._owns(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def _log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ----- configuration ----------------------------------------------------

    def _choose_ports(self, reuse: bool) -> dict[str, int]:
        """Reuse the previous ports where they are still free, pick new ones otherwise."""
        previous = self._ports() if reuse and self.state_file.exists() else {}
        ports: dict[str, int] = {}
        for name in PORT_NAMES:
            port = previous.get(name)
            ports[name] = (
                port
                if port and _port_free(port) and port not in ports.values()
                else _free_port(exclude=set(ports.values()))
            )
        return ports

    def _ports(self) -> dict[str, int]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        return {str(k): int(v) for k, v in state["ports"].items()}

    def _write_state(self, ports: dict[str, int]) -> None:
        state = {
            "ports": ports,
            "versions": {c.name: c.version for c in build.COMPONENTS},
            "kubeconfig": str(self.kubeconfig),
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _write_kubeconfigs(self, port: int) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        server = f"https://127.0.0.1:{port}"
        _write_kubeconfig(self.kubeconfig, server, self.pki, "admin", inline=True)
        for name in COMPONENTS[2:]:
            _write_kubeconfig(
                self.conf_dir / f"{name}.kubeconfig", server, self.pki, name, inline=False
            )

    # ----- health -----------------------------------------------------------

    def _wait(
        self, name: str, deadline: float, check: Callable[[], bool], what: str | None = None
    ) -> None:
        while True:
            for component in COMPONENTS:
                pidfile = self.run_dir / f"{component}.pid"
                if pidfile.exists() and self._pid(component) is None:
                    raise ClusterError(self._failure(component, f"{component} exited"))
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterError(self._failure(name, f"timed out waiting for {what or name}"))
            time.sleep(0.25)

    def _failure(self, name: str, headline: str) -> str:
        log = self._log(name)
        tail = "\n".join(self._latest_log(name).splitlines()[-25:]) or "(empty)"
        return f"{headline}; see {log}\n--- last lines of {log} ---\n{tail}"

    def _component_healthy(self, name: str) -> bool:
        if name == "etcd":
            return self._etcd_healthy()
        if name == "kube-apiserver":
            return self._apiserver_ready()
        try:
            port = self._ports()[name]
        except (OSError, KeyError, ValueError):
            return False
        if name == "kwok":
            return _http_ok(f"http://127.0.0.1:{port}/healthz", None)
        if name == "hostpath-provisioner":
            return _http_ok(f"http://127.0.0.1:{port}/metrics", None)
        return _http_ok(f"https://127.0.0.1:{port}/healthz", _unverified_tls())

    def _etcd_healthy(self) -> bool:
        try:
            port = self._ports()["etcd"]
        except (OSError, KeyError, ValueError):
            return False
        return _http_ok(f"http://127.0.0.1:{port}/health", None)

    def _apiserver_ready(self) -> bool:
        try:
            return bool(self.api("/readyz") == "ok")
        except (OSError, KeyError, ValueError, urllib.error.URLError, ssl.SSLError):
            return False

    def _create_storage(self) -> None:
        """The provisioner's ClusterRole and binding, and the default StorageClass."""
        paths = {
            "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            "StorageClass": "/apis/storage.k8s.io/v1/storageclasses",
        }
        for obj in STORAGE_RBAC:
            self._create(paths[obj["kind"]], obj)

    def _create_nodes(self) -> None:
        for node in FAKE_NODES:
            self._create("/api/v1/nodes", node)

    def _create(self, path: str, obj: dict[str, Any]) -> None:
        """POST one object; one that already exists is fine."""
        try:
            self.api(path, "POST", obj)
        except urllib.error.HTTPError as error:
            if error.code != 409:
                raise ClusterError(
                    f"creating {obj['kind']} {obj['metadata']['name']}: "
                    f"{error.read().decode(errors='replace')}"
                ) from error

    def _nodes_ready(self) -> bool:
        wanted = {n["metadata"]["name"] for n in FAKE_NODES}
        try:
            nodes = self.api("/api/v1/nodes")["items"]
        except (OSError, urllib.error.URLError):
            return False
        ready = {
            n["metadata"]["name"]
            for n in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
        }
        return wanted <= ready

    def _default_service_account(self) -> bool:
        try:
            self.api("/api/v1/namespaces/default/serviceaccounts/default")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def _admin_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.cert("admin")), str(self.pki.key("admin")))
        return context


# ----- helpers --------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_kubeconfig(path: Path, server: str, pki: Pki, user: str, inline: bool) -> None:
    """Write a kubeconfig (JSON, which kubectl reads as YAML) for ``user``'s certificate."""

    def ref(key: str, file: Path) -> dict[str, str]:
        if inline:
            return {f"{key}-data": base64.b64encode(file.read_bytes()).decode()}
        return {key: str(file)}

    name = "tailor-dev"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, **ref("certificate-authority", pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    **ref("client-certificate", pki.cert(user)),
                    **ref("client-key", pki.key(user)),
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
        "preferences": {},
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")


def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False


def _unverified_tls() -> ssl.SSLContext:
    """For the /healthz of controller-manager and scheduler, which serve self-signed certs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port(exclude: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _terminate(pid: int, grace: float) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace`` seconds, reap it."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        _signal_group(pid, signal.SIGKILL)
    _reap(pid, timeout=5.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (each component is a session leader)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(pid: int, timeout: float) -> None:
    """Collect the exit status of a child of this process, so it does not linger as a zombie."""
    process = _children.pop(pid, None)
    if process is not None:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        return
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
