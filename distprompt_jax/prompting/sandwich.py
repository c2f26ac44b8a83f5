"""A prompt method with the certified bound beside it: the bound runs first, each target's search stops once
it is within the method's `floor_tolerance` of its bound, and the results carry `kl_bound` (NaN where
uncertified) and `gap_to_bound` = kl − kl_bound: how far the search is from what is provably possible."""

from __future__ import annotations

import numpy as np

from distprompt_jax.bounds import BoundConfig, unembedding_bound
from distprompt_jax.prompting.engine import Method, run_method
from distprompt_jax.results import PromptResults


def run_with_bound(method: Method, lm, targets, bound: BoundConfig | bool, *, devices=None,
                   progress: bool = True) -> PromptResults:
    """`method` over `targets` (as `run_method`); with `bound` (True: the default BoundConfig) the certified
    bound first, used as every target's floor and joined to the results. `progress`: progress bars."""
    if not isinstance(bound, (bool, BoundConfig)):
        raise TypeError(f"with_bound must be True, False or a BoundConfig, got {bound!r}")
    if bound is False:
        return run_method(method, lm, targets, devices=devices, progress=progress)
    config = None if bound is True else bound
    floor = unembedding_bound(lm, targets, config, devices=devices, progress=progress)  # this process's share
    found = run_method(method, lm, targets, devices=devices, floors=floor.columns["kl"], progress=progress)
    kl_bound = np.asarray(floor.columns["kl"], np.float64)
    found.columns["kl_bound"] = kl_bound
    found.columns["gap_to_bound"] = np.asarray(found.columns["kl"], np.float64) - kl_bound
    return found
