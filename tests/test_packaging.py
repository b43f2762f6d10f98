"""The distribution installs as nugget2d.compress / .runtime / .serve, from a wheel as well as editable."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_three_packages_and_imports_from_itself(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("nugget2d-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("compress", "runtime", "serve"):
        assert f"nugget2d/{package}/__init__.py" in names
    assert "nugget2d/runtime/data/complete-angler.txt" in names
    for adapter in ("adapter", "adapters/gemma3-270m"):  # the default model's and Gemma 3's, with their cards
        for part in ("nugget2d_config.json", "scorer.safetensors", "adapter_model.safetensors", "README.md"):
            assert f"nugget2d/runtime/data/{adapter}/{part}" in names
    assert {"nugget2d/ds_configs/zero2.json", "nugget2d/ds_configs/zero3_offload.json"} <= set(names)
    assert not any(name.startswith("nugget2d/__init__") for name in names)  # nugget2d is a namespace
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import nugget2d.compress, nugget2d.runtime.cli, nugget2d.serve;"
        "from nugget2d.runtime.texts import bundled_text; assert bundled_text();"
        "from nugget2d.runtime.loading import other_adapter_dirs as o; assert [p.name for p in o()] == ['gemma3-270m'];"
        "from nugget2d.runtime.train import ds_config_dict; assert ds_config_dict('zero3.json', 1);"
        "print(nugget2d.compress.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(unpacked)], capture_output=True, text=True, check=True)
    assert result.stdout.strip().startswith(str(unpacked))


def _floors() -> dict[str, str]:
    """The lowest version pyproject.toml admits for each of torch, transformers and peft."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for line in declared:
        requirement = Requirement(line)
        if requirement.name in ("torch", "transformers", "peft"):
            (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            floors[requirement.name] = floor
    return floors


def test_make_test_compat_installs_exactly_the_declared_floors():
    pins = re.search(r"^COMPAT_PINS := (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).split()
    pinned = {name: version for name, version in (pin.split("==") for pin in pins)}
    assert {name: Version(v) for name, v in pinned.items()} == {name: Version(v) for name, v in _floors().items()}


def test_the_peers_extra_admits_the_transformers_floor():
    """kvpress pins transformers<5.3: the floor must sit inside that pin, or `.[peers]` cannot resolve a
    transformers the project was tested on."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    (peer,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    assert Requirement(peer).name == "kvpress"
    assert Version(_floors()["transformers"]) < Version("5.3")
