"""``tailor dev cluster up|down|status|env|build``: the local control plane of
``tailor.devcluster`` from the command line (``python -m tailor.devcluster`` is the same
tree). The cluster's state directory is ``--dir``, else ``$TAILOR_DEVCLUSTER_DIR``, else
``${XDG_STATE_HOME:-~/.local/state}/tailor/devcluster/<--name>``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tailor.devcluster.cluster import DevCluster


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser(
        "dev", help="local development: `tailor dev cluster up|down|status|env`"
    )
    dev_commands = dev.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, help="state directory (overrides --name)")
    common.add_argument("--name", default="default", help="cluster name (default: %(default)s)")
    cluster = dev_commands.add_parser(
        "cluster",
        help="a local control plane: up, down, status, env, build",
        description="A local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler, kwok fake nodes with GPUs).",
        parents=[common],
    )
    cluster_commands = cluster.add_subparsers(dest="command", required=True)
    up = cluster_commands.add_parser(
        "up", parents=[common], help="build if needed, start, wait for readiness"
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    up.add_argument(
        "--s3", action="store_true", help="also start an S3 server (SeaweedFS) for artifacts"
    )
    up.add_argument("--bucket", default="tailor", help="bucket the S3 server creates")
    up.add_argument("--kueue", action="store_true", help="also start Kueue (GPU quotas and queues)")
    down = cluster_commands.add_parser(
        "down", parents=[common], help="stop every process of the cluster"
    )
    down.add_argument(
        "--purge", action="store_true", help="also delete the state directory (data, certs, logs)"
    )
    cluster_commands.add_parser("status", parents=[common], help="components, health and memory")
    cluster_commands.add_parser("env", parents=[common], help="print export KUBECONFIG=...")
    cluster_commands.add_parser(
        "build", parents=[common], help="only build (or find) the binaries (with SeaweedFS)"
    )
    for command in cluster_commands.choices.values():
        command.set_defaults(handler=cluster_command)


def cluster_command(args: argparse.Namespace) -> int:
    """Run one ``tailor dev cluster`` command; a cluster or build error is one line, exit 1."""
    from tailor.devcluster.build import (
        ALL_COMPONENTS,
        KUEUE_VERSION,
        BuildError,
        ensure_binaries,
    )
    from tailor.devcluster.cluster import ClusterError, DevCluster, default_dir
    from tailor.devcluster.kueue import Kueue
    from tailor.devcluster.s3 import S3Server

    cluster = DevCluster(args.dir or default_dir(args.name))
    try:
        if args.command == "up":
            cluster.up(timeout=args.timeout)
            print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
            if args.kueue:
                kueue = Kueue(cluster)
                kueue.up()
                print(f"# Kueue {KUEUE_VERSION}: running, log {kueue.log_file}")
            if args.s3:
                s3 = S3Server(cluster.dir / "s3")
                s3.up(buckets=(args.bucket,))
                print(
                    f"# S3 (SeaweedFS): {s3.endpoint}, bucket {args.bucket}; keys in {s3.dir}/credentials.json"
                )
                print(f"export TAILOR_S3_ENDPOINT={s3.endpoint}")
            return 0
        if args.command == "build":
            for binary, path in ensure_binaries(components=ALL_COMPONENTS).items():
                print(f"{binary}\t{path}")
            return 0
        if args.command == "down":
            S3Server(cluster.dir / "s3").down()
            Kueue(cluster).down()
            stopped = cluster.down(purge=args.purge)
            print(f"stopped {len(stopped)} processes" if stopped else "nothing was running")
            return 0
        if args.command == "status":
            return _print_status(cluster)
        print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
        if not cluster.is_healthy():
            print(f"# dev cluster in {cluster.dir} is not running: run 'up' first", file=sys.stderr)
        return 0
    except (ClusterError, BuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _print_status(cluster: DevCluster) -> int:
    components = cluster.status()
    print(f"dev cluster: {cluster.dir}")
    if any(c.pid for c in components):
        print(f"server:      {cluster.server()}")
        print(f"kubeconfig:  {cluster.kubeconfig}")
    print(f"{'COMPONENT':<25} {'PID':>7}  {'STATE':<12} {'RSS':>9}  LOG")
    for c in components:
        rss = f"{c.rss_bytes / 2**20:.0f} MiB" if c.pid else "-"
        print(f"{c.name:<25} {c.pid or '-':>7}  {c.detail:<12} {rss:>9}  {c.log}")
    total = sum(c.rss_bytes for c in components)
    if total:
        print(f"{'total':<25} {'':>7}  {'':<12} {total / 2**20:>5.0f} MiB")
    return 0 if all(c.healthy for c in components) else 1
