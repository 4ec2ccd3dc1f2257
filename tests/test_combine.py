"""Reward aggregation rules on hand-computed numbers (arithmetic in the comments)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from flowalign.registry import Registry
from rewards.combine import (
    CombinedReward,
    CombinedRewards,
    RewardHead,
    apply_gate,
    build_combined,
    combine,
    log_tame,
    signed_log1p,
    zscore,
)

R1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
R2 = torch.tensor([10.0, 0.0, 10.0, 0.0])
GROUPS = torch.tensor([0, 0, 1, 1])


def close(a: torch.Tensor, b: list[float]) -> bool:
    return torch.allclose(a.float(), torch.tensor(b, dtype=torch.float32), atol=1e-5)


# ---- z-scores ----------------------------------------------------------------------------------------------
def test_zscore_over_the_batch():
    # mean 2.5; population var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; std = sqrt(1.25) = 1.118034
    # z = (-1.5, -0.5, 0.5, 1.5) / 1.118034 = (-1.341641, -0.447214, 0.447214, 1.341641)
    assert close(zscore(R1, eps=0.0), [-1.341641, -0.447214, 0.447214, 1.341641])


def test_zscore_per_group():
    # group 0 = (1, 3): mean 2, std 1 -> (-1, 1); group 1 = (10, 14): mean 12, std 2 -> (-1, 1)
    x = torch.tensor([1.0, 3.0, 10.0, 14.0])
    assert close(zscore(x, GROUPS, eps=0.0), [-1, 1, -1, 1])
    assert close(zscore(x, ["cat", "cat", "dog", "dog"], eps=0.0), [-1, 1, -1, 1])  # any hashable ids
    # interleaved groups: 0 = (1, 10) -> mean 5.5, std 4.5 -> (-1, 1); 1 = (3, 14) -> mean 8.5, std 5.5 -> (-1, 1)
    assert close(zscore(x, torch.tensor([0, 1, 0, 1]), eps=0.0), [-1, -1, 1, 1])
    # a group of one sample has std 0: (x - mean) = 0 -> 0
    assert close(zscore(x, torch.tensor([0, 0, 1, 2])), [-1, 1, 0, 0])


# ---- the three combinations --------------------------------------------------------------------------------
def test_weighted_sum():
    # 1*R1 + 0.5*R2 = (1 + 5, 2 + 0, 3 + 5, 4 + 0) = (6, 2, 8, 4)
    assert close(combine({"a": R1, "b": R2}, {"a": 1.0, "b": 0.5}), [6, 2, 8, 4])


def test_sum_then_normalize():
    # total (6, 2, 8, 4): mean 5, deviations (1, -3, 3, -1), var (1 + 9 + 9 + 1) / 4 = 5, std sqrt(5) = 2.236068
    # -> (0.447214, -1.341641, 1.341641, -0.447214)
    out = combine({"a": R1, "b": R2}, {"a": 1.0, "b": 0.5}, normalize="sum_then_normalize", eps=0.0)
    assert close(out, [0.447214, -1.341641, 1.341641, -0.447214])


def test_normalize_then_sum_over_the_batch():
    # z(R1) = (-1.341641, -0.447214, 0.447214, 1.341641)
    # z(R2): mean 5, std 5 -> (1, -1, 1, -1); times 0.5 -> (0.5, -0.5, 0.5, -0.5)
    # sum = (-0.841641, -0.947214, 0.947214, 0.841641)
    out = combine({"a": R1, "b": R2}, {"a": 1.0, "b": 0.5}, normalize="normalize_then_sum", eps=0.0)
    assert close(out, [-0.841641, -0.947214, 0.947214, 0.841641])


def test_normalize_then_sum_per_group():
    # z(R1) per group: (1, 2) -> (-1, 1); (3, 4) -> (-1, 1)
    # z(R2) per group: (10, 0) -> (1, -1); (10, 0) -> (1, -1); times 0.5 -> (0.5, -0.5, 0.5, -0.5)
    # sum = (-0.5, 0.5, -0.5, 0.5)
    out = combine({"a": R1, "b": R2}, {"a": 1.0, "b": 0.5}, normalize="normalize_then_sum", group_ids=GROUPS, eps=0)
    assert close(out, [-0.5, 0.5, -0.5, 0.5])


def test_the_two_normalisations_differ_when_scales_differ():
    # A head on a 100x scale dominates sum-then-normalise but not normalise-then-sum.
    big, small = torch.tensor([100.0, 300.0, 200.0, 0.0]), torch.tensor([4.0, 1.0, 2.0, 3.0])
    sum_first = combine({"big": big, "small": small}, {"big": 1, "small": 1}, normalize="sum_then_normalize")
    each_first = combine({"big": big, "small": small}, {"big": 1, "small": 1}, normalize="normalize_then_sum")
    assert sum_first.argmax() == 1  # follows `big`
    # z(big) = (-0.447214, 1.341641, 0.447214, -1.341641); z(small) = (1.341641, -1.341641, -0.447214, 0.447214)
    assert close(each_first, [0.894427, 0.0, 0.0, -0.894427])


# ---- log-taming (PaCo-RL) ----------------------------------------------------------------------------------
def test_log_tame_transforms_only_the_high_spread_heads():
    a = torch.tensor([2.0, 2.0, 2.0, 2.0])  # std 0            -> rho = 0
    b = torch.tensor([0.0, 8.0, 0.0, 8.0])  # mean 4, std 4     -> rho = 1
    c = torch.tensor([9.0, 11.0, 9.0, 11.0])  # mean 10, std 1  -> rho = 0.1
    # mean rho = (0 + 1 + 0.1) / 3 = 0.3667 -> only b (1 > 0.3667) is tamed: log(1 + b) = (0, ln 9, 0, ln 9)
    tamed, keys = log_tame({"a": a, "b": b, "c": c}, eps=0.0)
    assert keys == ("b",)
    assert close(tamed["b"], [0, math.log(9), 0, math.log(9)])
    assert torch.equal(tamed["a"], a) and torch.equal(tamed["c"], c)
    # summed with weight 1: (2 + 0 + 9, 2 + 2.197225 + 11, 11, 15.197225)
    assert close(combine(tamed, {"a": 1, "b": 1, "c": 1}), [11, 15.197225, 11, 15.197225])


def test_log_tame_needs_two_heads_and_is_defined_for_negatives():
    only, keys = log_tame({"a": torch.tensor([0.0, 100.0])})
    assert keys == () and close(only["a"], [0, 100])  # nothing to compare a single head with
    # log(1 + r) for r >= 0; mirrored for r < 0: -log(1 + 3) = -1.386294
    assert close(signed_log1p(torch.tensor([3.0, 0.0, -3.0])), [math.log(4), 0.0, -math.log(4)])


# ---- gates -------------------------------------------------------------------------------------------------
TOTAL = torch.tensor([0.5, 2.0, -1.0, 3.0])
GATE = torch.tensor([0.9, 0.2, 0.8, 0.1])  # floor 0.5: samples 1 and 3 violate


def test_gate_with_a_fixed_penalty():
    out, violated = apply_gate(TOTAL, GATE, 0.5, penalty=-5.0)
    assert violated.tolist() == [False, True, False, True]
    assert close(out, [0.5, -5.3, -1.0, -5.4])  # the penalty minus how far each falls short of the floor


def test_gate_to_the_minimum():
    # batch minimum of the totals = -1.0 -> violators get -1.0 minus their shortfall (0.3, 0.4)
    out, _ = apply_gate(TOTAL, GATE, 0.5)
    assert close(out, [0.5, -1.3, -1.0, -1.4])
    # per group: group 0 = (0.5, 2.0) -> min 0.5; group 1 = (-1.0, 3.0) -> min -1.0
    out, _ = apply_gate(TOTAL, GATE, 0.5, group_ids=GROUPS)
    assert close(out, [0.5, 0.2, -1.0, -1.4])


def test_gate_keeps_a_gradient_when_a_whole_group_violates():
    # both below the floor: ranked by the gate score (the one nearer the floor higher), not tied at the minimum
    out, violated = apply_gate(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.3]), 0.5)
    assert violated.all() and close(out, [0.6, 0.8])


def test_gate_floor_is_inclusive():
    out, violated = apply_gate(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.4999]), 0.5, penalty=0.0)
    assert violated.tolist() == [False, True] and close(out, [1.0, -0.0001])


# ---- the combined reward -----------------------------------------------------------------------------------
def _const(values: list[float], seen: list | None = None):
    def fn(images, prompts, **columns):
        if seen is not None:
            seen.append(columns)
        return torch.tensor(values)

    return fn


def test_combined_reward_returns_the_total_and_every_raw_score():
    seen: list = []
    heads = [
        RewardHead("a", _const([1, 2, 3, 4], seen), weight=1.0),
        RewardHead("b", _const([10, 0, 10, 0]), weight=0.5),
        RewardHead("artifact", _const([0.9, 0.2, 0.8, 0.1]), weight=0.0, floor=0.5, penalty=-5.0),
    ]
    out = CombinedReward(heads)(torch.zeros(4, 3, 8, 8), ["p"] * 4, group_ids=GROUPS, reference_images=[1, 2, 3, 4])
    assert isinstance(out, CombinedRewards)
    # weighted sum (6, 2, 8, 4) (the weight-0 gate head adds nothing), then samples 1 and 3 -> -5 - shortfall
    assert close(out.total, [6, -5.3, 8, -5.4])
    assert set(out.raw) == {"a", "b", "artifact"} and close(out.raw["artifact"], [0.9, 0.2, 0.8, 0.1])
    assert out.gated.tolist() == [False, True, False, True]
    assert torch.equal(seen[0]["group_ids"], GROUPS) and seen[0]["reference_images"] == [1, 2, 3, 4]
    metrics = out.metrics()
    assert metrics["reward/total"] == pytest.approx(0.825)  # (6 - 5.3 + 8 - 5.4) / 4
    assert metrics["reward/a"] == pytest.approx(2.5) and metrics["reward/gated_frac"] == pytest.approx(0.5)


def test_combined_reward_log_tames_contributing_heads_only():
    heads = [
        RewardHead("a", _const([2, 2, 2, 2])),
        RewardHead("b", _const([0, 8, 0, 8])),
        RewardHead("c", _const([9, 11, 9, 11])),
        RewardHead("gate", _const([0, 100, 0, 100]), weight=0.0, floor=-1.0),  # never violated, not in the ratios
    ]
    out = CombinedReward(heads, log_tame=True)(torch.zeros(4, 3, 8, 8), ["p"] * 4)
    # same numbers as test_log_tame_transforms_only_the_high_spread_heads
    assert out.tamed == ("b",) and close(out.total, [11, 15.197225, 11, 15.197225])
    assert close(out.raw["b"], [0, 8, 0, 8])  # raw scores stay raw


def test_combined_reward_checks_head_outputs():
    bad = CombinedReward([RewardHead("a", _const([1.0, 2.0, 3.0]))])
    with pytest.raises(ValueError, match=r"'a' returned \(3,\); expected a tensor of shape \(4,\)"):
        bad(torch.zeros(4, 3, 8, 8), ["p"] * 4)
    with pytest.raises(ValueError, match="duplicate head keys"):
        CombinedReward([RewardHead("a", _const([1])), RewardHead("a", _const([1]))])
    with pytest.raises(ValueError, match="'total' is reserved"):
        CombinedReward([RewardHead("total", _const([1]))])
    with pytest.raises(ValueError, match="every weight is 0"):
        CombinedReward([RewardHead("a", _const([1]), weight=0.0)])
    with pytest.raises(ValueError, match="unknown normalize"):
        CombinedReward([RewardHead("a", _const([1]))], normalize="zscore")  # type: ignore[arg-type]


def test_build_combined_from_config_dicts():
    registry: Registry = Registry("reward")
    built: list[dict] = []

    @registry.register("const")
    def const(values=(0.0,), **kwargs):
        built.append({"values": values, **kwargs})
        return _const(list(values))

    combined = build_combined(
        [
            {"name": "const", "weight": 1.0, "kwargs": {"values": [1, 2, 3, 4]}},
            {"name": "const", "key": "other", "weight": 0.5, "kwargs": {"values": [10, 0, 10, 0]}},
            {"name": "const", "key": "artifact", "weight": 0, "kwargs": {"values": [0.9, 0.2, 0.8, 0.1]},
             "gate": {"floor": 0.5}},
        ],
        normalize="normalize_then_sum",
        registry=registry,
    )  # fmt: skip
    assert [h.key for h in combined.heads] == ["const", "other", "artifact"]
    out = combined(torch.zeros(4, 3, 8, 8), ["p"] * 4, group_ids=GROUPS)
    # per-group normalise-then-sum = (-0.5, 0.5, -0.5, 0.5) (test_normalize_then_sum_per_group);
    # gate to the group minimum less the shortfall: group 0 min -0.5 -> sample 1 -0.8; group 1 -> sample 3 -0.9
    assert close(out.total, [-0.5, -0.8, -0.5, -0.9])
    assert built[0] == {"values": [1, 2, 3, 4]}
    with pytest.raises(ValueError, match="duplicate head keys"):
        build_combined([{"name": "const"}, {"name": "const"}], registry=registry)
    with pytest.raises(ValueError, match="unknown keys \\['weights'\\]"):
        build_combined([{"name": "const", "weights": 1}], registry=registry)
    with pytest.raises(ValueError, match="gate takes 'floor'"):
        build_combined([{"name": "const", "gate": {"penalty": 1}}], registry=registry)
    with pytest.raises(ValueError, match="unknown reward 'nope'; valid: const"):
        build_combined([{"name": "nope"}], registry=registry)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "brightness", "weight": float("nan")}, "weight must be a finite number"),
        ({"name": "brightness", "weight": None}, "weight must be a finite number"),
        ({"name": "brightness", "weight": "abc"}, "weight must be a finite number"),
        ({"name": "brightness", "kwargs": [1]}, "kwargs must be a mapping"),
        ({"name": "brightness", "gate": 0.5}, "gate must be a mapping"),
        ({"name": ["brightness"]}, "name must be a registered reward name"),
        ({"name": "brightness", "gate": {"floor": float("inf")}}, "gate floor must be a finite number"),
        ({"kwargs": {}}, "must be a mapping with a 'name'"),
    ],
)
def test_bad_reward_specs_are_named(entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_combined([entry])
