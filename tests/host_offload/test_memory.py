"""glibc malloc state for streaming (`memory.steady_malloc`)."""

import subprocess
import sys

import pytest

# In a fresh interpreter: page faults while 8 pages of 4 MiB are allocated, touched and
# freed together 10 times (as a layer's pages stream), with or without steady_malloc().
_FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "steady":
    from moejax.host_offload.memory import steady_malloc
    steady_malloc()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    pages = [np.ones(1 << 20, np.float32) for _ in range(8)]  # 4 MiB each
    del pages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


def test_steady_malloc_reuses_page_sized_blocks_instead_of_faulting_them_in():
    fresh = _faults("fresh")
    if fresh < 3 * 8 * 1024:  # not glibc's default behaviour: nothing to compare with
        pytest.skip(f"without steady_malloc only {fresh} page faults")
    assert _faults("steady") < fresh / 5
