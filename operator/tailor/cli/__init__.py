"""The ``tailor`` command.

One argparse tree, built once by ``build_parser``: every command group's module adds its
parsers with ``add_commands`` and marks each leaf with the function that runs it
(``handler``). ``tailor crds`` / ``tailor validate`` (``crds``, ``validate``), ``tailor dev
cluster`` (``dev``), ``tailor operator run`` (``operator``), ``tailor up`` / ``down`` /
``status`` / ``example-data`` (``quickstart``, with its ``ladder`` and data in
``quickstart_data``), ``tailor eval`` (``eval``), ``tailor store push`` (``store``), ``tailor prompt``
(``prompt``) and ``tailor rollout`` (``rollout``). The modules import their machinery inside the handlers,
so that ``tailor validate`` stays fast and needs no cluster libraries. Nothing imports this
package (an import-linter contract).
"""

from __future__ import annotations

import argparse
import sys

from tailor.cli import crds, dev, eval, operator, prompt, quickstart, rollout, store, validate


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; the top-level order is the order of ``tailor --help``."""
    parser = argparse.ArgumentParser(prog="tailor", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (crds, validate, dev, operator, quickstart, eval, store, prompt, rollout):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.handler(args) or 0)
