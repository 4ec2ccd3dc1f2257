"""FLUX.1 adapter: the `FlowAdapter` view of a stock `FluxPipeline`.

Every model call mirrors `FluxPipeline.__call__` of diffusers 0.42.1: the pipeline's `encode_prompt`, the
packed-latent noise draw of `prepare_latents`, the dynamically shifted schedule (`mu` from the image token count),
the guidance embedding (FLUX.1-dev is guidance-distilled: `guidance_scale` is an input of the transformer, not a
second pass), `timestep / 1000`, and optional "true CFG" with a negative prompt. Latents are FLUX's packed tokens
[B, L, 4C] throughout; `decode` unpacks them.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from flowalign.adapters.base import PipelineAdapter
from flowalign.types import Conditioning


class FluxAdapter(PipelineAdapter):
    """Wraps a `FluxPipeline` (which stays usable as is).

    Args:
        pipe: the stock pipeline; its `transformer` is looked up on every call (LoRA-injected or peft-wrapped).
        max_sequence_length: T5 tokens for every `encode` (the pipeline's default is 512).
        height, width: image size in pixels; default the pipeline's own default (`default_sample_size * vae factor`).
        true_cfg_scale: > 1 turns on the pipeline's "true CFG" (a second transformer pass on the negative prompt,
            `v = v_neg + s (v - v_neg)`); then `encode` also encodes the negative prompt ("" unless one is given).
            The stock `FluxPipeline` applies true CFG only when a `negative_prompt` is passed: compare with
            `pipe(..., true_cfg_scale=s, negative_prompt="")`. 1 (default) is FLUX.1-dev's usual single pass with
            the distilled guidance embedding.
    """

    family = "flux"
    pipeline_class = FluxPipeline

    def __init__(
        self,
        pipe: FluxPipeline,
        *,
        max_sequence_length: int = 512,
        height: int | None = None,
        width: int | None = None,
        true_cfg_scale: float = 1.0,
    ) -> None:
        super().__init__(pipe, max_sequence_length)
        self.true_cfg_scale = float(true_cfg_scale)
        config = pipe.transformer.config  # read once: a peft wrapper need not expose `.config`
        self.latent_channels: int = config.in_channels // 4
        self.guidance_embeds: bool = bool(config.guidance_embeds)
        multiple = pipe.vae_scale_factor * 2
        self.height, self.width = self._image_size(height, width, multiple, "VAE factor x 2x2 packing")
        self.timestep_per_sigma: float = self.num_train_timesteps / 1000  # FLUX's transformer takes timestep / 1000
        # The pipeline draws latents in the prompt embeddings' dtype: T5's output cast to T5's dtype.
        encoder = pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.transformer
        self.dtype: torch.dtype = encoder.dtype

    @property
    def _latent_hw(self) -> tuple[int, int]:
        # As FluxPipeline.prepare_latents: latent sides rounded down to even numbers for the 2x2 packing.
        f = self.pipe.vae_scale_factor * 2
        return 2 * (self.height // f), 2 * (self.width // f)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(L, 4C) of one sample's packed latents."""
        h, w = self._latent_hw
        return ((h // 2) * (w // 2), self.latent_channels * 4)

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, negative_prompt: str = "") -> Conditioning:
        """T5 sequence [B, max_sequence_length, D], CLIP pooled [B, Dp] and `text_ids` [L, 3] from the pipeline's
        `encode_prompt`. `guidance_scale` is FLUX's distilled guidance (used by `velocity`, not here); negatives are
        encoded only with true CFG (`true_cfg_scale > 1`)."""
        del guidance_scale
        prompts = list(prompts)
        kwargs = {"device": self.device, "max_sequence_length": self.max_sequence_length}
        pe, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, **kwargs)
        neg_pe = neg_pooled = None
        if self.true_cfg:
            neg_pe, neg_pooled, _ = self.pipe.encode_prompt(prompt=[negative_prompt] * len(prompts), **kwargs)
        return Conditioning(pe, pooled, neg_pe, neg_pooled, text_ids=text_ids)

    def init_noise(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """[B, L, 4C] packed latents, drawn unpacked [B, C, h, w] with `randn_tensor` and packed, as
        `FluxPipeline.prepare_latents` does (same generator consumption)."""
        h, w = self._latent_hw
        shape = (batch_size, self.latent_channels, h, w)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self.pipe._pack_latents(noise, batch_size, self.latent_channels, h, w)

    def sigmas(self, num_steps: int) -> Tensor:
        """[T+1] fp32 (CPU) schedule, 1 -> 0, set on a copy of the pipeline's scheduler as `FluxPipeline.__call__`
        sets it: `linspace(1, 1/T, T)` shifted with `mu = calculate_shift(image tokens)`."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            self.latent_shape[0],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.to(device="cpu", dtype=torch.float32)

    def _image_ids(self, device: torch.device) -> Tensor:
        h, w = self._latent_hw
        return self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, self.dtype)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Model velocity [B, L, 4C] at `sigma` ([] or [B]) with the guidance embedding set to `guidance_scale`
        (ignored by transformers without one, e.g. FLUX.1-schnell) and true CFG when `true_cfg_scale > 1`."""
        if self.true_cfg and not cond.has_uncond:
            raise ValueError("true_cfg_scale > 1 needs negative embeddings; encode with this adapter first")
        # contiguous: a strided view (traj.latents[:, k]) can take another kernel and round differently in bf16
        x = latents.to(self.dtype).contiguous()
        b = x.shape[0]
        # As the pipeline: the fp32 scheduler timestep sigma * 1000, cast to the latents' dtype, then / 1000.
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * self.num_train_timesteps
        timestep = (t.expand(b) if t.ndim == 0 else t).to(x.dtype) / 1000
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32).expand(b)
        img_ids = self._image_ids(x.device)

        def run(pe: Tensor, pooled: Tensor) -> Tensor:
            return self.transformer(
                hidden_states=x,
                timestep=timestep,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=pe,
                txt_ids=cond.text_ids,
                img_ids=img_ids,
                joint_attention_kwargs={},
                return_dict=False,
            )[0]

        v = run(cond.prompt_embeds, cond.pooled_embeds)
        if self.true_cfg:
            v_neg = run(cond.neg_prompt_embeds, cond.neg_pooled_embeds)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v

    def decode(self, latents: Tensor) -> Tensor:
        """[B, L, 4C] packed latents -> [B, 3, H, W] fp32 images in [0, 1] (gradients flow)."""
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
