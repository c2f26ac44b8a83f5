"""A plan as a table for people (the JSON is `Plan.to_json`)."""

from __future__ import annotations

from distprompt_jax.planning.hardware import GiB
from distprompt_jax.planning.plan import Plan
from distprompt_jax.planning.programs import PLANNED_METHODS, config_section


def _size(n: int) -> str:
    """Bytes in binary units, three significant figures: "12.3G", "456M", "7.89K"."""
    for unit, scale in (("G", GiB), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n}B"


def _by_section(plan: Plan) -> dict[str, list]:
    sections: dict[str, list] = {}
    for m in plan.methods.values():
        if m.fits:
            sections.setdefault(config_section(m.label), []).append(m)
    return sections


def table(plan: Plan) -> str:
    """The plan as text: one row per method, the overrides that run it as planned, and why anything does not fit."""
    devices = f"; {plan.chips // plan.hosts} chips per host (the slots a run's config sets are per host)"
    lines = [
        f"plan: {plan.model} ({plan.dtype}) on {plan.topology}: {plan.chips} chips, {plan.hosts} host(s), "
        f"{_size(plan.hbm_bytes_per_chip)} of memory per chip{devices}",
        "",
        f"{'method':<12} {'fits':<4} {'slots':>7} {'/host':>6} {'shard':<5} {'weights':>8} {'state':>7} {'temp':>7} "
        f"{'total':>7} {'GFLOP/step':>11} {'GB/step':>8} {'projected t·s/s':>16}  {'limited by':<15} {'compile s':>9}",
    ]
    for m in plan.methods.values():
        rate = "-" if m.projected_rate is None else f"{m.projected_rate:,.0f}"
        lines.append(
            f"{m.label:<12} {'yes' if m.fits else 'NO':<4} {m.slots:>7} {m.slots_per_host:>6} "
            f"{'yes' if m.shard_params else 'no':<5} {_size(m.memory.weights):>8} {_size(m.memory.state):>7} "
            f"{_size(m.memory.temp):>7} {_size(m.memory.total):>7} {m.cost.flops / 1e9:>11,.3g} "
            f"{m.cost.bytes_accessed / 1e9:>8,.3g} {rate:>16}  {m.limited_by:<15} {m.compile_s:>9.1f}")
    lines += [
        "",
        "Memory is per chip (K/M/G: binary units); GFLOP and GB per step are per chip, one step of the host's pool "
        "(layers counted by their trip count, not once).",
        f"projected t·s/s: target·steps per second of the whole slice — a PROJECTION, not a measurement: a roofline "
        f"at an assumed {plan.utilisation:.0%} of the chip's published peak flops and HBM bandwidth (XLA's bytes "
        "accessed); traffic between chips (sharded weights) is not modelled.",
    ]
    overrides = []
    for section, planned in _by_section(plan).items():
        # Methods sharing a section (bound and bound_norm; one prompt method's lengths) share its slots: the
        # smallest of their pools fits them all.
        overrides.append(f"--config.{section}.slots={min(m.slots_per_host for m in planned)}")
        if any(m.shard_chosen for m in planned):
            overrides.append(f"--config.{section}.shard_params=True")
    if overrides:
        lines.append("To run as planned: " + " ".join(overrides))
    for m in plan.methods.values():
        if m.shard_chosen and m.fits:
            lines.append(f"{m.label}: the weights do not fit a chip replicated, so the plan shards them "
                         "(shard_params=True)")
        if not m.fits:
            lines.append(f"does not fit: {m.advice}")
    if plan.unplanned:
        lines.append(f"not planned: {', '.join(plan.unplanned)} (plans do not cover it yet; planned methods: "
                     f"{', '.join(PLANNED_METHODS)})")
    return "\n".join(lines)
