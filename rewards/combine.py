"""Several reward heads -> one reward for the credit stage, keeping every head's raw score for logging.

ALGORITHMS.md section 4, "Aggregation". With raw head scores `r_k [B]` and weights `w_k`, in this order:

1. **Log-taming** (PaCo-RL; optional, `log_tame=True`). For each head, over the batch,
   `rho_k = std(r_k) / (|mean(r_k)| + eps)` (population std), the head's relative spread. Heads whose
   `rho_k` is strictly greater than the mean of all `rho_j` are replaced by `log(1 + r_k)` before weighting,
   so one high-variance head cannot drown the others; the rest pass unchanged. `log(1 + r)` is what
   PaCo-RL defines for its non-negative rewards; for r < 0 we use `-log(1 - r)` (i.e. `sign(r) * log(1 + |r|)`),
   so the transform stays defined and monotonic for any head. With one head (or equal ratios) nothing
   is tamed.
2. **Combination** (`normalize`):
   - `"sum"`: `total = sum_k w_k r_k`.
   - `"sum_then_normalize"`: `total = z(sum_k w_k r_k)` (weighted sum, then one normalisation).
   - `"normalize_then_sum"`: `total = sum_k w_k z(r_k)` (each head normalised first; DanceGRPO, MixGRPO), so
     heads on different scales (PickScore ~20, CLIP ~0.3) count by their weights only.
   `z(x) = (x - mean) / (std + eps)` with the population std, over each sample's group when `group_ids`
   is given (the G samples of one prompt), else over the batch.
3. **Gates** (constraints). A head with a `floor` turns into a constraint on its raw score: samples with
   `r_k < floor` get `total = base - (floor - r_k)`, where `base` is the penalty when one is set, else the
   minimum total of their group (the batch without `group_ids`). So a sample that breaks the constraint is
   below the worst sample, and violators rank by how far they fall short: a group where every sample breaks
   it still has a gradient, towards the floor. A gate head may have weight 0 (constraint only). Gates apply
   to the final total. A fixed penalty must lie below every total the combination can reach (a z-scored total
   can fall below -1), else a violator can outrank a sample that passes: the group minimum has no such catch.

`CombinedReward` returns `CombinedRewards(total, raw)`: `raw` holds every head's score before taming,
weighting and gating, for `reward/<head>` logs. Pareto selection (Parrot) is not implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from flowalign.registry import Registry
from rewards.base import REWARDS, RewardFn

Normalize = Literal["sum", "sum_then_normalize", "normalize_then_sum"]
NORMALIZE_MODES = ("sum", "sum_then_normalize", "normalize_then_sum")


@dataclass(frozen=True)
class CombinedRewards:
    """The combined reward of a batch and every head's raw score."""

    total: Tensor  # [B] fp32, what the credit stage turns into advantages
    raw: dict[str, Tensor]  # head key -> [B] fp32, the head's own score (before taming / weights / gates)
    tamed: tuple[str, ...] = ()  # heads log-tamed in this batch (PaCo-RL)
    gated: Tensor | None = None  # [B] bool: samples that broke at least one gate; None without gates

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Batch means for logging: `reward/total`, `reward/<head>`, `reward/<head>_std`, `reward/gated_frac`."""
        out = {f"{prefix}/total": float(self.total.detach().float().mean())}
        for key, value in self.raw.items():
            value = value.detach().float()
            out[f"{prefix}/{key}"] = float(value.mean())
            out[f"{prefix}/{key}_std"] = float(value.std(unbiased=False)) if value.numel() > 1 else 0.0
        if self.gated is not None:
            out[f"{prefix}/gated_frac"] = float(self.gated.float().mean())
        return out


# ---- pure numerics -----------------------------------------------------------------------------------------
def _group_index(group_ids: Tensor | Sequence[Any] | None, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Group index in [0, G) per sample and G; one group when `group_ids` is None."""
    if group_ids is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    if not isinstance(group_ids, Tensor):
        # any hashable ids (ints, prompt strings): number them in order of first appearance
        order: dict[Any, int] = {}
        group_ids = torch.tensor([order.setdefault(g, len(order)) for g in group_ids], dtype=torch.long)
    group_ids = group_ids.to(device).reshape(-1)
    if group_ids.numel() != n:
        raise ValueError(f"group_ids has {group_ids.numel()} entries for {n} samples")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def zscore(x: Tensor, group_ids: Tensor | Sequence[Any] | None = None, eps: float = 1e-6) -> Tensor:
    """`(x - mean) / (std + eps)` per group (population std); over the whole batch when `group_ids` is None.

    Args:
        x: `[B]` scores.
        group_ids: `[B]` group of each sample (tensor or any hashable ids), or None.
    Returns:
        `[B]` fp32; a group of one sample (std 0) gives 0.
    """
    x = x.float().reshape(-1)
    idx, n_groups = _group_index(group_ids, x.numel(), x.device)
    count = torch.zeros(n_groups, device=x.device).index_add_(0, idx, torch.ones_like(x))
    mean = torch.zeros(n_groups, device=x.device).index_add(0, idx, x) / count
    centered = x - mean[idx]
    var = torch.zeros(n_groups, device=x.device).index_add(0, idx, centered**2) / count
    return centered / (var.sqrt()[idx] + eps)


