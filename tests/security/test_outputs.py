"""Publishing never deletes what Tailor did not write (docs/security.md, "Ownership").

A FineTuneJob's ``spec.output.pvc`` names any folder on a claim of the namespace, e.g. a
shared models claim. Before, the trainer replaced whatever was there when it published (and
took another run's artifact there for its own). Now a folder with files this run did not
publish is refused before training starts, naming the field, and left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.workloads.errors import WorkloadError
from tailor.workloads.training.trainer import train
from tests.workloads.helpers import make_run


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "foreign",
    [
        {"README.md": b"the team's model card", "weights/model.safetensors": b"weights"},
        {  # another FineTuneJob's artifact at the same path
            "manifest.json": json.dumps(
                {"kind": "FineTuneJob", "owner": {"namespace": "ns1", "name": "other", "uid": "u2"}}
            ).encode(),
            "adapter_model.safetensors": b"other weights",
        },
    ],
    ids=["files-tailor-did-not-write", "another-runs-artifact"],
)
def test_an_output_folder_holding_foreign_files_is_refused_and_left_untouched(
    tmp_path: Path, foreign: dict[str, bytes]
) -> None:
    run = make_run(tmp_path, tmp_path / "pvcs")  # refused before the model is read
    output = Path(run.output_dir)
    for rel, data in foreign.items():
        (output / rel).parent.mkdir(parents=True, exist_ok=True)
        (output / rel).write_bytes(data)
    with pytest.raises(WorkloadError) as error:
        train(run)
    assert error.value.reason == "OutputNotEmpty"
    assert "spec.output" in error.value.message and "spec.output.pvc.path" in error.value.message
    assert tree(output) == foreign
    assert (
        not (tmp_path / "progress.jsonl").exists()
        or "artifact" not in (tmp_path / "progress.jsonl").read_text()
    )
