"""The KV-cache path of the model core: a prefix's keys and values, and logits of what follows them.

Judged against our own uncached path (every family, every split point, under jit and vmap, gradients
included) and against PyTorch transformers' `past_key_values` (the layout PEFT prefix tuning uses).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, TINY_VOCAB, kl_rows

from distprompt_jax import load_model
from distprompt_jax.lm import KVCache

LENGTH = 9  # longer than the tiny Gemma 3's sliding window (3), so its local layers drop keys


def _ids(n: int, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, TINY_VOCAB, size=(n, length))


@pytest.fixture(scope="module")
def tiny_lm(tiny_hf_dir):
    cache = {}

    def get(family: str, dtype: str = "float32"):
        if (family, dtype) not in cache:
            cache[family, dtype] = load_model(tiny_hf_dir(family)[1], dtype=dtype)
        return cache[family, dtype]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_uncached_at_split_points(family, tiny_lm):
    lm = tiny_lm(family)
    x = lm.embed(lm.params, _ids(4))
    full = np.asarray(jax.jit(jax.vmap(lm.logits, in_axes=(None, 0)))(lm.params, x))
    prefix_cache = jax.jit(jax.vmap(lm.prefix_cache, in_axes=(None, 0)))
    cached_logits = jax.jit(jax.vmap(lm.logits, in_axes=(None, 0, 0)))
    for split in (0, 1, 4, LENGTH - 1):  # an empty cache .. only the last position left
        cache = prefix_cache(lm.params, x[:, :split])
        assert cache.keys.shape == (4, lm.n_layers, split, lm.config.n_kv_heads, lm.config.head_dim)
        assert cache.values.shape == cache.keys.shape and cache.length == split
        ours = np.asarray(cached_logits(lm.params, x[:, split:], cache))
        assert ours.dtype == np.float32 and ours.shape == (4, TINY_VOCAB)
        np.testing.assert_allclose(ours, full, atol=2e-5, rtol=1e-5, err_msg=f"split {split}")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_shared_prefix_for_many_continuations(family, tiny_lm):
    """The search's case: a prefix cached once, many candidate continuations (cache axis None)."""
    lm = tiny_lm(family)
    ids = _ids(5)
    ids[:, :4] = ids[0, :4]  # a common prefix of 4 positions
    x = lm.embed(lm.params, ids)
    cache = lm.prefix_cache(lm.params, x[0, :4])
    batched = jax.jit(jax.vmap(lm.logits, in_axes=(None, 0, None)))(lm.params, x[:, 4:], cache)
    np.testing.assert_allclose(batched, lm.logits(lm.params, x), atol=2e-5, rtol=1e-5)
    # logits maps leading axes itself, with the cache shared or batched alike
    np.testing.assert_allclose(lm.logits(lm.params, x[:, 4:], cache), batched, atol=1e-6)
    per_prompt = lm.prefix_cache(lm.params, x[:, :4])
    np.testing.assert_allclose(lm.logits(lm.params, x[:, 4:], per_prompt), batched, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_cache_equals_the_cache_of_the_whole_prefix(family, tiny_lm):
    lm = tiny_lm(family)
    x = lm.embed(lm.params, _ids(1))[0]
    whole = lm.prefix_cache(lm.params, x[:7])
    cache = lm.prefix_cache(lm.params, x[:2])
    for start, stop in [(2, 3), (3, 3), (3, 7)]:  # one position, none, several
        cache = jax.jit(lm.extend_cache)(lm.params, cache, x[start:stop])
        assert cache.length == stop
    np.testing.assert_allclose(cache.keys, whole.keys, atol=1e-5)
    np.testing.assert_allclose(cache.values, whole.values, atol=1e-5)
    # one cache extended by a batch of continuations: a batch of caches
    batch = lm.extend_cache(lm.params, lm.prefix_cache(lm.params, x[:2]), jnp.stack([x[2:7], x[2:7]]))
    assert batch.keys.shape == (2, *whole.keys.shape)
    np.testing.assert_allclose(batch.keys[1], whole.keys, atol=1e-5)
    np.testing.assert_allclose(lm.logits(lm.params, x[7:], cache), lm.logits(lm.params, x), atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_gives_the_logits_and_the_cache_of_its_positions(family, tiny_lm):
    """What the hard search's gradient pass hands its candidates: the prompt's cache, from the same forward."""
    lm = tiny_lm(family)
    ids = _ids(3)
    ids[:, :2] = ids[0, :2]
    x = lm.embed(lm.params, ids)
    fixed = lm.prefix_cache(lm.params, x[0, :2])  # one cache before a batch of continuations
    whole = lm.extend_cache(lm.params, fixed, x[:, 2:])
    for cache, part, want_cache in [(None, x, lm.prefix_cache(lm.params, x)),
                                    (fixed, x[:, 2:], KVCache(whole.keys[:, :, 2:], whole.values[:, :, 2:]))]:
        logits, own = jax.jit(jax.vmap(lm.logits_and_cache, in_axes=(None, 0, None)))(lm.params, part, cache)
        np.testing.assert_allclose(logits, lm.logits(lm.params, x), atol=2e-5, rtol=1e-5)
        assert own.keys.shape == want_cache.keys.shape
        np.testing.assert_allclose(own.keys, want_cache.keys, atol=1e-5)
        np.testing.assert_allclose(own.values, want_cache.values, atol=1e-5)

    def loss(x):  # as the gradient pass takes it: the cache as the auxiliary output
        logits, own = lm.logits_and_cache(lm.params, x)
        return jax.nn.log_softmax(logits)[7], own

    (value, own), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x[0])
    want = jax.grad(lambda x: jax.nn.log_softmax(lm.logits(lm.params, x))[7])(x[0])
    np.testing.assert_allclose(grad, want, atol=1e-5 * float(np.abs(want).max()) + 1e-7, rtol=1e-4)
    np.testing.assert_allclose(own.keys, lm.prefix_cache(lm.params, x[0]).keys, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])  # windows and per-layer RoPE; learned positions
