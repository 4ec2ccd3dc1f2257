"""The Python API: resolve names (model, reward, prompts) into objects and run a training job.

    from flowalign.api import train
    summary = train("shapes", max_steps=50, output_dir="runs/demo")

This is the edge where strings become objects; the trainer below it only takes built objects.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.config import TrainConfig, load_config, load_prompt_set, load_run_config
from flowalign.trainer import (
    GRPOTrainer,
    Rewards,
    check_trackers,
    checkpoint_dir,
    evenly_spaced,
    make_accelerator,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_card(model: str) -> dict[str, Any]:
    """The settings a model ships with: a zoo model's card, or the `flowalign.json` that pretraining (and a
    pipeline export) writes beside a local pipeline (e.g. max_sequence_length: the shapes model learned 4 zero
    T5 tokens, not the pipeline's 256); {} for anything else."""
    from flowalign import zoo

    if model in zoo.ZOO:
        return zoo.sampling_settings(model)
    path = Path(model).expanduser() / "flowalign.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} (the model's sampling settings) is not valid JSON: {err}") from None


def load_model(model: str, dtype: str = "float32"):
    """A built-in zoo name, a local pipeline directory or a hub id -> (pipeline, recommended settings)."""
    from flowalign import zoo
    from flowalign.adapters import load_pipeline

    pipe = (
        zoo.load(model, torch_dtype=DTYPES[dtype]) if model in zoo.ZOO else load_pipeline(model, dtype=DTYPES[dtype])
    )
    return pipe, model_card(model)


def recommended_sampling(model: str) -> dict[str, Any]:
    """Config fields that sample `model` as its model card recommends: a zoo model ships them (the shapes model
    draws far better at 40 re-noising steps and guidance 2.5 than at the config's generic 20 ODE steps and 4.5),
    as does a local pipeline with a `flowalign.json`; any other model: {} (the config's defaults)."""
    rec = model_card(model)
    if "num_inference_steps" not in rec:
        return {}
    fields = {"eval_num_steps": rec["num_inference_steps"], "guidance_scale": rec["guidance_scale"]}
    if "stochastic_sampling" in rec:
        fields["eval_sampler"] = "renoise" if rec["stochastic_sampling"] else "ode"
    return fields


def require_file_path(path: str | Path | None, example: str, flag: str = "--out") -> None:
    """An output file's path (None: none asked for) must not be a directory, checked before any work."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; name the file, e.g. {Path(path) / example}")


def require_empty_dir(path: str | Path, fix: str) -> None:
    """Outputs go into a new or empty directory, checked before any work: nothing earlier is overwritten or left
    beside the new files. `fix` ends the error (what to do instead)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; {fix}")


def build_adapter(cfg: TrainConfig, device: torch.device | str | None = None):
    from flowalign.adapters import adapter_for

    pipe, rec = load_model(cfg.model, cfg.dtype)
    if device is not None:
        pipe.to(device)
    msl = cfg.max_sequence_length or rec.get("max_sequence_length")
    size = {"height": cfg.height, "width": cfg.width}
    return adapter_for(pipe, **({"max_sequence_length": msl} if msl else {}), **{k: v for k, v in size.items() if v})


def build_reward(spec: Any, *, normalize: str = "sum", log_tame: bool = False):
    """`"name"`, `{"name":..., "kwargs":...}` or a list of `{name, weight, kwargs}` -> (callable, display name)."""
    import rewards  # noqa: F401  (registers the built-in rewards)
    from rewards.base import REWARDS

    def shown(d: dict) -> str:  # the name with its options, so a run's header says which variant it trains
        opts = ", ".join(f"{k}={v!r}" for k, v in (d.get("kwargs") or {}).items())
        return f"{d['name']}({opts})" if opts else d["name"]

    if isinstance(spec, str):
        return REWARDS.get(spec)(), spec
    if isinstance(spec, dict) and "weight" not in spec:
        return REWARDS.get(spec["name"])(**spec.get("kwargs", {})), shown(spec)
    if isinstance(spec, (list, dict)):
        from rewards.combine import build_combined

        combined = build_combined(spec if isinstance(spec, list) else [spec], normalize=normalize, log_tame=log_tame)

        def reward(images, prompts, **columns) -> Rewards:
            out = combined(images, prompts, **columns)
            return Rewards(out.total, dict(out.raw))

        return reward, "+".join(shown(d) for d in (spec if isinstance(spec, list) else [spec]))
    raise ValueError(f"reward must be a registered name or a list of {{name, weight, kwargs}}, got {spec!r}")


