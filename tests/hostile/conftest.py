"""Hypothesis keeps caches (constants found in the source, Unicode tables) in ./.hypothesis even
with ``database=None``; the hostile suite keeps them out of the repository."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis.configuration import set_hypothesis_home_dir


@pytest.fixture(scope="package", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)