def test_bfloat16_cached_logits_equal_uncached(family, tiny_lm):
    lm = tiny_lm(family, "bfloat16")
    x = lm.embed(lm.params, _ids(3))
    logits, prefix_cache = jax.jit(lm.logits), jax.jit(lm.prefix_cache)
    full = logits(lm.params, x)
    for split in (1, 5, LENGTH - 1):
        cache = prefix_cache(lm.params, x[:, :split])
        assert cache.keys.dtype == jnp.bfloat16
        ours = logits(lm.params, x[:, split:], cache)
        # the same bfloat16 arithmetic, grouped differently: far below bfloat16's own error (KL ~1e-3)
        assert kl_rows(full, ours).max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_through_the_cache_is_the_gradient_of_the_whole_prompt(family, tiny_lm):
    """d/dx_prefix of loss(logits(x_suffix, prefix_cache(x_prefix))) is the uncached gradient w.r.t. x_prefix."""
    lm = tiny_lm(family)
    x = lm.embed(lm.params, _ids(1))[0]
    split = 5

    def loss_uncached(prefix):
        return jax.nn.log_softmax(lm.logits(lm.params, jnp.concatenate([prefix, x[split:]])))[7]

    def loss_cached(prefix):
        return jax.nn.log_softmax(lm.logits(lm.params, x[split:], lm.prefix_cache(lm.params, prefix)))[7]

    want = jax.grad(loss_uncached)(x[:split])
    got = jax.jit(jax.grad(loss_cached))(x[:split])
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()) + 1e-7, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gpt2"])
def test_gradient_with_respect_to_a_free_cache_matches_finite_differences(family, tiny_lm):
    """Prefix tuning optimizes keys and values directly: their gradient must be right."""
    lm = tiny_lm(family)
    x = lm.embed(lm.params, _ids(1))[0]
    cache = lm.prefix_cache(lm.params, x[:4])

    @jax.jit
    def loss(c: KVCache):
        return jax.nn.log_softmax(lm.logits(lm.params, x[4:], c))[11]

    grad = jax.jit(jax.grad(loss))(cache)
    assert isinstance(grad, KVCache)
    for leaf in grad:
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0
    rng = np.random.RandomState(1)
    for _ in range(3):
        direction = KVCache(*(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in cache))
        eps = 1e-2
        plus, minus = (jax.tree.map(lambda a, d, s=sign * eps: a + s * d, cache, direction) for sign in (1, -1))
        numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grad, direction))
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3, (numeric, analytic)


# --- against PyTorch transformers' past_key_values ---------------------------------------------------


