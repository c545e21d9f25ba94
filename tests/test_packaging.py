"""The front door: one CLI for every stage, a version, and manifests that ship inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from label_pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project's wheel, built and unpacked into a folder outside the checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(folder),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = folder.glob("*.whl")
    site = folder / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_manifests_are_package_data_found_by_name_after_install(installed_wheel, tmp_path):
    names = sorted(p.name for p in (installed_wheel / "label_pipeline" / "manifests").glob("*.yaml"))
    assert names == sorted(p.name for p in (ROOT / "manifests").glob("*.yaml"))
    env = {
        **os.environ,
        "PYTHONPATH": str(installed_wheel),
        "DATA_ROOT": str(tmp_path / "data"),
        "LABELS_ROOT": str(tmp_path),
    }
    # From another folder, with the installed package first on the path: no source checkout involved.
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from label_pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
            "run",
            "cc12m",
            "--experts",
            "edge:canny",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # cc12m was found by name: the run stops at the missing data, pointing at the download command.
    assert run.returncode == 2 and "make download DATASET=cc12m" in run.stderr, run.stderr[-2000:]


def test_version_and_every_stage_behind_one_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("label-pipeline ")
    for command, usage in [
        ("download", "label-pipeline download"),
        ("prepare", "label-pipeline prepare"),
        ("train", "label-pipeline train"),
        ("eval", "label-pipeline eval"),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"usage: {usage}" in capsys.readouterr().out


def test_delegated_stages_share_exit_codes(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert main(["prepare", "coco", "--data-root", str(tmp_path)]) == 1  # files missing: listed, exit 1
    assert "MISSING" in capsys.readouterr().out
