"""Does it work here? One row per case: supported, or unsupported with its reason (a skip AND a record)."""
import pytest

from backends import base as registry
from harness.judge.preflight import support_of


def test_support(case, diffbench_session):
    support = support_of(case, diffbench_session.env)
    if not support:
        assert support.reason.strip(), f"{case.backend} said unsupported without a reason"
        diffbench_session.result(case)          # records the unsupported row
        pytest.skip(f"unsupported: {support.reason}")
    assert registry.get(case.backend).available(), "supported for a case but the backend is unavailable"


def test_backend_listing_has_reasons():
    """`diffbench backends`: every backend either available or unavailable with a reason."""
    for name in registry.names():
        support = registry.get(name).available()
        assert support.supported or support.reason.strip(), name