def _hf_run(model, ids, cache):
    """Logits of HF `model` on ids [1, L], reading and updating `cache` (a transformers DynamicCache)."""
    import torch

    # transformers renamed the argument past_key_values -> cache (5.2x); pass whichever this version takes.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(torch.as_tensor(ids), use_cache=True, **{name: cache}).logits[:, -1].float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_equals_transformers_past_key_values(family, tiny_hf_dir, tiny_lm):
    from transformers import DynamicCache

    hf_model, _ = tiny_hf_dir(family)
    lm = tiny_lm(family)
    ids = _ids(1)
    for split in (1, 4, LENGTH - 1):
        hf_cache = DynamicCache(config=hf_model.config)
        _hf_run(hf_model, ids[:, :split], hf_cache)
        keys, values = lm.prefix_cache(lm.params, lm.embed(lm.params, ids[0, :split])).hf_layout()
        for layer, hf_layer in enumerate(hf_cache.layers):
            hf_keys, hf_values = hf_layer.keys[0].numpy(), hf_layer.values[0].numpy()
            # a sliding-window layer keeps only its last `window - 1` positions in transformers; ours keeps all
            kept = hf_keys.shape[1]
            assert kept == split or (lm.config.sliding_window[layer] is not None and kept < split)
            np.testing.assert_allclose(keys[layer, :, split - kept :], hf_keys, atol=1e-5)
            np.testing.assert_allclose(values[layer, :, split - kept :], hf_values, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_given_our_cache_predicts_what_we_do(family, tiny_hf_dir, tiny_lm):
    """Our cache loaded into transformers as past_key_values, then the remaining tokens: same distribution."""
    import torch
    from transformers import DynamicCache

    hf_model, _ = tiny_hf_dir(family)
    lm = tiny_lm(family)
    ids = _ids(1, seed=3)
    for split in (2, 6):
        cache = lm.prefix_cache(lm.params, lm.embed(lm.params, ids[0, :split]))
        keys, values = (np.array(a) for a in cache.hf_layout())  # writable copies, for torch
        hf_cache = DynamicCache(
            [(torch.as_tensor(k[None]), torch.as_tensor(v[None])) for k, v in zip(keys, values)],
            config=hf_model.config,
        )
        theirs = _hf_run(hf_model, ids[:, split:], hf_cache)
        ours = lm.logits(lm.params, lm.embed(lm.params, ids[0, split:]), cache)
        assert kl_rows(theirs, np.asarray(ours)[None]).max() <= 1e-6
    # and the transpose round-trips
    again = KVCache.from_hf_layout(keys, values)
    np.testing.assert_array_equal(again.keys, cache.keys)
    np.testing.assert_array_equal(again.values, cache.values)


# --- bad input ---------------------------------------------------------------------------------------


def test_a_cache_that_does_not_fit_is_refused_by_name(tiny_lm):
    lm = tiny_lm("llama")
    x = lm.embed(lm.params, _ids(2))
    cache = lm.prefix_cache(lm.params, x[0, :3])
    with pytest.raises(ValueError, match=r"n_layers=3, P, n_kv_heads=2, head_dim=16"):
        lm.logits(lm.params, x[0], KVCache(cache.keys[:2], cache.values[:2]))
    with pytest.raises(ValueError, match="cache keys .* / values"):
        lm.logits(lm.params, x[0], KVCache(cache.keys, cache.values[:, :2]))
    with pytest.raises(ValueError, match=r"cache leading axes \(3,\) must be none .* \(2,\)"):
        lm.logits(lm.params, x, lm.prefix_cache(lm.params, jnp.stack([x[0, :3]] * 3)))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        lm.logits(lm.params, x[0], (cache.keys, cache.values))
    with pytest.raises(ValueError, match="empty"):
        lm.logits(lm.params, x[0, :0], cache)


def test_gpt2_positions_continue_after_the_cache_and_stop_at_its_limit(tiny_lm):
    lm = tiny_lm("gpt2")  # 64 learned positions
    x = lm.embed(lm.params, np.random.RandomState(0).randint(0, TINY_VOCAB, size=64))
    cache = lm.prefix_cache(lm.params, x[:60])
    np.testing.assert_allclose(lm.logits(lm.params, x[60:], cache), lm.logits(lm.params, x), atol=2e-5)
    with pytest.raises(ValueError, match="prompt of 65 positions exceeds"):
        lm.logits(lm.params, x[59:], cache)


@pytest.mark.real_weights
def test_smollm2_cached_equals_uncached():
    lm = load_model("smollm2-135m")
    ids = lm.encode("The capital of France is a city that")
    x = lm.embed(lm.params, ids)
    full = lm.logits(lm.params, x)
    for split in (1, len(ids) // 2, len(ids) - 1):
        cached = lm.logits(lm.params, x[split:], lm.prefix_cache(lm.params, x[:split]))
        assert kl_rows(full[None], cached[None]).max() <= 1e-6
        np.testing.assert_allclose(cached, full, atol=1e-3)
