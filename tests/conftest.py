"""Shared test setup.

Most tests check a mechanism of `MeanShiftRejection` (the projection, `keep_magnitude`, resume, ...) on small
nets whose first conv is the one they inspect. They run with every conv acted on, the paper's rule
(`include_stem=True`), so that they keep checking that mechanism; the default that leaves the stem free
(`include_stem=False`) is tested by the tests marked `free_stem` (`tests/test_stem.py`, the model zoo).
"""

from __future__ import annotations

import pytest

import lightning_msr.engine.msr as msr_module
import lightning_msr.functional as functional


@pytest.fixture(autouse=True)
def _every_conv_acted_on(request, monkeypatch):
    if request.node.get_closest_marker("free_stem") is None:
        monkeypatch.setattr(functional, "stem_conv", lambda model: None)
        monkeypatch.setattr(msr_module, "stem_conv", lambda model: None)
