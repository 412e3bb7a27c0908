"""Data shipped with the package: APIBench's Torch Hub and HuggingFace files (Apache-2.0,
see ``apibench/LICENSE``), used by the quickstart, the tests and the benchmarks, so a clone
or a pip install of Tailor needs nothing beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

APIBENCH = Path(__file__).resolve().parent / "apibench"


def apibench_dir() -> Path:
    """The APIBench folder: ``TAILOR_APIBENCH`` when set, else the packaged copy."""
    return Path(os.environ.get("TAILOR_APIBENCH") or APIBENCH)
