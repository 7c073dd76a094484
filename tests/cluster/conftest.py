"""The three-node cluster of tests/cluster (one module's worth): see :mod:`tests.cluster.local_cluster`."""

from __future__ import annotations

import pytest

from tests.cluster.local_cluster import start_local_cluster


@pytest.fixture(scope="module")
def local_cluster():
    """``trainer`` (head), ``rollout-a``, ``rollout-b`` (also the teacher's node); torn down after the module."""
    pytest.importorskip("psutil")
    with start_local_cluster() as cluster:
        yield cluster
