import math

import pytest
import torch

from pruning.distill import kd_loss, qa_ce_loss
from pruning.schedules import cubic_schedule, linear_warmup_decay, warmup_steps, warmups


@pytest.mark.parametrize("initial,final", [(0.0, 0.1), (1.0, 0.3)])
def test_cubic_schedule_endpoints_and_monotonic(initial, final):
    total, w0, w1 = 120, 10, 30
    values = [cubic_schedule(s, total, initial, final, w0, w1) for s in range(total + 1)]
    assert all(v == initial for v in values[: w0 + 1])
    assert all(v == final for v in values[total - w1:])
    diffs = [b - a for a, b in zip(values, values[1:])]
    sign = 1 if final > initial else -1
    assert all(sign * d >= -1e-12 for d in diffs)
    # cubic: a quarter of the way along the ramp, 1 - 0.75^3 of the change is done
    ramp = total - w0 - w1
    quarter = cubic_schedule(w0 + ramp // 4, total, initial, final, w0, w1)
    assert quarter == pytest.approx(final + (initial - final) * 0.75**3)


@pytest.mark.parametrize("total,w0", [(1, 0), (2, 0), (10, 0), (10, 3), (120, 10)])
def test_cubic_schedule_without_final_warmup_ends_at_final_on_the_last_step(total, w0):
    """Steps run 0..total-1: the last one is at the final value, and the ramp before it is still cubic."""
    values = [cubic_schedule(s, total, 1.0, 0.3, w0, 0) for s in range(total)]
    assert values[-1] == 0.3
    assert all(v == 1.0 for v in values[:w0])
    assert all(b <= a for a, b in zip(values, values[1:]))
    ramp = total - 1 - w0
    if ramp >= 4:
        assert values[w0 + ramp // 2] == pytest.approx(0.3 + 0.7 * (1 - (ramp // 2) / ramp) ** 3)


def test_cubic_schedule_with_a_final_warmup_reaches_final_at_its_start():
    # A final warm-up of w1 steps: the ramp spans total - w0 - w1 steps and the last w1 steps are at the final value.
    total, w0, w1 = 20, 2, 3
    values = [cubic_schedule(s, total, 1.0, 0.5, w0, w1) for s in range(total)]
    assert values[total - w1 - 1] > 0.5 and all(v == 0.5 for v in values[total - w1:])
    assert values[w0 + 5] == pytest.approx(0.5 + 0.5 * (1 - 5 / (total - w0 - w1)) ** 3)


def test_cubic_schedule_clamps_and_degenerate():
    assert cubic_schedule(-5, 10, 0.0, 1.0, 2, 2) == 0.0
    assert cubic_schedule(50, 10, 0.0, 1.0, 2, 2) == 1.0
    assert cubic_schedule(3, 10, 0.0, 1.0, 5, 5) == 0.0
    assert cubic_schedule(5, 10, 0.0, 1.0, 5, 5) == 1.0  # no ramp left: jump after the warm-up
    assert cubic_schedule(0, 0, 0.0, 1.0) == 1.0


def test_warmup_steps_fraction_or_count():
    assert warmup_steps(0.1, 200) == 20
    assert warmup_steps(0, 200) == 0
    assert warmup_steps(30, 200) == 30


@pytest.mark.parametrize("initial,final", [(0.5, 0.5), (0.3, 0.7), (0.25, 0.75), (0.1, 0.9), (0.5, 0.4), (0.5, 0)])
def test_warmup_fractions_that_add_up_to_at_most_one_fit_any_number_of_steps(initial, final):
    """Each fraction rounded alone, halves to even, can take a step more than the run has (0.5 + 0.5 of 7 steps)."""
    for total in range(1, 60):
        first, last = warmups(initial, final, total)
        assert first + last <= total, total
        assert first == warmup_steps(initial, total)
        assert last >= warmup_steps(final, total) - 1


def test_warmups_that_fit_are_counted_as_each_fraction_alone():
    assert warmups(0.5, 0.5, 7) == (4, 3)
    assert warmups(0.5, 0.5, 6) == (3, 3)
    assert warmups(0.5, 0.5, 9) == (4, 4)  # 4.5 rounds to 4: they fit as they were
    assert warmups(0.1, 0.2, 15) == (2, 3)
    assert warmups(4, 4, 7) == (4, 4)  # steps: the caller refuses them


def test_linear_warmup_decay():
    assert linear_warmup_decay(0, 100, 10) == pytest.approx(0.1)
    assert linear_warmup_decay(9, 100, 10) == pytest.approx(1.0)
    assert linear_warmup_decay(55, 100, 10) == pytest.approx(0.5)
    assert linear_warmup_decay(100, 100, 10) == 0.0


def test_kd_loss_zero_when_student_equals_teacher():
    logits = torch.randn(4, 17)
    assert float(kd_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_positive_and_scaled_by_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    loss1 = kd_loss(s, t, 1.0)
    assert float(loss1) > 0
    # by hand at T=1: mean over rows of sum p_t * (log p_t - log p_s)
    p_t = torch.softmax(t, -1)
    expected = (p_t * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert float(loss1) == pytest.approx(float(expected), rel=1e-5)
    # the T^2 factor: the gradient scale stays comparable; the value at T=2 equals 4 * KL at T=2
    p2 = torch.softmax(t / 2, -1)
    kl2 = (p2 * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(4 * float(kl2), rel=1e-5)


def test_kd_loss_has_no_gradient_into_teacher():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_qa_ce_loss_is_mean_of_start_and_end():
    start, end = torch.randn(2, 6), torch.randn(2, 6)
    sp, ep = torch.tensor([1, 2]), torch.tensor([3, 4])
    expected = (torch.nn.functional.cross_entropy(start, sp) + torch.nn.functional.cross_entropy(end, ep)) / 2
    assert float(qa_ce_loss(start, end, sp, ep)) == pytest.approx(float(expected))
    assert math.isfinite(float(expected))
