"""The built-in `shapes` model: its components match the tokenizer, the loader's errors name the fix, and the
shipped weights load offline and score within the range their model card states."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowalign import world, zoo
from flowalign.zoo import shapes_model as sm

SHAPES_DIR = zoo.ZOO["shapes"]


def _require_weights() -> None:
    if not (SHAPES_DIR / "model_index.json").exists() or not (SHAPES_DIR / "flowalign.json").exists():
        pytest.skip(f"no shipped weights in {SHAPES_DIR} yet; run `python -m flowalign.zoo.pretrain` to make them")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="shapes"):
        zoo.load("nope")


def test_missing_weights_name_the_pretraining_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(zoo.ZOO, "shapes", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="python -m flowalign.zoo.pretrain"):
        zoo.load("shapes")


def test_built_components_match_the_tokenizer() -> None:
    pipe = sm.build_shapes_pipeline(seed=0)
    tok = pipe.tokenizer
    assert pipe.tokenizer_2 is tok and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        cfg = enc.config
        assert cfg.vocab_size == len(tok)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
        assert cfg.max_position_embeddings == tok.model_max_length == sm.TEXT_LEN
        assert not any(p.requires_grad for p in enc.parameters())  # frozen at random init
    # Every caption of the grammar fits the padding length untruncated.
    assert max(len(tok(c).input_ids) for c in world.all_captions()) <= sm.TEXT_LEN
    t = pipe.transformer.config
    assert t.joint_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert t.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert pipe.vae_scale_factor == 1 and pipe.vae.config.latent_channels == t.in_channels == t.out_channels
    # The pipeline's own prompt encoding has TEXT_LEN CLIP tokens followed by MAX_SEQUENCE_LENGTH zero tokens.
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            ["a red circle", ""],
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=sm.MAX_SEQUENCE_LENGTH,
        )
    assert embeds.shape == (2, sm.TEXT_LEN + sm.MAX_SEQUENCE_LENGTH, t.joint_attention_dim)
    assert pooled.shape == (2, t.pooled_projection_dim)
    assert torch.all(embeds[:, sm.TEXT_LEN :] == 0)


def test_build_is_deterministic_in_seed() -> None:
    a, b = sm.build_shapes_pipeline(seed=3), sm.build_shapes_pipeline(seed=3)
    for (name, p), q in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(
        a.text_encoder.text_model.embeddings.token_embedding.weight,
        b.text_encoder.text_model.embeddings.token_embedding.weight,
    )


def test_shipped_weights_fit_the_size_budget() -> None:
    _require_weights()
    size = sum(f.stat().st_size for f in SHAPES_DIR.rglob("*.safetensors"))
    assert 0 < size <= 25 * 2**20
    settings = zoo.sampling_settings("shapes")
    assert settings["max_sequence_length"] == sm.MAX_SEQUENCE_LENGTH
    assert (settings["height"], settings["width"]) == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert (SHAPES_DIR / "README.md").exists()


def test_shipped_model_scores_within_its_card_range() -> None:
    """A fast held-out evaluation through the stock pipeline lands within the card's measured accuracy.

    48 held-out entries (every 5th of `world.eval_captions()`, 8 per category), seed 0. The card's overall numbers
    come from n_card images; the difference of two independent means of Bernoulli(p) has standard error
    sqrt(p(1-p) (1/48 + 1/n_card)). Allowing 3.5 standard errors makes a spurious failure rarer than 1 in 2000
    while still catching a model that does not load or sample as trained (which scores ~0).
    """
    _require_weights()
    from rewards.shapes import evaluate

    settings = zoo.sampling_settings("shapes")
    pipe = zoo.load("shapes")
    captions = world.eval_captions()[::5]
    torch.manual_seed(0)  # a stochastic scheduler's step noise comes from the global RNG (see the model card)
    out = pipe(
        captions,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        max_sequence_length=settings["max_sequence_length"],
        height=settings["height"],
        width=settings["width"],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    images = out.images
    assert images.shape == (len(captions), 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    card = settings["eval"]
    checker = int(card.get("checker", 2))  # the card's checker (v2 before versions)
    res = evaluate(images.float(), captions, checker)
    # An image with nothing drawn already meets the "no extra objects" constraints (partial ~0.31 here); the model
    # must beat it clearly, which the binomial range alone would not prove at this sample size.
    blank = evaluate(torch.ones_like(images, dtype=torch.float32), captions, checker)
    assert res["partial"] >= blank["partial"] + 0.05, (res, blank)
    n = len(captions)
    for key in ("strict", "partial"):
        p = min(max(card[key], 0.05), 0.95)  # keep the tolerance non-zero at the extremes
        tol = 3.5 * math.sqrt(p * (1 - p) * (1 / n + 1 / card["n"]))
        assert abs(res[key] - card[key]) <= tol, (key, res[key], card[key], tol, json.dumps(res))


def test_a_runs_checker_version_grades_its_evaluation_and_reward() -> None:
    """`checker: 3` reaches both the evaluator and the shapes reward: the run's metrics equal the checker of that
    version applied to the same seeded images, regenerated here."""
    _require_weights()
    from flowalign.api import build_trainer
    from flowalign.config import load_config
    from rewards.base import build_reward
    from rewards.shapes import evaluate

    rewards = []
    for version in (2, 3):
        overrides = {"checker": version, "num_eval_prompts": 12, "eval_num_steps": 3, "eval_batch_size": 12}
        trainer = build_trainer(load_config("shapes", overrides), training=False)
        metrics = trainer.evaluate()
        images, prompts = trainer.generate(trainer.eval_prompts, trainer.cfg.eval_seed), trainer.eval_prompts
        assert metrics["eval/checker"] == version
        assert metrics["eval/strict"] == evaluate(images, prompts, version)["strict"]
        partial = build_reward("shapes_partial", checker=version)(images, prompts)
        assert metrics["eval/reward_mean"] == pytest.approx(float(partial.mean()))
        rewards.append(metrics["eval/reward_mean"])
    assert rewards[0] != rewards[1]  # these images grade differently under the two versions


def test_pretrain_script_runs_and_its_output_loads_offline(tmp_path, monkeypatch) -> None:
    """The pretraining script end to end for a few steps, with the non-default options a GPU run would use (patch 8
    here to stay fast), trained two-layer text encoders and `--compile`: every training step runs through the
    compiled forward, the saved pipeline loads through `from_pretrained` with that architecture, and its card and
    sidecar record the run and the command that reproduces it."""
    from diffusers import StableDiffusion3Pipeline

    from flowalign.zoo import pretrain

    compiled_calls = []
    real_compile = torch.compile

    def spy_compile(module, *a, **kw):
        fn = real_compile(module, *a, **kw)
        return lambda *args, **kwargs: compiled_calls.append(1) or fn(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy_compile)
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["--out", str(out), "--runs", str(runs), "--steps", "3", "--vae-steps", "2", "--device", "cpu"]
    args += ["--patch-size", "8", "--width", "64", "--layers", "1", "--text-layers", "2", "--train-text"]
    args += ["--no-sweep", "--compile"]
    threads = torch.get_num_threads()
    try:
        pretrain.main(args + ["--num-steps", "2", "--eval-seeds", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count

    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    cfg = pipe.transformer.config
    assert (cfg.patch_size, cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim) == (8, 1, 64)
    side = json.loads((out / "flowalign.json").read_text())
    t = side["pretraining"]
    assert t["steps"] == 3
    assert len(compiled_calls) == 3  # one compiled forward per training step
    # every changed option, so that the command reproduces the run (the device is named where not "auto")
    tail = "--steps 3 --seed 0 --vae-steps 2 --device cpu --patch-size 8 --width 64 --layers 1 --text-layers 2"
    assert t["command"].endswith(f"{tail} --train-text --compile --num-steps 2 --eval-seeds 0 --no-sweep")
    # the text encoders trained (their saved EMA weights moved off the seed's initialisation) and have two layers
    init = sm.build_shapes_pipeline(seed=0, text_layers=2)
    for name in ("text_encoder", "text_encoder_2"):
        saved, fresh = getattr(pipe, name), getattr(init, name)
        assert saved.config.num_hidden_layers == 2
        fresh_state = fresh.state_dict()
        assert any(not torch.equal(v, fresh_state[k]) for k, v in saved.state_dict().items()), name
    assert side["eval"]["n"] == len(world.eval_captions())
    card = (out / "README.md").read_text()
    assert "patch 8 on 32×32×3 pixels (16 image tokens)" in card
    assert "bf16 autocast, torch.compile" in card
    assert "2 layers, width 64, **trained with the transformer** (the pipeline reads layer 1's states)" in card
    assert len(list(runs.glob("transformer_step*.safetensors"))) == 1


def test_transformer_config_rejects_sizes_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match="patch_size dividing 32"):
        sm.transformer_config(patch_size=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        sm.transformer_config(width=100)


def test_the_cards_pretraining_command_reproduces_every_changed_setting():
    """The card's command must carry every option the run changed, so that running it trains the same recipe."""
    import shlex

    from flowalign.zoo.pretrain import _changed_flags, build_parser

    parser = build_parser()
    argv = ["--minutes", "5", "--batch-size", "8", "--lr", "0.0005", "--no-bf16", "--compile", "--no-sweep"]
    argv += ["--eval-seeds", "3", "4", "--width", "64", "--ema-decay", "0.9"]
    args = parser.parse_args(argv)
    flags = _changed_flags(parser, args, skip={"out", "runs", "threads", "steps", "minutes", "seed"})
    again = parser.parse_args(["--minutes", "5", *shlex.split(flags)])
    assert vars(again) == vars(args)
    assert "--out" not in flags and "--threads" not in flags


