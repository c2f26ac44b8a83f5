"""Command line entry point (`distprompt`).

Until the sweep lands, this loads a model and prints the next-token distribution of a prompt, so a new
install can be checked end to end on real weights.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags, logging

from distprompt_jax.checkpoints import registry

_MODEL = flags.DEFINE_string(
    "model", registry.DEFAULT_MODEL, "Registry name, HF model directory, or .gguf path."
)
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text whose next token to predict.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "How many of the most likely next tokens to print.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def next_token_report(lm, prompt: str, top_k: int) -> str:
    ids = lm.encode(prompt)
    logits = jax.jit(lm.logits)(lm.params, lm.embed(lm.params, ids))
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    probs = np.exp(log_probs)
    entropy = -np.sum(probs * log_probs)
    lines = [
        f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, vocabulary {lm.vocab_size}",
        f"prompt {prompt!r} -> {len(ids)} tokens {ids.tolist()}",
        f"next-token entropy {entropy:.4f} nats; top {top_k}:",
    ]
    for token in np.argsort(-probs)[:top_k]:
        lines.append(f"  {probs[token]:8.4f}  {lm.tokenizer.decode([int(token)])!r}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # absl logs at INFO by default, which surfaces JAX's backend probing.
        logging.set_verbosity(logging.WARNING)
    from distprompt_jax import load_model

    try:
        lm = load_model(_MODEL.value, dtype=_DTYPE.value)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        sys.exit(f"distprompt: {err}")
    print(next_token_report(lm, _PROMPT.value, _TOP_K.value))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
