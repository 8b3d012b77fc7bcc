"""Session-wide test set-up: server fixtures live in tests/fixtures/ and load as plugins."""

from collections.abc import Iterator

import pytest

from heimdall.config import prefer_passive_threads

prefer_passive_threads()  # before torch is imported: two workers share two cores

import torch  # noqa: E402

pytest_plugins = [
    "tests.fixtures.seaweedfs",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.silent",
    "tests.fixtures.ray_cluster",
]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run PyTorch on one thread: on a shared 2-core machine two spinning threads are 10× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
