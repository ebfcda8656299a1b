"""The allocator setting of `vbb` (allocator.py): freed memory stays in the process within a
stage, and the store hands it back between stages."""

import numpy as np
import pytest

from vlmbackdoor_bench.allocator import keep_freed_memory, release_freed_memory
from vlmbackdoor_bench.grid.store import Store

MB = 1 << 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture
def kept():
    if not keep_freed_memory():  # conftest applied it already; this says whether it could
        pytest.skip("no glibc mallopt here")


def _free_a_big_array() -> int:
    """Allocate, touch and free 512 MB; the resident size right after the free."""
    array = np.ones(512 * MB, dtype=np.uint8)
    del array
    return resident_bytes()


def test_freed_memory_stays_until_released(kept):
    before = resident_bytes()
    after_free = _free_a_big_array()
    assert after_free - before > 400 * MB  # kept: the next array of that size faults nothing in
    assert release_freed_memory()
    assert after_free - resident_bytes() > 400 * MB


def test_store_releases_after_each_build(tmp_path, kept):
    store = Store(tmp_path / "store")
    resident_at_end = {}

    def build(directory):
        array = np.ones(512 * MB, dtype=np.uint8)
        (directory / "sum.txt").write_text(str(int(array[:10].sum())))
        del array
        resident_at_end["build"] = resident_bytes()
        return {}

    entry = store.get_or_build("stage", {"n": 1}, build)
    assert (entry.path / "sum.txt").read_text() == "10"
    assert resident_at_end["build"] - resident_bytes() > 400 * MB
