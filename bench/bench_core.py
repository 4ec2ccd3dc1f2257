"""Throughput and memory of the core: rollout with log-probs, and one full GRPO step. Prints JSON.

    python bench/bench_core.py                 # tiny SD3 on CPU (and the shapes model if installed)
    python bench/bench_core.py --sd35m         # + a random-weight transformer of SD3.5-Medium's shape at 512 px,
                                               #   bf16, on CUDA (skipped without a GPU), without and with
                                               #   gradient checkpointing

Peak memory: CUDA max allocated on GPU; process max RSS on CPU (includes the Python/torch baseline).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch

from flowalign.adapters import adapter_for
from flowalign.config import make_config
from flowalign.samplers.rollout import rollout
from flowalign.testing import tiny_sd3_pipeline
from flowalign.trainer import GRPOTrainer
from flowalign.types import Conditioning


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench_adapter(
    name: str, adapter, *, batch: int, steps: int, guidance: float, repeats: int, device, checkpointing: bool = False
) -> dict:
    prompts = ["a red circle to the left of a blue square"] * batch
    gen = torch.Generator().manual_seed(0)
    cond = adapter.encode(prompts, guidance)

    def roll():
        rollout(adapter, prompts, num_steps=steps, guidance_scale=guidance, noise_level=0.7, generator=gen, cond=cond)

    t_roll = _time(roll, repeats, device)
    cfg = make_config(
        dict(
            model=name,
            prompts="x",
            eval_prompts="x",
            num_steps=steps,
            guidance_scale=guidance,
            prompts_per_step=max(1, batch // 4),
            group_size=min(4, batch),
            train_batch_size=min(4, batch),
            lora_rank=16,
            max_steps=1,
            output_dir=tempfile.mkdtemp(),
            device=str(device.type),
            gradient_checkpointing=checkpointing,
        )
    )
    trainer = GRPOTrainer(cfg, adapter, lambda im, p, **_: im.mean(dim=(1, 2, 3)), prompts, [])
    t_step = _time(lambda: trainer.train_step(0), max(1, repeats // 2), device)
    return {
        "model": name,
        "device": str(device),
        "batch": batch,
        "steps": steps,
        "guidance": guidance,
        "rollout_samples_per_s": batch / t_roll,
        "grpo_step_samples_per_s": cfg.batch_size / t_step,
        "grpo_step_s": t_step,
        "gradient_checkpointing": checkpointing,
        "peak_memory_mb": _peak_mb(device),
    }


def sd35m_adapter(device: torch.device):
    """A random-weight SD3.5-Medium-shaped transformer (2.5B params, 24 layers, dual attention in 0..12)
    inside a pipeline whose tiny text encoders are replaced by random conditioning of the real widths."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline()
    pipe.transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ).to(device, torch.bfloat16)
    pipe.vae.config.latent_channels = 16
    adapter = adapter_for(pipe, height=512, width=512)
    adapter.dtype = torch.bfloat16
    adapter.latent_shape = (16, 64, 64)

    def encode(prompts, guidance_scale, negative_prompt=""):
        g = torch.Generator().manual_seed(0)
        b = len(prompts)
        emb = torch.randn(b, 333, 4096, generator=g).to(device, torch.bfloat16)
        pooled = torch.randn(b, 2048, generator=g).to(device, torch.bfloat16)
        neg = (emb.clone(), pooled.clone()) if guidance_scale > 1 else (None, None)
        return Conditioning(emb, pooled, *neg)

    adapter.encode = encode
    adapter.init_noise = lambda n, generator=None: torch.randn(n, 16, 64, 64, generator=generator).to(
        device, torch.bfloat16
    )
    adapter.decode = lambda latents: (latents[:, :3].float().clamp(-1, 1) + 1) / 2  # no VAE cost in this figure
    return adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd35m", action="store_true", help="also bench the SD3.5-M-shaped model on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    results = [
        bench_adapter(
            "tiny-sd3",
            adapter_for(tiny_sd3_pipeline(), max_sequence_length=8),
            batch=16,
            steps=10,
            guidance=4.5,
            repeats=args.repeats,
            device=cpu,
        )
    ]
    try:
        from flowalign import zoo

        pipe = zoo.load("shapes")
        rec = zoo.sampling_settings("shapes")
        results.append(
            bench_adapter(
                "shapes",
                adapter_for(pipe, max_sequence_length=rec["max_sequence_length"]),
                batch=32,
                steps=10,
                guidance=rec.get("guidance_scale", 4.5),
                repeats=args.repeats,
                device=cpu,
            )
        )
    except (FileNotFoundError, ImportError, AttributeError, KeyError) as err:
        results.append({"model": "shapes", "skipped": str(err)})
    if args.sd35m:
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            for checkpointing in (False, True):  # the peak of one GRPO step, without and with recomputation
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                results.append(
                    bench_adapter(
                        "sd3.5-medium-shape-random",
                        sd35m_adapter(dev),
                        batch=8,
                        steps=10,
                        guidance=4.5,
                        repeats=args.repeats,
                        device=dev,
                        checkpointing=checkpointing,
                    )
                )
        else:
            results.append({"model": "sd3.5-medium-shape-random", "skipped": "no CUDA device"})
    json.dump(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, sys.stdout, indent=2
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