def signed_log1p(x: Tensor) -> Tensor:
    """`log(1 + x)` for x >= 0, mirrored (`-log(1 - x)`) for x < 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def log_tame(raw: Mapping[str, Tensor], eps: float = 1e-6) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """PaCo-RL log-taming: heads whose batch `std / |mean|` exceeds the mean ratio become `log(1 + r)`.

    Returns the (partly) transformed scores and the keys that were tamed.
    """
    if len(raw) < 2:
        return {k: v.float() for k, v in raw.items()}, ()
    ratios = {
        k: float(v.detach().float().std(unbiased=False) / (v.detach().float().mean().abs() + eps))
        for k, v in raw.items()
    }
    threshold = sum(ratios.values()) / len(ratios)
    tamed = tuple(k for k, rho in ratios.items() if rho > threshold)
    return {k: signed_log1p(v.float()) if k in tamed else v.float() for k, v in raw.items()}, tamed


def combine(
    scores: Mapping[str, Tensor],
    weights: Mapping[str, float],
    *,
    normalize: Normalize = "sum",
    group_ids: Tensor | Sequence[Any] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Weighted combination of head scores `[B]` (see the module doc for the three modes). Returns `[B]` fp32."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZE_MODES)}")
    if not scores:
        raise ValueError("combine: no reward heads")
    missing = set(scores) - set(weights)
    if missing:
        raise ValueError(f"combine: no weight for {sorted(missing)}")
    terms = []
    for key, value in scores.items():
        value = value.float()
        if normalize == "normalize_then_sum":
            value = zscore(value, group_ids, eps)
        terms.append(weights[key] * value)
    total = torch.stack(terms).sum(0)
    if normalize == "sum_then_normalize":
        total = zscore(total, group_ids, eps)
    return total


def apply_gate(
    total: Tensor,
    score: Tensor,
    floor: float,
    *,
    penalty: float | None = None,
    group_ids: Tensor | Sequence[Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Turns `score >= floor` into a constraint on `total`.

    Args:
        total: `[B]` combined reward.
        score: `[B]` the gate head's raw score.
        floor: samples with `score < floor` violate the constraint.
        penalty: the base of their new total, `base - (floor - score)`; None = the minimum total of their group
            (batch without `group_ids`).
    Returns:
        the gated total `[B]` and the violation mask `[B]` bool.
    """
    total = total.float()
    violated = score.detach().reshape(-1).to(total.device) < floor
    if penalty is not None:
        replacement = torch.full_like(total, float(penalty))
    else:
        idx, n_groups = _group_index(group_ids, total.numel(), total.device)
        group_min = torch.full((n_groups,), float("inf"), device=total.device)
        group_min = group_min.scatter_reduce(0, idx, total, reduce="amin", include_self=True)
        replacement = group_min[idx]
    shortfall = (floor - score.detach().reshape(-1).to(total.device).float()).clamp_min(0)
    return torch.where(violated, replacement - shortfall, total), violated


# ---- the combined reward -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardHead:
    """One head of a combined reward."""

    key: str  # log name, unique within the combination (reward/<key>)
    fn: RewardFn  # (images, prompts, **columns) -> [B]
    weight: float = 1.0
    floor: float | None = None  # gate: raw score must be >= floor
    penalty: float | None = None  # gate: total for violators; None = group minimum
    kwargs: dict[str, Any] = field(default_factory=dict)  # how it was built (for logs / resolved configs)


