"""GRPOTrainer: sample -> score -> assign credit -> clipped policy update, with exact resume.

A linear loop (cleanrl style). Sampling noise, prompt choice and minibatch order are drawn from
generators seeded by (seed, step, rank), so a resumed run replays exactly what an uninterrupted one does;
the only carried state is weights, optimizer, LR schedule, EMA and the step counter.
Groups are sampled on one process, so group statistics need no cross-rank gather; metrics and gradients do.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

from flowalign import credit as credit_lib
from flowalign.config import TrainConfig, load_run_config, to_yaml
from flowalign.lora_window import limit_lora
from flowalign.losses import policy_step_loss
from flowalign.samplers.rollout import (
    noise_stds,
    replay_step,
    rollout,
    sde_window,
    sliding_window_start,
    window_starts,
)
from flowalign.samplers.sde import kl_step_std
from flowalign.samplers.step_rewards import step_rewards
from flowalign.types import FlowAdapter, Trajectory

logger = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward returned NaN/inf or the wrong shape; training stops, the last checkpoint stays intact."""


@dataclass(frozen=True)
class Rewards:
    """Scores of one batch: the total that drives credit, and each head's raw score for the log."""

    total: Tensor  # [B] fp32
    raw: dict[str, Tensor]  # name -> [B]


RewardCallable = Callable[..., "Tensor | Rewards"]
Evaluator = Callable[[Tensor, Sequence[str]], dict[str, float]]


def _seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python hash randomisation)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint32).astype(np.uint64) @ [1 << 31, 1])


def _can_compile(device: torch.device) -> bool:
    """torch.compile's CPU backend builds C++ with the compiler inductor finds (g++, or $CXX): without one, warn and
    stay eager rather than fail later inside the first forward pass. Asks inductor's own search, not a guess."""
    if device.type != "cpu":
        return True
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except RuntimeError as err:
        logger.warning("compile: %s; running eager (~12%% slower steps on CPU; install g++ or set CXX)", err)
        return False
    return True


def weights_fingerprint(module: torch.nn.Module) -> str | None:
    """A short hash of a model's weights, saved with every checkpoint: a model name cannot tell two versions of
    one model apart (the zoo's `shapes` weights changed with base v3). It hashes each tensor's name, shape and first
    64 values rounded to bf16 (so an fp32 and a bf16 load of one checkpoint agree): cheap at any size, and two
    trainings or initialisations differ there. None when no tensor has values here (all offloaded)."""
    h, hashed = hashlib.sha256(), 0
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, Tensor) and not t.is_meta:
            head = t.detach().reshape(-1)[:64].to(torch.bfloat16).float().cpu().numpy()
            h.update(f"{name}{tuple(t.shape)}".encode() + head.tobytes())
            hashed += 1
    return h.hexdigest()[:16] if hashed else None


# Checkpoints saved before fingerprints: every `shapes` one was trained on base v2 (or the older v1).
LEGACY_FINGERPRINTS = {"shapes": "025e495d5ae51b1d"}


