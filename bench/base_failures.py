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
base model's; `--captions train_eval` grades the balanced training captions instead of the held-out ones.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from step_gradients import write_report  # bench/ is on sys.path when run as a script

from flowalign import world
from flowalign.api import build_trainer, checkpoint_dir
from flowalign.config import load_config
from rewards import shapes

CAPTIONS = {"eval": world.eval_captions, "train_eval": world.train_eval_captions}


def binding(spec: world.CaptionSpec, found: tuple[shapes.Detection, ...]) -> str | None:
    """For a caption naming two objects of different colours and shapes (most position and colour attribution
    captions): "bound" when both stated colour-shape pairs were found, "swapped" when neither was but both pairs with
    the colours exchanged were, else "other"; None for other captions. Tells attribute binding (the right colours
    and shapes on the wrong objects) apart from missing or misdrawn objects."""
    if len(spec.objects) != 2:
        return None
    a, b = spec.objects
    if a.color is None or b.color is None or a.color == b.color or a.shape == b.shape:
        return None
    pairs = {(d.color, d.shape) for d in found}
    if {(a.color, a.shape), (b.color, b.shape)} <= pairs:
        return "bound"
    if not pairs & {(a.color, a.shape), (b.color, b.shape)} and {(b.color, a.shape), (a.color, b.shape)} <= pairs:
        return "swapped"
    return "other"


def failures(seed: int, eval_sampler: str = "ode", checkpoint: Path | None = None, captions: str = "eval") -> dict:
    overrides = {"num_eval_prompts": 0, "seed": seed, "eval_sampler": eval_sampler}
    if checkpoint is None:
        trainer = build_trainer(load_config("shapes", overrides))
    else:
        step_dir = checkpoint_dir(checkpoint)
        trainer = build_trainer(load_config(str(step_dir / "config.yaml"), overrides))
        trainer.load(step_dir)
    caption_list = CAPTIONS[captions]()
    images = trainer.generate(caption_list, seed=seed)  # [N, 3, H, W] in [0, 1], which the checker reads as is
    failed, total, surplus, bindings = Counter(), Counter(), Counter(), Counter()
    found_all, unknown = 0, 0
    for caption, image in zip(caption_list, images, strict=True):
        spec = world.parse_caption(caption)
        result = shapes.score(spec, image)
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
        "caption_set": captions,
        "captions": len(caption_list),
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
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    write_report(failures(args.seed, args.eval_sampler, args.checkpoint, args.captions), args.out)


if __name__ == "__main__":
    main()
