"""The expressivity certificate: certified bound ≤ primal ≤ any prompt's KL, checked against float64 scipy."""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

from distprompt_jax import bounds
from distprompt_jax.bounds import (
    BoundConfig,
    BoundMethod,
    norm_bound_estimate,
    unembedding_bound,
)
from distprompt_jax.bounds.certificate import Unembedding, evaluate_rows
from distprompt_jax.prompting.engine import run_method
from distprompt_jax.prompting.objective import kl_from_logits
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import PoolCheckpoint
from distprompt_jax.targets import TargetSet

FAMILIES = ("llama", "gemma3", "gpt2")
# One pool shape (8 slots × the tiny models' V=300, d=64) everywhere, so the solver compiles once.
CONFIG = BoundConfig(slots=8)


@dataclasses.dataclass(eq=False)
class AffineLM:
    """Only an unembedding (logits = W h + b): all `unembedding_bound` needs, with a bias the families lack.

    Like a LanguageModel, its weights are `params` and its functions take them as an argument."""

    params: dict
    config: SimpleNamespace
    name: str = "affine"

    vocab_size = property(lambda self: self.config.vocab_size)
    d_model = property(lambda self: self.config.d_model)

    def unembedding(self, params):
        return params["w"], params["b"]


def make_affine_lm(w, b) -> AffineLM:
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    config = SimpleNamespace(final_logit_softcap=None, family="affine", vocab_size=len(w), d_model=w.shape[1])
    return AffineLM(params, config)


