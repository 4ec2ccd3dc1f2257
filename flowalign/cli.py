"""`flowalign` command line: train | sample | eval | bench | export | artifact. The only place that prints."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flowalign.config import bool_field_names, field_names


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` (dashes or underscores) -> {key: "value"}; types are coerced by the config.

    An on/off key may stand alone: `--key` sets it true, `--no-key` false."""
    flags = bool_field_names()
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}; config overrides look like --key value")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            elif key in flags:
                value = "true"
            elif key.startswith("no_") and key[3:] in flags:
                key, value = key[3:], "false"
            else:
                raise ValueError(f"{tok} needs a value")
        if key == "reward" and value.lstrip().startswith(("[", "{")):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ValueError(f"--reward {value!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        out[key] = value
        i += 1
    return out


def banner(trainer) -> str:
    cfg = trainer.cfg
    n_train = cfg.sde_window or cfg.num_steps - 1
    window = ""
    if cfg.sde_window:
        from flowalign.samplers.rollout import window_starts

        starts = window_starts(cfg.num_steps, cfg.sde_window, cfg.sde_window_max_start)
        if len(starts) == 1:
            window = f" (steps {starts[0]}..{starts[0] + cfg.sde_window - 1})"
        elif cfg.sde_window_shift_every:
            window = f" in a window sliding {cfg.sde_window_stride} every {cfg.sde_window_shift_every} steps"
        else:
            window = f" in a random window starting at 0..{starts[-1]}"
    per_step = cfg.batch_size * cfg.inner_epochs // cfg.train_batch_size
    lines = [
        f"flowalign train  model={cfg.model}  reward={trainer.reward_name}  credit={cfg.credit}"
        f"  device={trainer.device}",
        f"  samples/step  B = {cfg.prompts_per_step} prompts x {cfg.group_size} per group = {cfg.batch_size}"
        f"  (x {trainer.accelerator.num_processes} processes)",
        f"  minibatch {cfg.train_batch_size}, {per_step} minibatches/step, grad_accum {cfg.grad_accum}"
        f" -> {max(1, per_step // cfg.grad_accum)} optimizer steps/step",
        f"  denoising: {cfg.num_steps} steps train ({n_train} trained{window}, {cfg.sampler}, a={cfg.noise_level};"
        f" rest {cfg.untrained_sampler}),"
        f" {cfg.eval_num_steps} eval ({cfg.eval_sampler}); CFG {cfg.guidance_scale}",
        f"  {'LoRA r=' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}"
        f"{f' (on at sigma >= {cfg.lora_min_sigma}, the base model below)' if cfg.lora_min_sigma else ''}:"
        f" {sum(p.numel() for p in trainer.params.values()):,} trainable parameters; lr {cfg.learning_rate}"
        f"{'; compiled' if trainer.compiled else ''}",
        f"  {cfg.max_steps} steps -> {cfg.output_dir}"
        + (f" (also logged to {', '.join(cfg.log_with)}, project 'flowalign')" if cfg.log_with else ""),
    ]
    return "\n".join(lines)


def _with_se(metrics: dict[str, float], key: str) -> str:
    se = metrics.get(key + "_se")
    return f"{metrics.get(key, float('nan')):.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _metric_keys(metrics: dict[str, float]) -> list[str]:
    """The accuracies/rewards to show: not timings, sample counts ("eval/n", "eval/<category>/n"), errors or the
    checker version (`_graded_by` names it)."""
    return [
        k
        for k in metrics
        if not k.startswith(("eval/time", "time/")) and not k.endswith(("/n", "_se")) and k != "eval/checker"
    ]


def _graded_by(metrics: dict[str, float]) -> str:
    """ "checker vN; " when the shapes checker graded these metrics, since accuracies compare only within a version."""
    return f"checker v{int(metrics['eval/checker'])}; " if "eval/checker" in metrics else ""


def _table(base: dict[str, float], final: dict[str, float]) -> str:
    """Base vs aligned, each ± its standard error, and the change, called noise when under two standard errors.

    The standard errors are the evaluation's (which images were drawn: the two draws share their seeds, so this
    is conservative); a retrained seed varies more (README: the main job's seed-to-seed spread)."""
    keys = [k for k in _metric_keys(base or final) if k in final]
    rows = [f"  {'metric':26s} {'base':>15s}  {'aligned':>15s}  {'change':>15s}"]
    for k in keys:
        change = final[k] - base.get(k, float("nan"))
        cell = f"{change:+.3f}"
        if k + "_se" in base and k + "_se" in final:
            se = (base[k + "_se"] ** 2 + final[k + "_se"] ** 2) ** 0.5
            noise = change != 0 and abs(change) < 2 * se
            cell += f" ± {se:.3f}" + ("  within noise" if noise else "")
        rows.append(f"  {k.removeprefix('eval/'):26s} {_with_se(base, k):>15s}  {_with_se(final, k):>15s}  {cell}")
    return "\n".join(rows)


def _main_process() -> bool:
    """Under `accelerate launch` / `torchrun` only one process prints and writes what every process computed."""
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from flowalign.api import build_trainer, write_summary_and_grid
    from flowalign.config import load_config

    cfg = load_config(args.config, parse_overrides(extra))
    trainer = build_trainer(cfg)
    if trainer.accelerator.is_main_process:
        print(banner(trainer), flush=True)
    trainer.train(resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    summary = write_summary_and_grid(trainer)
    if trainer.accelerator.is_main_process:
        print(
            f"\nheld-out evaluation ({_graded_by(summary.final)}step 0 vs step {summary.steps}; ± one standard error"
            " of the evaluation):"
            f"\n{_table(summary.base, summary.final)}"
        )
        print(
            f"\nwrote {cfg.output_dir}/metrics.jsonl, metrics.png, summary.json"
            + (f", {summary.grid}" if summary.grid else "")
        )
    return 0


def cmd_sample(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from flowalign.config import load_config, load_prompt_set

    file_prompts, file_columns = load_prompt_set(args.prompts) if args.prompts else ([], {})
    prompts = list(args.prompt or []) + file_prompts
    # A .jsonl's extra fields (e.g. reference images) let the reward score its images; --prompt entries have none.
    columns = {} if args.prompt else file_columns
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    if not columns:  # a set that cycles or repeats a caption (shapes:eval/counting) draws each once per seed
        prompts = list(dict.fromkeys(prompts))
    if args.compare and not args.checkpoint:
        raise ValueError("--compare draws a run's base model beside its aligned weights: give --checkpoint RUN_DIR")
    if args.n < 1 or args.seed < 0:
        raise ValueError(f"--n must be >= 1 and --seed >= 0, got --n {args.n} --seed {args.seed}")
    if args.checkpoint and args.model:
        raise ValueError("--model and --checkpoint both name the model: a checkpoint samples its run's own model")
    model = args.model or "shapes"  # the built-in model unless told otherwise
    from flowalign.api import (
        build_trainer,
        comparison_rows,
        load_run,
        recommended_sampling,
        require_empty_dir,
        write_grid,
    )

    out = Path(args.out)
    if not args.overwrite:
        require_empty_dir(out, "name a new --out, or add --overwrite")

    overrides = parse_overrides(extra)
    if args.checkpoint:
        trainer = load_run(args.checkpoint, keep_reference=args.compare, **overrides)
    else:
        # A bare model samples as its card recommends (a zoo model ships its settings); --key value still wins.
        trainer = build_trainer(
            load_config(None, {"model": model, **recommended_sampling(model), **overrides}), training=False
        )
    cfg = trainer.cfg
    if trainer.accelerator.is_main_process:
        print(f"sampling {cfg.model}: {cfg.eval_num_steps} steps ({cfg.eval_sampler}), CFG {cfg.eval_guidance}")
    if args.overwrite and out.is_dir():  # what an earlier call wrote would otherwise stand beside this one's
        for old in [*out.glob("*_seed*.png"), out / "grid.png", out / "grid.json"]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.n))
    # Generation is shared out over processes (every one calls it); the main one writes.
    if args.compare:
        rows = comparison_rows(trainer, prompts, seeds)
        files = [f"seed{s}_{kind}" for s in seeds for kind in ("base", "aligned")]
    else:
        rows = {f"seed {s}": trainer.generate(prompts, s) for s in seeds}
        files = [f"seed{s}" for s in seeds]
    if not trainer.accelerator.is_main_process:
        return 0
    from PIL import Image

    for stem, images in zip(files, rows.values(), strict=True):
        for j, img in enumerate(images):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(out / f"{j:03d}_{stem}.png")
    # A run's own reward scores its images; a bare model has no reward of its own to be judged by.
    write_grid(trainer, rows, prompts, out / "grid.png", score=bool(args.checkpoint), columns=columns)
    count = sum(len(r) for r in rows.values())
    print(f"wrote {count} image{'s' if count != 1 else ''} and grid.png (+ grid.json) to {out}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from flowalign.api import evaluate, require_file_path

    require_file_path(args.out, "eval.json")
    metrics = evaluate(args.config, checkpoint=args.checkpoint, **parse_overrides(extra))
    if not _main_process():
        return 0
    print(f"evaluation of {args.checkpoint or args.config or 'shapes'} ({_graded_by(metrics)}± one standard error):")
    print("\n".join(f"  {k.removeprefix('eval/'):26s} {_with_se(metrics, k):>15s}" for k in _metric_keys(metrics)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from flowalign.bench import run_bench

    path = run_bench(
        args.config,
        parse_overrides(extra),
        seeds=args.seeds,
        budget_steps=args.steps,
        budget_reward_calls=args.reward_calls,
        budget_seconds=args.seconds,
        out=args.out,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    if _main_process():
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from flowalign.api import export

    if extra:
        raise ValueError(f"unexpected arguments: {' '.join(extra)}")
    result = export(args.checkpoint, args.out, merged=args.merged, dtype=args.dtype)
    if result is None:  # another process: the main one wrote and prints
        return 0
    what = "a diffusers LoRA" if result.kind == "lora" else "a diffusers pipeline"
    print(f"wrote {what} to {result.path} (step {result.step}{', EMA weights' if result.ema else ''}); load it with:")
    print("\n".join("  " + line for line in result.usage.splitlines()))
    settings = ", ".join(f"{k} {v}" for k, v in result.sampling.items())
    print(f"the run's figures were measured with {settings} (in {result.path}/export.json)")
    return 0


def cmd_artifact(args: argparse.Namespace, extra: list[str]) -> int:
    if not extra or extra[0] != "train":
        raise ValueError("usage: flowalign artifact train --clean DIR --artifact DIR --out HEAD.safetensors [...]")
    from rewards.artifact import main as artifact_main

    return int(artifact_main(extra[1:]) or 0)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--reward x` (a config override) must not be read as bench's `--reward-calls x`.
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    parser = strict(prog="flowalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=strict)
    t = sub.add_parser(
        "train",
        help="GRPO training from a preset or YAML",
        description="Any config key can be overridden: --key value. Keys: " + ", ".join(field_names()),
    )
    t.add_argument("config", help="YAML file or built-in preset name (e.g. shapes)")
    t.add_argument("--resume", default=None, help="checkpoint dir, or 'auto' for the output dir's latest")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir (else refused)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="draw images from a base model or a checkpoint")
    s.add_argument(
        "--model",
        default=None,
        help="zoo name (sampled as its model card recommends; default shapes), local dir or hub id; --key value"
        " overrides any config field, e.g. --eval-num-steps 28 --guidance-scale 3.5",
    )
    s.add_argument("--checkpoint", default=None, help="a run dir or checkpoint dir from `flowalign train`")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--prompts", default=None, help="text file, one prompt per line, or shapes:eval")
    s.add_argument("--n", "--num-seeds", dest="n", type=int, default=1, help="seeds per prompt")
    s.add_argument("--seed", type=int, default=0, help="first seed; seeds SEED .. SEED+N-1")
    s.add_argument(
        "--compare",
        action="store_true",
        help="with --checkpoint: the run's base model and its aligned weights from the same noise, row by row,"
        " each image scored by the run's reward (a before/after grid on your prompts)",
    )
    s.add_argument("--out", default="samples", help="a new or empty directory for the PNGs and grid")
    s.add_argument("--overwrite", action="store_true", help="replace the images an earlier call wrote to --out")
    e = sub.add_parser(
        "eval",
        help="evaluate a base model or a checkpoint on a prompt set (per-category accuracy on shapes: sets)",
        description="Any config key can be overridden: --key value, e.g. --eval-prompts shapes:train_eval "
        "--num-eval-prompts 240 --eval-seed 7.",
    )
    # an option, not a positional: an optional positional would swallow the value of an override like --eval-prompts
    e.add_argument("--config", default=None, help="preset or YAML of a base model (default: shapes)")
    e.add_argument("--checkpoint", default=None, help="a run dir or checkpoint dir from `flowalign train`")
    e.add_argument("--out", default=None, help="also write the metrics as JSON here")
    b = sub.add_parser("bench", help="accuracy vs reward calls and seconds for a config, several seeds")
    b.add_argument("config", help="preset or YAML (e.g. shapes)")
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--steps", type=int, default=None, help="training steps per seed (default: config max_steps)")
    b.add_argument("--reward-calls", type=float, default=None, help="budget: reward calls per seed")
    b.add_argument("--seconds", type=float, default=None, help="budget: training seconds per seed")
    b.add_argument(
        "--out",
        default=None,
        help="JSON path (default: <output_dir>_bench/bench.json; with --output-dir D: D/bench.json)",
    )
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier bench's runs in the output dir")
    b.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted bench: keep finished seeds, resume the others from their latest checkpoint",
    )
    x = sub.add_parser(
        "export",
        help="a trained run as a diffusers LoRA (pipe.load_lora_weights) or a whole pipeline (from_pretrained)",
    )
    x.add_argument("checkpoint", help="a run dir or checkpoint dir from `flowalign train`")
    x.add_argument("--out", required=True, help="a new directory")
    x.add_argument("--merged", action="store_true", help="fuse a LoRA into the transformer; save the whole pipeline")
    x.add_argument("--dtype", default=None, help="a saved pipeline's transformer dtype (default float32: exact)")
    a = sub.add_parser("artifact", help="artifact regularizer tools: flowalign artifact train --clean DIR ...")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _quiet_libraries() -> None:
    """One progress bar (ours): silence the loaders' per-component bars and chatter."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import logging as hlog
    from transformers.utils import logging as tlog

    hlog.disable_propagation()  # it has its own handler: through ours too, each of its warnings printed twice

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "artifact":
        extra = args.rest
    handlers = {
        "train": cmd_train,
        "sample": cmd_sample,
        "eval": cmd_eval,
        "bench": cmd_bench,
        "export": cmd_export,
        "artifact": cmd_artifact,
    }
    handler = handlers[args.command]
    try:
        return handler(args, extra)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        print(f"flowalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (what it checkpointed continues with --resume auto)" if args.command == "train" else ""
        print(f"\nflowalign {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
