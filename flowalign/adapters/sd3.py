"""Stable Diffusion 3 / 3.5 adapter: the `FlowAdapter` view of a stock `StableDiffusion3Pipeline`.

Every model call mirrors `StableDiffusion3Pipeline.__call__` of diffusers 0.42.1 (prompt encoding through the
pipeline's own `encode_prompt`, `prepare_latents`' noise draw, `retrieve_timesteps` for the schedule, the
transformer call and its classifier-free guidance), so a sampler built on this adapter with noise level 0
reproduces the stock pipeline's latents.
"""

from __future__ import annotations

import copy

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from flowalign.adapters.base import PipelineAdapter
from flowalign.types import Conditioning


class SD3Adapter(PipelineAdapter):
    """Wraps a `StableDiffusion3Pipeline` (which stays usable as is).

    Args:
        pipe: the stock pipeline. Its `transformer` is looked up on every call, so a LoRA injected into it (or a
            peft wrapper assigned to `adapter.transformer` / `pipe.transformer`) is what `velocity` runs.
        max_sequence_length: T5 tokens (without T5, the number of zero tokens the pipeline appends). Used by every
            `encode`; sampling with the stock pipeline must pass the same value.
        height, width: image size in pixels; default the pipeline's own default
            (`transformer.config.sample_size * vae_scale_factor`).
    """

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        *,
        max_sequence_length: int = 256,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__(pipe, max_sequence_length)
        # Config values read once: a peft wrapper around the transformer need not expose `.config`.
        config = pipe.transformer.config
        self.in_channels: int = config.in_channels
        self.patch_size: int = config.patch_size
        multiple = pipe.vae_scale_factor * self.patch_size
        self.height, self.width = self._image_size(height, width, multiple, "VAE factor x patch size")
        self.timestep_per_sigma: float = float(self.num_train_timesteps)  # the transformer's timestep = sigma * this
        # The pipeline draws latents in the prompt embeddings' dtype, which is the CLIP encoder's dtype.
        encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.transformer
        self.dtype: torch.dtype = encoder.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one sample's latents."""
        f = self.pipe.vae_scale_factor
        return (self.in_channels, self.height // f, self.width // f)

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, negative_prompt: str = "") -> Conditioning:
        """Prompt encodings via the pipeline's `encode_prompt`; negatives only when CFG is on (`guidance_scale > 1`).

        Returns: Conditioning with prompt_embeds [B, 77 + max_sequence_length, D], pooled_embeds [B, Dp].
        """
        pe, neg_pe, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=guidance_scale > 1,
            negative_prompt=negative_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(pe, pooled, neg_pe, neg_pooled)

    def init_noise(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """[B, C, h, w] standard normal latents, drawn as `prepare_latents` draws them (same shape, dtype and
        generator consumption, via diffusers' `randn_tensor`)."""
        shape = (batch_size, *self.latent_shape)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def sigmas(self, num_steps: int) -> Tensor:
        """[T+1] fp32 (CPU) schedule, 1 -> 0, computed on a copy of the pipeline's scheduler the way
        `StableDiffusion3Pipeline.__call__` sets it (including resolution-dependent shifting when configured)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            f = self.pipe.vae_scale_factor * self.patch_size
            image_seq_len = (self.height // f) * (self.width // f)
            # Defaults as in the SD3 pipeline (diffusers 0.42.1), which uses 1.16 for max_shift.
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
        return scheduler.sigmas.to(device="cpu", dtype=torch.float32)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Model velocity [B, C, h, w] at `sigma` ([] or [B]); CFG `v_u + g (v_c - v_u)` when `guidance_scale > 1`.

        The timestep is `sigma * num_train_timesteps` in fp32, exactly as the scheduler computes its timesteps.
        """
        cfg = guidance_scale > 1
        if cfg and not cond.has_uncond:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative embeddings; encode with the same guidance_scale"
            )
        # contiguous: a strided view (traj.latents[:, k]) can take another kernel and round differently in bf16
        x = latents.to(self.dtype).contiguous()
        pe, pooled = cond.prompt_embeds, cond.pooled_embeds
        if cfg:
            x = torch.cat([x, x])
            pe = torch.cat([cond.neg_prompt_embeds, pe])
            pooled = torch.cat([cond.neg_pooled_embeds, pooled])
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * self.num_train_timesteps
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else (torch.cat([t, t]) if cfg else t)
        out = self.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if cfg:
            v_uncond, v_cond = out.chunk(2)
            out = v_uncond + guidance_scale * (v_cond - v_uncond)
        return out

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] latents -> [B, 3, H, W] fp32 images in [0, 1] (gradients flow; wrap in no_grad if unwanted)."""
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
