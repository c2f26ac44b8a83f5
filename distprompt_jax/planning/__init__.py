"""Plans: a config's programs compiled for hardware that need not be at hand (see plan.py)."""

from distprompt_jax.planning.hardware import PlanError, known_topologies
from distprompt_jax.planning.plan import ASSUMED_UTILISATION, MethodPlan, Plan, make_plan

__all__ = ["ASSUMED_UTILISATION", "MethodPlan", "Plan", "PlanError", "known_topologies", "make_plan"]
