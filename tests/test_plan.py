"""Plans (`distprompt --plan`): a config's programs compiled for a TPU slice on abstract weights, with no TPU.

libtpu (the test extra) provides JAX's compile-only TPU client; nothing here needs a TPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from distprompt_jax import platforms
from distprompt_jax.experiment import base_config
from distprompt_jax.lm import abstract_language_model
from distprompt_jax.models import ModelConfig, RopeSpec
from distprompt_jax.planning import PlanError, hardware, make_plan

TARGETS = 8
PROMPT_LEN = 10  # the soft prompts' default, which the tiny config keeps


@pytest.fixture(scope="module")
def cli_plan(tiny_hf_dir, tmp_path_factory):
    """`distprompt --config=<tiny llama: bound + soft> --plan=v5e-4 --plan_json=... --workdir=...` run once."""
    _, model_dir = tiny_hf_dir("llama")
    root = tmp_path_factory.mktemp("plan")
    config_file = root / "tiny.py"
    config_file.write_text(
        "from ml_collections import ConfigDict\n"
        "from distprompt_jax.experiment import base_config\n\n"
        "def get_config():\n"
        f"    config = base_config({str(model_dir)!r})\n"
        f"    config.targets.vanilla = ConfigDict(dict(kind='vanilla', n={TARGETS}, entropy_min=0.0, "
        "entropy_max=-1.0))\n"
        "    config.methods = ('bound', 'soft')\n"
        "    config.bound.support = 256\n"
        "    config.bound.slots = 4\n"  # the config's own pool: checked as it is; soft's is searched for
        "    return config\n")
    json_path, workdir = root / "plan.json", root / "workdir"
    result = subprocess.run(
        [sys.executable, "-m", "distprompt_jax.main", f"--config={config_file}", "--plan=v5e-4",
         f"--plan_json={json_path}", f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=300)
    plan = json.loads(json_path.read_text()) if json_path.is_file() else None
    return result, plan, workdir


def test_a_tiny_model_plans_on_a_v5e_2x2_without_touching_the_workdir(cli_plan):
    result, plan, workdir = cli_plan
    assert result.returncode == 0, result.stderr[-3000:]
    assert not workdir.exists()
    assert (plan["topology"], plan["chips"], plan["hbm_bytes_per_chip"]) == ("v5e-4", 4, 16 * 2**30)
    for name, method in plan["methods"].items():
        assert method["fits"] and method["slots"] > 0, name
        sizes = method["per_chip_bytes"]
        assert 0 < sizes["total"] <= plan["hbm_bytes_per_chip"]
        assert sizes["total"] == sizes["weights"] + sizes["state"] + sizes["temp"]
        assert sizes["state"] > 0 and sizes["temp"] >= 0
        assert method["flops_per_step"] > 0 and method["projected_target_steps_per_s"] > 0
    assert plan["methods"]["bound"]["slots"] == 4  # the config's own pool
    assert plan["methods"]["soft"]["slots"] == TARGETS  # searched, at most the targets
    assert "PROJECTION" in result.stdout and "--config.soft.slots=8" in result.stdout


def test_the_plan_json_has_exactly_the_documented_keys(cli_plan):
    _, plan, _ = cli_plan
    assert set(plan) == {"topology", "chips", "hbm_bytes_per_chip", "model", "dtype", "methods"}
    for method in plan["methods"].values():
        assert set(method) == {"fits", "slots", "per_chip_bytes", "flops_per_step", "projected_target_steps_per_s",
                               "compile_s", "shard_params"}
        assert set(method["per_chip_bytes"]) == {"weights", "state", "temp", "total"}


def test_a_step_counts_every_layer_not_the_scan_body_once(cli_plan, tiny_hf_dir):
    """A soft step runs every layer forward and back for each of a chip's targets: at least 2 × 2·T·(layer
    weights) flops per layer. XLA's own count of the scanned stack (its body once) falls below that."""
    _, plan, _ = cli_plan
    model, _ = tiny_hf_dir("llama")
    cfg = model.config
    layer_weights = sum(p.numel() for name, p in model.named_parameters()
                        if name.startswith("model.layers.0.") and "norm" not in name)
    per_target_forward = 2 * PROMPT_LEN * layer_weights * cfg.num_hidden_layers
    targets_per_chip = plan["methods"]["soft"]["slots"] // plan["chips"]
    assert plan["methods"]["soft"]["flops_per_step"] >= 2 * per_target_forward * targets_per_chip


