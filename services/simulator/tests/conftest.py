from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sim_helpers import settings

from gridstream.simulator.server import ThreadedSimulator


@pytest.fixture(scope="module")
def sim() -> Iterator[ThreadedSimulator]:
    """A simulator whose replay never starts (no market ws client): clock = window start."""
    s = ThreadedSimulator(settings()).start()
    yield s
    s.stop()
