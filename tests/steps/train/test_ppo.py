"""PPO's arithmetic (steps/train/ppo.py) against a written-out computation: plain Python loops over
lists, token by token, on fixed numbers (with a completion shorter than the batch's longest)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from steps.train import ppo  # noqa: E402

LOGPS = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 0.0, 0.0]]
OLD = [[-1.5, -0.4, -1.5, -0.1], [-0.2, -1.6, 0.0, 0.0]]
REF = [[-0.9, -0.7, -2.2, -0.3], [-0.5, -1.0, 0.0, 0.0]]
VALUES = [[0.2, 0.1, -0.3, 0.4], [0.5, -0.2, 0.0, 0.0]]
OLD_VALUES = [[0.1, 0.3, -0.1, 0.2], [0.4, 0.1, 0.0, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
SCORES = [1.5, -0.5]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def written_out_rewards(kl_coef):
    rewards, kls = [], []
    for logps, ref, mask, score in zip(LOGPS, REF, MASK, SCORES):
        n = sum(mask)
        kl = [(a - b) if m else 0.0 for a, b, m in zip(logps, ref, mask)]
        r = [-kl_coef * k for k in kl]
        r[n - 1] += score
        rewards.append(r)
        kls.append(kl)
    return rewards, kls


def written_out_gae(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        n = sum(m)
        adv = [0.0] * len(r)
        running = 0.0
        for i in reversed(range(n)):
            next_value = v[i + 1] if i + 1 < n else 0.0
            delta = r[i] + gamma * next_value - v[i]
            running = delta + gamma * lam * running
            adv[i] = running
        advantages.append(adv)
        returns.append([a + (v[i] if i < n else 0.0) for i, a in enumerate(adv)])
    return advantages, returns


def flat(rows):
    return [x for row in rows for x in row]


def masked_items(rows, mask):
    return [x for row, m in zip(rows, mask) for x, keep in zip(row, m) if keep]


def test_kl_rewards_put_the_penalty_everywhere_and_the_score_at_the_last_token():
    rewards, kl = ppo.kl_rewards(torch.tensor(SCORES), t(LOGPS), t(REF), t(MASK), kl_coef=0.2)
    want_rewards, want_kl = written_out_rewards(0.2)
    assert flat(rewards.tolist()) == pytest.approx(flat(want_rewards))
    assert flat(kl.tolist()) == pytest.approx(flat(want_kl))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_the_backward_recursion(gamma, lam):
    rewards, _ = written_out_rewards(0.1)
    advantages, returns = ppo.gae(t(rewards), t(VALUES), t(MASK), gamma=gamma, lam=lam)
    want_adv, want_ret = written_out_gae(rewards, VALUES, MASK, gamma, lam)
    assert flat(advantages.tolist()) == pytest.approx(flat(want_adv))
    assert masked_items(returns.tolist(), MASK) == pytest.approx(masked_items(want_ret, MASK))


def test_whiten_uses_the_masked_positions_only():
    values = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, -99.0]]
    items = masked_items(values, MASK)
    mean = sum(items) / len(items)
    var = sum((x - mean) ** 2 for x in items) / (len(items) - 1)
    out = ppo.whiten(t(values), t(MASK)).tolist()
    assert masked_items(out, MASK) == pytest.approx([(x - mean) / math.sqrt(var + 1e-8) for x in items])


def test_policy_loss_is_the_clipped_surrogate():
    advantages = [[0.5, -1.0, 2.0, -0.3], [1.0, -2.0, 0.0, 0.0]]
    eps = 0.2
    terms = []
    for lp, old, adv, mask in zip(LOGPS, OLD, advantages, MASK):
        for a, o, A, m in zip(lp, old, adv, mask):
            if m:
                ratio = math.exp(a - o)
                terms.append(max(-A * ratio, -A * min(max(ratio, 1 - eps), 1 + eps)))
    loss, metrics = ppo.policy_loss(t(LOGPS), t(OLD), t(advantages), t(MASK), epsilon=eps)
    assert float(loss) == pytest.approx(sum(terms) / len(terms))
    assert 0.0 < metrics["policy_clip_frac"] < 1.0  # the numbers above clip some tokens and not others


def test_value_loss_is_the_clipped_squared_error():
    returns = [[1.0, 0.5, -0.5, 0.0], [0.2, 0.9, 0.0, 0.0]]
    clip = 0.1
    terms = []
    for v, old, ret, mask in zip(VALUES, OLD_VALUES, returns, MASK):
        for a, o, r, m in zip(v, old, ret, mask):
            if m:
                clipped = min(max(a, o - clip), o + clip)
                terms.append(0.5 * max((a - r) ** 2, (clipped - r) ** 2))
    loss, _ = ppo.value_loss(t(VALUES), t(OLD_VALUES), t(returns), t(MASK), clip=clip)
    assert float(loss) == pytest.approx(sum(terms) / len(terms))


def test_the_kl_coefficient_moves_toward_its_target_and_survives_a_checkpoint():
    ctl = ppo.AdaptiveKL(value=0.1, target=6.0, horizon=100)
    assert ctl.update(kl=12.0, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # too far: coef rises
    high = ctl.value
    assert ctl.update(kl=3.0, samples=10) == pytest.approx(high * (1 - 0.2 * 10 / 100))  # too close: it falls
    resumed = ppo.AdaptiveKL(value=0.1, target=6.0, horizon=100)
    resumed.load(ctl.state())
    assert resumed.value == ctl.value
    assert ppo.AdaptiveKL(value=0.1).update(kl=50.0, samples=10) == 0.1  # no target: a fixed coefficient
