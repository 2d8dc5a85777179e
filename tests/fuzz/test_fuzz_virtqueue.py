"""Fuzz (c): the virtio split-queue parser over hostile rings.  Only GuestError (QueueError) may escape,
and every descriptor chain it accepts lies inside guest RAM and within the chain-length bound."""

from __future__ import annotations

import pytest
from fuzzsettings import budget
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import HypothesisChooser, QueueWorld


@pytest.fixture(scope="module")
def qworld():
    w = QueueWorld()
    yield w
    assert w.chains > 0 and w.guest_errors > 0  # both sides were reached
    w.close()


@budget(250)
@given(data=st.data())
def test_virtqueue_only_guest_errors(qworld, data):
    qworld.case(HypothesisChooser(data))
