"""No silent skips: without the reference folder, fidelity tests fail under ``CI`` or ``--require-reference``.

Each case runs pytest in a subprocess on a one-line fidelity test written to a temp dir, with this
directory's real conftest.py (loaded as a plugin, for the option) and reference_data.py on the path, and
``PRISMER_REFERENCE_DIR`` pointing at a folder that does or does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
FIDELITY_TEST = """
from reference_data import reference_dir


def test_reads_the_reference():
    assert (reference_dir("edge") / "marker.txt").read_text() == "here"
"""


def _run_pytest(tmp_path: Path, reference: Path, ci: str | None, *options: str) -> tuple[int, str]:
    test_file = tmp_path / "test_needs_reference.py"
    test_file.write_text(FIDELITY_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["PRISMER_REFERENCE_DIR"] = str(reference)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no third-party plugins: ~1 s per run instead of ~6
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest"]
    command += [*options, "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("ci", "options"),
    [("true", ()), (None, ("--require-reference",))],
    ids=["CI=true", "option"],
)
def test_missing_reference_fails_when_required(tmp_path, ci, options):
    missing = tmp_path / "nowhere" / "reference"
    code, output = _run_pytest(tmp_path, missing, ci, *options)
    assert code == 1, output
    assert "1 failed" in output, output
    assert f"Prismer reference data not found at {missing / 'edge'}" in output
    assert "../shared/reference" in output and "PRISMER_REFERENCE_DIR" in output
    assert "Traceback" not in output  # one clear line, not a stack


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_reference_skips_otherwise(tmp_path, ci):
    missing = tmp_path / "nowhere"
    code, output = _run_pytest(tmp_path, missing, ci)
    assert code == 0, output
    assert "1 skipped" in output and "PRISMER_REFERENCE_DIR" in output, output


def test_present_reference_passes_when_required(tmp_path):
    reference = tmp_path / "reference"
    (reference / "edge").mkdir(parents=True)
    (reference / "edge" / "marker.txt").write_text("here")
    code, output = _run_pytest(tmp_path, reference, "1", "--require-reference")
    assert code == 0 and "1 passed" in output, output
