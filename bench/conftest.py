"""Shared set-up of the pytest-benchmark files: the suites are specified at 2 threads."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