def affine_lm(vocab=300, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return make_affine_lm(rng.standard_normal((vocab, d)), rng.standard_normal(vocab))


def random_targets(lm, seed: int) -> np.ndarray:
    """A mix of target kinds: dense at several temperatures, sparse (zeros), one-hot, and near-expressible."""
    rng = np.random.default_rng(seed)
    vocab = lm.vocab_size
    rows = []
    for sigma in (0.5, 2.0, 6.0):
        z = rng.standard_normal(vocab) * sigma
        rows.append(np.exp(z - z.max()))
    for k in (3, 30):
        p = np.zeros(vocab)
        p[rng.choice(vocab, k, replace=False)] = rng.dirichlet(np.ones(k))
        rows.append(p)
    one_hot = np.zeros(vocab)
    one_hot[rng.integers(vocab)] = 1
    rows.append(one_hot)
    w, b = (np.asarray(a, np.float64) for a in lm.unembedding(lm.params))
    z = w @ (rng.standard_normal(w.shape[1]) * 3 / np.sqrt(w.shape[1]) / np.abs(w).mean()) + b
    rows.append(0.7 * np.exp(z - z.max()) / np.exp(z - z.max()).sum() + 0.3 * rng.dirichlet(np.ones(vocab)))
    probs = np.asarray(rows)
    return (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def scipy_lower_bound(w, b, p) -> float:
    """inf_h Σ p log(p / softmax(W h + b)) in float64 (trust-region Newton, exact Hessian), stored-p convention."""
    w, b, p = (np.asarray(a, np.float64) for a in (w, b, p))
    mass = p.sum()
    p_bar = p / mass

    def parts(h):
        z = w @ h + b
        lse = z.max() + np.log(np.exp(z - z.max()).sum())
        return z, lse, np.exp(z - lse)

    def fun(h):
        z, lse, q = parts(h)
        return lse - p_bar @ z, w.T @ (q - p_bar)

    def hess(h):
        _, _, q = parts(h)
        mean = w.T @ q
        return (w * q[:, None]).T @ w - np.outer(mean, mean)

    result = minimize(fun, np.zeros(w.shape[1]), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-13})
    positive = p_bar > 0
    neg_entropy = float(np.sum(p_bar[positive] * np.log(p_bar[positive])))
    return mass * (neg_entropy + result.fun) + mass * math.log(mass)


def soft_prompt_kl(lm, targets, length: int = 4, steps: int = 60, seed: int = 0) -> np.ndarray:
    """The best KL seen in `steps` Adam steps on a free [length, d] input prompt per target.

    Each value is the KL of a prompt the model was actually run on, so the bound must lie below it. (A
    direct optimization rather than the soft-prompt engine: any optimizer's prompts qualify, and this one
    compiles once per model.)
    """
    std = float(jnp.std(lm.embedding_matrix(lm.params)))
    x0 = std * jax.random.normal(jax.random.key(seed), (len(targets), length, lm.d_model))
    adam = optax.adam(0.1)

    @jax.jit
    def run(params, x, p):
        value_and_grad = jax.vmap(jax.value_and_grad(lambda x1, p1: kl_from_logits(p1, lm.logits(params, x1))))

        def step(carry, _):
            x, state, best = carry
            kl, grad = value_and_grad(x, p)
            updates, state = jax.vmap(adam.update)(grad, state, x)
            return (x + updates, state, jnp.minimum(best, kl)), None

        start = (x, jax.vmap(adam.init)(x), jnp.full(len(p), jnp.inf))
        return jax.lax.scan(step, start, None, length=steps)[0][2]

    return np.asarray(run(lm.params, x0, jnp.asarray(targets)), np.float64)


@pytest.fixture(scope="module")
def solved(peaked_lm):
    """family -> (lm, targets, unembedding bound, soft-prompt KLs) on random targets of two seeds."""
    @functools.cache
    def get(family: str):
        lm = peaked_lm(family)
        targets = np.concatenate([random_targets(lm, seed) for seed in (0, 1)])
        return lm, targets, unembedding_bound(lm, targets, CONFIG), soft_prompt_kl(lm, targets)

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_certified_bound_below_primal_below_soft_prompt(solved, family):
    _, targets, bound, soft_kl = solved(family)
    table = bound.to_pandas()
    assert np.all(table.gap >= 0)
    certified = table.certified.to_numpy()
    kl = table.kl.to_numpy()
    assert np.array_equal(np.isnan(kl), ~certified)
    assert np.all(kl[certified] <= table.primal[certified])
    # The bound is below the KL of every prompt tried (float32 noise in that KL: 1e-5).
    assert np.all(kl[certified] <= soft_kl[certified] + 1e-5), (kl, soft_kl)
    # The primal point is the best h: no prompt beats it by more than the certified gap.
    assert np.all(table.primal - table.gap <= soft_kl + 1e-5)
    # Dense targets (full support) always certify, to the default gap tolerance or close to it.
    dense = np.all(targets > 0, axis=1)
    assert certified[dense].all() and (table.gap[dense] <= 1e-5).all(), table[dense]
    assert (table.certificate[certified] != "none").all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_gap_to_the_bound_is_the_kl_from_the_best_expressible_distribution(solved, family):
    """For a dense target the optimum q* = softmax(W h* + b) matches p's moments (Wᵀp = Wᵀq*), so for ANY
    prompt with next-token distribution q: KL(p‖q) = bound + KL(q*‖q). The gap to the bound is exactly how
    far the prompt's distribution is from q* — and the search's objective differs from KL(q*‖q) by a
    constant, so no reformulation of the target through q* changes the search's landscape."""
    lm, targets, bound, _ = solved(family)
    dense = np.flatnonzero(np.all(targets > 0, axis=1))[:3]
    q_star = jax.nn.log_softmax(jax.vmap(lm.unembed, in_axes=(None, 0))(
        lm.params, jnp.asarray(bound.arrays["h"][dense], jnp.float32)))
    prompts = 0.5 * jax.random.normal(jax.random.key(3), (len(dense), 4, lm.d_model))
    log_q = jax.nn.log_softmax(jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, prompts))
    p = targets[dense].astype(np.float64)
    kl_p = np.sum(p * (np.log(p) - np.asarray(log_q, np.float64)), axis=1)
    q_star, log_q = np.asarray(q_star, np.float64), np.asarray(log_q, np.float64)
    kl_star = np.sum(np.exp(q_star) * (q_star - log_q), axis=1)
    np.testing.assert_allclose(kl_p - bound.columns["primal"][dense], kl_star, atol=2e-4)