def shapes_evaluator(images: torch.Tensor, prompts: list[str], checker: int) -> dict[str, float]:
    from rewards.shapes import evaluate

    return evaluate(images, prompts, checker)


def with_checker(spec: Any, checker: int) -> Any:
    """The reward spec with `checker` as the version of its shapes_* heads that do not name one; unchanged at the
    default version, so a default run's reward keeps its plain name."""
    from rewards.shapes import DEFAULT_CHECKER

    if checker == DEFAULT_CHECKER:
        return spec
    if isinstance(spec, str):
        return {"name": spec, "kwargs": {"checker": checker}} if spec.startswith("shapes_") else spec
    if isinstance(spec, list):
        return [with_checker(head, checker) for head in spec]
    if isinstance(spec, dict) and str(spec.get("name", "")).startswith("shapes_"):
        kwargs = spec.get("kwargs") or {}
        return {**spec, "kwargs": {"checker": checker, **kwargs}} if isinstance(kwargs, dict) else spec
    return spec


def build_trainer(cfg: TrainConfig, *, training: bool = True, **kwargs: Any) -> GRPOTrainer:
    """The trainer of `cfg`: prompt sets first (a missing file is named before a model loads), then the model and
    reward (and, to train, a check that the trackers of `log_with` are installed). `training=False` (evaluating,
    sampling, comparing or exporting a run) skips the training prompts, which such uses never read, so a run made
    with a relative prompt file loads from any directory, and starts no tracker."""
    if training:
        check_trackers(cfg.log_with)
    train_prompts, columns = load_prompt_set(cfg.prompts) if training else ([], {})
    eval_prompts, eval_columns = load_prompt_set(cfg.eval_prompts)
    specs = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    heads = [h if isinstance(h, str) else h.get("name") for h in specs if isinstance(h, (str, dict))]
    if any(str(h).startswith("shapes_") for h in heads):  # the checker's grammar, before anything loads
        from flowalign.world import parse_caption

        for caption in dict.fromkeys(train_prompts + eval_prompts):
            parse_caption(caption)
    accelerator = make_accelerator(cfg, track=training)
    # the reward before the model: a missing reward model is named before a large pipeline loads
    reward = with_checker(cfg.reward, cfg.checker)
    reward_fn, name = build_reward(reward, normalize=cfg.reward_normalize, log_tame=cfg.reward_log_tame)
    adapter = build_adapter(cfg, accelerator.device)
    evaluator = partial(shapes_evaluator, checker=cfg.checker) if cfg.eval_prompts.startswith("shapes:") else None
    return GRPOTrainer(
        cfg,
        adapter,
        reward_fn,
        train_prompts,
        eval_prompts,
        prompt_columns=columns,
        eval_columns=eval_columns,
        evaluator=evaluator,
        reward_name=name,
        accelerator=accelerator,
        **kwargs,
    )


@dataclass(frozen=True)
class RunSummary:
    """What a training job reports at the end (also written as summary.json)."""

    output_dir: str
    steps: int
    base: dict[str, float]  # eval metrics at step 0
    final: dict[str, float]  # eval metrics at the last step
    grid: str | None  # path of the before/after PNG