def test_the_missing_weights_error_names_the_shipped_recipe():
    card = zoo.sampling_settings("shapes")["pretraining"]["command"]
    assert zoo._PRETRAIN_COMMANDS["shapes"] == card


def test_a_pretrained_folder_is_loaded_with_the_settings_it_ships(tmp_path):
    """`pretrain --out DIR` writes flowalign.json beside the pipeline: loading DIR must use its text length (4
    zero T5 tokens; the pipeline's default 256 gives another, much worse model) and sampling settings, as the zoo
    name does."""
    import shutil

    from flowalign.api import build_adapter, load_model, recommended_sampling
    from flowalign.config import make_config

    shutil.copytree(zoo.model_dir("shapes"), tmp_path / "shapes_copy")
    folder = str(tmp_path / "shapes_copy")
    assert load_model(folder)[1] == zoo.sampling_settings("shapes")
    assert recommended_sampling(folder) == recommended_sampling("shapes") != {}
    assert build_adapter(make_config({"model": folder})).max_sequence_length == 4


def test_caption_encoder_makes_the_pipelines_own_prompt_embeddings() -> None:
    """`--train-text` encodes captions per batch with `CaptionEncoder` instead of the pipeline's `encode_prompt`; the
    transformer must see the same embeddings either way (one- and two-layer encoders, the empty prompt included)."""
    from flowalign.zoo import pretrain

    captions = world.train_captions()[::40] + [""]
    for layers in (1, 2):
        pipe = sm.build_shapes_pipeline(seed=1, text_layers=layers)
        embeds, pooled = pretrain.encode_captions(pipe, captions)
        with torch.no_grad():
            mine, mine_pooled = pretrain.CaptionEncoder(pipe, captions)(torch.arange(len(captions)).flip(0))
        assert torch.equal(mine, embeds.flip(0)) and torch.equal(mine_pooled, pooled.flip(0))
