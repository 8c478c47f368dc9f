"""NPU scenarios: they run only where CANN's runtime loads and sees an Ascend NPU,
and skip with the reason everywhere else.

    python -m pytest -q tests/npu
"""

import pytest

from sleepd import _C

REASON = _C.acl_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if REASON:
        for item in items:
            if "tests/npu" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=f"needs an Ascend NPU: {REASON}"))


@pytest.fixture
def backend():
    return "acl"


@pytest.fixture
def fake():
    """The real runtime, not the double."""
    return None
