"""Access to Prismer's reference data in ``../shared/reference`` (see its README).

Fidelity tests read the reference tensors from there. The folder sits beside the project root on
developer machines and in CI, not in a plain clone: without it a fidelity test skips with a clear reason,
unless the run requires the reference (the ``CI`` environment variable is set, or pytest got
``--require-reference``; see conftest.py): then it fails, saying where to put the folder. So a CI run
cannot go green with no fidelity coverage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_ROOT = PROJECT_ROOT.parent / "shared" / "reference"
REFERENCE_ROOT = Path(os.environ.get("PRISMER_REFERENCE_DIR", DEFAULT_REFERENCE_ROOT))
ERROR_LOG_ENV = "REFERENCE_ERROR_LOG"
# Set by conftest.py from ``--require-reference``.
REQUIRE_REFERENCE_OPTION = False


def reference_required() -> bool:
    """Whether a missing reference folder fails instead of skipping: under CI or ``--require-reference``."""
    ci = os.environ.get("CI", "").strip().lower()
    return REQUIRE_REFERENCE_OPTION or ci not in ("", "0", "false", "no")


def missing_reference_message(path: Path) -> str:
    return (
        f"Prismer reference data not found at {path}: put the shared reference folder at "
        f"{DEFAULT_REFERENCE_ROOT} (../shared/reference beside the project) or point PRISMER_REFERENCE_DIR "
        "at it"
    )


def reference_dir(*parts: str) -> Path:
    """Return a folder under the reference root; when it is missing, skip the calling test, or fail it
    when the run requires the reference (:func:`reference_required`)."""
    path = REFERENCE_ROOT.joinpath(*parts)
    if not path.exists():
        message = missing_reference_message(path)
        if reference_required():
            pytest.fail(f"{message} (required: CI is set or --require-reference was given)", pytrace=False)
        pytest.skip(f"{message} to run this fidelity test")
    return path


def load_npy(*parts: str) -> np.ndarray:
    """Load one reference array (a missing reference skips or fails the test, as :func:`reference_dir`)."""
    *folders, name = parts
    return np.load(reference_dir(*folders) / name)


def make_weights(state_dict_json: Path, scheme: str = "A") -> dict:
    """Fill a state dict deterministically from a ``[key, shape, dtype]`` list (reference README §2).

    The expressions are kept exactly as the reference recipe writes them: a different but equivalent
    formula can change the last bit of a weight.
    """
    import torch

    entries = json.loads(Path(state_dict_json).read_text())
    if isinstance(entries, dict):  # prismer_model lists wrap the list in a dict
        entries = entries["state_dict"]
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in sorted(entries, key=lambda e: e[0]):
        dt = getattr(torch, dtype)
        if not dt.is_floating_point:
            state[key] = torch.zeros(shape, dtype=dt)
            continue
        r = torch.randn(shape, generator=generator)
        if key.endswith("running_var"):
            t = 1.0 + 0.1 * r.abs()
        elif key.endswith("running_mean"):
            t = 0.1 * r
        elif scheme == "B" and key.endswith("weight") and len(shape) == 1:
            t = 1.0 + 0.1 * r
        elif scheme == "B" and key.endswith("weight") and len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = r * (1.0 / fan_in**0.5)
        else:
            t = 0.02 * r
        state[key] = t.to(dt)
    return state


def abs_diff(actual: Any, expected: Any) -> np.ndarray:
    """``|actual - expected|`` in float64 (shapes must agree)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return np.abs(actual - expected)


def record_error(what: str, diff: np.ndarray, expected: Any) -> None:
    """Append an achieved error (max and mean of ``diff``) to the JSON-lines file
    ``$REFERENCE_ERROR_LOG``, when set: how the per-tensor tolerances were measured (run the golden
    tests with it, take the largest value of each ``(test, what)`` over runs, keep each tolerance at
    most 3x that)."""
    log = os.environ.get(ERROR_LOG_ENV)
    if not log:
        return
    scale = float(np.abs(np.asarray(expected, dtype=np.float64)).max()) if np.size(expected) else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    entry = {
        "test": test,
        "what": what,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "max_abs_ref": scale,
    }
    with open(log, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def assert_close_to_reference(
    actual: Any, expected: Any, atol: float, what: str = "output", mean_atol: float | None = None
) -> None:
    """``max |actual - expected| <= atol`` and, when given, ``mean |actual - expected| <= mean_atol``.

    Each tolerance is per tensor and at most 3x the largest error measured for it (recorded with
    :func:`record_error`), not the reference README's generic ``1e-4 * max|ref| + 1e-6``, which let
    small real bugs through. The mean catches a small error spread over the whole tensor (a wrong
    LayerNorm eps) that float32 noise, large only at a few elements, would hide in the max.
    """
    diff = abs_diff(actual, expected)
    record_error(what, diff, expected)
    worst = float(diff.max()) if diff.size else 0.0
    assert worst <= atol, f"{what}: max abs diff {worst:.3e} exceeds the tolerance {atol:.1e}"
    if mean_atol is not None:
        mean = float(diff.mean())
        assert mean <= mean_atol, f"{what}: mean abs diff {mean:.3e} exceeds the tolerance {mean_atol:.1e}"
