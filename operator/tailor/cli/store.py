"""``tailor store push FOLDER s3://bucket/key/``: upload a folder the way Tailor's
workloads do (files, then the completion marker), so a model of your own can be a
``uri: s3://...`` model source. Credentials come from the AWS SDK's usual chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "store",
        help="`tailor store push FOLDER s3://bucket/key/`: upload a model",
        description=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a folder with its completion marker")
    push.add_argument("folder", type=Path)
    push.add_argument("uri", help="s3://bucket/key/")
    push.add_argument("--endpoint", help="S3 endpoint URL (MinIO, SeaweedFS, Ceph, GCS)")
    push.add_argument("--region", default="us-east-1")
    push.add_argument("--addressing-style", choices=("auto", "path", "virtual"), default="path")
    push.set_defaults(handler=lambda args: push_folder(args, parser))


def push_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Upload ``args.folder`` to ``args.uri``; ``parser`` (``tailor store``) reports bad
    arguments, a failed upload is one line (reason: message) and exit 2."""
    from tailor.api.workloads import ObjectStore
    from tailor.workloads.errors import WorkloadError
    from tailor.workloads.io.storage import Store
    from tailor.workloads.program import setup_logging

    setup_logging()
    if not args.uri.startswith("s3://") or "/" not in args.uri[len("s3://") :].strip("/"):
        parser.error(f"uri: {args.uri!r} is not s3://bucket/key/")
    if not args.folder.is_dir():
        parser.error(f"folder: {args.folder} is not a folder")
    bucket, _, key = args.uri[len("s3://") :].partition("/")
    config = ObjectStore(
        bucket=bucket,
        endpoint=args.endpoint,
        region=args.region,
        addressing_style=args.addressing_style,
    )
    try:
        marker = Store(config, args.folder).push(args.folder, key)
    except WorkloadError as exc:
        print(f"{exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    size = sum(f["sizeBytes"] for f in marker["files"])
    print(
        f"uploaded {len(marker['files'])} files ({size / 1e6:.1f} MB) to s3://{bucket}/{key.strip('/')}/"
    )
    return 0
