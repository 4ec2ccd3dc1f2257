"""Credit assignment: hand-derived numbers (arithmetic in comments), invariants, and an independent
plain-Python reference of the TP-GRPO turning-point rule (ALGORITHMS.md Sec. 3)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowalign.credit import (
    CREDIT,
    CreditOutput,
    assign_credit,
    balance_turning_points,
    credit_stats,
    group_advantages,
    incremental_rewards,
    outcome_step_rewards,
    step_group_advantages,
    turning_point_rewards,
    zero_variance_fraction,
)

EPS = 1e-4


def tp(R, **kw):
    r, t = turning_point_rewards(torch.tensor([R], dtype=torch.float64), **kw)
    return r[0].tolist(), t[0].tolist()


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_tp(R: list[float], constrained: bool, first_step: bool) -> tuple[list[float], list[bool]]:
    """Loop-by-loop transcription of ALGORITHMS.md Sec. 3 (independent of the vectorised code)."""
    n = len(R) - 1
    G = R[n] - R[0]
    d = [R[k + 1] - R[k] for k in range(n)]
    s = [sgn(d[k]) * sgn(G) for k in range(n)]
    r, turning = [], []
    for k in range(n):
        if k == 0:
            if not first_step:
                is_tp = False
            elif constrained:
                is_tp = sgn(d[0]) * sgn(R[n] - R[1]) > 0
            else:
                is_tp = s[0] > 0
        else:
            is_tp = s[k - 1] < 0 and s[k] > 0
            if constrained:
                is_tp = is_tp and sgn(d[k]) * sgn(R[n] - R[k + 1]) > 0
        # "(replacing d_k, when non-zero)": only a real replacement of a non-zero d_k by another, non-zero R_n - R_k.
        is_tp = is_tp and d[k] != 0 and R[n] - R[k] != 0 and R[n] - R[k] != d[k]
        turning.append(is_tp)
        r.append(R[n] - R[k] if is_tp else d[k])
    return r, turning


# --------------------------------------------------------------------------- worked examples

# ALGORITHMS.md Sec. 3, constrained, first-step rule on.
DOC_EXAMPLES = [
    ([0, 1, 2, 3], [3, 1, 1]),
    ([9, 7, 4, 2], [-7, -3, -2]),
    ([5, 2, 6, 9], [-3, 7, 3]),
    ([5, 8, 4, 1], [3, -7, -3]),
    ([10, 4, 12, 11], [-6, 8, -1]),
    ([5, 5, 7, 7], [0, 2, 0]),
    ([5, 7, 5], [2, -2]),
]


@pytest.mark.parametrize("R, expected", DOC_EXAMPLES)
def test_doc_examples_constrained_first_step(R, expected):
    r, _ = tp(R)
    assert r == expected
    assert reference_tp(R, True, True)[0] == expected


def test_doc_example_unconstrained():
    # [10,4,12,11]: d = [-6, 8, -1], G = 1, s = [-1, 1, -1]. k = 1: s_0 < 0, s_1 > 0 -> turning without the
    # constraint (with it, sign(d_1)*sign(R_3 - R_2) = 1*(-1) < 0 blocks it); r_1 = 11 - 4 = 7.
    assert tp([10, 4, 12, 11], constrained=False) == ([-6, 7, -1], [False, True, False])
    assert tp([10, 4, 12, 11], constrained=True) == ([-6, 8, -1], [False, False, False])


# Variants the doc does not list, derived by hand: (R, constrained, first_step, r, turning).
HAND_VARIANTS = [
    # [0,1,2,3]: d = [1,1,1], G = 3. k = 0 is turning only through the first-step rule
    # (constrained: sign(1)*sign(3-1) > 0; unconstrained: s_0 = 1 > 0) -> r_0 = R_3 - R_0 = 3.
    ([0, 1, 2, 3], True, False, [1, 1, 1], [False, False, False]),
    ([0, 1, 2, 3], False, True, [3, 1, 1], [True, False, False]),
    ([0, 1, 2, 3], False, False, [1, 1, 1], [False, False, False]),
    # [9,7,4,2]: d = [-2,-3,-2], G = -7; k = 0 by the first-step rule -> r_0 = 2 - 9 = -7; s = [1,1,1] so no k >= 1.
    ([9, 7, 4, 2], True, False, [-2, -3, -2], [False, False, False]),
    ([9, 7, 4, 2], False, True, [-7, -3, -2], [True, False, False]),
    ([9, 7, 4, 2], False, False, [-2, -3, -2], [False, False, False]),
    # [5,2,6,9]: d = [-3,4,3], G = 4, s = [-1,1,1]; k = 1 turning in both variants (R_3 - R_2 = 3 > 0):
    # r_1 = 9 - 2 = 7; k = 0 never (s_0 < 0, and sign(-3)*sign(9-2) < 0).
    ([5, 2, 6, 9], True, False, [-3, 7, 3], [False, True, False]),
    ([5, 2, 6, 9], False, True, [-3, 7, 3], [False, True, False]),
    ([5, 2, 6, 9], False, False, [-3, 7, 3], [False, True, False]),
    # [5,8,4,1]: d = [3,-4,-3], G = -4, s = [-1,1,1]; k = 1 turning: r_1 = 1 - 8 = -7.
    ([5, 8, 4, 1], True, False, [3, -7, -3], [False, True, False]),
    ([5, 8, 4, 1], False, True, [3, -7, -3], [False, True, False]),
    ([5, 8, 4, 1], False, False, [3, -7, -3], [False, True, False]),
    # [10,4,12,11]: the first-step rule never fires (s_0 = -1), so it does not matter.
    ([10, 4, 12, 11], True, False, [-6, 8, -1], [False, False, False]),
    ([10, 4, 12, 11], False, False, [-6, 7, -1], [False, True, False]),
    # [5,5,7,7]: d = [0,2,0], s = [0,1,0]: d_0 = 0 is never replaced, s_0 = 0 is not < 0 -> no turning point.
    ([5, 5, 7, 7], True, False, [0, 2, 0], [False, False, False]),
    ([5, 5, 7, 7], False, True, [0, 2, 0], [False, False, False]),
    ([5, 5, 7, 7], False, False, [0, 2, 0], [False, False, False]),
    # [5,7,5]: G = 0 -> no turning point in any variant; r = d = [2,-2].
    ([5, 7, 5], True, False, [2, -2], [False, False]),
    ([5, 7, 5], False, True, [2, -2], [False, False]),
    ([5, 7, 5], False, False, [2, -2], [False, False]),
    # [0,2,1]: d = [2,-1], G = 1, s_0 = 1 > 0 -> unconstrained first step turning: r_0 = 1 - 0 = 1;
    # constrained: sign(2)*sign(1-2) < 0 -> not turning, r = d.
    ([0, 2, 1], True, True, [2, -1], [False, False]),
    ([0, 2, 1], False, True, [1, -1], [True, False]),
    # [0,2,1,2,1]: d = [2,-1,1,-1], G = 1, s = [1,-1,1,-1]. Unconstrained k = 2 has s_1 < 0, s_2 > 0 but
    # R_4 - R_2 = 1 - 1 = 0: nothing to replace d_2 = 1 with -> not a turning point, r_2 = d_2 = 1.
    # Unconstrained k = 0: s_0 > 0 -> r_0 = 1. Constrained: k = 0 sign(2)*sign(1-2) < 0; k = 2 sign(1)*sign(1-2) < 0.
    ([0, 2, 1, 2, 1], False, True, [1, -1, 1, -1], [True, False, False, False]),
    ([0, 2, 1, 2, 1], False, False, [2, -1, 1, -1], [False, False, False, False]),
    ([0, 2, 1, 2, 1], True, True, [2, -1, 1, -1], [False, False, False, False]),
    # [0,-1,1,0,2,3]: d = [-1,2,-1,2,1], G = 3, s = [-1,1,-1,1,1]. Constrained k = 1 (R_5 - R_2 = 2 > 0)
    # and k = 3 (R_5 - R_4 = 1 > 0): r_1 = 3 - (-1) = 4, r_3 = 3 - 0 = 3. Two turning points in one row.
    ([0, -1, 1, 0, 2, 3], True, True, [-1, 4, -1, 3, 1], [False, True, False, True, False]),
    # n = 1: [0,1]: constrained k = 0 needs sign(R_1 - R_1) = 0 -> no; unconstrained s_0 > 0, but R_1 - R_0 = d_0:
    # nothing replaced, so not counted as a turning point (it would take a balancing slot for nothing).
    ([0, 1], True, True, [1], [False]),
    ([0, 1], False, True, [1], [False]),
    # [0,1,1]: unconstrained s_0 > 0 and R_2 - R_0 = 1 = d_0 (R_2 = R_1): not a turning point either.
    ([0, 1, 1], False, True, [1, 0], [False, False]),
    # [0,2,1,3,3]: d = [2,-1,2,0], s = [1,-1,1,0]; unconstrained k = 2 flips, but R_4 = R_3: r_2 = d_2 = 2, unflagged.
    ([0, 2, 1, 3, 3], False, False, [2, -1, 2, 0], [False, False, False, False]),
]


@pytest.mark.parametrize("R, constrained, first_step, r_exp, t_exp", HAND_VARIANTS)
def test_hand_variants(R, constrained, first_step, r_exp, t_exp):
    assert tp(R, constrained=constrained, first_step=first_step) == (r_exp, t_exp)
    assert reference_tp(R, constrained, first_step) == (r_exp, t_exp)


def test_doc_examples_as_one_batch():
    # Rows of equal length from the doc, processed together, give the same answers as row by row.
    rows = [R for R, _ in DOC_EXAMPLES if len(R) == 4]
    r, t = turning_point_rewards(torch.tensor(rows))
    assert r.dtype == torch.float32 and t.dtype == torch.bool
    assert r.tolist() == [e for R, e in DOC_EXAMPLES if len(R) == 4]


def test_incremental_rewards_are_differences():
    assert incremental_rewards(torch.tensor([[10, 4, 12, 11]])).tolist() == [[-6, 8, -1]]


# --------------------------------------------------------------------------- properties

seqs = st.lists(st.integers(-3, 3), min_size=2, max_size=9)


@settings(max_examples=400, deadline=None)
@given(R=seqs, constrained=st.booleans(), first_step=st.booleans())
def test_matches_reference_and_invariants(R, constrained, first_step):
    Rt = torch.tensor([R], dtype=torch.float64)
    r_t, t_t = turning_point_rewards(Rt, constrained=constrained, first_step=first_step)
    r, turning = r_t[0].tolist(), t_t[0].tolist()
    assert (r, turning) == reference_tp(R, constrained, first_step)

    n, G = len(R) - 1, R[-1] - R[0]
    d = [R[k + 1] - R[k] for k in range(n)]
    # turning points off: sum r = G
    assert sum(incremental_rewards(Rt)[0].tolist()) == G
    # sum r - G = sum over turning k of (R_n - R_{k+1})
    assert sum(r) - G == sum(R[n] - R[k + 1] for k in range(n) if turning[k])
    # every step is either d_k or (at a turning point) R_n - R_k
    for k in range(n):
        assert r[k] == (R[n] - R[k] if turning[k] else d[k])
    if G == 0:
        assert not any(turning)
    if not first_step:
        assert not turning[0]
    if constrained:
        assert not turning[-1]
        for k in range(n):
            if turning[k]:
                assert sgn(r[k]) == sgn(d[k]) == sgn(G) != 0
                assert abs(r[k]) > abs(d[k])
        # the constrained turning points are a subset of the unconstrained ones
        _, t_free = turning_point_rewards(Rt, constrained=False, first_step=first_step)
        assert not (t_t & ~t_free).any()


def test_batched_equals_row_by_row_random():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 7)
        rows = [[rng.randint(-2, 2) for _ in range(n + 1)] for _ in range(16)]
        for constrained in (True, False):
            for first_step in (True, False):
                r, t = turning_point_rewards(torch.tensor(rows), constrained=constrained, first_step=first_step)
                for i, R in enumerate(rows):
                    assert (r[i].tolist(), t[i].tolist()) == reference_tp(R, constrained, first_step)


def test_float_rewards_invariants():
    # Real-valued rewards (fp64): the same invariants up to rounding.
    g = torch.Generator().manual_seed(0)
    R = torch.randn(256, 8, generator=g, dtype=torch.float64)
    for constrained in (True, False):
        r, t = turning_point_rewards(R, constrained=constrained)
        G = R[:, -1] - R[:, 0]
        after = (R[:, -1:] - R[:, 1:]) * t
        torch.testing.assert_close(r.sum(1) - G, after.sum(1))
        assert t.any()
    r, t = turning_point_rewards(R.float())
    assert r.dtype == torch.float32


# --------------------------------------------------------------------------- balancing

A = [0, 1, 2, 3]  # G = +3, turning at k = 0, r = [3, 1, 1], d = [1, 1, 1]
C = [5, 2, 6, 9]  # G = +4, turning at k = 1, r = [-3, 7, 3], d = [-3, 4, 3]
GG = [0, 1, 2, 6]  # G = +6, turning at k = 0, r = [6, 1, 4], d = [1, 1, 4]
NB = [9, 7, 4, 2]  # G = -7, turning at k = 0, r = [-7, -3, -2]
ND = [5, 8, 4, 1]  # G = -4, turning at k = 1, r = [3, -7, -3]


def balanced(rows, key="abs_G", scope_ids=None):
    R = torch.tensor(rows, dtype=torch.float64)
    r, t = turning_point_rewards(R)
    r2, t2 = balance_turning_points(R, r, t, scope_ids=scope_ids, key=key)
    return r, t, r2, t2


def test_balance_keeps_min_of_each_sign_by_abs_G():
    # positives: A (|G| 3), C (|G| 4), GG (|G| 6); negatives: NB. m = min(3, 1) = 1.
    # key abs_G keeps GG (largest |G|), reverts A and C to d.
    r, t, r2, t2 = balanced([A, C, GG, NB])
    assert r2.tolist() == [[1, 1, 1], [-3, 4, 3], [6, 1, 4], [-7, -3, -2]]
    assert t2.tolist() == [[False] * 3, [False] * 3, [True, False, False], [True, False, False]]
    # inputs untouched
    assert r.tolist() == [[3, 1, 1], [-3, 7, 3], [6, 1, 4], [-7, -3, -2]]


def test_balance_keeps_by_abs_r():
    # turning |r|: A 3, C 7 (= 9 - 2), GG 6 -> key abs_r keeps C, reverts A and GG.
    _, _, r2, t2 = balanced([A, C, GG, NB], key="abs_r")
    assert r2.tolist() == [[1, 1, 1], [-3, 7, 3], [1, 1, 4], [-7, -3, -2]]
    assert t2.sum().item() == 2 and t2[1, 1] and t2[3, 0]


def test_balance_two_of_each():
    # positives A (3), C (4), GG (6); negatives NB (7), ND (4): m = 2 keeps GG and C, reverts A.
    _, _, r2, t2 = balanced([A, C, GG, NB, ND])
    assert r2.tolist() == [[1, 1, 1], [-3, 7, 3], [6, 1, 4], [-7, -3, -2], [3, -7, -3]]
    assert t2.sum().item() == 4


def test_balance_one_sign_unchanged():
    r, t, r2, t2 = balanced([A, C, GG])
    assert torch.equal(r, r2) and torch.equal(t, t2)
    r, t, r2, t2 = balanced([NB, ND, [5, 7, 6, 5]])  # last row: G = 0, no turning point
    assert torch.equal(r, r2) and torch.equal(t, t2)


def test_balance_ties_break_by_position():
    # Two identical positive rows (|G| 3 each) vs one negative: the earlier row keeps its turning point.
    _, _, r2, t2 = balanced([A, A, NB])
    assert r2.tolist() == [[3, 1, 1], [1, 1, 1], [-7, -3, -2]]
    _, _, r2, _ = balanced([NB, A, A])
    assert r2.tolist() == [[-7, -3, -2], [3, 1, 1], [1, 1, 1]]


def test_balance_counts_turning_points_not_trajectories():
    # [0,-1,1,0,2,3]: two positive turning points (k = 1: r 4, k = 3: r 3; d_3 = 2) in one row;
    # [9,7,4,2,1,0]: one negative (k = 0: r = -9). m = 1 -> one positive kept: tie on |G| = 3, earlier
    # step k = 1 wins; k = 3 reverts to d_3 = 2.
    rows = [[0, -1, 1, 0, 2, 3], [9, 7, 4, 2, 1, 0]]
    r, t, r2, t2 = balanced(rows)
    assert r[0].tolist() == [-1, 4, -1, 3, 1] and r[1].tolist() == [-9, -3, -2, -1, -1]
    assert r2[0].tolist() == [-1, 4, -1, 2, 1]
    assert t2.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]
    _, _, r3, _ = balanced(rows, key="abs_r")  # |r| 4 > 3: same choice
    assert r3[0].tolist() == [-1, 4, -1, 2, 1]


def test_balance_honours_scope_ids():
    # Without scopes: positives A (3), C (4) vs NB -> keep C, revert A.
    _, _, r2, _ = balanced([A, NB, C])
    assert r2.tolist() == [[1, 1, 1], [-7, -3, -2], [-3, 7, 3]]
    # Scope 0 = {A, NB} (one of each sign: both kept); scope 1 = {C} (one sign: unchanged).
    r, _, r2, t2 = balanced([A, NB, C], scope_ids=torch.tensor([0, 0, 1]))
    assert torch.equal(r, r2) and t2.sum().item() == 3
    # Scope 0 = {A, C, NB}, scope 1 = {} -> as without scopes.
    _, _, r2, _ = balanced([A, C, NB], scope_ids=torch.tensor([5, 5, 5]))
    assert r2.tolist() == [[1, 1, 1], [-3, 7, 3], [-7, -3, -2]]


def test_balance_random_properties():
    rng = random.Random(1)
    for trial in range(150):
        n = rng.randint(1, 6)
        B = rng.randint(1, 12)
        rows = [[rng.randint(-2, 2) for _ in range(n + 1)] for _ in range(B)]
        R = torch.tensor(rows, dtype=torch.float64)
        scope = torch.tensor([rng.randint(0, 2) for _ in range(B)]) if trial % 2 else None
        key = "abs_G" if trial % 3 else "abs_r"
        r, t = turning_point_rewards(R, constrained=bool(trial % 4))
        r2, t2 = balance_turning_points(R, r, t, scope_ids=scope, key=key)
        d = R[:, 1:] - R[:, :-1]
        G = R[:, -1] - R[:, 0]
        assert not (t2 & ~t).any()  # only removes turning points
        reverted = t & ~t2
        assert torch.equal(r2[reverted], d[reverted])
        assert torch.equal(r2[~reverted], r[~reverted])
        scopes = torch.zeros(B, dtype=torch.long) if scope is None else scope
        for u in scopes.unique():
            rows_u = (scopes == u)[:, None]
            sgnG = G.sign()[:, None].expand_as(t)
            pos0, neg0 = (t & rows_u & (sgnG > 0)).sum(), (t & rows_u & (sgnG < 0)).sum()
            pos1, neg1 = (t2 & rows_u & (sgnG > 0)).sum(), (t2 & rows_u & (sgnG < 0)).sum()
            if pos0 and neg0:
                assert pos1 == neg1 == min(pos0, neg0)
            else:
                assert pos1 == pos0 and neg1 == neg0
            # every kept turning point scores at least as high as every reverted one of its sign
            score = G.abs()[:, None].expand_as(t) if key == "abs_G" else r.abs()
            for s in (1, -1):
                kept = score[t2 & rows_u & (sgnG == s)]
                lost = score[reverted & rows_u & (sgnG == s)]
                if kept.numel() and lost.numel():
                    assert kept.min() >= lost.max()
        # idempotent
        r3, t3 = balance_turning_points(R, r2, t2, scope_ids=scope, key=key)
        assert torch.equal(r3, r2) and torch.equal(t3, t2)


def test_balance_rejects_bad_key():
    R = torch.tensor([A], dtype=torch.float64)
    r, t = turning_point_rewards(R)
    with pytest.raises(ValueError, match="abs_G"):
        balance_turning_points(R, r, t, key="G")


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_example():
    rewards = torch.tensor([1.0, 3.0, 7.0, 7.0, 7.0, 2.0])
    gid = torch.tensor([0, 0, 1, 1, 1, 2])
    a = group_advantages(rewards, gid)
    # group 0: mean 2, population std 1 -> (1-2)/(1+1e-4) = -0.99990001, +0.99990001
    # group 1: all 7 -> 0 exactly; group 2: one sample -> 0 exactly
    expected = [-1 / (1 + EPS), 1 / (1 + EPS), 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(a, torch.tensor(expected))
    assert (a[2:] == 0).all()
    # clip 0.5 -> +-0.5
    torch.testing.assert_close(group_advantages(rewards, gid, clip=0.5)[:2], torch.tensor([-0.5, 0.5]))
    assert zero_variance_fraction(rewards, gid) == pytest.approx(2 / 3)


def test_group_advantages_default_clip():
    # 29 zeros and one 30: mean 1, deviations -1 (x29) and 29, var = (29 + 841) / 30 = 29, std = sqrt(29) = 5.385;
    # z(30) = 29 / (5.385 + 1e-4) = 5.385 -> clipped to 5; z(0) = -1 / (sqrt(29) + 1e-4) = -0.18569.
    rewards = torch.tensor([0.0] * 29 + [30.0])
    a = group_advantages(rewards, torch.zeros(30, dtype=torch.long))
    assert a[-1].item() == 5.0
    torch.testing.assert_close(a[:-1], torch.full((29,), -1 / (math.sqrt(29) + EPS)))


def test_group_advantages_batch_std():
    rewards = torch.tensor([1.0, 3.0, 7.0, 7.0, 7.0])
    gid = torch.tensor([3, 3, 8, 8, 8])
    # batch mean 25/5 = 5; deviations -4,-2,2,2,2 -> var = (16+4+4+4+4)/5 = 6.4 (ddof 0), std = 2.5298.
    # group 0 centred by its own mean 2: +-1 / (sqrt(6.4) + 1e-4) = +-0.39527; group 1 centred -> 0.
    a = group_advantages(rewards, gid, std_scope="batch")
    v = 1 / (math.sqrt(6.4) + EPS)
    torch.testing.assert_close(a, torch.tensor([-v, v, 0.0, 0.0, 0.0]))


def test_group_advantages_match_numpy_flow_grpo():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=24)
    gid = np.repeat(np.arange(6), 4)
    expected = np.zeros(24)
    for g in range(6):
        m = gid == g
        expected[m] = (rewards[m] - rewards[m].mean()) / (rewards[m].std() + EPS)
    a = group_advantages(torch.tensor(rewards), torch.tensor(gid))
    np.testing.assert_allclose(a.numpy(), np.clip(expected, -5, 5), rtol=1e-10)
    # batch std
    expected_b = np.zeros(24)
    for g in range(6):
        m = gid == g
        expected_b[m] = (rewards[m] - rewards[m].mean()) / (rewards.std() + EPS)
    a = group_advantages(torch.tensor(rewards), torch.tensor(gid), std_scope="batch")
    np.testing.assert_allclose(a.numpy(), np.clip(expected_b, -5, 5), rtol=1e-10)


def test_zero_variance_group_is_exactly_zero_with_rounding():
    # In fp32, sum(0.3 x 6) / 6 != 0.3 (off by 3e-8); divided by std 0 + eps that residue would give 3e-4,
    # not 0, and the group would not be dropped. Zero-variance groups must give exact zeros.
    rewards = torch.tensor([0.3] * 6 + [0.1, 0.7])
    gid = torch.tensor([0] * 6 + [1, 1])
    a = group_advantages(rewards, gid)
    assert (a[:6] == 0).all() and (a[6:] != 0).all()
    a = step_group_advantages(rewards[:, None].expand(8, 3), gid)
    assert (a[:6] == 0).all()
    out = assign_credit(None, rewards, gid, n=2)
    assert out.keep.tolist() == [False] * 6 + [True] * 2


def test_step_group_advantages_hand_example():
    r = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [5.0, 4.0]])
    gid = torch.tensor([0, 0, 1, 1])
    # step 0: group 0 [1,3] -> +-1/(1+eps); group 1 [5,5] -> 0.
    # step 1: group 0 [0,0] -> 0; group 1 [2,4] -> +-1/(1+eps).
    v = 1 / (1 + EPS)
    expected = torch.tensor([[-v, 0.0], [v, 0.0], [0.0, -v], [0.0, v]])
    torch.testing.assert_close(step_group_advantages(r, gid), expected)


def test_input_validation():
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.ones(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.ones(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="std_scope"):
        group_advantages(torch.ones(2), torch.tensor([0, 0]), std_scope="global")
    with pytest.raises(ValueError, match="n\\+1"):
        turning_point_rewards(torch.ones(3, 1))


# --------------------------------------------------------------------------- assign_credit


def test_outcome_credit_equals_flow_grpo_every_step():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(12, generator=g)
    final[4:8] = 0.5  # one zero-variance group
    gid = torch.arange(3).repeat_interleave(4)
    for std_scope in ("group", "batch"):
        out = assign_credit(None, final, gid, credit="outcome", n=5, std_scope=std_scope)
        ref = group_advantages(final, gid, std_scope=std_scope)
        assert out.advantages.shape == (12, 5)
        assert torch.equal(out.advantages, ref[:, None].expand(12, 5))
        assert torch.equal(out.step_rewards_used, outcome_step_rewards(final, 5))
        assert not out.turning.any()
        assert out.keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_incremental_credit_equals_outcome_advantage_when_final_reward_only():
    # "turning points off and final reward only": R_0 .. R_{n-1} = 0, R_n = final -> r = [0, .., 0, final];
    # the last step's advantage is the Flow-GRPO one, earlier steps carry none.
    final = torch.tensor([1.0, 2.0, 4.0, 3.0])
    gid = torch.tensor([0, 0, 1, 1])
    R = torch.zeros(4, 4)
    R[:, -1] = final
    out = assign_credit(R, final, gid, credit="incremental", n=3)
    assert torch.equal(out.advantages[:, -1], group_advantages(final, gid))
    assert (out.advantages[:, :-1] == 0).all()


def test_incremental_credit_constant_increments():
    # R_k = a + c*k (n = 3): d_k = c at every step. group 0: c = 1, 3 -> mean 2, std 1 -> -+1/(1+eps) at each step;
    # group 1: c = 2, 2 (different offsets) -> zero variance -> 0, dropped;
    # group 2: c = 0, 1, 2 -> mean 1, std sqrt(2/3) = 0.8165 -> -1/(0.8165+eps), 0, +1/(0.8165+eps).
    a = [0, 5, 1, -4, 2, 2, 2]
    c = [1, 3, 2, 2, 0, 1, 2]
    R = torch.tensor([[a[i] + c[i] * k for k in range(4)] for i in range(7)], dtype=torch.float32)
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    out = assign_credit(R, R[:, -1], gid, credit="incremental", n=3)
    v, w = 1 / (1 + EPS), 1 / (math.sqrt(2 / 3) + EPS)
    expected = torch.tensor([-v, v, 0, 0, -w, 0, w])[:, None].expand(7, 3)
    torch.testing.assert_close(out.advantages, expected)
    assert out.keep.tolist() == [True, True, False, False, True, False, True]
    assert out.step_rewards_used.tolist() == [[ci] * 3 for ci in c]
    assert not out.turning.any()
    torch.testing.assert_close(out.trend, torch.tensor([3.0 * ci for ci in c]))


def test_turning_point_credit_hand_example():
    # One group: [0,1,2,3] -> r [3,1,1]; [5,2,6,9] -> r [-3,7,3].
    # step 0: [3,-3] mean 0, std 3 -> +-3/(3+eps); step 1: [1,7] mean 4, std 3 -> -+3/(3+eps);
    # step 2: [1,3] mean 2, std 1 -> -+1/(1+eps).
    R = torch.tensor([A, C], dtype=torch.float32)
    out = assign_credit(R, R[:, -1], torch.tensor([0, 0]), credit="turning_point", n=3)
    x, y = 3 / (3 + EPS), 1 / (1 + EPS)
    torch.testing.assert_close(out.advantages, torch.tensor([[x, -x, -y], [-x, x, y]]))
    assert out.turning.tolist() == [[True, False, False], [False, True, False]]
    assert out.step_rewards_used.tolist() == [[3, 1, 1], [-3, 7, 3]]


def test_turning_point_credit_balance_modes():
    # Rows A, C (pos), NB (neg); groups {A, NB}, {C}.
    R = torch.tensor([A, NB, C], dtype=torch.float32)
    gid = torch.tensor([0, 0, 1])
    kw = dict(credit="turning_point", n=3)
    none = assign_credit(R, R[:, -1], gid, balance="none", **kw)
    assert none.turning.sum() == 3
    # batch (= global on one process): positives A (3), C (4) vs NB -> A reverts.
    for mode in ("batch", "global"):
        out = assign_credit(R, R[:, -1], gid, balance=mode, **kw)
        assert out.step_rewards_used.tolist() == [[1, 1, 1], [-7, -3, -2], [-3, 7, 3]]
    # group: {A, NB} balanced (one each, kept), {C} one sign -> unchanged.
    out = assign_credit(R, R[:, -1], gid, balance="group", **kw)
    assert torch.equal(out.turning, none.turning)
    # batch with scope_ids (e.g. process rank per gathered row): same split as the groups here.
    out = assign_credit(R, R[:, -1], gid, balance="batch", scope_ids=torch.tensor([0, 0, 1]), **kw)
    assert torch.equal(out.turning, none.turning)
    # global spans every row whatever its process: A still reverts.
    out = assign_credit(R, R[:, -1], gid, balance="global", scope_ids=torch.tensor([0, 0, 1]), **kw)
    assert out.step_rewards_used.tolist() == [[1, 1, 1], [-7, -3, -2], [-3, 7, 3]]
    # group refined by scope_ids: group id 0 on two "processes" -> scopes {A}, {NB, C}: {A} has one sign,
    # {NB, C} one of each -> nothing reverts. Unrefined, group 0 = {A, NB, C} -> A reverts.
    same = torch.tensor([0, 0, 0])
    out = assign_credit(R, R[:, -1], same, balance="group", scope_ids=torch.tensor([0, 1, 1]), **kw)
    assert out.step_rewards_used.tolist() == [[3, 1, 1], [-7, -3, -2], [-3, 7, 3]]
    out = assign_credit(R, R[:, -1], same, balance="group", **kw)
    assert out.step_rewards_used.tolist() == [[1, 1, 1], [-7, -3, -2], [-3, 7, 3]]
    # abs_r key through the entry point: A (|r| 3) vs C (|r| 7) -> A reverts either way here.
    out = assign_credit(R, R[:, -1], gid, balance="batch", balance_key="abs_r", **kw)
    assert out.turning.tolist() == [[False] * 3, [True, False, False], [False, True, False]]


def test_assign_credit_errors_and_registry():
    R = torch.tensor([A, C], dtype=torch.float32)
    gid = torch.tensor([0, 0])
    assert CREDIT.names() == ["incremental", "outcome", "turning_point"]
    with pytest.raises(ValueError, match="valid: incremental, outcome, turning_point"):
        assign_credit(R, R[:, -1], gid, credit="tp", n=3)
    with pytest.raises(ValueError, match="step_rewards"):
        assign_credit(None, R[:, -1], gid, credit="turning_point", n=3)
    with pytest.raises(ValueError, match="n\\+1 = 5"):
        assign_credit(R, R[:, -1], gid, credit="incremental", n=4)
    with pytest.raises(ValueError, match="balance"):
        assign_credit(R, R[:, -1], gid, credit="turning_point", n=3, balance="process")
    with pytest.raises(ValueError, match="balance_key"):
        assign_credit(R, R[:, -1], gid, credit="turning_point", n=3, balance_key="G")


def test_credit_output_is_frozen():
    out = assign_credit(None, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), n=2)
    assert isinstance(out, CreditOutput)
    with pytest.raises(AttributeError):
        out.keep = None  # type: ignore[misc]


def test_credit_stats():
    # A: turning k=0 (r 3, G +); C: k=1 (r 7, G +); NB: k=0 (r -7, G -).
    # turning |r| mean = (3 + 7 + 7) / 3; ordinary |r|: A 1,1; C 3,3; NB 3,2 -> 13 / 6.
    R = torch.tensor([A, C, NB], dtype=torch.float32)
    out = assign_credit(R, R[:, -1], torch.tensor([0, 0, 0]), credit="turning_point", n=3)
    stats = credit_stats(out)
    assert stats["train/credit/turning_points"] == 3
    assert stats["train/credit/turning_pos_G"] == 2
    assert stats["train/credit/turning_neg_G"] == 1
    assert stats["train/credit/trajectories_with_turning"] == 3
    assert stats["train/credit/abs_r_turning"] == pytest.approx(17 / 3)
    assert stats["train/credit/abs_r_ordinary"] == pytest.approx(13 / 6)
    assert stats["train/credit/keep_frac"] == 1.0
    outcome = credit_stats(assign_credit(None, R[:, -1], torch.tensor([0, 0, 0]), n=3))
    assert outcome["train/credit/turning_points"] == 0 and outcome["train/credit/abs_r_turning"] == 0.0
