"""Access to Prismer's reference data in ``../shared/reference`` (see its README).

Fidelity tests read the reference tensors from there and skip with a clear reason when the folder is
absent (it sits beside the project root on developer machines and in CI, not in a plain clone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_ROOT = Path(os.environ.get("PRISMER_REFERENCE_DIR", PROJECT_ROOT.parent / "shared" / "reference"))


def reference_dir(*parts: str) -> Path:
    """Return a folder under the reference root, or skip the calling test when it is missing."""
    path = REFERENCE_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"Prismer reference data not found at {path}; set PRISMER_REFERENCE_DIR to the "
            "shared/reference folder to run this fidelity test"
        )
    return path


def load_npy(*parts: str) -> np.ndarray:
    """Load one reference array, skipping the test when the reference data is absent."""
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


def assert_close_to_reference(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """The reference README's float32 tolerance: ``|port - ref| <= rel * max|ref| + 1e-6``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = rel * np.abs(expected).max() + 1e-6
    worst = np.abs(actual - expected).max()
    assert worst <= bound, f"max abs diff {worst:.3e} exceeds {bound:.3e}"
