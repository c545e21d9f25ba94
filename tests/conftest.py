"""Test settings: never reach a model hub; keep Ray's token auth off for local clusters; the
``--require-reference`` option (fidelity tests fail, not skip, without ../shared/reference)."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-reference",
        action="store_true",
        help="fail the fidelity tests when Prismer's reference data (../shared/reference or "
        "$PRISMER_REFERENCE_DIR) is missing, instead of skipping them; implied when $CI is set",
    )


def pytest_configure(config: pytest.Config) -> None:
    import reference_data

    reference_data.REQUIRE_REFERENCE_OPTION = bool(config.getoption("--require-reference"))