def comparison_rows(trainer: GRPOTrainer, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, Tensor]:
    """Base and aligned images of the same prompts from the same noise (each seed), as grid rows.

    The base row is the trainer's reference policy (LoRA off, or the frozen copy of a full fine-tune), so the two
    rows differ only by what training changed. Rows are "base" / "aligned" for one seed, "base s<seed>" /
    "aligned s<seed>" for several. A collective under accelerate: every process must call it.
    """
    rows: dict[str, Tensor] = {}
    for s in seeds:
        tag = f" s{s}" if len(seeds) > 1 else ""
        with trainer.reference_policy():
            rows[f"base{tag}"] = trainer.generate(prompts, s)
        rows[f"aligned{tag}"] = trainer.generate(prompts, s)
    return rows


def write_grid(
    trainer: GRPOTrainer,
    rows: dict[str, Tensor],
    prompts: Sequence[str],
    path: str | Path,
    *,
    score: bool = True,
    columns: dict[str, list] | None = None,
) -> Path:
    """Writes `rows` as a comparison grid PNG (+ JSON sidecar), each image scored by the trainer's reward when
    `score` (`columns`: per-prompt extras the reward reads, e.g. reference images). Call it on the main process
    only. A prompt the reward cannot judge (a caption outside the shapes grammar, a missing reference image) leaves
    the grid unscored, with a warning that says why, rather than no grid at all."""
    from flowalign.grids import comparison_grid

    scores = None
    if score:
        try:
            scores = {name: trainer.score(images, prompts, columns).total.tolist() for name, images in rows.items()}
        except ValueError as err:
            logger.warning("grid left unscored: %s", err)
    return comparison_grid(rows, prompts, Path(path), scores=scores)


