"""One rank of a 2-process CPU run (`torch.distributed.run`) for `test_trainer.py`. Each rank's weight loading leaves
its global RNG in another state, as real loading does. Three runs of the tiny trainer, evaluating every step in
batches of one image (so the ranks share out the four evaluation images):
- `full`: 3 steps, then the summary and grid (every rank calls it, as the CLI does);
- `resumed`: 2 steps, then a new trainer resumes from its checkpoint to step 3;
- `stopped`: up to 4 steps, with a stop condition that only the second process meets, at step 2;
- `uneven`: 2 steps in which rank 1 drops a group of equal rewards (fewer minibatches there);
- `batch_std` / `tp_global`: one step's credit with statistics over both processes' rows.
Saves, per rank, the LoRA weights at the start and end of each run, the images `generate` gives every rank, and
how many images an evaluation scored on this rank."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from flowalign.api import write_summary_and_grid
from flowalign.testing import tiny_trainer

rank = PartialState(cpu=True).process_index
out = Path(sys.argv[1])
prompts = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
settings = dict(save_every=1, eval_every=1, eval_batch_size=1)


def trainer(name: str, max_steps: int, **over):
    return tiny_trainer(out / name, prompts, rng_after_load=1000 + rank, max_steps=max_steps, **settings, **over)


full = trainer("full", 3, grid_prompts=2)
start = {n: p.detach().clone() for n, p in full.params.items()}
full.train(progress=False)
write_summary_and_grid(full)
# Evaluation scores each image once over the processes: count the images this rank's reward sees.
scored = []
reward_fn = full.reward_fn
full.reward_fn = lambda images, prompts, **kw: scored.append(len(prompts)) or reward_fn(images, prompts, **kw)
evaluation = full.evaluate()
trainer("resumed", 2).train(progress=False)
resumed = trainer("resumed", 3)
resumed.train(resume=out / "resumed" / "checkpoints", progress=False)
# A stop condition true on one process only (as a seconds budget may be) must stop both, not leave one waiting.
stopped = trainer("stopped", 4)
stopped.train(progress=False, stop=lambda rec: rank == 1 and rec["step"] >= 2)
# One group with equal rewards on rank 1 only: its samples are dropped there (zero advantages), so the ranks hold
# different numbers of samples and minibatches, yet must take the same optimizer steps (else one waits forever).
base_reward = reward_fn  # the trainer's own reward, not the counting wrapper above


def uneven_reward(images, prompts, **kw):
    r = base_reward(images, prompts, **kw)
    r = (r.total if hasattr(r, "total") else r).clone()
    if rank == 1:
        r[4:] = 0.5
    return r


uneven = tiny_trainer(
    out / "uneven", prompts, uneven_reward, rng_after_load=1000 + rank, max_steps=2, train_batch_size=4, eval_every=0
)
uneven.train(progress=False)
# Credit over both processes' rows: record each rank's rewards, step rewards and advantages for the test to
# recompute on the union (adv_std "batch" and credit_balance "global" must span the whole batch).
import flowalign.trainer as trainer_module  # noqa: E402

recorded = {}
real_step_rewards = trainer_module.step_rewards


def recording_step_rewards(*args, **kwargs):
    out = real_step_rewards(*args, **kwargs)
    recorded["values"] = out.values
    return out


trainer_module.step_rewards = recording_step_rewards
credit_runs = {}
for name, over in {
    "batch_std": dict(adv_std="batch"),
    "tp_global": dict(credit="turning_point", credit_balance="global", adv_std="batch"),
}.items():
    recorded.clear()
    tr = tiny_trainer(out / name, prompts, rng_after_load=1000 + rank, max_steps=1, **over)
    traj = tr.sample(0)
    judged = tr.score(traj.images, traj.prompts, traj.columns)
    credit, _ = tr.assign_credit(traj, judged)
    credit_runs[name] = {
        "totals": judged.total,
        "values": recorded.get("values"),
        "advantages": credit.advantages,
        "turning": credit.turning,
        "group_ids": tr.group_ids,
    }
result = {
    "credit": credit_runs,
    "uneven": uneven.trainable_state(),
    "stopped_at": stopped.step,
    "start": start,
    "end": full.trainable_state(),
    "resumed": resumed.trainable_state(),
    "images": full.generate(prompts, seed=7),
    "scored": sum(scored),
    "eval_reward": evaluation["eval/reward_mean"],
}
torch.save(result, out / f"rank{rank}.pt")