def test_result_table_conventions(solved):
    lm, targets, bound, _ = solved("llama")
    table = bound.to_pandas()
    assert list(table.columns[:3]) == ["target_id", "method", "kl"]
    assert (table.method == "bound").all() and (table.prompt_len == 0).all()
    for column in ("primal", "gap", "certified", "certificate", "residual", "steps", "refine_steps", "target_entropy"):
        assert column in table.columns
    assert bound.arrays["h"].shape == (len(targets), lm.d_model)
    assert set(table.certificate) <= set(bounds.CERTIFICATES)
    # `primal` is the KL at the returned h, recomputed here through the model's own unembedding.
    logits = np.asarray(lm.unembed(lm.params, jnp.asarray(bound.arrays["h"], jnp.float32)), np.float64)
    log_q = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    p = targets.astype(np.float64)
    direct = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0), axis=1)
    np.testing.assert_allclose(table.primal, direct, atol=1e-4)


def test_expressible_targets_have_zero_bound(peaked_lm):
    rng = np.random.default_rng(3)
    for lm in (peaked_lm("llama"), affine_lm()):
        w, b = (np.asarray(a, np.float64) for a in lm.unembedding(lm.params))
        h = rng.standard_normal((8, w.shape[1])) * 2 / np.sqrt(np.mean(w**2) * w.shape[1])
        z = h @ w.T + b
        targets = np.exp(z - z.max(1, keepdims=True))
        targets /= targets.sum(1, keepdims=True)
        table = unembedding_bound(lm, targets.astype(np.float32), CONFIG).to_pandas()
        assert table.certified.all()
        assert (table.primal.abs() <= 1e-6).all() and (table.kl.abs() <= 1e-6).all(), table


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_float64_scipy(peaked_lm, seed):
    """Against an independent float64 solve, with a bias (affine model) and on a tiny model's unembedding."""
    for lm in (affine_lm(seed=seed), peaked_lm("gpt2")):
        targets = random_targets(lm, seed)
        table = unembedding_bound(lm, targets, dataclasses.replace(CONFIG, gap_tolerance=1e-8)).to_pandas()
        w, b = lm.unembedding(lm.params)
        for i, p in enumerate(targets):
            exact = scipy_lower_bound(w, b, p)
            row = table.iloc[i]
            assert row.primal >= exact - 1e-10, (i, row.primal, exact)
            if row.certified:
                assert row.kl <= exact + 1e-10, (i, row.kl, exact)
            if np.all(p > 0):  # attained infimum: the primal is the optimum to the certified gap
                assert row.certified and row.primal - exact <= row.gap + 1e-10 and row.gap <= 1e-7, (i, row)


def test_certificate_is_feasible_and_bounds_the_dual():
    """The repaired point q' the proof builds: in the simplex, moment-matched, and D(q') ≥ the bound."""
    lm = affine_lm(seed=2)
    targets = random_targets(lm, 2)
    result = unembedding_bound(lm, targets, CONFIG)
    w, b = (np.asarray(a, np.float64) for a in lm.unembedding(lm.params))
    for i, p in enumerate(targets):
        row = result.to_pandas().iloc[i]
        if row.certificate != "dual":
            continue
        repaired = bounds.repair_distribution(w, b, p, result.arrays["h"][i])
        p_bar = p.astype(np.float64) / p.astype(np.float64).sum()
        assert repaired.min() >= 0  # the proof gives q' ≥ (1 − θ) q
        assert abs(repaired.sum() - 1) <= 1e-12
        assert np.max(np.abs(w.T @ (repaired - p_bar))) <= 1e-11 * np.abs(w).max()
        single = bounds.certify(w, b, p, result.arrays["h"][i])  # the one-point API agrees with the row
        assert abs(single["primal"] - row.primal) <= 1e-12 and single["lower"] <= row.primal
        dual = bounds.dual_value(w, b, p, repaired)
        assert dual >= row.kl - 1e-11, (i, dual, row.kl)  # the certified bound is below D(q')
        assert dual <= row.primal + 1e-12  # weak duality: D(q') ≤ every primal value
        assert dual <= scipy_lower_bound(w, b, p) + 1e-10


