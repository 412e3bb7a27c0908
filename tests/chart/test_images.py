"""The chart, the Dockerfiles and `make images` agree (a cheap check for `make test`; the
images themselves are built and smoke-run by tests/images/run.sh, which downloads torch).

No registry publishes Tailor's images: `make images` builds them (images/build.sh) under the
names the chart composes (`<registry>/tailor-operator:<appVersion>`,
`<registry>/tailor-workloads:<appVersion>[-cuda]`), and the chart requires the registry."""

from __future__ import annotations

import re
import tomllib

import yaml

from tailor.api.settings import OperatorSettings
from tailor.builders.common import Program
from tests.chart.helpers import CHART, ROOT, by_kind, helm, render

IMAGES = ROOT / "images"


def dockerfile(name: str) -> str:
    return (IMAGES / f"{name}.Dockerfile").read_text()


def test_the_chart_requires_a_registry_and_says_how_to_fill_it() -> None:
    for values, field in (
        ({"image": {"repository": ""}}, "image.repository"),
        ({"workloads": {"image": {"repository": ""}}}, "workloads.image.repository"),
    ):
        refused = helm("template", "t", str(CHART), values=values, check=False)
        assert refused.returncode != 0
        assert f"{field} is required" in refused.stderr
        assert "make images PUSH=" in refused.stderr


def test_image_names_tags_users_and_entry_points_agree() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version  # the tag `make images` builds is the chart's default

    build = (IMAGES / "build.sh").read_text()
    names = dict(
        re.findall(
            r"\[([a-z-]+)\]=(tailor-[a-z]+)", build.split("declare -A NAME=")[1].split("\n")[0]
        )
    )
    assert names == {"operator": "tailor-operator", "workloads": "tailor-workloads",
                     "workloads-cuda": "tailor-workloads"}  # fmt: skip
    assert "[workloads-cuda]=$VERSION-cuda" in build
    assert "images/build.sh" in (ROOT / "Makefile").read_text()

    objects = by_kind(render({"workloads": {"image": {"tag": version}}}))
    (deployment,) = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"registry.example.com/team/tailor-operator:{version}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TAILOR_IMAGE"] == f"registry.example.com/team/tailor-workloads:{version}"
    assert env["TAILOR_GPU_IMAGE"] == f"registry.example.com/team/tailor-workloads:{version}-cuda"

    # users: the images' USER is the UID the chart and the operator's pods run as
    for name in ("operator", "workloads", "workloads-cuda"):
        text = dockerfile(name)
        assert "USER 1000:1000" in text and "useradd --uid 1000 --gid 1000" in text, name
        assert "ARG BASE=" in text and "FROM ${BASE}" in text, name  # Debian base here
    assert pod["securityContext"]["runAsUser"] == 1000
    assert env["TAILOR_RUN_AS_USER"] == "1000" and OperatorSettings().run_as_user == 1000

    # entry points: the operator's command, and the workload programs' `python -m`
    operator = dockerfile("operator")
    assert 'ENTRYPOINT ["tailor"]' in operator and container["command"] == ["tailor"]
    assert container["args"][:2] == ["operator", "run"]
    for name in ("workloads", "workloads-cuda"):
        text = dockerfile(name)
        assert "PATH=/opt/tailor/bin:$PATH" in text and "HOME=/home/tailor" in text
        assert '".[workloads]"' in text  # the extra with torch: the operator's has none
    assert '".[workloads]"' not in operator and "torch" not in operator.split("FROM")[1]
    smoke = (ROOT / "tests" / "images" / "run.sh").read_text()
    for program in Program:
        assert program.value in smoke, f"tests/images/run.sh does not smoke-run {program}"
