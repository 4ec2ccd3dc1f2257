"""One rank of a 2-process CPU run (`torch.distributed.run`) for `test_trainer.py`: each rank's weight loading leaves
its global RNG in another state, as real loading does; saves the rank's LoRA weights at start and end."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from flowalign.testing import tiny_trainer

rank = PartialState(cpu=True).process_index
out = Path(sys.argv[1])
prompts = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
trainer = tiny_trainer(out, prompts, rng_after_load=1000 + rank, max_steps=2, save_every=0)
start = {n: p.detach().clone() for n, p in trainer.params.items()}
trainer.train(progress=False)
torch.save({"start": start, "end": trainer.trainable_state()}, out / f"rank{rank}.pt")
