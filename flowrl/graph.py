"""Checks that the stages of a pipeline fit together, and builds them.

`check_graph` refuses contradictions with the fix in the message; it needs no weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowrl import registry

if TYPE_CHECKING:
    from flowrl.config import ResolvedPipeline


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_graph(p: ResolvedPipeline) -> list[tuple[str, str]]:
    """Contradictions between sections, as (dotted key, message with the fix)."""
    problems: list[tuple[str, str]] = []
    cfg = p.config
    est, obj = p.estimator.kind, p.objective.kind

    if est == "trajectory":
        from flowrl.estimators.trajectory import sampler_problems

        problems += [("estimator.kind", m) for m in sampler_problems(p.estimator, p.sampler.kind, p.sampler)]
    from flowrl.objectives.policy_gradient import requirement_problem

    need = requirement_problem(registry.lookup("objective", obj), registry.lookup("estimator", est))
    if need is not None:
        problems.append(("objective.kind", need))
    kl = getattr(p.objective, "kl", None)
    if kl is not None and kl.beta > 0:
        from flowrl.kl import supported_estimators

        ok = supported_estimators(kl.kind)
        if est not in ok:
            problems.append((
                "objective.kl.kind",
                f"KL {kl.kind!r} cannot be computed by the {est!r} estimator (it works with "
                f"{', '.join(ok)}); use kind: girsanov, or set beta: 0",
            ))

    if cfg.prompts.tag_weights and cfg.prompts.sampling != "by-tag":
        problems.append((
            "prompts.tag_weights",
            f"tag weights share an epoch's prompts among task tags, which sampling: {cfg.prompts.sampling} does not do; "
            "set prompts.sampling: by-tag, or remove tag_weights",
        ))
    batch, group = cfg.train.batch_size, cfg.prompts.group_size
    if batch % group:
        near = [d for d in _divisors(batch) if d > 1]
        problems.append((
            "prompts.group_size",
            f"group_size {group} does not divide train.batch_size {batch}; every prompt needs a full "
            f"group. Use a group_size in {near[:8]} or a batch_size that is a multiple of {group}",
        ))
    elif group < 2:
        problems.append((
            "prompts.group_size",
            "group_size 1 makes every advantage zero (each image is its own group mean); use >= 2",
        ))
    steps = cfg.train.steps_per_epoch
    if batch % steps:
        problems.append((
            "train.steps_per_epoch",
            f"{steps} optimizer steps cannot split train.batch_size {batch} evenly; use one of {_divisors(batch)[:8]}",
        ))
    else:
        per_step = batch // steps
        if per_step % cfg.train.micro_batch:
            problems.append((
                "train.micro_batch",
                f"micro_batch {cfg.train.micro_batch} does not divide the {per_step} images of one "
                f"optimizer step (batch_size / steps_per_epoch); use one of {_divisors(per_step)}",
            ))
        elif getattr(p.estimator, "noise", None) == "per-group" and group and cfg.train.micro_batch % group:
            problems.append((
                "estimator.noise",
                f"noise: per-group shares each term's noise within a prompt's group, so every micro-batch "
                f"must hold whole groups, but train.micro_batch {cfg.train.micro_batch} is not a multiple "
                f"of prompts.group_size {group}; use a micro_batch that is, or noise: per-image",
            ))
    return problems
