"""What does the base model (or a trained checkpoint) get wrong? Per-constraint failure counts of the checker.

    python bench/base_failures.py --out bench/results/base_failures.json
    python bench/base_failures.py --checkpoint runs/shapes/checkpoints/step_000120 --eval-sampler renoise \
        --captions train_eval

Draws one image per held-out caption (`world.eval_captions()`, 240) with the main job's evaluation settings (the
trainer's seeded `generate`, at the base model since nothing is trained) and counts, per category, how often
each constraint of `rewards.shapes` fails, how many objects were found against how many the caption states, and
how many detections have no recognisable shape ("unknown"), and, for captions naming two different colours on two
different shapes, whether each colour sits on its shape (`binding`). The answer says where alignment has to act:
local shape structure, and on held-out pairs the binding of colour to shape (docs/EXPERIMENTS.md, "Why position
and colour attribution do not move"). `--eval-sampler ode` (the default) is what `bench/results/base_failures.json`
used; the main job evaluates with `renoise` (`--seed 1234 --eval-sampler renoise` is its own draw). `--checkpoint`
grades a training run's checkpoint (its own config and EMA weights) on the same draw, so its counts pair with the
base model's; `--captions train_eval` grades the balanced training captions instead of the held-out ones, and
`--captions train_twins` the training captions whose colour-exchanged twin is trained too (does the model read word
order?). `--model DIR` grades another base model (e.g. a pretraining run's output) and `--guidance-scale` another
evaluation guidance, each on the same draw.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

from step_gradients import write_report  # bench/ is on sys.path when run as a script

from flowalign import world
from flowalign.api import build_trainer, checkpoint_dir
from flowalign.config import load_config
from rewards import shapes


def two_pairs(spec: world.CaptionSpec) -> bool:
    """Whether a caption names two objects of different colours and shapes (most position and colour attribution
    captions), so that its colours can be found on the wrong shapes."""
    if len(spec.objects) != 2:
        return False
    a, b = spec.objects
    return a.color is not None and b.color is not None and a.color != b.color and a.shape != b.shape


def binding(spec: world.CaptionSpec, found: tuple[shapes.Detection, ...]) -> str | None:
    """For a `two_pairs` caption: "bound" when both stated colour-shape pairs were found, "swapped" when neither was
    but both pairs with the colours exchanged were, else "other"; None for other captions. Tells attribute binding
    (the right colours and shapes on the wrong objects) apart from missing or misdrawn objects."""
    if not two_pairs(spec):
        return None
    a, b = spec.objects
    pairs = {(d.color, d.shape) for d in found}
    if {(a.color, a.shape), (b.color, b.shape)} <= pairs:
        return "bound"
    if not pairs & {(a.color, a.shape), (b.color, b.shape)} and {(b.color, a.shape), (a.color, b.shape)} <= pairs:
        return "swapped"
    return "other"


def exchanged(spec: world.CaptionSpec) -> world.CaptionSpec:
    """The caption with its two objects' colours exchanged ("a red circle and a blue square" -> "a blue circle and
    a red square"): the same words, so only their order tells the two apart."""
    a, b = spec.objects
    return replace(spec, objects=(replace(a, color=b.color), replace(b, color=a.color)))


def train_twins() -> list[str]:
    """Training captions naming two colours on two shapes whose colour-exchanged caption is a training caption too.
    Only word order tells such a caption from its twin, so `binding` on them measures whether the model reads it
    (on the held-out pairs the familiar pairing is the only one trained)."""
    train = set(world.train_captions())
    out = []
    for caption in world.train_captions():
        spec = world.parse_caption(caption)
        if two_pairs(spec) and world.caption_of(exchanged(spec)) in train:
            out.append(caption)
    return out


CAPTIONS = {"eval": world.eval_captions, "train_eval": world.train_eval_captions, "train_twins": train_twins}


def failures(
    seed: int,
    eval_sampler: str = "ode",
    checkpoint: Path | None = None,
    captions: str = "eval",
    guidance_scale: float | None = None,
    model: str | None = None,
) -> dict:
    overrides = {"num_eval_prompts": 0, "seed": seed, "eval_sampler": eval_sampler}
    if guidance_scale is not None:
        overrides["eval_guidance_scale"] = guidance_scale
    if model is not None:
        if checkpoint is not None:
            raise ValueError("--model grades a base model; a --checkpoint names its own model in its config")
        overrides["model"] = model
    if checkpoint is None:
        trainer = build_trainer(load_config("shapes", overrides))
    else:
        step_dir = checkpoint_dir(checkpoint)
        trainer = build_trainer(load_config(str(step_dir / "config.yaml"), overrides))
        trainer.load(step_dir)
    caption_list = CAPTIONS[captions]()
    images = trainer.generate(caption_list, seed=seed)  # [N, 3, H, W] in [0, 1], which the checker reads as is
    failed, total, surplus, bindings, strict = Counter(), Counter(), Counter(), Counter(), Counter()
    found_all, unknown = 0, 0
    for caption, image in zip(caption_list, images, strict=True):
        spec = world.parse_caption(caption)
        result = shapes.score(spec, image)
        strict[spec.category] += int(result.strict)
        found = result.detections
        stated = spec.count if spec.category == "counting" else len(spec.objects)
        surplus[f"{spec.category}/found_minus_stated={len(found) - stated:+d}"] += 1
        bound = binding(spec, found)
        if bound is not None:
            bindings[f"{spec.category}/{bound}"] += 1
        found_all += len(found)
        unknown += sum(d.shape == "unknown" for d in found)
        for name, held in result.constraints.items():
            key = f"{spec.category}/{name}"
            total[key] += 1
            failed[key] += not held
    return {
        "seed": seed,
        "eval_sampler": eval_sampler,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model": trainer.cfg.model,
        "guidance_scale": trainer.cfg.eval_guidance,
        "caption_set": captions,
        "captions": len(caption_list),
        "strict_passed": dict(sorted(strict.items())),
        "constraint_failed_of_total": {k: [failed[k], total[k]] for k in sorted(total)},
        "images_by_found_minus_stated": dict(sorted(surplus.items())),
        "two_colour_two_shape_captions_by_binding": dict(sorted(bindings.items())),
        "detections": found_all,
        "unknown_shape_detections": unknown,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-sampler", choices=("ode", "renoise"), default="ode")
    p.add_argument("--checkpoint", type=Path, default=None, help="a run dir, its checkpoints dir or a step dir")
    p.add_argument("--captions", choices=sorted(CAPTIONS), default="eval")
    p.add_argument("--guidance-scale", type=float, default=None, help="instead of the config's (the card's 2.5)")
    p.add_argument("--model", default=None, help="a base model other than the preset's: a pipeline dir or hub id")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = failures(args.seed, args.eval_sampler, args.checkpoint, args.captions, args.guidance_scale, args.model)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
