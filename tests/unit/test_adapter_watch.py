"""The serving process's spec-file watcher and adapter bookkeeping (no model needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tailor.api.workloads import Paths, ServedAdapter, ServeRun, adapters_digest
from tailor.workloads.serving.adapters import AdapterSet, SpecWatcher


def run_with(*names: str) -> ServeRun:
    adapters = [ServedAdapter(name=n, path=f"/artifacts/{n}") for n in names]
    return ServeRun.model_validate(
        {
            "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
            "servedName": "md",
            "adapters": [a.model_dump(by_alias=True) for a in adapters],
            "adaptersRevision": adapters_digest(adapters),
            "owner": {"kind": "ModelDeployment", "namespace": "ns", "name": "md"},
            "paths": {"artifacts": "/artifacts"},
        }
    )


def wait(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_watcher_applies_the_file_as_it_finds_it_then_each_change(tmp_path: Path) -> None:
    """The first poll applies the file even if it changed before the watcher started (a
    server still downloading an S3 adapter must not miss it); rewriting the same bytes
    applies nothing; an invalid file is ignored."""
    spec = tmp_path / "spec.json"
    spec.write_text(run_with("a").model_dump_json(by_alias=True))
    seen: list[list[str]] = []
    watcher = SpecWatcher(spec, lambda run: seen.append([a.name for a in run.adapters]), 0.02)
    spec.write_text(run_with("a", "b").model_dump_json(by_alias=True))  # before it starts
    watcher.start()
    try:
        wait(lambda: seen == [["a", "b"]])
        spec.write_text(run_with("a", "b").model_dump_json(by_alias=True))
        spec.write_text("{not json")
        time.sleep(0.2)
        assert seen == [["a", "b"]]
        spec.write_text(run_with("c").model_dump_json(by_alias=True))
        wait(lambda: seen == [["a", "b"], ["c"]])
    finally:
        watcher.stop()


class FakeEngine:
    """Records loads; fails for paths containing "broken"."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.loaded)

    def load_adapter(self, name: str, path: str) -> None:
        if "broken" in path:
            raise RuntimeError(f"no adapter at {path}")
        self.loaded[name] = path

    def unload_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)


def test_a_failed_adapter_is_reported_and_its_old_version_keeps_serving() -> None:
    first = run_with("a", "b")
    adapters = AdapterSet(first.adapters, first.adapters_revision, Paths(artifacts="/a"),
                          lambda a, p: None, lambda a: None)  # fmt: skip
    engine = FakeEngine()
    engine.loaded = {a.name: a.path for a in first.adapters}
    wanted = [ServedAdapter(name="a", path="/artifacts/broken-a"), first.adapters[1]]
    assert not adapters.apply(engine, wanted, "rev2")
    report = adapters.report()
    assert engine.loaded["a"] == "/artifacts/a"  # the old weights still answer
    assert report["errors"][0]["name"] == "a" and "broken-a" in report["errors"][0]["message"]
    assert (report["wanted"], report["revision"]) == ("rev2", first.adapters_revision)
    assert adapters.apply(engine, [first.adapters[1]], "rev3")  # "a" removed: all served
    assert engine.loaded == {"b": "/artifacts/b"} and adapters.report()["errors"] == []
    assert adapters.report()["revision"] == "rev3"
