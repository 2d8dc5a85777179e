"""Fuzz (a): hypercall dispatch with random ports and argument blocks against real guest memory and a
sandboxed LiveHostIO over a temporary mount.  Only GuestError may escape; the host is unharmed."""

from __future__ import annotations

import pytest
from fuzzsettings import budget
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import DispatchWorld, HypothesisChooser


@pytest.fixture(scope="module", params=[False, True], ids=["live", "recorded"])
def world(request, tmp_path_factory):
    w = DispatchWorld(str(tmp_path_factory.mktemp("fuzz-dispatch")), record=request.param)
    yield w
    w.check_host()
    w.close()  # recorded: the trace of every request reads back complete


@budget(600)
@given(data=st.data())
def test_dispatch_only_guest_errors(world, data):
    world.case(HypothesisChooser(data))
    world.check_host()
    world.maintain(world.calls)
