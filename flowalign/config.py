"""Training configuration: one frozen dataclass, YAML in, resolved YAML out, any field overridable.

Names are resolved at the edge: this module turns strings (presets, prompt sources) into values; the
trainer takes built objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "npu")
# accelerate's experiment trackers (`log_with`) -> the pip package each needs.
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


# Integer fields -> (least allowed value, what that value means); None (where a field allows it) is not checked.
MINIMUMS = {
    "group_size": (2, "group-relative advantages need a group"),
    "prompts_per_step": (1, ""),
    "max_steps": (0, ""),
    "num_steps": (2, ""),
    "eval_num_steps": (1, ""),
    "sde_window": (0, "0 = every step"),
    "sde_window_max_start": (0, "null = within the first half"),
    "max_sequence_length": (1, "null = the model's"),
    "completion_steps": (1, "null = all remaining"),
    "train_batch_size": (1, ""),
    "grad_accum": (1, ""),
    "inner_epochs": (1, ""),
    "eval_batch_size": (1, ""),
    "sde_window_stride": (1, ""),
    "height": (1, "pixels; null = the model's"),
    "width": (1, "pixels; null = the model's"),
    "keep_checkpoints": (0, "0 keeps all"),
    "lora_rank": (0, "0 = full fine-tuning"),
    "num_eval_prompts": (0, "0 = no evaluation"),
    "sde_window_shift_every": (0, "0 = a random window each step"),
    "warmup_steps": (0, ""),
    "save_every": (0, ""),
    "eval_every": (0, ""),
    "seed": (0, ""),
    "eval_seed": (0, ""),
    "grid_prompts": (0, ""),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a GRPO run. Batch sizes: B = prompts_per_step * group_size samples per step."""

    # --- model -------------------------------------------------------------------------------------
    model: str = "shapes"  # built-in zoo name ("shapes"), local pipeline dir, or Hugging Face hub id
    dtype: str = "float32"  # weights dtype of the frozen parts: float32 | bfloat16 | float16
    mixed_precision: str = "no"  # accelerate autocast: no | bf16 (fp16 needs loss scaling: not supported)
    # torch.compile the transformer (rollouts, replays, evaluation): ~12% faster steps on the shapes model on CPU,
    # after ~20 s of compiling. On CPU it needs a C++ compiler; without one the run warns and stays eager.
    compile: bool = False
    # Recompute each transformer block's activations in the backward pass instead of keeping them: less memory per
    # training sample (what fits FLUX on one GPU) for roughly one more forward pass per update; same gradients.
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = None  # text tokens; None = the model's recommended value
    # Image size in pixels for training, evaluation and grids; None = the model's default (1024 for SD3.5 and FLUX,
    # where Flow-GRPO trains at 512: a quarter of the image tokens; FLUX's shift follows the size).
    height: int | None = None
    width: int | None = None
    # --- sampling ----------------------------------------------------------------------------------
    num_steps: int = 10  # denoising steps while training (Flow-GRPO trains with fewer than it evaluates)
    eval_num_steps: int = 20  # denoising steps for evaluation and grids
    # Evaluation sampler: "ode" (Euler, noise 0: the stock pipeline's default) or "renoise" (every step re-noises the
    # predicted clean image, the cps step at a=1 = diffusers' `stochastic_sampling`; seeded, so still reproducible).
    eval_sampler: str = "ode"
    guidance_scale: float = 4.5  # CFG used to sample AND to recompute log-probs (must match)
    eval_guidance_scale: float | None = None  # None = guidance_scale
    noise_level: float = 0.7  # SDE noise scale a (SD3 0.7, FLUX 0.9)
    # sde | cps (exact Gaussian log-probs) | cps_flow_grpo (cps with Flow-GRPO's constant-free log-prob, whose
    # log-ratios are the exact ones times 2 sigma_n^2: the scale the reference code's cps clip range 1e-5 is for)
    sampler: str = "sde"
    sde_window: int = 0  # >0: SDE (and training) only on a random window of this many early steps
    sde_window_max_start: int | None = None  # last allowed window start; None = within the first half
    # 0: a random window each step (Flow-GRPO-Fast). N > 0: MixGRPO's sliding window, starting at step 0 and moving
    # `sde_window_stride` steps later every N training steps until it reaches sde_window_max_start, where it stays.
    sde_window_shift_every: int = 0
    sde_window_stride: int = 1
    group_shared_noise: bool = False  # a group's G samples start from one initial noise, so the group baseline
    # absorbs the reward variance the initial noise causes, which no step's log-prob can explain
    min_noise_std: float = 0.02  # steps whose noise std is below this run ODE: they explore nothing yet their
    # log-prob gradients are ~1/std and swamp the rest (the schedule's step to sigma ~0.001; docs/EXPERIMENTS.md)
    # How training rollouts run the steps they do not train (outside the window, or too narrow): "ode" or "renoise",
    # the eval_sampler choices; renoise makes the rewarded images come from the sampler the model is evaluated with.
    untrained_sampler: str = "ode"
    # --- data --------------------------------------------------------------------------------------
    prompts: str = "shapes:train"  # "shapes:train[_balanced]" | "shapes:eval" | "shapes:train_eval" | .txt/.jsonl
    eval_prompts: str = "shapes:eval"  # the same forms; a .jsonl's extra fields reach the reward here too
    num_eval_prompts: int = 64  # fixed evaluation prompts (N spread evenly over the list; cycles if N is larger)
    # version of the built-in world's checker (rewards.shapes.CHECKERS) that grades shapes: prompt sets and is the
    # default of the shapes_* rewards: 2 (every figure so far) or 3 (stricter shapes, off-palette objects); the
    # default is rewards.shapes.DEFAULT_CHECKER (a test holds the two equal; config imports no torch at load time)
    checker: int = 2
    prompts_per_step: int = 4  # P distinct prompts per step
    group_size: int = 8  # G samples per prompt (>= 2: advantages are relative within a group)
    # --- reward and credit -------------------------------------------------------------------------
    reward: Any = "shapes_partial"  # a registered reward name, or a list of {name, weight, kwargs, key, gate}
    reward_normalize: str = "sum"  # several rewards: sum | sum_then_normalize | normalize_then_sum
    reward_log_tame: bool = False  # PaCo-RL log-taming of high-variance rewards before combining
    credit: str = "outcome"  # outcome (Flow-GRPO) | incremental | turning_point
    credit_constrained: bool = True  # TP-GRPO: the paper's constrained turning-point definition
    credit_first_step: bool = True  # TP-GRPO: the first-step rule (k = 0 may be a turning point)
    credit_balance: str = "batch"  # none | batch | group | global: where turning points of both signs balance
    credit_balance_key: str = "abs_G"  # abs_G | abs_r: which turning points survive balancing
    step_reward_mode: str = "ode"  # ode (exact deterministic completions, O(T^2)) | x0 (one-step estimate, O(T))
    completion_steps: int | None = None  # ode completions on this many sigmas (None = all remaining)
    adv_std: str = "group"  # group | batch: scope of the std in group-relative advantages
    adv_clip: float = 5.0
    # --- optimisation ------------------------------------------------------------------------------
    lora_rank: int = 16  # 0 = full fine-tuning
    lora_alpha: float | None = None  # None = lora_rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # >0: the LoRA acts only at noise levels sigma >= this, the base model below (flowalign.lora_window). Set it
    # to cover the trained window, so the untrained low-noise steps cannot drift unsteered. 0 = every step.
    lora_min_sigma: float = 0.0
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    train_batch_size: int = 8  # samples per forward/backward minibatch
    grad_accum: int = 1  # minibatches per optimizer step (each accumulates over all its trained steps)
    inner_epochs: int = 1  # passes over each step's samples
    clip_range: float = 1e-4  # PPO clip epsilon on the ratio (tiny: log-probs are per-element means)
    kl_beta: float = 0.0  # weight of the KL to the reference (LoRA disabled / frozen copy)
    # flow_grpo: the reference code's KL, which divides by the sde noise scale a sqrt(sigma/(1-sigma)) without the
    # step's sqrt(-dt), i.e. the Gaussian KL times (sigma - sigma'), 4-25x smaller on SD3.5's 10 steps: the scale
    # the published kl_beta values (0.01-0.04) are for. exact: the Gaussian KL of each step (cps: the two agree).
    kl_form: str = "flow_grpo"
    ema_decay: float = 0.0  # >0: keep an EMA of the trainable weights, used for evaluation
    # --- run ---------------------------------------------------------------------------------------
    max_steps: int = 100
    seed: int = 0
    output_dir: str = "runs/shapes"
    save_every: int = 25  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 0  # 0 keeps every checkpoint; N keeps the N latest (a FLUX full fine-tune's is ~24 GB)
    eval_every: int = 25  # evaluate every N steps (and at start and end); 0 = only start and end
    eval_seed: int = 1234
    eval_batch_size: int = 64  # images per evaluation batch; each batch is seeded by (eval_seed, its start), and the
    # batches are shared out over processes, so evaluation is the same on 1 or N processes (not across batch sizes)
    grid_prompts: int = 8  # prompts in the before/after grid (0 = no grid)
    device: str | None = None  # None = accelerate's choice
    # Experiment trackers, through accelerate (tensorboard, wandb, mlflow, ...: TRACKERS): every metrics.jsonl
    # record also goes to them, under the project "flowalign" (TensorBoard: <output_dir>/flowalign/).
    log_with: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def eval_guidance(self) -> float:
        """The guidance scale of evaluation, grids and `sample`."""
        return self.guidance_scale if self.eval_guidance_scale is None else self.eval_guidance_scale

    def validate(self) -> None:
        """Raises ValueError naming the field and the fix."""
        for name, (least, meaning) in MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}{f' ({meaning})' if meaning else ''}, got {value}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {self.adam_betas}")
        if self.batch_size % self.train_batch_size:
            raise ValueError(
                f"train_batch_size ({self.train_batch_size}) must divide "
                f"prompts_per_step*group_size ({self.batch_size})"
            )
        if not self.output_dir.strip():
            raise ValueError("output_dir must name a directory, got an empty string")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        for name in ("guidance_scale", "eval_guidance_scale", "noise_level", "learning_rate", "kl_beta", "adv_clip"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.device is not None and self.device.split(":")[0] not in DEVICE_TYPES:
            raise ValueError(
                f"device must be one of {', '.join(DEVICE_TYPES)} (optionally with :N) or null, got {self.device!r}"
            )
        if self.min_noise_std < 0:
            raise ValueError(f"min_noise_std must be >= 0, got {self.min_noise_std}")
        if not 0 <= self.lora_min_sigma <= 1 or (self.lora_min_sigma > 0 and self.lora_rank <= 0):
            raise ValueError(f"lora_min_sigma must be in [0, 1] and needs lora_rank > 0, got {self.lora_min_sigma}")
        if self.sde_window >= self.num_steps:
            raise ValueError(f"sde_window ({self.sde_window}) must be < num_steps ({self.num_steps}); 0 = all steps")
        if self.sde_window_shift_every and not self.sde_window:
            raise ValueError("sde_window_shift_every slides an sde_window: set sde_window > 0 too")
        if self.mixed_precision == "fp16":
            raise ValueError(
                "mixed_precision fp16 is not supported: it needs loss scaling, which the trainer does not do; use bf16"
                " (what SD3 and FLUX are trained in)"
            )
        for name, allowed in {
            "sampler": ("sde", "cps", "cps_flow_grpo"),
            "kl_form": ("flow_grpo", "exact"),
            "eval_sampler": ("ode", "renoise"),
            "untrained_sampler": ("ode", "renoise"),
            "credit": ("outcome", "incremental", "turning_point"),
            "adv_std": ("group", "batch"),
            "credit_balance": ("none", "batch", "group", "global"),
            "credit_balance_key": ("abs_G", "abs_r"),
            "step_reward_mode": ("ode", "x0"),
            "reward_normalize": ("sum", "sum_then_normalize", "normalize_then_sum"),
            "dtype": ("float32", "bfloat16", "float16"),
            "mixed_precision": ("no", "bf16"),  # fp16 would need loss scaling, which the trainer does not do
        }.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        from rewards.shapes import checker_of  # the versions live with the checker

        checker_of(self.checker)
        for name in self.log_with:
            if name not in TRACKERS:
                raise ValueError(f"log_with: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def bool_field_names() -> set[str]:
    """The on/off keys: the command line accepts `--key` and `--no-key` for them."""
    hints = typing.get_type_hints(TrainConfig)
    return {name for name in field_names() if hints[name] is bool}


def _unknown_key_error(key: str) -> ValueError:
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(field_names())}")


def _coerce(name: str, value: Any) -> Any:
    """Converts YAML / command-line values to the field's declared type."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is tuple:
        inner = args[0] if args else str
        if isinstance(value, str):
            items = [x for x in value.split(",") if x.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{name} expects a list of {inner.__name__} (or a comma-separated string), got {value!r}")
        return tuple(_scalar(name, inner, x.strip() if isinstance(x, str) else x) for x in items)
    return _scalar(name, hint, value)


def _scalar(name: str, hint: type, value: Any) -> Any:
    """One value of type `hint`, refusing what would be silently changed: a float or bool where an integer is due
    (2.7 -> 2, true -> 1), null or a list where text is due (a folder named "None")."""
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name} expects true/false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} expects true/false, got {value!r}")
    bad = value is None or isinstance(value, (list, tuple, dict)) or (hint is not str and isinstance(value, bool))
    if hint is int and isinstance(value, float) and not value.is_integer():
        bad = True
    if not bad:
        try:
            return hint(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} expects {'an integer' if hint is int else hint.__name__}, got {value!r}")


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Builds and validates a config from a mapping; unknown keys are named with the valid ones."""
    valid = set(field_names())
    for key in values:
        if key not in valid:
            raise _unknown_key_error(key)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    cfg.validate()
    return cfg


# Fields added after runs were first written, with the value that gives an older run's config.yaml (which lacks
# them) its old meaning: kl_beta was the exact Gaussian KL before kl_form existed, and shapes checker v2 graded
# everything before checker versions were recorded (the metrics logs and model cards of that time read so too).
LEGACY_DEFAULTS = {"kl_form": "exact", "checker": 2}


def load_run_config(checkpoint: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config a checkpoint step directory was trained with (its config.yaml, read with `LEGACY_DEFAULTS` for
    fields it predates), plus overrides."""
    values = read_yaml(str(Path(checkpoint) / "config.yaml"))
    return make_config(
        {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in values}, **values, **(overrides or {})}
    )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` looks like a flowalign run (even one stopped before its first checkpoint), its checkpoints dir
    or a step dir: for the hint to pass it as --checkpoint."""
    path = Path(path)
    marks = ("checkpoints", "metrics.jsonl", "latest", "trainable.safetensors")
    return any((path / mark).exists() for mark in marks)


def read_yaml(source: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file path or a built-in preset name -> mapping, with its `base:` chain merged in.

    `base: shapes` (a preset, or a YAML path relative to the file naming it) starts from that config, so a user's
    file holds only what it changes: its keys win over the base's, as `--key value` wins over both.
    """
    path = Path(source)
    if not path.is_file():
        if source not in preset_names():
            hint = " (a training run: pass it as --checkpoint, checkpoint= in Python)" if is_run_dir(path) else ""
            raise FileNotFoundError(
                f"config {source!r} is neither a YAML file nor a built-in preset{hint}; presets: "
                f"{', '.join(preset_names())}"
            )
        path = PRESET_DIR / f"{source}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: base must name a preset or a YAML file, got {base!r}")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ValueError(f"{path}: its base chain loops back to itself: {chain}")
    relative = path.parent / base  # = base when base is absolute
    base_source = base if base in preset_names() and not relative.is_file() else str(relative)
    try:
        merged = read_yaml(base_source, (*_seen, resolved))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: base {base!r}: {err}") from None
    return {**merged, **data}


def load_config(source: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset or YAML file, then overrides (later wins)."""
    values = read_yaml(source) if source else {}
    values.update(overrides or {})
    return make_config(values)


def to_yaml(cfg: TrainConfig) -> str:
    data = dataclasses.asdict(cfg)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return yaml.safe_dump(data, sort_keys=False)


def load_prompt_set(source: str) -> tuple[list[str], dict[str, list]]:
    """Resolves a prompt source into prompts and per-prompt columns (forwarded to rewards as keywords).

    "shapes:train" / "shapes:eval": the built-in world's splits; "shapes:train_balanced": the training split with
    every category equally likely under uniform draws (`world.train_balanced_captions`); "shapes:train_eval": 40
    training captions per category (the model card's balanced list, to check a run on what it trained on); a
    "/<category>" suffix keeps one category ("shapes:eval/counting": the 40 held-out counting entries); `*.txt`: one
    prompt per line;
    `*.jsonl`: one object per line with a "prompt" and any extra fields (e.g. "reference_images" for DINO similarity).
    """
    if source.startswith("shapes:"):
        from flowalign import world

        sets = {
            "train": world.train_captions,
            "train_balanced": world.train_balanced_captions,
            "eval": world.eval_captions,
            "train_eval": world.train_eval_captions,
        }
        split, _, category = source.split(":", 1)[1].partition("/")
        if split not in sets or (category and category not in world.CATEGORIES):
            raise ValueError(
                f"unknown built-in prompt set {source!r}; use one of {', '.join('shapes:' + k for k in sets)}, "
                f"optionally with /<category> ({', '.join(world.CATEGORIES)})"
            )
        prompts = list(sets[split]())
        if category:
            prompts = [p for p in prompts if world.parse_caption(p).category == category]
        return prompts, {}
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"prompt file {source!r} is a directory; pass a text file with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {source!r} not found; pass a text file with one prompt per line (or a .jsonl file)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {source!r} is empty; it needs one prompt per line")
    if path.suffix != ".jsonl":
        return lines, {}
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{source}:{i}: each line needs an object with a "prompt" string')
        rows.append(row)
    keys = sorted({k for row in rows for k in row} - {"prompt"})
    return [r["prompt"] for r in rows], {k: [r.get(k) for r in rows] for k in keys}


def load_prompts(source: str) -> list[str]:
    """Only the prompts of `load_prompt_set(source)`."""
    return load_prompt_set(source)[0]
