"""The built-in `shapes` model: component configs and a builder for an untrained pipeline.

The model is a stock diffusers `StableDiffusion3Pipeline` with tiny components, so everything that works on a
real SD3 checkpoint (the adapter, the samplers, `pipe(...)` itself) works on it unchanged:

- `transformer`: a small `SD3Transformer2DModel` (MM-DiT) working directly on 32×32 RGB pixels (patch 4 →
  64 image tokens), a "justified pixel-space alternative" to a latent model: the scenes are flat-coloured
  shapes, so a learned latent space buys nothing a 2-CPU budget could pay for.
- `vae`: a one-level `AutoencoderKL` (no down-sampling, `vae_scale_factor == 1`, 3 latent channels) trained to
  copy its input, so a latent *is* the image in [-1, 1]; it only lets the stock pipeline decode unchanged.
- `text_encoder`, `text_encoder_2`: two small `CLIPTextModelWithProjection`s over a reduced real-CLIP
  vocabulary (`flowalign.tokenizer.clip_tokenizer(words=grammar_words())`). The shipped model (base v3) has two
  layers each, trained with the transformer (pretraining's `--text-layers 2 --train-text`), so the token states
  the transformer reads are contextual: "red" before "circle" differs from "red" before "square". The builder's
  default, one layer frozen at random initialisation (base v2), also works: the penultimate hidden state is then
  the token + position embedding itself, an exact code of the caption, and the pooled projection of the
  end-of-text state still separates captions. Measured against each other in docs/EXPERIMENTS.md.
- `text_encoder_3 = tokenizer_3 = None`: the pipeline then appends `max_sequence_length` zero tokens, which
  act as a few constant register tokens. Training and every sampling call must use the same value
  (`MAX_SEQUENCE_LENGTH`, also written to the `flowalign.json` sidecar).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from flowalign.tokenizer import clip_tokenizer

IMAGE_SIZE = 32  # pixels; the world renders 32×32 scenes
TEXT_LEN = 16  # CLIP tokenizer padding length (BOS + caption + EOS/pad); the longest grammar caption is 12
MAX_SEQUENCE_LENGTH = 4  # zero "T5" tokens the pipeline appends; training and sampling must agree
SCHEDULER_SHIFT = 1.0  # no resolution shift at 32×32; the training sigma density matches shift 1

TEXT_HIDDEN = 64  # width of each CLIP text encoder; the two are concatenated → 128 = joint_attention_dim
TEXT_PROJECTION = 64  # each pooled projection; concatenated → 128 = pooled_projection_dim
HEAD_DIM = 32  # transformer attention head width; the width is a multiple of it
# The shipped transformer's size (pretrain's defaults).
PATCH_SIZE = 4
WIDTH = 96
LAYERS = 6


def transformer_config(patch_size: int = PATCH_SIZE, width: int = WIDTH, layers: int = LAYERS) -> dict[str, Any]:
    """The `SD3Transformer2DModel` config; the defaults are the shipped model's.

    Patch 2 (256 tokens) draws sharper shapes but costs ~3.7× the compute per sample: a GPU option.
    """
    if IMAGE_SIZE % patch_size or width % HEAD_DIM or width <= 0 or layers <= 0:
        raise ValueError(
            f"need patch_size dividing {IMAGE_SIZE}, width a positive multiple of {HEAD_DIM} and layers > 0; "
            f"got patch_size={patch_size}, width={width}, layers={layers}"
        )
    return dict(
        sample_size=IMAGE_SIZE,
        patch_size=patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=width // HEAD_DIM,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=width,  # must equal the transformer width (heads × head dim)
        pooled_projection_dim=2 * TEXT_PROJECTION,
        pos_embed_max_size=IMAGE_SIZE // patch_size,
        qk_norm="rms_norm",
    )


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(16,),  # one level: no down-sampling, vae_scale_factor = 1
    layers_per_block=1,
    latent_channels=3,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # latents are pixels in [-1, 1]: no rescaling
    shift_factor=0.0,
    mid_block_add_attention=False,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)


def text_config(tokenizer: CLIPTokenizer, layers: int = 1) -> CLIPTextConfig:
    """A small CLIP text config (one layer by default) whose vocabulary and special ids match `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def shapes_tokenizer() -> CLIPTokenizer:
    """The reduced real-CLIP tokenizer over the world's grammar words, padded to `TEXT_LEN`."""
    from flowalign.world import grammar_words

    return clip_tokenizer(words=grammar_words(), model_max_length=TEXT_LEN)


def _text_encoder(tokenizer: CLIPTokenizer, layers: int = 1) -> CLIPTextModelWithProjection:
    encoder = CLIPTextModelWithProjection(text_config(tokenizer, layers))
    # CLIP initialises embeddings with std 0.02; unit-scale codes are easier for the (trained) context
    # embedder to read, and while the encoders stay frozen (the default) this scale is what the transformer sees.
    emb = encoder.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, 1.0)
        emb.position_embedding.weight.normal_(0.0, 0.5)
    return encoder.eval().requires_grad_(False)


def build_shapes_pipeline(
    seed: int = 0, transformer: dict[str, Any] | None = None, text_layers: int = 1
) -> StableDiffusion3Pipeline:
    """Builds the untrained `shapes` pipeline from the configs above (no downloads, deterministic in `seed`).

    `transformer`: a `transformer_config(...)`; None = the shipped size.
    """
    torch.manual_seed(seed)
    tokenizer = shapes_tokenizer()
    text_encoder = _text_encoder(tokenizer, text_layers)
    text_encoder_2 = _text_encoder(tokenizer, text_layers)
    transformer_model = SD3Transformer2DModel(**(transformer or transformer_config()))
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return StableDiffusion3Pipeline(
        transformer=transformer_model,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
