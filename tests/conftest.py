"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Test inputs are tiny and the test machine has two shared cores: more
    # torch threads only add OpenMP contention. Tests that care about the
    # thread count set (and restore) it themselves. Session scope, so that
    # module-level fixtures building models run under it too.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
