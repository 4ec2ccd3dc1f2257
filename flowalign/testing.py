"""Tiny diffusers pipelines built in code from configs with fixed seeds (no network, a second or two on a CPU).

Shared by the tests and the notebooks. The component sizes follow the spirit of diffusers' own
`get_dummy_components` (diffusers 0.42, tests/pipelines/stable_diffusion_3 and flux) but every module is
built here from its config, including the tokenizers:

* CLIP: the real CLIP BPE tokenizer from `flowalign.tokenizer.clip_tokenizer()` (full 49,408-token vocabulary,
  so prompts split exactly as in SD3 / FLUX); the tiny text encoders share its vocabulary size and end-of-text
  id, which is what CLIP's pooling looks up.
* T5: a tiny T5 tokenizer whose Unigram vocabulary (`T5_WORDS` as whole words plus single letters, digits and
  punctuation) is written in memory with the `tokenizers` library; any text tokenizes (unknown characters
  become `<unk>`), ids 0/1/2 are `<pad>`/`</s>`/`<unk>` as in T5, and `</s>` is appended as T5 does.
"""

from __future__ import annotations

import json
import string
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from flowalign.tokenizer import clip_tokenizer

__all__ = ["T5_WORDS", "tiny_clip_config", "tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_t5_tokenizer"]

#: Whole words in the tiny T5 vocabulary (everything else splits into characters).
T5_WORDS = (
    "a an the of and on in with to left right above below top bottom small large big one two three four five "
    "red green blue yellow orange purple black white gray circle circles square squares triangle triangles "
    "star cat dog photo picture"
).split()


def tiny_t5_tokenizer(words: list[str] | tuple[str, ...] = T5_WORDS, model_max_length: int = 512) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer over `words` plus single characters, built offline.

    Written as a `tokenizer.json` and loaded with `from_pretrained`, the one constructor transformers 4 and 5
    both accept. Ids: 0 `<pad>`, 1 `</s>`, 2 `<unk>`; no `<extra_id_*>` sentinels.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -2.0) for w in dict.fromkeys(words)]
    pieces += [(c, -6.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    config = {
        "model_max_length": model_max_length,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp, "tokenizer.json")))
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(tmp)


@lru_cache(maxsize=1)
def _clip() -> CLIPTokenizer:
    # Built once per process and shared by every tiny pipeline (read-only in practice): it is 2/3 of build time.
    return clip_tokenizer()


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    """A 2-layer CLIP text config sharing `tokenizer`'s vocabulary and special ids (pooling finds the EOS id)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,  # SD3 reads the penultimate hidden state
        num_attention_heads=4,
        projection_dim=projection_dim,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _tiny_t5(d_model: int, vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    # Two levels -> vae_scale_factor 2; SD3's scaling / shift factors so decode exercises both.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5035,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _finish(pipe, dtype: torch.dtype):
    # Modules built from configs start in train mode; from_pretrained returns them in eval mode (no dropout).
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
            if dtype != torch.float32:
                module.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(
    seed: int = 0, sample_size: int = 16, *, with_t5: bool = False, dtype: torch.dtype = torch.float32
) -> StableDiffusion3Pipeline:
    """A tiny `StableDiffusion3Pipeline`: 2-layer width-32 MM-DiT, patch 2, 4 latent channels, VAE factor 2.

    Args:
        seed: seeds every module's initialisation (same seed -> identical weights).
        sample_size: latent side; the default image is `2 * sample_size` pixels square (32 for 16).
        with_t5: add a tiny T5 encoder (`text_encoder_3`); without it the pipeline appends
            `max_sequence_length` zero tokens, as the real SD3 does when T5 is dropped.
        dtype: dtype of every module.
    """
    torch.manual_seed(seed)
    clip_dim, joint_dim = 32, 64  # joint_attention_dim holds both CLIP widths side by side (and T5's width)
    tok = _clip()
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tok, clip_dim, clip_dim))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tok, clip_dim, clip_dim))
    tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
    text_encoder_3 = _tiny_t5(joint_dim, len(tokenizer_3)) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32,  # = heads * head_dim
        pooled_projection_dim=2 * clip_dim,  # both CLIP projections concatenated
        pos_embed_max_size=sample_size,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler config
        vae=_tiny_vae(latent_channels=4),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe, dtype)


def tiny_flux_pipeline(seed: int = 0, sample_size: int = 16, *, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A tiny `FluxPipeline`: one double and one single block, width 32, guidance embedding on (FLUX.1-dev style),
    4 latent channels packed 2x2 into 16, VAE factor 2, FLUX.1-dev's dynamically shifted scheduler.

    Args:
        seed: seeds every module's initialisation.
        sample_size: latent side; the default image is `2 * sample_size` pixels square (32 for 16), set through
            `pipe.default_sample_size` so a bare `pipe(prompt)` stays tiny too.
        dtype: dtype of every module.
    """
    torch.manual_seed(seed)
    width = 32
    tok = _clip()
    text_encoder = CLIPTextModel(tiny_clip_config(tok, width, width))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = _tiny_t5(width, len(tokenizer_2))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width,  # T5 width
        pooled_projection_dim=width,  # CLIP pooled width
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(latent_channels=4),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = sample_size  # FLUX's default is 128 (1024 px); keep the tiny default tiny
    return _finish(pipe, dtype)


def tiny_trainer(
    output_dir,
    prompts: list[str],
    reward=None,
    *,
    rng_after_load: int | None = None,
    columns: dict[str, list] | None = None,
    family: str = "sd3",
    **over,
):
    """A `GRPOTrainer` on the tiny SD3 pipeline with settings small enough for a unit test (a 4-step schedule
    1, 0.86, 0.60, 0.009, 0; LoRA rank 8; brightness reward); `over` replaces any config field; `columns`
    (per-prompt extras for the reward) serve the training and the evaluation prompts alike; `family="flux"` builds
    the tiny FLUX pipeline instead.

    Building the tiny pipeline seeds the global RNG; loading real weights leaves it wherever it was.
    `rng_after_load` reseeds it after the build to stand for that arbitrary state."""
    from flowalign.adapters import adapter_for
    from flowalign.config import make_config
    from flowalign.trainer import GRPOTrainer
    from rewards.simple import brightness

    values = dict(
        model="tiny",
        prompts="unused",
        eval_prompts="unused",
        num_steps=4,
        eval_num_steps=4,
        guidance_scale=1.0,
        noise_level=0.9,
        prompts_per_step=2,
        group_size=4,
        train_batch_size=4,
        lora_rank=8,
        learning_rate=3e-2,
        clip_range=1.0,
        max_steps=4,
        save_every=2,
        eval_every=0,
        num_eval_prompts=4,
        output_dir=str(output_dir),
        device="cpu",
        grid_prompts=0,
    )
    values.update(over)
    pipe = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[family](seed=0)
    if rng_after_load is not None:
        torch.manual_seed(rng_after_load)
    adapter = adapter_for(pipe, max_sequence_length=8)
    return GRPOTrainer(
        make_config(values),
        adapter,
        reward or brightness(),
        prompts,
        prompts,
        prompt_columns=columns,
        eval_columns=columns,
    )