def write_summary_and_grid(trainer: GRPOTrainer) -> RunSummary:
    """Base vs aligned evaluation (from the metrics log) and a before/after grid on the same seeds."""
    out = trainer.out
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    evals = [r for r in records if "eval/reward_mean" in r]
    base = {k: v for k, v in evals[0].items() if k.startswith("eval/")} if evals else {}
    final = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    grid = None
    # An evaluation set may repeat prompts (it cycles when short); a grid need not: each prompt's first occurrence.
    first = [trainer.eval_prompts.index(p) for p in dict.fromkeys(trainer.eval_prompts)]
    picked = evenly_spaced(first, min(trainer.cfg.grid_prompts, len(first)))
    if picked:  # every process: generation is shared out over them
        prompts = [trainer.eval_prompts[i] for i in picked]
        rows = comparison_rows(trainer, prompts, [trainer.cfg.eval_seed])
        grid = str(out / "grid.png")
        if trainer.accelerator.is_main_process:
            columns = {k: [v[i] for i in picked] for k, v in trainer.eval_columns.items()}
            write_grid(trainer, rows, prompts, grid, columns=columns)
    summary = RunSummary(str(out), trainer.step, base, final, grid)
    if trainer.accelerator.is_main_process:
        from flowalign.plots import plot_metrics

        (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
        plot_metrics(out)
    return summary


def train(
    config: str | None = "shapes",
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
):
    """Runs a training job from a preset/YAML plus overrides; returns its RunSummary. `resume`: "auto" or a
    checkpoint; `overwrite`: replace a run already in output_dir (else refused, see `GRPOTrainer.train`)."""
    if resume is not None and not isinstance(resume, (str, Path)):
        raise ValueError(f"resume must be 'auto' or a checkpoint path, got {resume!r}")
    cfg = load_config(config, overrides)
    trainer = build_trainer(cfg)
    trainer.train(resume=resume, progress=progress, overwrite=overwrite)
    return write_summary_and_grid(trainer)


def load_run(checkpoint: str | Path, *, keep_reference: bool = False, **overrides: Any) -> GRPOTrainer:
    """A trainer holding a saved run: its config (plus `overrides`, e.g. other evaluation prompts) and the weights
    of its checkpoint (`checkpoint_dir` resolves a run dir), EMA ones where the run kept them; for evaluating,
    sampling or comparing the run. `keep_reference`: a full fine-tune also keeps its base model (for `compare`)."""
    ckpt = checkpoint_dir(checkpoint)
    trainer = build_trainer(load_run_config(ckpt, overrides), training=False, keep_reference=keep_reference)
    trainer.load(ckpt)
    return trainer


def evaluate(config: str | None = None, *, checkpoint: str | Path | None = None, **overrides: Any) -> dict[str, float]:
    """Evaluation metrics of a base model (`config`, default the `shapes` preset) or of a trained checkpoint (its
    run's config), exactly as training evaluates: its `eval_sampler`, seeded by `eval_seed`, EMA weights.

    Overrides pick the prompt set, e.g. `evaluate(checkpoint="runs/shapes", eval_prompts="shapes:train_eval")` asks
    whether a run improved the captions it trained on; `shapes:` sets also get the checker's accuracies per category.
    """
    if checkpoint is not None and config is not None:
        raise ValueError("give a config (evaluates its base model) or a checkpoint (uses its run's config), not both")
    if checkpoint is not None:
        ckpt = checkpoint_dir(checkpoint)
        cfg = load_run_config(ckpt, overrides)
    else:
        cfg = load_config(config or "shapes", overrides)
    if cfg.num_eval_prompts < 1:  # before any model loads
        raise ValueError(f"num_eval_prompts must be >= 1 to evaluate, got {cfg.num_eval_prompts}")
    trainer = build_trainer(cfg, training=False)
    if checkpoint is not None:
        trainer.load(ckpt)
    return trainer.evaluate()


def compare(
    checkpoint: str | Path,
    prompts: Sequence[str] | str,
    *,
    seeds: Sequence[int] = (0,),
    path: str | Path = "compare.png",
    **overrides: Any,
) -> Path:
    """A before/after grid of a trained run on any prompts: its base model above its aligned (EMA) weights, from
    the same noise for each seed, at the run's evaluation settings, each image scored by the run's reward.

    `prompts` is a list, a prompt file (a .jsonl's extra fields, e.g. reference images, reach the reward) or a
    built-in set ("shapes:eval/position"); `flowalign sample --checkpoint
    RUN --compare` is the same from the command line. Returns the PNG's path (a JSON sidecar with the prompts,
    rows and scores lies beside it).
    """
    try:
        prompt_list, columns = load_prompt_set(prompts) if isinstance(prompts, str) else (list(prompts), {})
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (for captions, pass a list: prompts=[{prompts!r}])") from None
    listed = list(seeds) if isinstance(seeds, Iterable) and not isinstance(seeds, str) else [None]
    if not all(isinstance(s, numbers.Integral) and s >= 0 for s in listed):
        raise ValueError(f"seeds must be a list of integers >= 0, e.g. seeds=range(4); got {seeds!r}")
    seeds = [int(s) for s in listed]
    if not prompt_list or not seeds:
        raise ValueError("compare needs at least one prompt and one seed")
    if path is None or str(path).strip() == "":
        raise ValueError("compare needs path=: where to write the PNG")
    trainer = load_run(checkpoint, keep_reference=True, **overrides)
    rows = comparison_rows(trainer, prompt_list, seeds)
    if trainer.accelerator.is_main_process:
        write_grid(trainer, rows, prompt_list, path, columns=columns)
    return Path(path)


def export(checkpoint: str | Path, out: str | Path, *, merged: bool = False, dtype: str | None = None):
    """A trained run as a diffusers LoRA file (`pipe.load_lora_weights(out)`) or, `merged` / a full fine-tune, a
    whole pipeline (`from_pretrained(out)`): its EMA weights where it kept them. Returns `flowalign.export.Export`,
    whose `usage` is the Python that loads it (also in out/export.json); None on processes other than the main one.
    See `flowalign.export`."""
    from flowalign.export import check_request, export_run

    check_request(out, dtype, merged, checkpoint)  # before the model loads
    # nothing trains: no compiled wrapper around the transformer, no KL copy of a full fine-tune's base
    trainer = load_run(checkpoint, compile=False, kl_beta=0.0)
    result = None
    if trainer.accelerator.is_main_process:  # under several processes one writes, the others wait for it
        result = export_run(trainer, out, merged=merged, dtype=dtype)
    trainer.accelerator.wait_for_everyone()
    return result