def test_boundary_targets_are_reported_honestly():
    """One-hot and two-token targets: infima that are not attained (bound 0, reached only as ‖h‖ → ∞) and
    one that is (a token inside the hull of the others can never be made certain)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((300, 64))
    w[7] = np.delete(w, 7, axis=0).mean(axis=0)  # token 7 sits inside the hull: LB(one-hot 7) > 0
    lm = make_affine_lm(w, np.zeros(300))
    targets = np.eye(300, dtype=np.float32)[[0, 1, 2, 7, 3, 4]]
    targets[4:, 10] = 1
    targets /= targets.sum(1, keepdims=True)
    table = unembedding_bound(lm, targets, CONFIG).to_pandas()
    for i, p in enumerate(targets):
        row = table.iloc[i]
        exact = scipy_lower_bound(w.astype(np.float32), np.zeros(300), p)
        assert row.primal >= exact - 1e-9 and row.gap >= 0
        assert row.certified and row.kl <= exact + 1e-9 and row.gap <= 1e-5, (i, row, exact)
    interior = table.iloc[3]
    assert interior.certificate == "dual" and interior.kl > 0.1  # a real bound, not the trivial one
    vertices = table.drop(index=3)
    assert (vertices.certificate == "trivial").all() and (vertices.primal <= 1e-5).all()


def test_sharding_and_chunking_leave_results_unchanged():
    lm = affine_lm(seed=5)
    targets = np.concatenate([random_targets(lm, 5), random_targets(lm, 6)])[:11]
    one = unembedding_bound(lm, targets, CONFIG, devices=jax.local_devices()[:1])
    many = unembedding_bound(lm, targets, CONFIG)  # 8 slots on 4 fake devices: 11 targets pass through
    assert len(jax.local_devices()) == 4
    # Batched float32 matmuls round differently when split differently: equal to the certified gaps.
    tolerance = np.maximum(one.columns["gap"], many.columns["gap"]) + 1e-6
    assert np.all(np.abs(one.columns["primal"] - many.columns["primal"]) <= tolerance)
    np.testing.assert_array_equal(one.columns["certified"], many.columns["certified"])
    np.testing.assert_array_equal(many.to_pandas().target_id, np.arange(11))


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_constrained_estimate(solved, family):
    lm, targets, bound, soft_kl = solved(family)
    dense = np.flatnonzero(np.all(targets > 0, axis=1))
    sub = PromptResults(
        method="bound", columns={k: v[dense] for k, v in bound.columns.items()},
        arrays={k: v[dense] for k, v in bound.arrays.items()},
        metadata=bound.metadata.iloc[dense].reset_index(drop=True),
    )
    subset = TargetSet(probs=targets[dense], metadata=sub.metadata)
    result = norm_bound_estimate(lm, subset, dataclasses.replace(CONFIG, restarts=2), unconstrained=sub)
    table = result.to_pandas()
    assert (table.method == "bound_norm").all()
    soft_kl = soft_kl[dense]
    lower = table.lower.to_numpy()
    assert np.all(lower <= table.kl + 1e-12) and np.all(table.gap >= 0)
    # The unconstrained certified bound is below the norm-constrained lower bound, which is below any prompt.
    assert np.all(sub.columns["kl"] <= lower + 1e-9)
    assert np.all(lower <= soft_kl + 1e-5), (lower, soft_kl)
    assert table.certified.all(), table
    # The norm's output really is what the model computes from the returned pre-norm vectors.
    x_model = np.asarray(jax.vmap(lm.final_norm, in_axes=(None, 0))(lm.params, jnp.asarray(result.arrays["u"])))
    np.testing.assert_allclose(result.arrays["x"], x_model, atol=1e-4)


def test_config_is_validated():
    for bad, message in [
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"init": "ones"}, "init must be one of"),
        ({"gap_tolerance": -1.0}, "gap_tolerance must be a positive"),
        ({"gap_tolerance": 1e-2, "max_gap": 1e-3}, "must not exceed max_gap"),
        ({"refine_steps": -1}, "refine_steps must be a non-negative"),
        ({"slots": 0}, "slots must be a positive integer, 'auto' or None"),
    ]:
        with pytest.raises(ValueError, match=message):
            BoundConfig(**bad).validate()
    with pytest.raises(ValueError, match="columns"):
        unembedding_bound(affine_lm(), np.ones((2, 7), np.float32) / 7, CONFIG)
    with pytest.raises(ValueError, match="support=16 is below d_model"):
        unembedding_bound(affine_lm(), np.full((1, 300), 1 / 300, np.float32), BoundConfig(support=16))


def test_softcapped_models_are_refused():
    lm = affine_lm()
    lm.config.final_logit_softcap = 30.0
    with pytest.raises(ValueError, match="final_logit_softcap"):
        unembedding_bound(lm, np.full((1, lm.vocab_size), 1 / lm.vocab_size, np.float32), CONFIG)




def test_a_targets_float64_point_does_not_depend_on_the_targets_beside_it():
    """The host evaluates finished targets together (W read once); a target's point must be bitwise what it is
    in any other company, or a resumed run (other targets finishing together) would certify differently."""
    lm = affine_lm(seed=9)
    targets = np.concatenate([random_targets(lm, 9), random_targets(lm, 10)])[:11]
    w, b = lm.unembedding(lm.params)
    unemb = Unembedding.build(np.asarray(w), np.asarray(b))
    h = np.random.default_rng(9).standard_normal((11, lm.d_model)) * 0.1
    rows = np.arange(11)
    together = evaluate_rows(unemb, targets, h, rows)
    for company in ([3], [3, 4, 5], [10, 3, 7, 0], [0, 8]):  # 0 and 8 share a position: two blocks
        apart = evaluate_rows(unemb, targets[company], h[company], rows[company])
        for i, point in zip(company, apart):
            for name in ("primal", "primal_err", "q", "rho", "r", "r_err", "r_norm_up"):
                np.testing.assert_array_equal(getattr(point, name), getattr(together[i], name), err_msg=name)


class Interrupted(Exception):
    pass


def test_resumes_mid_run_from_a_checkpoint_bitwise(tmp_path):
    """A run stopped after a checkpoint (with targets finished and certified before it, others in the slots)
    and rerun on the same checkpoint directory gives exactly the uninterrupted run's results."""
    lm = affine_lm(seed=7)
    targets = np.concatenate([random_targets(lm, 7), random_targets(lm, 8)])[:11]
    config = dataclasses.replace(CONFIG, slots=4, segment_steps=5)
    method = BoundMethod(lm, config)

    def run(**kwargs):
        return run_method(method, lm, targets, on_finished=method.finished, progress=False, **kwargs)

    expected = run()
    # Without the hook (nothing certified during the run) `columns` certifies every row itself, the same.
    alone = run_method(method, lm, targets, progress=False)
    for name in expected.columns:
        np.testing.assert_array_equal(alone.columns[name], expected.columns[name], err_msg=name)

    seen = {}  # segment -> SegmentInfo
    checkpoint = PoolCheckpoint(tmp_path / "pool")

    def stop_after_a_checkpoint_with_finished_targets(info):
        seen[info.segment] = info
        saved = checkpoint.latest()
        if saved is not None and 0 < seen[saved].finished < info.n_targets:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(checkpoint=checkpoint, checkpoint_every=1, on_segment=stop_after_a_checkpoint_with_finished_targets)
    saved = checkpoint.latest()
    checkpoint.close()

    segments = []
    resumed = run(checkpoint=PoolCheckpoint(tmp_path / "pool"), checkpoint_every=1, on_segment=segments.append)
    assert segments[0].segment == saved + 1  # continued, not started over
    assert resumed.columns.keys() == expected.columns.keys()
    for name in expected.columns:
        np.testing.assert_array_equal(resumed.columns[name], expected.columns[name], err_msg=name)
    np.testing.assert_array_equal(resumed.arrays["h"], expected.arrays["h"])