class CombinedReward:
    """Scores a batch with every head and combines them (see the module doc).

    Call as `combined(images [B,3,H,W], prompts, group_ids=None, **columns) -> CombinedRewards`. Columns and
    `group_ids` are forwarded to every head (the pairwise judge uses `group_ids`).
    """

    def __init__(
        self,
        heads: Sequence[RewardHead],
        *,
        normalize: Normalize = "sum",
        log_tame: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if not heads:
            raise ValueError("CombinedReward: needs at least one head")
        keys = [h.key for h in heads]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"CombinedReward: duplicate head keys {duplicates}; give each a distinct 'key'")
        if "total" in keys:
            raise ValueError(
                "CombinedReward: 'total' is reserved for the combined reward; give the head another 'key'"
            )
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZE_MODES)}")
        if all(h.weight == 0 for h in heads):
            raise ValueError("CombinedReward: every weight is 0; at least one head must contribute")
        self.heads = tuple(heads)
        self.normalize: Normalize = normalize
        self.log_tame = log_tame
        self.eps = eps

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        *,
        group_ids: Tensor | Sequence[Any] | None = None,
        **columns: Any,
    ) -> CombinedRewards:
        n = images.shape[0]
        if group_ids is not None:
            columns["group_ids"] = group_ids
        raw: dict[str, Tensor] = {}
        for head in self.heads:
            score = head.fn(images, prompts, **columns)
            if not isinstance(score, Tensor) or score.shape != (n,):
                shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
                raise ValueError(f"reward head {head.key!r} returned {shape}; expected a tensor of shape ({n},)")
            raw[head.key] = score.float().to(images.device)
        contributing = {h.key: raw[h.key] for h in self.heads if h.weight != 0}
        tamed: tuple[str, ...] = ()
        if self.log_tame:
            contributing, tamed = log_tame(contributing, self.eps)
        weights = {h.key: h.weight for h in self.heads}
        total = combine(contributing, weights, normalize=self.normalize, group_ids=group_ids, eps=self.eps)
        gated = None
        for head in self.heads:
            if head.floor is not None:
                total, violated = apply_gate(
                    total, raw[head.key], head.floor, penalty=head.penalty, group_ids=group_ids
                )
                gated = violated if gated is None else gated | violated
        return CombinedRewards(total=total, raw=raw, tamed=tamed, gated=gated)


_SPEC_KEYS = {"name", "weight", "kwargs", "key", "gate"}


def _finite(value: Any, what: str) -> float:
    """A config number, refusing text, null, bool, NaN and infinities with the field named."""
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def build_combined(
    spec: Sequence[Mapping[str, Any]],
    *,
    normalize: Normalize = "sum",
    log_tame: bool = False,
    eps: float = 1e-6,
    registry: Registry = REWARDS,
) -> CombinedReward:
    """Builds a `CombinedReward` from config dicts, each head by its registered name.

    Example:
        build_combined([
            {"name": "pickscore", "weight": 1.0},
            {"name": "clip_score", "weight": 0.5, "kwargs": {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}},
            {"name": "artifact_head", "weight": 0.0, "kwargs": {"head": "HEAD.safetensors"},
             "gate": {"floor": 0.5}},
        ], normalize="normalize_then_sum")

    Entry keys: `name` (registered reward), `weight` (default 1), `kwargs` (for the factory), `key` (log name;
    default `name`, needed when one reward appears twice), `gate` (`{"floor": f, "penalty": p | None}`).
    """
    heads = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ValueError(f"reward spec #{i} must be a mapping with a 'name'; got {entry!r}")
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise ValueError(
                f"reward spec #{i} ({entry['name']}): unknown keys {sorted(unknown)}; valid: "
                f"{', '.join(sorted(_SPEC_KEYS))}"
            )
        where = f"reward spec #{i} ({entry['name']!r})"
        if not isinstance(entry["name"], str):
            raise ValueError(f"{where}: name must be a registered reward name (text)")
        for part in ("kwargs", "gate"):
            if entry.get(part) is not None and not isinstance(entry[part], Mapping):
                raise ValueError(f"{where}: {part} must be a mapping, got {entry[part]!r}")
        kwargs = dict(entry.get("kwargs") or {})
        gate = dict(entry.get("gate") or {})
        if set(gate) - {"floor", "penalty"} or (gate and "floor" not in gate):
            raise ValueError(f"{where}: gate takes 'floor' (required) and 'penalty'")
        weight = _finite(entry.get("weight", 1.0), f"{where}: weight")
        floor = None if "floor" not in gate else _finite(gate["floor"], f"{where}: gate floor")
        penalty = None if gate.get("penalty") is None else _finite(gate["penalty"], f"{where}: gate penalty")
        fn = registry.get(entry["name"])(**kwargs)
        heads.append(
            RewardHead(
                key=str(entry.get("key") or entry["name"]),
                fn=fn,
                weight=weight,
                floor=floor,
                penalty=penalty,
                kwargs=kwargs,
            )
        )
    return CombinedReward(heads, normalize=normalize, log_tame=log_tame, eps=eps)