def _copy_to_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` whose weights live on the CPU, made without a second copy on the accelerator: each
    parameter and buffer is copied straight to CPU memory (tied weights stay tied), the rest is deep-copied."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False))
    for b in module.buffers():
        memo.setdefault(id(b), b.detach().to("cpu", copy=True))
    return copy.deepcopy(module, memo)


def evenly_spaced(items: list, n: int) -> list:
    """`n` items spread evenly over the list (prompt sets are often grouped by category: never take a prefix); above
    the list's length it cycles, so a small held-out set can still be scored on enough images (each its own noise)."""
    if n >= len(items):
        return [items[i % len(items)] for i in range(n)] if items else []
    return [items[(i * len(items)) // n] for i in range(n)]


def checkpoint_dir(path: str | Path) -> Path:
    """Resolves a run dir, its checkpoints dir or a step dir to a step dir."""
    path = Path(path)
    for cand in (path, path / "checkpoints"):
        if (cand / "latest").exists():
            return cand / (cand / "latest").read_text().strip()
    if (path / "trainable.safetensors").exists():
        return path
    raise FileNotFoundError(
        f"no flowalign checkpoint under {path} (expected checkpoints/latest or trainable.safetensors)"
    )


def holds_run(out: str | Path) -> bool:
    """Whether `out` holds a training run (its log or checkpoints), which a fresh run there would erase."""
    return (Path(out) / "metrics.jsonl").exists() or (Path(out) / "checkpoints" / "latest").exists()


def split_log(path: Path, step: int) -> tuple[str, str]:
    """A metrics log's text up to and including `step`, and after it."""
    upto, after = [], []
    for line in path.read_text().splitlines():
        if line:
            (upto if json.loads(line).get("step", 0) <= step else after).append(line + "\n")
    return "".join(upto), "".join(after)


def make_accelerator(cfg: TrainConfig, *, track: bool = True) -> Accelerator:
    """The run's Accelerator: precision, device, and (`track`) the experiment trackers of `log_with`, started by
    `train`; a trainer that only evaluates, samples or exports a run starts none."""
    kind = (cfg.device or "").split(":")[0]
    available = {"cuda": torch.cuda.is_available, "mps": lambda: torch.backends.mps.is_available()}
    if kind in available and not available[kind]():
        raise ValueError(f"device {cfg.device!r}: no {kind} device is visible here; use device: cpu or null")
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.device == "cpu",
        log_with=(list(cfg.log_with) or None) if track else None,
        project_dir=cfg.output_dir,
    )


def check_trackers(names: Sequence[str]) -> None:
    """One clear error for a `log_with` tracker whose package is missing: accelerate would drop it silently, and a
    run meant for W&B would log only to metrics.jsonl. `build_trainer` calls it before the model loads; `train`
    again, for trainers built by hand."""
    import accelerate.utils

    from flowalign.config import TRACKERS

    missing = [n for n in names if not getattr(accelerate.utils, f"is_{n}_available", lambda: False)()]
    if missing:
        raise ValueError(
            f"log_with: {', '.join(missing)} not installed here; pip install {' '.join(TRACKERS[n] for n in missing)}"
            " or drop it from log_with (metrics.jsonl is written either way)"
        )


class GRPOTrainer:
    """Flow-GRPO / TP-GRPO on a diffusers flow pipeline through a `FlowAdapter`.

    Args:
        cfg: the run's configuration.
        adapter: built from a stock pipeline (`flowalign.adapters.adapter_for`).
        reward_fn: `(images [B,3,H,W], prompts, **columns) -> Tensor[B] | Rewards`.
        train_prompts / eval_prompts: resolved prompt lists.
        prompt_columns: per-train-prompt extras (e.g. reference images), forwarded to the reward.
        evaluator: optional `(images, prompts) -> {metric: value}` for richer eval reports (e.g. the
            shapes checker's per-category accuracy).
        reward_name: named in errors.
        keep_reference: whether a full fine-tune keeps a frozen copy of its base model for drawing base images
            (`reference_policy`); default: when it draws a before/after grid (`grid_prompts > 0`). A KL
            (`kl_beta > 0`) always keeps one. LoRA needs no copy: its base model is the adapter switched off.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        adapter: FlowAdapter,
        reward_fn: RewardCallable,
        train_prompts: Sequence[str],
        eval_prompts: Sequence[str],
        *,
        evaluator: Evaluator | None = None,
        reward_name: str = "reward",
        accelerator: Accelerator | None = None,
        prompt_columns: dict[str, list] | None = None,
        eval_columns: dict[str, list] | None = None,
        keep_reference: bool | None = None,
    ) -> None:
        cfg.validate()
        self.cfg, self.adapter, self.reward_fn = cfg, adapter, reward_fn
        self.train_prompts = list(train_prompts)
        self.evaluator, self.reward_name = evaluator, reward_name
        self.prompt_columns = dict(prompt_columns or {})
        for name, prompts, columns in (
            ("prompt", train_prompts, self.prompt_columns),
            ("eval", eval_prompts, eval_columns),
        ):
            for key, values in (columns or {}).items():
                if len(values) != len(prompts):
                    raise ValueError(f"{name} column {key!r} has {len(values)} values for {len(prompts)} prompts")
        # The evaluation prompts and their columns (e.g. DINO reference images) are picked together.
        picked = evenly_spaced(list(range(len(eval_prompts))), cfg.num_eval_prompts)
        self.eval_prompts = [eval_prompts[i] for i in picked]
        self.eval_columns = {k: [v[i] for i in picked] for k, v in (eval_columns or {}).items()}
        self.accelerator = accelerator or make_accelerator(cfg)
        self.device = self.accelerator.device
        self.out = Path(cfg.output_dir)
        self.step = 0
        # Row b of every sampled batch belongs to prompt group b // G (see `sample`).
        self.group_ids = torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.group_size)

        transformer = adapter.transformer
        transformer.requires_grad_(False)
        self.base_fingerprint = weights_fingerprint(transformer)  # before LoRA: the base weights alone
        self.ref_model: torch.nn.Module | None = None
        if cfg.lora_rank > 0:
            from peft import LoraConfig

            # PEFT draws A from the global RNG, which nothing seeds once weights load from disk: seeded here, so
            # `seed` fixes the run and every process starts from the same A (gradients are averaged, not weights).
            with torch.random.fork_rng():  # the caller's CPU and CUDA generators are left as they were
                torch.manual_seed(_seed(cfg.seed, 5))
                transformer.add_adapter(
                    LoraConfig(
                        r=cfg.lora_rank,
                        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                        init_lora_weights="gaussian",
                        target_modules=list(cfg.lora_targets),
                    )
                )
            # PEFT's gaussian init still zeros B, so the run starts exactly at the base model.
        else:
            # A full fine-tune overwrites the base weights, so the base model survives only as a frozen copy: the
            # KL's reference (beside the policy, used every step) and the before/after grid's base row (in CPU
            # memory when only the grid needs it; `reference_policy` moves it over for those few images).
            keep = cfg.grid_prompts > 0 if keep_reference is None else keep_reference
            if cfg.kl_beta > 0:
                self.ref_model = copy.deepcopy(transformer).requires_grad_(False).eval()
            elif keep:
                self.ref_model = _copy_to_cpu(transformer).requires_grad_(False).eval()
            transformer.requires_grad_(True)
        # Trainable weights in fp32 even when the frozen base is bf16: LoRA updates are tiny.
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        for p in self.params.values():
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
        )
        warm = max(cfg.warmup_steps, 0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0
        )
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if cfg.ema_decay > 0 else None
        # Steps whose Gaussian is wide enough to explore (see `TrainConfig.min_noise_std`); the others run ODE.
        sigmas = adapter.sigmas(cfg.num_steps)
        stds = noise_stds(cfg.sampler, sigmas, cfg.noise_level)
        self.explores = [bool(s >= cfg.min_noise_std) for s in stds[:-1]] + [False]
        starts = window_starts(cfg.num_steps, cfg.sde_window, cfg.sde_window_max_start) if cfg.sde_window else [0]
        size = cfg.sde_window or cfg.num_steps
        if not all(any(self.explores[s : s + size]) for s in starts):
            raise ValueError(
                f"no denoising step {'in some sde_window ' if cfg.sde_window else ''}has noise std >= "
                f"min_noise_std={cfg.min_noise_std} (stds {[round(float(s), 4) for s in stds]} with "
                f"sampler={cfg.sampler!r}, noise_level={cfg.noise_level}); raise noise_level, move the window "
                "earlier or lower min_noise_std"
            )
        if cfg.lora_min_sigma > 0:
            trainable = {k for s in starts for k in range(s, s + size) if self.explores[k]}
            below = [round(float(sigmas[k]), 4) for k in sorted(trainable) if sigmas[k] < cfg.lora_min_sigma]
            if below:  # the LoRA would be off there: the step's log-prob could not depend on what is trained
                raise ValueError(
                    f"lora_min_sigma={cfg.lora_min_sigma} switches the LoRA off at trained steps (sigma {below}); "
                    "lower it to the trained window's last sigma or narrow the window (sde_window)"
                )
            limit_lora(transformer, cfg.lora_min_sigma, adapter.timestep_per_sigma)
        if cfg.gradient_checkpointing:
            if not getattr(transformer, "_supports_gradient_checkpointing", False):
                raise ValueError(f"{type(transformer).__name__} does not support gradient_checkpointing; turn it off")
            transformer.enable_gradient_checkpointing()  # only where grad is on: sampling is unchanged
        self.compiled = cfg.compile and _can_compile(self.device)
        if self.compiled:
            transformer.compile()  # in place, after LoRA and its gate, so both are inside what is compiled

    # ----------------------------------------------------------------------------------------- sampling
    def _sde_steps(self, step: int) -> list[int]:
        """The exploring steps: all, a Flow-GRPO-Fast window drawn reproducibly for this step, or MixGRPO's sliding
        window at this step's position."""
        cfg = self.cfg
        if cfg.sde_window <= 0:
            return [k for k, ok in enumerate(self.explores) if ok]
        start = None
        if cfg.sde_window_shift_every:
            last = window_starts(cfg.num_steps, cfg.sde_window, cfg.sde_window_max_start)[-1]
            start = sliding_window_start(step, cfg.sde_window_shift_every, cfg.sde_window_stride, last)
        gen = torch.Generator().manual_seed(_seed(cfg.seed, step, 4))  # same window on every process
        window = sde_window(
            cfg.num_steps, cfg.sde_window, start=start, generator=gen, max_start=cfg.sde_window_max_start
        )
        return [k for k in window if self.explores[k]]

    @torch.no_grad()
    def sample(self, step: int) -> Trajectory:
        """P prompts x G samples with log-probs; group p occupies rows p*G .. p*G+G-1."""
        cfg = self.cfg
        if not self.train_prompts:  # a trainer built to evaluate, sample or export a run (`build_trainer`)
            raise ValueError(f"no training prompts: this trainer was built without them (prompts: {cfg.prompts!r})")
        rank = self.accelerator.process_index
        rng = np.random.default_rng(_seed(cfg.seed, step, rank, 1))
        replace = len(self.train_prompts) < cfg.prompts_per_step
        idx = rng.choice(len(self.train_prompts), size=cfg.prompts_per_step, replace=replace)
        prompts = [self.train_prompts[i] for i in idx]
        cond = self.adapter.encode(prompts, cfg.guidance_scale).repeat(cfg.group_size)
        gen = torch.Generator(device="cpu").manual_seed(_seed(cfg.seed, step, rank, 2))
        latents = None
        if cfg.group_shared_noise:
            latents = self.adapter.init_noise(cfg.prompts_per_step, gen).repeat_interleave(cfg.group_size, dim=0)
        self.adapter.transformer.eval()
        with self.accelerator.autocast():
            return rollout(
                self.adapter,
                [p for p in prompts for _ in range(cfg.group_size)],
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                noise_level=cfg.noise_level,
                sampler=cfg.sampler,
                sde_steps=self._sde_steps(step),
                generator=gen,
                untrained=cfg.untrained_sampler,
                latents=latents,
                cond=cond,
                columns={
                    "group_ids": self.group_ids.tolist(),
                    **{k: [v[i] for i in idx for _ in range(cfg.group_size)] for k, v in self.prompt_columns.items()},
                },
            )

    def score(self, images: Tensor, prompts: Sequence[str], columns: dict | None = None) -> Rewards:
        """Calls the reward and refuses NaN/inf with an error that names the reward and the step."""
        out = self.reward_fn(images, list(prompts), **(columns or {}))
        rewards = out if isinstance(out, Rewards) else Rewards(out, {self.reward_name: out})
        total = rewards.total.detach().float().cpu()
        if total.shape != (len(prompts),) or not torch.isfinite(total).all():
            raise RewardError(
                f"reward {self.reward_name!r} returned {'non-finite values' if total.numel() else 'nothing'} "
                f"(shape {tuple(total.shape)}) at step {self.step}; the last checkpoint in {self.out / 'checkpoints'} "
                "is intact"
            )
        return Rewards(total, {k: v.detach().float().cpu() for k, v in rewards.raw.items()})

    def assign_credit(self, traj: Trajectory, rewards: Rewards) -> tuple[credit_lib.CreditOutput, dict[str, float]]:
        """Advantages [B, n] for the n stochastic steps, plus metrics of the whole batch (all processes): cost
        (model evaluations, reward calls), credit statistics and the fraction of groups with equal rewards."""
        cfg = self.cfg
        n = int(traj.sde_mask.sum())
        batch = len(traj.prompts)
        cost = {"cost/model_evals": float(batch * traj.num_steps), "cost/reward_calls": float(batch)}
        values = None
        if cfg.credit != "outcome":
            # the rollout's precision: R_k and R_n from one computation of the policy
            with self.accelerator.autocast():
                sr = step_rewards(
                    self.adapter,
                    traj,
                    lambda images, prompts: self.score(images, prompts, traj.columns).total,
                    rewards.total,
                    mode=cfg.step_reward_mode,
                    completion_steps=cfg.completion_steps,
                )
            values = sr.values
            cost = {
                "cost/model_evals": cost["cost/model_evals"] + sr.model_evals,
                "cost/reward_calls": sr.reward_calls,
            }
        totals, groups, scopes = rewards.total, self.group_ids, None
        rank, procs = self.accelerator.process_index, self.accelerator.num_processes
        if procs > 1:
            # Credit over every process's rows (group ids made unique, each row's process as its scope), so
            # adv_std "batch" and credit_balance "global" span the whole batch; "batch" balancing stays per process.
            def gather(t: Tensor) -> Tensor:
                return self.accelerator.gather(t.to(self.device)).cpu()

            values = None if values is None else gather(values)
            totals = gather(totals)
            groups = gather(self.group_ids + rank * cfg.prompts_per_step)
            scopes = gather(torch.full_like(self.group_ids, rank))
        out = credit_lib.assign_credit(
            values,
            totals,
            groups,
            credit=cfg.credit,
            n=n,
            constrained=cfg.credit_constrained,
            first_step=cfg.credit_first_step,
            balance=cfg.credit_balance,
            balance_key=cfg.credit_balance_key,
            scope_ids=scopes,
            std_scope=cfg.adv_std,
            clip=cfg.adv_clip,
        )
        # statistics of the whole batch, before each process takes its rows back
        metrics = {
            "reward/mean": float(totals.float().mean()),
            "reward/std": float(totals.float().std()) if totals.numel() > 1 else 0.0,
            "reward/zero_std_frac": credit_lib.zero_variance_fraction(totals, groups),
            **credit_lib.credit_stats(out),
            # every process draws and scores a full batch: the run's cost is N times one process's
            **{k: float(v) * procs for k, v in cost.items()},
        }
        if procs > 1:  # this process's rows
            rows = slice(rank * batch, (rank + 1) * batch)
            sliced = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            out = dataclasses.replace(out, **{k: v[rows] for k, v in sliced.items() if v is not None})
        return out, metrics

    # ----------------------------------------------------------------------------------------- update
    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """The base model, for the KL and the before/after grid: the same transformer with LoRA disabled, or the
        frozen copy a full fine-tune keeps (see `__init__`)."""
        transformer = self.adapter.transformer
        if self.cfg.lora_rank > 0:
            transformer.disable_adapters()
            try:
                yield
            finally:
                transformer.enable_adapters()
            return
        if self.ref_model is None:
            raise ValueError(
                "this full fine-tune kept no copy of its base model (kl_beta 0 and grid_prompts 0): build the trainer "
                "with keep_reference=True, or set grid_prompts > 0, to draw base-model images"
            )
        # The KL's copy already sits beside the policy (every step: nothing to move); the grid-only copy visits.
        pipe, home = self.adapter.pipe, next(self.ref_model.parameters()).device
        device = next(transformer.parameters()).device
        pipe.transformer = self.ref_model if home == device else self.ref_model.to(device)
        try:
            yield
        finally:
            pipe.transformer = transformer
            if home != device:
                self.ref_model.to(home)

    def _optimizer_step(self) -> float:
        if self.accelerator.num_processes > 1:
            # Every process joins every reduction, also one whose share of this window was empty (grad None).
            # Each backpropagated its share of the window's sample mean, so the sum is the mean over all of them.
            for p in self.params.values():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = self.accelerator.reduce(grad, reduction="sum")
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.max_grad_norm) if grads else 0.0
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            d = self.cfg.ema_decay
            for n, p in self.params.items():
                self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)
        return float(norm)

    def _minibatch_plan(self, kept: int) -> tuple[int, list[int]]:
        """Minibatches per epoch (the same on every process) and, per minibatch over all epochs, the number of samples
        in its optimizer window summed over processes.

        `keep` drops samples whose advantages are all zero, and how many remain differs between processes (a group
        with equal rewards on one of them), so each process pads with empty minibatches up to the largest count: every
        process then takes the same optimizer steps and joins every gradient reduction. Each window's gradient is the
        mean over the samples it holds, whatever the minibatch sizes (a short last minibatch or window counts its
        samples, not as a whole minibatch)."""
        cfg = self.cfg
        counts = [kept]
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(torch.tensor([kept], device=self.device)).tolist()
        per_epoch = max(-(-c // cfg.train_batch_size) for c in counts)
        sizes = [
            sum(min(max(c - i * cfg.train_batch_size, 0), cfg.train_batch_size) for c in counts)
            for _ in range(cfg.inner_epochs)
            for i in range(per_epoch)
        ]
        windows = [
            sum(sizes[w - w % cfg.grad_accum : w - w % cfg.grad_accum + cfg.grad_accum]) for w in range(len(sizes))
        ]
        return per_epoch, windows

    def train_on(self, traj: Trajectory, credit: credit_lib.CreditOutput, step: int) -> dict[str, float]:
        """PPO-clipped updates over the trained steps; gradients accumulate over steps and minibatches."""
        cfg = self.cfg
        steps = torch.nonzero(traj.sde_mask).flatten().tolist()
        # Samples with all-zero advantages add no policy gradient and are skipped, unless a KL still pulls them back.
        keep = torch.nonzero(credit.keep if cfg.kl_beta == 0 else torch.ones_like(credit.keep)).flatten()
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "kl", "clip_frac", "approx_kl")}
        ratios: list[Tensor] = []
        norms: list[float] = []
        per_epoch, windows = self._minibatch_plan(keep.numel())
        if per_epoch == 0:  # nothing kept on any process
            return {"train/kept_frac": 0.0}
        self.adapter.transformer.train()
        rng = torch.Generator().manual_seed(_seed(cfg.seed, step, self.accelerator.process_index, 3))
        n_batches = 0
        for _ in range(cfg.inner_epochs):
            order = keep[torch.randperm(keep.numel(), generator=rng)]
            chunks = list(order.split(cfg.train_batch_size)) if keep.numel() else []
            for chunk in chunks + [order[:0]] * (per_epoch - len(chunks)):
                if len(chunk):
                    sub = traj.select(chunk)
                    adv = credit.advantages[chunk].to(self.device)
                    # this minibatch's part of its window's mean over samples, and over the trained steps
                    share = len(steps) * (windows[n_batches] / len(chunk))
                    for j, k in enumerate(steps):
                        with self.accelerator.autocast():
                            new = replay_step(self.adapter, sub, k)
                            ref_mean = kl_std = None
                            if cfg.kl_beta > 0:
                                with torch.no_grad(), self.reference_policy():
                                    ref_mean = replay_step(self.adapter, sub, k).mean
                                kl_std = kl_step_std(
                                    cfg.kl_form, cfg.sampler, new.std, sub.sigmas[k], sub.sigmas[k + 1]
                                )
                        out = policy_step_loss(
                            new.log_prob,
                            sub.log_probs[:, k].to(self.device),
                            adv[:, j],
                            cfg.clip_range,
                            kl_beta=cfg.kl_beta,
                            mean=new.mean,
                            ref_mean=ref_mean,
                            std=kl_std,
                        )
                        self.accelerator.backward(out.loss / share)
                        for key in stats:
                            stats[key].append(float(getattr(out, key).detach()))
                        ratios.append(out.ratio.float().cpu())
                n_batches += 1
                if n_batches % cfg.grad_accum == 0:
                    norms.append(self._optimizer_step())
        if n_batches % cfg.grad_accum:
            norms.append(self._optimizer_step())
        lr = self.lr_schedule.get_last_lr()[0]
        if not ratios:  # this process kept nothing; it took its part in every optimizer step all the same
            return {"train/kept_frac": 0.0, "train/grad_norm": float(np.mean(norms)), "train/lr": lr}
        ratio = torch.cat(ratios)
        metrics = {f"train/{k}": float(np.mean(v)) for k, v in stats.items()}
        metrics.update(
            {
                "train/ratio_mean": float(ratio.mean()),
                "train/ratio_min": float(ratio.min()),
                "train/ratio_max": float(ratio.max()),
                "train/grad_norm": float(np.mean(norms)),
                "train/kept_frac": keep.numel() / len(traj.prompts),
                "train/lr": lr,
            }
        )
        return metrics

    # ----------------------------------------------------------------------------------------- eval
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swaps the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            p.data.copy_(self.ema[n])
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.data.copy_(backup[n])

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[str], seed: int) -> Tensor:
        cfg = self.cfg
        self.adapter.transformer.eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with self.ema_weights(), self.accelerator.autocast():
            traj = rollout(
                self.adapter,
                list(prompts),
                num_steps=cfg.eval_num_steps,
                guidance_scale=cfg.eval_guidance,
                noise_level=0.0,
                sde_steps=[],
                generator=gen,
                untrained=cfg.eval_sampler,
            )
        return traj.images.float().cpu()

    def _shared_out(self, prompts: Sequence[str], seed: int, work: Callable[[Tensor, int], Any]) -> list:
        """`work(images, start)` on this process's batches (prompts[start : start + len(images)]), gathered in batch
        order on every process.

        Batch k of `eval_batch_size` is seeded by (seed, its start) and made by process k mod num_processes, so N
        processes draw what one does and share the work. A collective: every process must call it."""
        size, acc = self.cfg.eval_batch_size, self.accelerator
        starts = range(0, len(prompts), size)
        mine = {
            a: work(self._generate_batch(prompts[a : a + size], _seed(seed, a)), a)
            for a in starts[acc.process_index :: acc.num_processes]
        }
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            mine = {a: out for part in gather_object([mine]) for a, out in part.items()}
        return [mine[a] for a in starts]

    def generate(self, prompts: Sequence[str], seed: int) -> Tensor:
        """Images for `prompts` at the evaluation settings (`eval_sampler`), [N,3,H,W] on CPU on every process;
        shared out over processes by batch (`_shared_out`)."""
        return torch.cat(self._shared_out(prompts, seed, lambda images, _: images))

    def evaluate(self) -> dict[str, float]:
        """Reward (and evaluator metrics) of seeded samples (`eval_sampler`) on the fixed evaluation prompts. Each
        process generates and scores its share of the batches, so N processes score each image once; the evaluator
        (metrics over the whole set, e.g. per category) then sees every image on every process."""
        if not self.eval_prompts:
            return {}
        t0 = time.perf_counter()

        def judged(images: Tensor, start: int) -> tuple[Tensor, Tensor]:
            end = start + len(images)
            columns = {k: v[start:end] for k, v in self.eval_columns.items()}
            return images, self.score(images, self.eval_prompts[start:end], columns).total

        parts = self._shared_out(self.eval_prompts, self.cfg.eval_seed, judged)
        images, total = torch.cat([im for im, _ in parts]), torch.cat([r for _, r in parts])
        se = float(total.std() / len(total) ** 0.5) if len(total) > 1 else 0.0
        metrics = {"eval/reward_mean": float(total.mean()), "eval/reward_mean_se": se}
        if self.evaluator is not None:
            metrics.update({f"eval/{k}": float(v) for k, v in self.evaluator(images, self.eval_prompts).items()})
        metrics["time/eval"] = time.perf_counter() - t0
        return metrics

    # ----------------------------------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.params.items()}

    def save(self) -> Path:
        """Writes checkpoints/step_N atomically (temporary directory, then rename) and points `latest` at it."""
        if not self.accelerator.is_main_process:
            return self.out / "checkpoints"
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp_step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self.trainable_state(), tmp / "trainable.safetensors")
        if self.ema is not None:
            save_file({n: t.cpu().contiguous() for n, t in self.ema.items()}, tmp / "ema.safetensors")
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()},
            tmp / "optimizer.pt",
        )
        save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        meta = {
            "step": self.step,
            "lora_rank": self.cfg.lora_rank,
            "model": self.cfg.model,
            "base_fingerprint": self.base_fingerprint,
            "num_processes": self.accelerator.num_processes,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        (tmp / "config.yaml").write_text(to_yaml(self.cfg))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        if self.cfg.keep_checkpoints:
            # Once the new one and `latest` are in place: this run's oldest go, and any later step, which an earlier
            # run in this directory (or the rest of a run resumed from before its end) left behind.
            steps = self._checkpoint_steps()
            mine = [d for s, d in steps if s <= self.step]
            for old in mine[: -self.cfg.keep_checkpoints] + [d for s, d in steps if s > self.step]:
                shutil.rmtree(old)
        return final

    def _checkpoint_steps(self) -> list[tuple[int, Path]]:
        """(step, directory) of this run's checkpoints, in step order."""
        root = self.out / "checkpoints"
        return sorted((int(d.name.removeprefix("step_")), d) for d in root.glob("step_*"))

    def _check_trained_config(self, step_dir: Path) -> None:
        """Compares a checkpoint's config with this run's before resuming it. Refuses another shapes checker
        version (the log would mix two versions' accuracies in one curve; evaluating a checkpoint under another
        version is fine: `flowalign eval`) and warns when the KL was weighed another way."""
        if not (step_dir / "config.yaml").is_file():
            return
        trained = load_run_config(step_dir)  # a checkpoint older than kl_form reads as "exact"
        if trained.checker != self.cfg.checker:
            raise ValueError(
                f"checkpoint {step_dir} was trained and evaluated with shapes checker v{trained.checker}, this run "
                f"uses v{self.cfg.checker}: resume with --checker {trained.checker}, or start a new run to train "
                f"under v{self.cfg.checker}"
            )
        if self.cfg.kl_beta > 0 and trained.kl_form != self.cfg.kl_form:
            logger.warning(
                "checkpoint %s weighed its KL as kl_form %r, this run uses %r (the two differ by sigma - sigma' "
                "per sde step): set kl_form: %s to go on as it trained",
                step_dir,
                trained.kl_form,
                self.cfg.kl_form,
                trained.kl_form,
            )

    def load(self, path: str | Path) -> tuple[Path, dict[str, Any]]:
        """Restores a checkpoint written by `save` (a run, checkpoints or step directory); returns its step
        directory and saved state (step, model, process count)."""
        path = checkpoint_dir(path)
        saved = json.loads((path / "state.json").read_text())
        trained_on = saved.get("base_fingerprint", LEGACY_FINGERPRINTS.get(saved.get("model")))
        if None in (trained_on, self.base_fingerprint):  # no fingerprint to compare: the name is all there is
            if saved.get("model") not in (None, self.cfg.model):
                logger.warning(
                    "checkpoint %s was trained on model %r, this run loads %r: fine if that is a copy of the same "
                    "weights (moved, or downloaded); another base model would mix two models",
                    path,
                    saved["model"],
                    self.cfg.model,
                )
        elif trained_on != self.base_fingerprint:  # a moved or renamed copy has the same fingerprint: silent
            logger.warning(
                "checkpoint %s was trained on other base weights than this run loads (fingerprint %s, these %s): "
                "another version of model %r (flowalign's shapes weights changed with base v3); its trained weights "
                "on this base mix two models: train again, or load it with the base it was trained on (--model DIR)",
                path,
                trained_on,
                self.base_fingerprint,
                self.cfg.model,
            )
        state = load_file(path / "trainable.safetensors")
        missing = set(self.params) ^ set(state)
        shapes = [n for n in set(self.params) & set(state) if state[n].shape != self.params[n].shape]
        if missing or shapes:
            wrong = sorted(missing)[:3] + [f"{n}: {tuple(state[n].shape)} saved" for n in sorted(shapes)[:3]]
            raise ValueError(
                f"checkpoint {path} does not match this model/LoRA config (its config.yaml says how it was made): "
                f"{wrong} ..."
            )
        for n, p in self.params.items():
            p.data.copy_(state[n])
        if self.ema is not None:
            if (path / "ema.safetensors").exists():
                self.ema = {k: v.to(self.device) for k, v in load_file(path / "ema.safetensors").items()}
            else:  # EMA turned on after the fact: it starts from these weights, not from the ones before loading
                logger.warning("checkpoint %s has no EMA; the EMA starts from its weights", path)
                self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_schedule.load_state_dict(opt["lr_schedule"])
        # The optimizer's settings are this config's (the saved ones come back with its state): a resume that
        # changes the learning rate, weight decay or betas uses them, as its config.yaml then says.
        cfg = self.cfg
        self.lr_schedule.base_lrs = [cfg.learning_rate] * len(self.optimizer.param_groups)
        factor = self.lr_schedule.lr_lambdas[0](self.lr_schedule.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(
                initial_lr=cfg.learning_rate,
                lr=cfg.learning_rate * factor,
                weight_decay=cfg.weight_decay,
                betas=tuple(cfg.adam_betas),
            )
        torch.set_rng_state(load_file(path / "rng.safetensors")["torch_cpu"])
        self.step = saved["step"]
        return path, saved

    def _warn_process_count(self, path: Path, procs: int) -> None:
        """A resumed run on another number of processes goes on with another batch (it is per process)."""
        if procs != self.accelerator.num_processes:
            logger.warning(
                "checkpoint %s was trained on %d processes, this run has %d: each step now draws %d samples instead"
                " of %d (prompts_per_step x group_size per process)",
                path,
                procs,
                self.accelerator.num_processes,
                self.cfg.batch_size * self.accelerator.num_processes,
                self.cfg.batch_size * procs,
            )

    # ----------------------------------------------------------------------------------------- loop
    def _log(self, record: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _truncate_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint so the log equals an uninterrupted run's. Lines of
        steps that had been checkpointed (a resume from an earlier checkpoint than the latest) are kept aside in
        `metrics.after_step_N.jsonl`, not lost."""
        path = self.out / "metrics.jsonl"
        if path.exists() and self.accelerator.is_main_process:
            kept, dropped = split_log(path, self.step)
            last = max((s for s, _ in self._checkpoint_steps()), default=-1)
            if last > self.step:
                aside = self.out / f"metrics.after_step_{self.step}.jsonl"
                aside.write_text(dropped)
                logger.warning(
                    "resuming at step %d of a run checkpointed up to step %d: its log after step %d is in %s",
                    self.step,
                    last,
                    self.step,
                    aside,
                )
            path.write_text(kept)

    def _over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each process's statistics combined over the processes that report them, so the log describes the whole
        batch, not the main process's part: `*_min` / `*_max` as the minimum / maximum, the rest (means over equal
        shares of the batch) as the mean. A collective."""
        if self.accelerator.num_processes == 1:
            return metrics
        from accelerate.utils import gather_object

        parts = gather_object([metrics])
        keys = dict.fromkeys(k for part in parts for k in part)
        combine = {"_min": min, "_max": max}
        return {k: float(combine.get(k[-4:], np.mean)([part[k] for part in parts if k in part])) for k in keys}

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        traj = self.sample(step)
        t1 = time.perf_counter()
        rewards = self.score(traj.images, traj.prompts, traj.columns)
        t2 = time.perf_counter()
        credit, batch_metrics = self.assign_credit(traj, rewards)
        t_credit = time.perf_counter()
        metrics = self.train_on(traj, credit, step)
        t3 = time.perf_counter()
        metrics.update({f"reward/{k}": float(v.mean()) for k, v in rewards.raw.items() if k != "total"})
        metrics = self._over_processes(metrics)
        metrics.update(batch_metrics)
        metrics.update(
            {
                "time/sample": t1 - t0,
                "time/reward": t2 - t1,
                "time/credit": t_credit - t2,
                "time/train": t3 - t_credit,
            }
        )
        return metrics

    def train(
        self,
        resume: str | Path | None = None,
        progress: bool = True,
        stop: Callable[[dict[str, float]], bool] | None = None,
        overwrite: bool = False,
    ) -> list[dict[str, float]]:
        """Runs to `max_steps` (or until `stop(record)` says so, for budgeted benchmarks); returns the records
        written this call. The last step is always evaluated and checkpointed. `resume`: a checkpoint (step dir,
        checkpoints dir or run dir), or "auto": this output_dir's latest checkpoint if it has one, else a fresh
        start. A checkpoint of another run forks it: this output_dir's log starts with that run's up to the
        checkpoint. An output_dir holding another run is refused unless `overwrite` (its log and checkpoints are
        replaced): a fresh start there, or a fork into it, would mix or erase that run."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        check_trackers(cfg.log_with)
        auto = resume == "auto"
        if auto:
            resume = self.out / "checkpoints" if (self.out / "checkpoints" / "latest").exists() else None
        held = holds_run(self.out)
        here = resume is not None and self.out.resolve() in (Path(resume).resolve(), *Path(resume).resolve().parents)
        if held and not overwrite and not here and not (auto and resume is None):
            raise FileExistsError(
                f"{self.out} holds another run ({'its checkpoints' if resume else 'metrics.jsonl'}): continue it with "
                "--resume auto, write this one elsewhere with --output-dir DIR, or replace it with --overwrite"
            )
        if resume:  # first: a checkpoint that does not fit leaves the run's files as they were
            self._check_trained_config(checkpoint_dir(resume))
            step_dir, saved = self.load(resume)
            self._warn_process_count(step_dir, saved.get("num_processes", self.accelerator.num_processes))
        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            latest = self.out / "checkpoints" / "latest"
            if resume and here:
                self._truncate_metrics()
            else:  # a fresh start, or a fork from another run's checkpoint: this directory starts over
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                if latest.exists():  # a previous run's: `--resume auto` must not pick it up for this one
                    logger.warning(
                        "%s held a previous run (checkpoints up to %s); this run starts over and replaces them",
                        self.out,
                        latest.read_text().strip(),
                    )
                    latest.unlink()
                # nothing of the previous run may be resumed into this one or mistaken for its log
                for old in (self.out / "checkpoints").glob("*step_*"):
                    shutil.rmtree(old, ignore_errors=True)
                for old in self.out.glob("metrics.after_step_*.jsonl"):
                    old.unlink()
                source = step_dir.parent.parent / "metrics.jsonl" if resume else None
                if source is not None and step_dir.parent.name == "checkpoints" and source.is_file():
                    # a fork starts its log with its source's up to the checkpoint (the step-0 baseline too)
                    (self.out / "metrics.jsonl").write_text(split_log(source, self.step)[0])
        if cfg.log_with:  # on the main process only (accelerate); every process may call it
            scalar = (bool, int, float, str, type(None))  # what every tracker's hyperparameter table takes
            hparams = {k: v if isinstance(v, scalar) else json.dumps(v) for k, v in dataclasses.asdict(cfg).items()}
            # TensorBoard drops what an interrupted run wrote after the checkpoint (or a fresh run's predecessor in
            # this directory wrote at all), as metrics.jsonl does.
            kwargs = {"wandb": {"name": self.out.name}, "tensorboard": {"purge_step": self.step + 1 if resume else 0}}
            self.accelerator.init_trackers("flowalign", config=hparams, init_kwargs=kwargs)
        records = []
        if self.step == 0 and not resume:
            rec = {"step": 0, **self.evaluate()}
            self._log(rec)
            records.append(rec)
        bar = tqdm(
            range(self.step, cfg.max_steps),
            disable=not (progress and self.accelerator.is_main_process),
            desc="train",
            initial=self.step,
            total=cfg.max_steps,
        )
        for step in bar:
            metrics = self.train_step(step)
            self.step = step + 1
            if stop is not None and stop({"step": self.step, **metrics}):
                self.accelerator.set_trigger()
            # A stop met on any process (a budget of per-process seconds) stops all: else they wait for its gradients.
            last = self.step == cfg.max_steps or (stop is not None and self.accelerator.check_trigger())
            if cfg.eval_every and self.step % cfg.eval_every == 0 or last:
                metrics.update(self.evaluate())
            rec = {"step": self.step, **metrics}
            self._log(rec)
            records.append(rec)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if cfg.save_every and self.step % cfg.save_every == 0 or last:
                self.save()
            if last:
                break
        for tracker in self.accelerator.trackers:  # not accelerator.end_training(): it ends the process group too
            tracker.finish()
        self.accelerator.trackers.clear()
        self.accelerator.wait_for_everyone()  # the log and checkpoint are complete before any process reads them
        return records
