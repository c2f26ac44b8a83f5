"""Splitting targets over processes and chunks."""

from __future__ import annotations

import numpy as np
import pytest

from distprompt_jax import parallel


def test_process_slices_cover_every_target_once():
    for n, count in [(10, 3), (3, 4), (4096, 8)]:
        slices = [parallel.process_slice(n, i, count) for i in range(count)]
        covered = np.concatenate([np.arange(n)[s] for s in slices])
        np.testing.assert_array_equal(covered, np.arange(n))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1


def test_chunks_and_padding():
    assert parallel.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    padded = parallel.pad_rows(np.arange(6).reshape(3, 2), 5)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]])
    assert parallel.round_up(5, 4) == 8
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        parallel.chunk_bounds(3, 0)
    with pytest.raises(ValueError, match="do not fit"):
        parallel.pad_rows(np.zeros((5, 2)), 4)
