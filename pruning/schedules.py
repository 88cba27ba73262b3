"""Schedules as pure functions of the step."""

from __future__ import annotations

__all__ = ["cubic_schedule", "warmup_steps", "warmups", "linear_warmup_decay"]


def warmup_steps(value: float, total: int) -> int:
    """A warm-up length given as a fraction (< 1) of ``total`` or as a number of steps (>= 1)."""
    if value < 1:
        return int(round(value * total))
    return int(value)


def warmups(initial: float, final: float, total: int) -> tuple[int, int]:
    """The initial and final warm-ups of ``total`` steps, each by :func:`warmup_steps`, except that two fractions
    adding up to at most 1 always fit: where both round a half up (0.5 and 0.5 of 7 steps, 3.5 + 3.5 -> 4 + 4), the
    final warm-up takes the steps the initial one leaves."""
    first, last = warmup_steps(initial, total), warmup_steps(final, total)
    if initial < 1 and final < 1 and initial + final <= 1 and first + last > total:
        last = total - first
    return first, last


def cubic_schedule(step: int, total: int, initial: float, final: float, initial_warmup: int = 0,
                   final_warmup: int = 0) -> float:
    """Cubic interpolation from ``initial`` to ``final``.

    The value holds at ``initial`` for the first ``initial_warmup`` steps, then follows

        v(s) = final + (initial - final) * (1 - p) ** 3,   p = (s - initial_warmup) / ramp,

    with ``ramp = end - initial_warmup``, and holds at ``final`` from step ``end`` on: the last ``final_warmup``
    steps, ``end = total - final_warmup``. Without a final warm-up the ramp ends at the last step of the schedule
    (``end = total - 1``), which is then at ``final``: the steps are 0 to ``total - 1``, and a step ``total`` is
    never taken. The ramp moves fast at first and flattens as it nears the final value, which gives the network
    time to recover from the last pruned blocks. Steps outside [0, total] are clamped. When the warm-ups leave no
    ramp the value jumps to ``final`` after the initial warm-up.

    Args:
        step: current optimisation step (0-based).
        total: number of steps of the schedule.
        initial: value during the initial warm-up.
        final: value reached at ``end`` and held afterwards.
        initial_warmup: steps held at ``initial``.
        final_warmup: steps held at ``final`` at the end.

    Returns:
        The scheduled value.
    """
    if total <= 0:
        return final
    step = min(max(step, 0), total)
    end = total - max(final_warmup, 1)
    ramp = end - initial_warmup
    if step < initial_warmup:
        return initial
    if ramp <= 0 or step >= end:
        return final
    progress = (step - initial_warmup) / ramp
    return final + (initial - final) * (1.0 - progress) ** 3


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear rise over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))
