"""Searches on the real default model at their recipes' budgets: soft prompts, the default recipe against the
certified bound, and the ladder's final-norm rung against an independent optimum. Apart from test_real_models.py
(the loaders against transformers) so that the two test processes (`--dist loadfile`) can run them side by side.

They run on one device, as on a laptop: conftest gives every test four fake CPU devices, over which the engine
would replicate the 135M weights and stream them four times a step on two cores (measured: the default recipe's
run took 273 s on the four, 95 s on one)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distprompt_jax import load_model

pytestmark = pytest.mark.real_weights

ONE_DEVICE = jax.devices()[:1]


def test_soft_prompts_on_smollm2():
    from distprompt_jax import SoftPromptConfig, soft_prompt

    lm = load_model("smollm2-135m")
    text_ids = lm.encode("The capital of France is")
    text_target = np.asarray(jax.nn.softmax(lm.logits(lm.params, lm.embed(lm.params, text_ids))), np.float64)
    logits = np.random.default_rng(0).standard_normal((3, lm.vocab_size)) * 3
    random_targets = np.exp(logits - logits.max(-1, keepdims=True))
    random_targets /= random_targets.sum(-1, keepdims=True)
    targets = np.concatenate([text_target[None], random_targets])
    # A short run at a constant rate (the engine's reach; the default recipe at its budget is tested below).
    config = SoftPromptConfig(prompt_len=5, max_steps=150, slots=4, restarts=1, learning_rate=0.1,
                              schedule="constant", warmup=0.0)
    result = soft_prompt(lm, targets, config, devices=ONE_DEVICE, with_bound=False)
    kl, initial = result.columns["kl"], result.columns["initial_kl"]
    # A distribution a real 5-token text produces is reachable by a 5-vector soft prompt.
    assert kl[0] < 0.05, kl
    # A short run lowers the KL of targets the model cannot reach exactly.
    assert kl[1:].mean() < 0.9 * initial[1:].mean(), (kl, initial)
    assert len(result.columns["nearest_text"][0]) > 0

    # A text init starts from exactly that text's prompt.
    paris = soft_prompt(lm, text_target, SoftPromptConfig(
        prompt_len=5, init="text", init_text="The capital of France is", max_steps=1, slots=4,
    ), devices=ONE_DEVICE)
    assert paris.columns["initial_kl"][0] < 1e-5


def test_the_default_recipe_reaches_targets_whose_bound_is_near_zero_on_smollm2():
    """The issue's test of the search: a one-hot on an ordinary token and the model's own next-token
    distribution after a real text both have a certified bound ≈ 0; the default recipe gets within 0.1 of it.
    Where in (0, 0.1) the text's target ends is a matter of float32 trajectories: its one attempt stopped at
    0.077 (patience) on one device and at 0.023 on four fake ones; the one-hot ends at 0.001 on both."""
    from distprompt_jax import soft_prompt

    lm = load_model("smollm2-135m")
    own = np.asarray(jax.nn.softmax(lm.logits(lm.params, lm.embed(lm.params, lm.encode("The capital of France is")))),
                     np.float64)
    one_hot = np.zeros(lm.vocab_size)
    one_hot[lm.encode(" Paris")[0]] = 1.0
    result = soft_prompt(lm, np.stack([own, one_hot]), devices=ONE_DEVICE)
    assert np.all(result.columns["kl_bound"] < 0.01), result.columns["kl_bound"]
    assert np.all(result.columns["gap_to_bound"] <= 0.1), result.columns["kl"]


def surface_optimum(lm, p: np.ndarray, starts: int = 3, steps: int = 200) -> float:
    """The least KL(p‖q) over the final norm's surface (the outputs of pre-norm vectors far larger than √ε, as
    every prompt's are), found independently of the engine: L-BFGS over the direction of u, several starts."""
    import jax.numpy as jnp
    import optax

    w, b = lm.unembedding(lm.params)  # arguments, not constants of the compiled solve (28M of them)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))

    def kl(u, w, b):
        y = 100.0 * u / jnp.linalg.norm(u)  # scale-free: only u's direction matters on the surface
        log_q = jax.nn.log_softmax(w @ lm.final_norm(lm.params, y) + b)
        return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0))

    solver = optax.lbfgs()

    @jax.jit
    def solve(u, w, b):
        objective = lambda u: kl(u, w, b)  # noqa: E731
        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry, _):
            u, state = carry
            value, grad = value_and_grad(u, state=state)
            updates, state = solver.update(grad, state, u, value=value, grad=grad, value_fn=objective)
            return (optax.apply_updates(u, updates), state), None

        (u, _), _ = jax.lax.scan(step, (u, solver.init(u)), None, length=steps)
        return objective(u)

    keys = jax.random.split(jax.random.key(1), starts)
    return min(float(solve(jax.random.normal(key, (lm.d_model,)), w, b)) for key in keys)


def test_the_final_norm_rung_reaches_the_best_point_of_the_norms_surface_on_smollm2():
    """At its defaults the ladder's final-norm rung is a search that finishes: on high-entropy targets, where
    SmolLM2's ill-conditioned unembedding makes it slow, it ends within 0.1 nats of the surface's optimum found
    by another method (L-BFGS). With the soft prompts' recipe it misses the uniform target's by 0.29."""
    import dataclasses

    from distprompt_jax import experiment
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod
    from distprompt_jax.targets import vanilla_targets

    lm = load_model("smollm2-135m")
    targets = vanilla_targets(lm.vocab_size, np.log(lm.vocab_size) * np.array([0.85, 1.0]), seed=0, progress=False)
    # One attempt: each step streams the whole model (memory-bound), so a few slots cost as much as many.
    config = dataclasses.replace(experiment.final_norm_config(experiment.base_config(), lm.n_layers), restarts=1)
    found = run_method(SoftMethod(lm, config), lm, targets, devices=ONE_DEVICE, progress=False).columns["kl"]
    optimum = np.array([surface_optimum(lm, p) for p in targets.probs])
    assert (found <= optimum + 0.1).all(), (found, optimum)