def _deep_model():
    """72 layers 2048 wide (Llama-3.2-1B's) under a 32,000-token vocabulary: 4.5e9 float32 parameters, 17.8 GB."""
    cfg = ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=72, n_heads=16, n_kv_heads=2,
                      head_dim=128, d_ff=8192, norm_eps=1e-5, activation="silu", tie_embeddings=False,
                      rope=(RopeSpec(theta=10000.0),) * 72)
    return abstract_language_model(cfg, "float32", "deep")


def test_weights_too_large_for_a_chip_are_refused_replicated_and_planned_sharded():
    from ml_collections import ConfigDict

    lm = _deep_model()
    weights = sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(lm.params))
    assert weights > 16 * 2**30  # more than a v5e chip holds
    config = base_config("deep")
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=4, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("soft",)
    config.soft.slots = 4
    soft = make_plan(config, "v5e-4", lm=lm).methods["soft"]
    assert soft.fits and soft.shard_params and soft.shard_chosen  # the replicated pool did not fit
    assert soft.memory.weights == pytest.approx(weights / 4, rel=1e-3)
    assert soft.memory.total <= 0.9 * 16 * 2**30


def test_an_unknown_topology_lists_the_known_ones():
    with pytest.raises(PlanError, match="unknown topology 'v9-8'; known: local, v4-8, .*v5e-256.*v6e-256"):
        hardware.topology("v9-8")
    with pytest.raises(PlanError, match="unknown topology 'v5p-7'"):
        hardware.topology("v5p-7")


def test_a_tpu_plan_without_libtpu_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "libtpu" else find_spec(name))
    with pytest.raises(PlanError, match=r"pip install libtpu \(or pip install 'distprompt_jax\[tpu\]'\)"):
        hardware.topology("v5e-4")


def test_slice_names_map_to_hosts_and_chips():
    for name, chips, hosts in (("v4-8", 4, 1), ("v5p-128", 64, 16), ("v6e-8", 8, 1), ("2xv5e-256", 512, 128)):
        topology = hardware.topology(name)
        assert (topology.chips, topology.hosts) == (chips, hosts), name
        assert topology.devices.shape == (hosts, chips // hosts)


def test_no_tpu_probe_where_no_tpu_chip_is(tmp_path):
    assert not platforms.tpu_chips_present(tmp_path)
    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")
    assert platforms.tpu_chips_present(tmp_path)
    environ = {"JAX_PLATFORMS": "cuda"}
    assert not platforms.skip_absent_tpu(environ) and environ == {"JAX_PLATFORMS": "cuda"}  # the user's choice


def test_importing_the_package_starts_jax_on_the_cpu_without_asking_libtpu_for_a_tpu():
    # libtpu comes with the test extra; on this TPU-less machine a plain `import jax` start probes for a TPU and
    # prints libtpu's warnings. A notebook or script that imports the package first must not.
    assert importlib.util.find_spec("libtpu") is not None and not platforms.tpu_chips_present()
    env = {name: value for name, value in os.environ.items() if name != "JAX_PLATFORMS"}
    program = "import distprompt_jax, jax, os; print(jax.devices()[0].platform, os.environ['JAX_PLATFORMS'])"
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent, check=True)
    assert run.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in run.stderr, run.stderr[-2000:]


def test_a_method_plans_do_not_cover_leaves_the_plan_incomplete():
    from ml_collections import ConfigDict

    cfg = ModelConfig(family="llama", vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      d_ff=96, norm_eps=1e-5, activation="silu", rope=(RopeSpec(theta=10000.0),) * 2)
    config = base_config("tiny")
    config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=4, entropy_min=0.0, entropy_max=-1.0))
    config.methods = ("hard",)
    plan = make_plan(config, "v5e-4", lm=abstract_language_model(cfg))
    assert plan.unplanned == ("hard",) and not plan.methods and not plan.fits
