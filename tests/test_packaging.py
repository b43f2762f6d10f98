"""The distribution installs as nugget2d.compress / .runtime / .serve, from a wheel as well as editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert {"nugget2d/ds_configs/zero2.json", "nugget2d/ds_configs/zero3_offload.json"} <= set(names)
    assert not any(name.startswith("nugget2d/__init__") for name in names)  # nugget2d is a namespace
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import nugget2d.compress, nugget2d.runtime.cli, nugget2d.serve;"
        "from nugget2d.runtime.texts import bundled_text; assert bundled_text();"
        "from nugget2d.runtime.train import ds_config_dict; assert ds_config_dict('zero3.json', 1);"
        "print(nugget2d.compress.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(unpacked)], capture_output=True, text=True, check=True)
    assert result.stdout.strip().startswith(str(unpacked))
