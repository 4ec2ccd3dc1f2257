"""Credit assignment: rewards -> per-step rewards -> per-step, per-group advantages.

Pure tensor functions (no config objects, no I/O). Shape letters: B samples (= P prompts x G images),
n trained (SDE) steps of the window, k = 0..n-1 a trained step. `step_rewards[:, k]` is R_k:

- R_0 the reward of the pure-ODE image from the trajectory's own initial noise,
- R_k (1 <= k < n) the reward after k SDE steps finished deterministically with the current policy,
- R_n the reward of the rollout's final image.

Three credit rules, registered in `CREDIT` (a new rule is one registered function):

- "outcome" (Flow-GRPO, arXiv 2505.05470 Sec. 4.1): every step gets the final reward; the advantage is
  the group z-score `A = (R - mean_group R) / (std + eps)`, clipped to +-clip.
- "incremental" (TP-GRPO, arXiv 2602.06422): step k gets `d_k = R_{k+1} - R_k`.
- "turning_point" (TP-GRPO): like "incremental", but a turning point k gets the long-term reward
  `R_n - R_k`, optionally balanced between trajectories whose trend G = R_n - R_0 is positive / negative.

Step-level advantages are z-scores per step index and per prompt group (TP-GRPO), with the same eps
and clip as Flow-GRPO. All standard deviations are population std (ddof = 0), the convention of both
papers' code (`np.std` / `torch.std(unbiased=False)`): a group of G images is the whole population
the sample is compared with, not a sample of a larger one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.registry import Registry

__all__ = [
    "CREDIT",
    "CreditOutput",
    "assign_credit",
    "balance_turning_points",
    "credit_stats",
    "group_advantages",
    "incremental_rewards",
    "outcome_step_rewards",
    "step_group_advantages",
    "turning_point_rewards",
    "zero_variance_fraction",
]

STD_SCOPES = ("group", "batch")
BALANCE_MODES = ("none", "batch", "group", "global")
BALANCE_KEYS = ("abs_G", "abs_r")


@dataclass(frozen=True)
class CreditOutput:
    """What the credit stage hands to the loss."""

    advantages: Tensor  # [B, n] clipped z-scores of `step_rewards_used`; 0 in zero-variance groups
    step_rewards_used: Tensor  # [B, n] r: the per-step reward the advantages were computed from
    turning: Tensor  # [B, n] bool: steps whose reward is the long-term R_n - R_k (after balancing)
    keep: Tensor  # [B] bool: False for samples whose advantages are all zero (drop them)
    trend: Tensor | None = None  # [B] G = R_n - R_0; None for "outcome" credit (no R_0 exists)


# --------------------------------------------------------------------------- validation helpers


def _float(x: Tensor) -> Tensor:
    """At least fp32 (integer / half inputs are promoted; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; fix the reward function before assigning credit")


def _check_group_ids(group_ids: Tensor, batch: int, name: str = "group_ids") -> None:
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (one id per row), got {group_ids.dtype}")


def _check_eps_clip(eps: float, clip: float) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (use float('inf') for no clipping), got {clip}")


def _check_step_rewards(step_rewards: Tensor) -> None:
    if step_rewards.dim() != 2 or step_rewards.shape[1] < 2:
        raise ValueError(
            f"step_rewards must have shape [B, n+1] with n >= 1 (R_0 .. R_n), got {tuple(step_rewards.shape)}"
        )


# --------------------------------------------------------------------------- group statistics


def _group_zscores(x: Tensor, group_ids: Tensor, std_scope: str, eps: float, clip: float) -> Tensor:
    """Column-wise group z-scores of x [B, m]: (x - mean_group) / (std + eps), clipped to +-clip.

    Groups whose values in a column are all equal get exactly 0 there (not a float-rounding residue
    divided by eps, which could reach +-clip), so `keep` can drop them reliably.
    """
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] group index 0..U-1
    num_groups = int(inv.max()) + 1
    m = x.shape[1]
    counts = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(
        0, inv, torch.ones_like(x[:, 0])
    )  # [U]
    sums = torch.zeros(num_groups, m, dtype=x.dtype, device=x.device).index_add_(0, inv, x)  # [U, m]
    mean = sums / counts[:, None]
    idx = inv[:, None].expand_as(x)
    hi = torch.zeros(num_groups, m, dtype=x.dtype, device=x.device).scatter_reduce(
        0, idx, x, "amax", include_self=False
    )
    lo = torch.zeros(num_groups, m, dtype=x.dtype, device=x.device).scatter_reduce(
        0, idx, x, "amin", include_self=False
    )
    constant = (hi == lo)[inv]  # [B, m]
    centered = torch.where(constant, torch.zeros_like(x), x - mean[inv])
    if std_scope == "group":
        var = torch.zeros(num_groups, m, dtype=x.dtype, device=x.device).index_add_(0, inv, centered**2)
        std = (var / counts[:, None]).sqrt()[inv]  # population std (ddof = 0)
    elif std_scope == "batch":
        # Flow-GRPO's global-std option: one std over every sample of the batch (per column), ddof = 0.
        std = x.std(dim=0, correction=0, keepdim=True)
    else:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    return (centered / (std + eps)).clamp(-clip, clip)


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, std_scope: str = "group", eps: float = 1e-4, clip: float = 5.0
) -> Tensor:
    """Flow-GRPO advantages `A = (R - mean_group(R)) / (std + eps)`, clipped to +-clip.

    Args:
        rewards: [B] one scalar reward per sample.
        group_ids: [B] integer prompt-group id of each sample (any ids; need not be contiguous).
        std_scope: "group" (std within each prompt group) or "batch" (one std over all B samples).
        eps: added to the std (Flow-GRPO uses 1e-4).
        clip: advantages are clamped to [-clip, clip] (Flow-GRPO uses 5).

    Returns:
        [B] advantages (fp32, or fp64 for fp64 input). Population std (ddof = 0) in both scopes;
        groups whose rewards are all equal (including single-sample groups) get exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    _check_group_ids(group_ids, rewards.shape[0])
    _check_eps_clip(eps, clip)
    x = _float(rewards)
    _check_finite(x, "rewards")
    return _group_zscores(x[:, None], group_ids, std_scope, eps, clip)[:, 0]


def zero_variance_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of prompt groups whose rewards are all equal (they carry no GRPO signal).

    Args:
        rewards: [B].
        group_ids: [B] integer ids; a single-sample group counts as zero-variance.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    _check_group_ids(group_ids, rewards.shape[0])
    if rewards.shape[0] == 0:
        return 0.0
    x = _float(rewards)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    hi = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amax", include_self=False)
    lo = torch.zeros(len(uniq), dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amin", include_self=False)
    return float((hi == lo).float().mean())


def step_group_advantages(
    rewards: Tensor, group_ids: Tensor, *, std_scope: str = "group", eps: float = 1e-4, clip: float = 5.0
) -> Tensor:
    """TP-GRPO step-level advantages: per step index k and per prompt group,
    `A[i, k] = (r[i, k] - mean_group r[., k]) / (std_group(ddof=0) r[., k] + eps)`, clipped to +-clip.

    Args:
        rewards: [B, n] per-step rewards r.
        group_ids: [B] integer prompt-group ids.
        std_scope: "group" (TP-GRPO) or "batch" (std over all B samples at step k, as Flow-GRPO's option).
        eps, clip: as in `group_advantages`.

    Returns:
        [B, n]; exactly 0 where a group's r[., k] are all equal.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, n], got {tuple(rewards.shape)}")
    _check_group_ids(group_ids, rewards.shape[0])
    _check_eps_clip(eps, clip)
    x = _float(rewards)
    _check_finite(x, "rewards")
    return _group_zscores(x, group_ids, std_scope, eps, clip)


# --------------------------------------------------------------------------- per-step rewards


def outcome_step_rewards(final_rewards: Tensor, n: int) -> Tensor:
    """Flow-GRPO: the outcome reward broadcast to every trained step. [B] -> [B, n]."""
    if final_rewards.dim() != 1:
        raise ValueError(f"final_rewards must have shape [B], got {tuple(final_rewards.shape)}")
    if n < 1:
        raise ValueError(f"n (number of trained steps) must be >= 1, got {n}")
    return _float(final_rewards)[:, None].expand(-1, n).clone()


def incremental_rewards(step_rewards: Tensor) -> Tensor:
    """TP-GRPO incremental rewards `d_k = R_{k+1} - R_k`. [B, n+1] -> [B, n]; sum over k is G = R_n - R_0."""
    _check_step_rewards(step_rewards)
    x = _float(step_rewards)
    return x[:, 1:] - x[:, :-1]


def turning_point_rewards(
    step_rewards: Tensor, *, constrained: bool = True, first_step: bool = True
) -> tuple[Tensor, Tensor]:
    """TP-GRPO per-step rewards with turning points (ALGORITHMS.md Sec. 3, arXiv 2602.06422).

    With `d_k = R_{k+1} - R_k`, `G = R_n - R_0`, `s_k = sign(d_k) * sign(G)` (sign(0) = 0), step k is a
    turning point when
      - constrained (paper default), k >= 1: `s_{k-1} < 0 and s_k > 0 and sign(d_k)*sign(R_n - R_{k+1}) > 0`;
        k = 0 (first-step rule): `sign(d_0)*sign(R_n - R_1) > 0`;
      - unconstrained, k >= 1: `s_{k-1} < 0 and s_k > 0`; k = 0 (first-step rule): `s_0 > 0`;
    with `first_step=False`, k = 0 is never a turning point. A turning point gets `r_k = R_n - R_k`,
    every other step `r_k = d_k`.

    "(replacing d_k, when non-zero)": a turning point must actually replace a non-zero increment with
    another, non-zero long-term reward, so `d_k != 0`, `R_n - R_k != 0` and `R_n - R_{k+1} != 0` (else
    r_k = d_k) are required. Every definition above already implies `d_k != 0` (it has a sign(d_k)
    factor), and the constrained ones imply the other two (`R_n - R_k = d_k + (R_n - R_{k+1})`, two
    non-zero terms of one sign); the guard only bites in the unconstrained rules when the trajectory ends
    exactly at R_k or R_{k+1}: that step keeps d_k and is not flagged (the TP-GRPO code counts it, and it
    would take a balancing slot while changing nothing). So `turning` marks exactly the steps where
    r != d, and `sum(r) - G == sum over turning k of (R_n - R_{k+1})` holds.

    Consequences (tested): G = 0 gives no turning point (s_k = 0; for the constrained k = 0 rule
    R_n - R_1 = -d_0); the constrained last step is never one (R_n - R_n = 0); a constrained turning
    point's r has the sign of d_k and of G and |r| > |d_k|.

    Args:
        step_rewards: [B, n+1] R_0 .. R_n.
        constrained: use the constrained definition (default) or the unconstrained variant.
        first_step: apply the k = 0 first-step rule (default on).

    Returns:
        r [B, n] (fp32, or fp64 for fp64 input) and turning [B, n] bool.
    """
    _check_step_rewards(step_rewards)
    R = _float(step_rewards)
    _check_finite(R, "step_rewards")
    d = R[:, 1:] - R[:, :-1]  # [B, n] d_k
    G = R[:, -1] - R[:, 0]  # [B]
    s = d.sign() * G.sign()[:, None]  # [B, n] s_k
    to_end = R[:, -1:] - R[:, :-1]  # [B, n] R_n - R_k (the long-term reward)
    after = R[:, -1:] - R[:, 1:]  # [B, n] R_n - R_{k+1} (what happens after step k)
    consistent = d.sign() * after.sign() > 0  # later evolution keeps step k's direction

    turning = torch.zeros_like(d, dtype=torch.bool)
    flip = (s[:, :-1] < 0) & (s[:, 1:] > 0)  # [B, n-1] for k = 1..n-1: trend flips back to G's sign
    turning[:, 1:] = (flip & consistent[:, 1:]) if constrained else flip
    if first_step:
        # Constrained k = 0: sign(d_0)*sign(R_n - R_1) > 0, which implies s_0 > 0 (G = d_0 + (R_n - R_1)
        # has their common sign); `s_0 > 0` is spelled out so float rounding can never break that.
        turning[:, 0] = ((s[:, 0] > 0) & consistent[:, 0]) if constrained else (s[:, 0] > 0)
    turning &= (d != 0) & (to_end != 0) & (after != 0)  # a turning point changes its step's reward
    r = torch.where(turning, to_end, d)
    return r, turning


def balance_turning_points(
    step_rewards: Tensor,
    rewards: Tensor,
    turning: Tensor,
    scope_ids: Tensor | None = None,
    key: str = "abs_G",
) -> tuple[Tensor, Tensor]:
    """TP-GRPO balancing: keep equally many turning points of positive and negative trend G per scope.

    Within each scope (rows sharing a `scope_ids` value; None = all rows one scope) the turning
    points are split by sign(G) of their trajectory. If both signs occur, m = min(#pos, #neg) of
    each sign are kept, those with the largest key, and the rest revert to `d_k` (and are no longer
    flagged). If only one sign occurs, nothing changes.

    Counting is **per turning point**, not per trajectory: balancing exists to even out how many
    long-term rewards of each sign enter the step-level normalisation, and a trajectory can hold
    several turning points (which, with key "abs_G", tie with each other). Ties are broken
    deterministically by position: lower row first, then lower step index (a stable sort on the
    row-major order).

    Args:
        step_rewards: [B, n+1] R_0 .. R_n (for G and d_k).
        rewards: [B, n] r from `turning_point_rewards`.
        turning: [B, n] bool turning-point mask from `turning_point_rewards`.
        scope_ids: [B] integer scope of each row, or None for one scope.
        key: "abs_G" (|R_n - R_0| of the trajectory, the paper's choice) or "abs_r" (the turning
            point's own |r_k| = |R_n - R_k|).

    Returns:
        New (rewards, turning) tensors; the inputs are not modified.
    """
    _check_step_rewards(step_rewards)
    B, n = step_rewards.shape[0], step_rewards.shape[1] - 1
    if rewards.shape != (B, n) or turning.shape != (B, n):
        raise ValueError(
            f"rewards and turning must have shape [B, n] = [{B}, {n}] to match step_rewards [B, n+1], "
            f"got {tuple(rewards.shape)} and {tuple(turning.shape)}"
        )
    if turning.dtype != torch.bool:
        raise ValueError(f"turning must be a bool mask, got {turning.dtype}")
    if key not in BALANCE_KEYS:
        raise ValueError(f"balance key must be one of {BALANCE_KEYS}, got {key!r}")
    if scope_ids is not None:
        _check_group_ids(scope_ids, B, "scope_ids")

    R = _float(step_rewards)
    d = R[:, 1:] - R[:, :-1]
    G = R[:, -1] - R[:, 0]
    rows, steps = turning.nonzero(as_tuple=True)  # row-major order: the tie-break order
    if rows.numel() == 0:
        return rewards.clone(), turning.clone()
    sign = G[rows].sign()
    if bool((sign == 0).any()):
        raise ValueError(
            "a turning point lies on a trajectory with G = R_n - R_0 = 0; turning_point_rewards never "
            "produces one, so the turning mask does not match step_rewards"
        )
    score = G[rows].abs() if key == "abs_G" else rewards[rows, steps].abs()
    scope = torch.zeros_like(rows) if scope_ids is None else scope_ids[rows]

    revert = torch.zeros(rows.numel(), dtype=torch.bool)
    sign_l, score_l, scope_l = sign.tolist(), score.tolist(), scope.tolist()
    for u in sorted(set(scope_l)):
        pos = [j for j in range(len(scope_l)) if scope_l[j] == u and sign_l[j] > 0]
        neg = [j for j in range(len(scope_l)) if scope_l[j] == u and sign_l[j] < 0]
        m = min(len(pos), len(neg))
        if m == 0:
            continue  # one sign only: unchanged
        for side in (pos, neg):
            ranked = sorted(side, key=lambda j: (-score_l[j], j))  # largest key first, then position
            for j in ranked[m:]:
                revert[j] = True

    out_r, out_t = rewards.clone(), turning.clone()
    rr, ss = rows[revert.to(rows.device)], steps[revert.to(rows.device)]
    out_r[rr, ss] = d[rr, ss].to(out_r.dtype)
    out_t[rr, ss] = False
    return out_r, out_t


# --------------------------------------------------------------------------- registered credit rules

CreditRule = Callable[..., CreditOutput]
CREDIT: Registry[CreditRule] = Registry("credit rule")


def _finish(
    r: Tensor, turning: Tensor, trend: Tensor | None, group_ids: Tensor, std_scope: str, eps: float, clip: float
) -> CreditOutput:
    adv = step_group_advantages(r, group_ids, std_scope=std_scope, eps=eps, clip=clip)
    return CreditOutput(advantages=adv, step_rewards_used=r, turning=turning, keep=(adv != 0).any(dim=1), trend=trend)


def _need_step_rewards(step_rewards: Tensor | None, rule: str, n: int) -> Tensor:
    if step_rewards is None:
        raise ValueError(
            f"credit={rule!r} needs step_rewards [B, n+1] (R_0 .. R_n from the step-reward pass); "
            "pass them or use credit='outcome'"
        )
    _check_step_rewards(step_rewards)
    if step_rewards.shape[1] != n + 1:
        raise ValueError(f"step_rewards must have n+1 = {n + 1} columns (R_0 .. R_n), got {step_rewards.shape[1]}")
    return step_rewards


@CREDIT.register("outcome")
def outcome_credit(
    step_rewards: Tensor | None,
    final_rewards: Tensor,
    group_ids: Tensor,
    *,
    n: int,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
    **_: object,
) -> CreditOutput:
    """Flow-GRPO: every step's advantage is the sample's outcome advantage. `step_rewards` is ignored."""
    r = outcome_step_rewards(final_rewards, n)
    adv = group_advantages(final_rewards, group_ids, std_scope=std_scope, eps=eps, clip=clip)[:, None].expand(-1, n)
    adv = adv.clone()
    return CreditOutput(
        advantages=adv,
        step_rewards_used=r,
        turning=torch.zeros_like(r, dtype=torch.bool),
        keep=(adv != 0).any(dim=1),
    )


@CREDIT.register("incremental")
def incremental_credit(
    step_rewards: Tensor | None,
    final_rewards: Tensor,
    group_ids: Tensor,
    *,
    n: int,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
    **_: object,
) -> CreditOutput:
    """TP-GRPO without turning points: r_k = d_k, step-level group advantages."""
    step_rewards = _need_step_rewards(step_rewards, "incremental", n)
    r = incremental_rewards(step_rewards)
    R = _float(step_rewards)
    return _finish(r, torch.zeros_like(r, dtype=torch.bool), R[:, -1] - R[:, 0], group_ids, std_scope, eps, clip)


@CREDIT.register("turning_point")
def turning_point_credit(
    step_rewards: Tensor | None,
    final_rewards: Tensor,
    group_ids: Tensor,
    *,
    n: int,
    constrained: bool = True,
    first_step: bool = True,
    balance: str = "none",
    balance_key: str = "abs_G",
    scope_ids: Tensor | None = None,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
    **_: object,
) -> CreditOutput:
    """TP-GRPO: turning-point rewards, optional balancing, step-level group advantages."""
    step_rewards = _need_step_rewards(step_rewards, "turning_point", n)
    r, turning = turning_point_rewards(step_rewards, constrained=constrained, first_step=first_step)
    if balance != "none":
        if balance == "group":
            scope = group_ids
            if scope_ids is not None:  # group ids may repeat across gathered processes: refine by scope
                scope = torch.unique(torch.stack([scope_ids, group_ids], dim=1), dim=0, return_inverse=True)[1]
        elif balance == "batch":  # the passed rows, or one scope per scope_ids value (e.g. each row's process)
            scope = scope_ids
        else:  # "global": every passed row in one scope, whatever process each came from
            scope = None
        r, turning = balance_turning_points(step_rewards, r, turning, scope_ids=scope, key=balance_key)
    R = _float(step_rewards)
    return _finish(r, turning, R[:, -1] - R[:, 0], group_ids, std_scope, eps, clip)


def assign_credit(
    step_rewards: Tensor | None,
    final_rewards: Tensor,
    group_ids: Tensor,
    *,
    credit: str = "outcome",
    n: int,
    constrained: bool = True,
    first_step: bool = True,
    balance: str = "none",
    balance_key: str = "abs_G",
    scope_ids: Tensor | None = None,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
) -> CreditOutput:
    """The trainer's entry point: per-step rewards and advantages for one batch.

    Args:
        step_rewards: [B, n+1] R_0 .. R_n, or None (allowed only for credit="outcome"). Step-level
            rules read R_n from here; `final_rewards` is used by "outcome" only.
        final_rewards: [B] outcome reward of each rollout.
        group_ids: [B] integer prompt-group ids (advantages are normalised within a group).
        credit: a name registered in `CREDIT`: "outcome" | "incremental" | "turning_point".
        n: number of trained steps (advantage columns).
        constrained, first_step: turning-point definition (see `turning_point_rewards`).
        balance: turning-point balancing scope (ignored by rules without turning points):
            "none"; "batch" = the rows passed in form one scope, or one scope per `scope_ids` value
            (e.g. the process rank of each row when the caller gathered several processes' batches,
            the TP-GRPO code's per-process sampling batch); "group" = one scope per prompt group
            (refined by `scope_ids` when given, so per-process group ids can repeat); "global" = one
            scope over every row passed (`scope_ids` ignored): the caller must pass all processes' rows.
            On one process "global" and "batch" coincide; this pure function never communicates.
        balance_key: "abs_G" (paper) or "abs_r" (see `balance_turning_points`).
        scope_ids: [B] integer balancing scopes, or None.
        std_scope: "group" | "batch" std for the advantage normalisation.
        eps, clip: normalisation epsilon and advantage clip.

    Returns:
        CreditOutput with advantages [B, n], step_rewards_used [B, n], turning [B, n], keep [B].
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
    if balance_key not in BALANCE_KEYS:
        raise ValueError(f"balance_key must be one of {BALANCE_KEYS}, got {balance_key!r}")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    if n < 1:
        raise ValueError(f"n (number of trained steps) must be >= 1, got {n}")
    if final_rewards.dim() != 1:
        raise ValueError(f"final_rewards must have shape [B], got {tuple(final_rewards.shape)}")
    _check_group_ids(group_ids, final_rewards.shape[0])
    if step_rewards is not None and step_rewards.shape[0] != final_rewards.shape[0]:
        raise ValueError(
            f"step_rewards has {step_rewards.shape[0]} rows but final_rewards has {final_rewards.shape[0]}"
        )
    if scope_ids is not None:
        _check_group_ids(scope_ids, final_rewards.shape[0], "scope_ids")
    rule = CREDIT.get(credit)
    return rule(
        step_rewards,
        final_rewards,
        group_ids,
        n=n,
        constrained=constrained,
        first_step=first_step,
        balance=balance,
        balance_key=balance_key,
        scope_ids=scope_ids,
        std_scope=std_scope,
        eps=eps,
        clip=clip,
    )


def credit_stats(out: CreditOutput) -> dict[str, float]:
    """Scalars for the metrics log (`train/credit/...`).

    Mean |r| over an empty set is reported as 0.0 (the matching count says it is empty).
    """
    turning = out.turning
    abs_r = out.step_rewards_used.abs()
    num_tp = int(turning.sum())
    num_ord = turning.numel() - num_tp
    if out.trend is not None and num_tp > 0:
        tp_sign = out.trend.sign()[:, None].expand_as(turning)[turning]
        pos, neg = int((tp_sign > 0).sum()), int((tp_sign < 0).sum())
    else:
        pos = neg = 0
    return {
        "train/credit/turning_points": float(num_tp),
        "train/credit/turning_pos_G": float(pos),
        "train/credit/turning_neg_G": float(neg),
        "train/credit/trajectories_with_turning": float(turning.any(dim=1).sum()),
        "train/credit/abs_r_turning": float(abs_r[turning].mean()) if num_tp else 0.0,
        "train/credit/abs_r_ordinary": float(abs_r[~turning].mean()) if num_ord else 0.0,
        "train/credit/keep_frac": float(out.keep.float().mean()) if out.keep.numel() else 0.0,
    }
