"""GRPO trainer end to end on the tiny SD3 pipeline: it learns, it resumes exactly, it fails cleanly."""

import copy
import json
import math

import pytest
import torch

from flowalign.testing import tiny_trainer
from flowalign.trainer import GRPOTrainer, RewardError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]


REWARD_SUMMARY_KEYS = ("reward/mean", "reward/std", "reward/zero_std_frac")


def _trainer(tmp_path, reward=None, **over) -> GRPOTrainer:
    return tiny_trainer(tmp_path, PROMPTS, reward, **over)


def _eval_brightness(trainer: GRPOTrainer, seeds=range(4)) -> torch.Tensor:
    """Mean brightness per evaluation seed (deterministic ODE samples) -> [len(seeds)]."""
    return torch.stack([trainer.generate(PROMPTS, seed).mean() for seed in seeds])


def test_training_raises_reward_and_changes_every_trainable_parameter(tmp_path):
    trainer = _trainer(tmp_path, max_steps=10)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    assert before, "LoRA should add trainable parameters"
    base = _eval_brightness(trainer)
    trainer.train(progress=False)
    after = _eval_brightness(trainer)
    noise = base.std()
    assert after.mean() - base.mean() > noise, (base.tolist(), after.tolist())
    unchanged = [n for n, p in trainer.params.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(11))
    for key in (
        "reward/mean",
        "reward/std",
        "train/loss",
        "train/clip_frac",
        "train/approx_kl",
        "train/ratio_mean",
        "reward/zero_std_frac",
        "time/sample",
        "time/train",
    ):
        assert key in records[1], key


def _strip_times(records):
    # Wall times differ; the interrupted run also evaluated at its own last step (2), which the other didn't.
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))} for r in records]


def test_resume_is_exact(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.train(progress=False)
    first = _trainer(tmp_path / "b", max_steps=2)
    first.train(progress=False)
    resumed = _trainer(tmp_path / "b", max_steps=4)
    resumed.train(resume=tmp_path / "b" / "checkpoints", progress=False)
    for n, p in straight.params.items():
        assert torch.equal(p, resumed.params[n]), n
    log_a = _strip_times(json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    log_b = _strip_times(json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    assert log_a == log_b
    final_a, final_b = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in "ab")
    assert final_a["eval/reward_mean"] == final_b["eval/reward_mean"]


def test_resuming_with_other_settings_uses_them_and_a_mismatched_checkpoint_changes_nothing(tmp_path, caplog):
    first = _trainer(tmp_path, max_steps=2)
    first.train(progress=False)
    # a changed learning rate, weight decay and betas take effect (the saved optimizer state brings its own back)
    again = _trainer(tmp_path, max_steps=3, learning_rate=1e-3, weight_decay=0.5, adam_betas=(0.8, 0.9))
    again.train(resume=tmp_path / "checkpoints", progress=False)
    group = again.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-3, 0.5, (0.8, 0.9))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["train/lr"] == 1e-3
    # EMA turned on for a checkpoint without one starts from its weights, not from the untrained LoRA
    ema = _trainer(tmp_path, ema_decay=0.9)
    with caplog.at_level("WARNING"):
        ema.load(tmp_path / "checkpoints")
    assert "has no EMA" in caplog.text
    assert all(torch.equal(ema.ema[n], p) for n, p in ema.params.items())
    assert any(p.abs().max() > 0 for n, p in ema.ema.items() if "lora_B" in n)
    # another LoRA rank: one clear error, and the run's config.yaml is left as it was
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match="does not match this model/LoRA config"):
        _trainer(tmp_path, lora_rank=4, max_steps=3).train(resume=tmp_path / "checkpoints", progress=False)
    assert (tmp_path / "config.yaml").read_text() == saved


def test_keep_checkpoints_keeps_the_latest_and_resume_still_works(tmp_path):
    _trainer(tmp_path, max_steps=3, save_every=1, keep_checkpoints=2).train(progress=False)
    assert sorted(d.name for d in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    resumed = _trainer(tmp_path, max_steps=4, save_every=1, keep_checkpoints=2)
    resumed.train(resume="auto", progress=False)
    assert resumed.step == 4
    assert sorted(d.name for d in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]
    _trainer(tmp_path, max_steps=1, keep_checkpoints=2).train(progress=False, overwrite=True)  # a new run here
    assert sorted(d.name for d in (tmp_path / "checkpoints").glob("step_*")) == ["step_000001"]  # no stale steps


def test_a_fresh_run_into_a_used_directory_cannot_be_resumed_as_the_old_one(tmp_path, caplog):
    _trainer(tmp_path, max_steps=2).train(progress=False)
    fresh = _trainer(tmp_path, max_steps=2, learning_rate=1e-3)

    def interrupted(step):
        raise KeyboardInterrupt  # before its first checkpoint

    fresh.train_step = interrupted
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        fresh.train(progress=False, overwrite=True)
    assert "held a previous run (checkpoints up to step_000002)" in caplog.text
    # `--resume auto` looks for checkpoints/latest: it must not continue the old run under the new config
    assert not (tmp_path / "checkpoints" / "latest").exists()
    again = _trainer(tmp_path, max_steps=1, learning_rate=1e-3)
    records = again.train(resume="auto", progress=False)  # nothing of its own to resume: a fresh start
    assert [r["step"] for r in records] == [0, 1] and again.step == 1


def test_a_compiled_transformer_samples_replays_and_trains_as_the_eager_one(tmp_path):
    """`compile` may change speed only: the same rollouts and log-probs (to float tolerance), replays equal to the
    sampled log-probs, the same update, and the same images afterwards with the LoRA gate (`lora_min_sigma`) on."""
    from flowalign.samplers.rollout import replay_step

    over = dict(sde_window=2, sde_window_max_start=0, lora_min_sigma=0.8, max_steps=2)
    eager, comp = _trainer(tmp_path / "e", **over), _trainer(tmp_path / "c", compile=True, **over)
    assert comp.compiled and not eager.compiled
    a, b = eager.sample(0), comp.sample(0)
    torch.testing.assert_close(b.images, a.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-4, rtol=0)
    with torch.no_grad():
        for k in torch.nonzero(b.sde_mask).flatten().tolist():
            torch.testing.assert_close(replay_step(comp.adapter, b, k).log_prob, b.log_probs[:, k], atol=1e-5, rtol=0)
    start = torch.cat([p.detach().flatten() for p in eager.params.values()])
    eager.train(progress=False)
    comp.train(progress=False)
    step_e, step_c = (torch.cat([p.detach().flatten() for p in t.params.values()]) - start for t in (eager, comp))
    # Adam divides by sqrt(v): an element whose gradient is ~0 may move differently on float noise, so the update
    # is compared as a whole (measured: 211 of 4,096 elements differ by more than 1e-4; relative distance 5e-3).
    assert step_e.norm() > 0 and (step_c - step_e).norm() < 0.02 * step_e.norm()
    torch.testing.assert_close(comp.generate(PROMPTS, seed=3), eager.generate(PROMPTS, seed=3), atol=1e-3, rtol=0)


def test_compile_without_a_cpp_compiler_warns_and_stays_eager(tmp_path, caplog):
    """Where inductor would find no compiler (its own search, pointed at a missing one), the run stays eager."""
    import torch._inductor.config as inductor

    # torch's own config patch: pytest's monkeypatch on this config proxy left `cpp.cxx` missing afterwards (seen
    # in CI: the next compile in the session failed with 'cpp.cxx does not exist')
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with caplog.at_level("WARNING", logger="flowalign.trainer"):
            trainer = _trainer(tmp_path, compile=True)
    assert inductor.cpp.cxx[-1] != str(tmp_path / "no-such-g++")
    assert not trainer.compiled and "No working C++ compiler" in caplog.text and "running eager" in caplog.text


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora-gated", "full"])
def test_gradient_checkpointing_recomputes_blocks_and_trains_to_the_same_weights(tmp_path, lora_rank):
    gate = {"sde_window": 1, "sde_window_max_start": 0, "lora_min_sigma": 0.8} if lora_rank else {}
    runs = {}
    for ckpt in (False, True):
        trainer = _trainer(tmp_path / str(ckpt), lora_rank=lora_rank, max_steps=2, gradient_checkpointing=ckpt, **gate)
        calls: list[bool] = []
        block = trainer.adapter.transformer.transformer_blocks[0]
        # a pre-hook: checkpoint's recomputation stops early, before a forward hook would run
        block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(torch.is_grad_enabled()))
        start = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.train(progress=False)
        runs[ckpt] = trainer, calls, start
    (plain, plain_calls, start), (ckpt, ckpt_calls, _) = runs[False], runs[True]
    # recomputed in backward: the block runs once more, with grad on, per replayed forward pass
    assert ckpt_calls.count(True) == 2 * plain_calls.count(True) > 0
    assert ckpt_calls.count(False) == plain_calls.count(False)  # sampling and evaluation are unchanged
    for n, p in plain.params.items():
        assert torch.allclose(p, ckpt.params[n], atol=1e-6, rtol=0), n
    assert any(not torch.equal(p, start[n]) for n, p in plain.params.items())  # it trained: the match means something


@pytest.mark.parametrize(("tbs", "accum"), [(8, 1), (4, 2), (2, 4), (4, 1), (2, 1)])
def test_a_window_gradient_is_the_mean_over_the_samples_it_holds(tmp_path, tbs, accum):
    """Dropping zero-advantage samples leaves uneven minibatches; every optimizer window's gradient must still be
    the mean over its samples (and trained steps) of -A grad log p, the policy gradient at ratio 1, computed here
    without the trainer's loss code. The windows (captured, not stepped) weighted by their sizes give it over all."""
    from flowalign.credit import CreditOutput
    from flowalign.samplers.rollout import replay_step

    trainer = _trainer(tmp_path, train_batch_size=tbs, grad_accum=accum)
    traj = trainer.sample(0)
    n_steps = int(traj.sde_mask.sum())
    steps = torch.nonzero(traj.sde_mask).flatten().tolist()
    adv = torch.randn(len(traj.prompts), n_steps, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([True, False, True, True, True, False, True, True])  # 6 of 8 kept
    adv[~keep] = 0
    credit = CreditOutput(adv, adv, torch.zeros_like(adv, dtype=torch.bool), keep)

    windows = []

    def capture() -> float:
        windows.append({n: p.grad.detach().clone() for n, p in trainer.params.items()})
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer._optimizer_step = capture
    trainer.train_on(traj, credit, 0)
    sizes = [
        sum(min(max(6 - i * tbs, 0), tbs) for i in range(w * accum, (w + 1) * accum)) for w in range(len(windows))
    ]
    assert sum(sizes) == 6 and all(sizes)
    combined = {n: sum(s * w[n] for s, w in zip(sizes, windows, strict=True)) / 6 for n in windows[0]}

    trainer.adapter.transformer.train()
    idx = torch.nonzero(keep).flatten()
    surrogate = sum(
        -(adv[idx, j] * replay_step(trainer.adapter, traj.select(idx), k).log_prob).sum() for j, k in enumerate(steps)
    )
    grads = torch.autograd.grad(surrogate / (len(idx) * n_steps), list(trainer.params.values()))
    for (n, _), g in zip(trainer.params.items(), grads, strict=True):
        torch.testing.assert_close(combined[n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_the_kl_still_acts_on_samples_without_advantage(tmp_path):
    """A group of equal rewards has zero advantages, which the loss skips; with kl_beta > 0 those samples still
    carry the KL to the reference, and a policy away from it must be pulled back."""
    from flowalign.credit import CreditOutput

    trainer = _trainer(tmp_path, kl_beta=0.5)
    g = torch.Generator().manual_seed(0)
    for name, p in trainer.params.items():  # move the LoRA away from the reference (B = 0 at init)
        if "lora_B" in name:
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    traj = trainer.sample(0)
    zero = torch.zeros(len(traj.prompts), int(traj.sde_mask.sum()))
    credit = CreditOutput(zero, zero, zero.bool(), torch.zeros(len(traj.prompts), dtype=torch.bool))
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    metrics = trainer.train_on(traj, credit, 0)
    assert metrics["train/kl"] > 0 and metrics["train/kept_frac"] == 1.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.params.items())


def test_step_rewards_run_at_the_rollouts_precision(tmp_path, monkeypatch):
    """Under mixed precision the rollout runs in the accelerator's autocast; the completions behind R_0..R_{n-1}
    must too, or the increments d_k = R_{k+1} - R_k mix two computations of the policy (R_n is the rollout's own
    reward). (Checked through the context itself: accelerate fixes the precision once per process.)"""
    import contextlib

    import flowalign.trainer as trainer_module
    from flowalign.config import make_config

    trainer = _trainer(tmp_path, credit="incremental", max_steps=1)
    depth, seen = [0], []

    @contextlib.contextmanager
    def autocast():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real = trainer_module.step_rewards
    monkeypatch.setattr(trainer.accelerator, "autocast", autocast)
    monkeypatch.setattr(trainer_module, "step_rewards", lambda *a, **k: seen.append(depth[0]) or real(*a, **k))
    traj = trainer.sample(0)
    trainer.assign_credit(traj, trainer.score(traj.images, traj.prompts, traj.columns))
    assert seen == [1]
    with pytest.raises(ValueError, match="fp16 is not supported.*use bf16"):
        make_config({"mixed_precision": "fp16"})


def test_lora_init_is_fixed_by_seed_alone(tmp_path):
    """Real weights load from disk without touching the global RNG, so the LoRA's A must be drawn from `seed`:
    otherwise two runs with one seed (or two processes of one run) start from different weights."""
    a = _trainer(tmp_path / "a", seed=7, rng_after_load=1)
    b = _trainer(tmp_path / "b", seed=7, rng_after_load=2)
    c = _trainer(tmp_path / "c", seed=8, rng_after_load=3)
    now = torch.random.get_rng_state()
    assert torch.equal(now, torch.manual_seed(3).get_state()), "building the trainer must not move the global RNG"
    lora_a = [n for n in a.params if "lora_A" in n]
    assert lora_a and all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert not any(torch.equal(a.params[n], c.params[n]) for n in lora_a)


def test_two_processes_train_resume_and_evaluate_as_one_run(tmp_path):
    """Processes average gradients, not weights: from different LoRA inits they would silently diverge. Only the
    main process writes the log and checkpoints, which the others then read; evaluation (generating and scoring) is
    shared out by batch."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_two_process_run.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=300)  # a hang fails
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("start", "end", "resumed", "uneven"):
        assert all(torch.equal(r0[key][n], r1[key][n]) for n in r0[key]), key
    _check_credit_spans_both_processes(r0["credit"], r1["credit"])
    assert any(not torch.equal(r0["start"][n], r0["end"][n]) for n in r0["end"]), "the run must have trained"
    assert all(torch.equal(r0["end"][n], r0["resumed"][n]) for n in r0["end"]), "resume must replay the run"
    assert r0["stopped_at"] == r1["stopped_at"] == 2, "a stop on any process stops all"

    logs = {
        d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("full", "resumed")
    }
    assert [r["step"] for r in logs["full"]] == [0, 1, 2, 3], "one line per step, written once"
    assert logs["full"][1]["cost/reward_calls"] == 2 * 8, "both processes' samples were scored"
    # the one reward's own log is its mean over both processes' samples, as reward/mean is (not rank 0's half)
    (own,) = [k for k in logs["full"][1] if k.startswith("reward/") and k not in REWARD_SUMMARY_KEYS]
    assert logs["full"][1][own] == pytest.approx(logs["full"][1]["reward/mean"], abs=1e-6)
    assert _strip_times(logs["full"]) == _strip_times(logs["resumed"])
    assert (tmp_path / "full" / "grid.png").exists() and (tmp_path / "full" / "summary.json").exists()

    # One process, the same weights: the same images and evaluation as the two processes shared out.
    one = _trainer(tmp_path / "one", eval_batch_size=1, max_steps=3)
    one.load(tmp_path / "full" / "checkpoints")
    assert torch.equal(r0["images"], r1["images"])
    torch.testing.assert_close(one.generate(PROMPTS, seed=7), r0["images"], rtol=0, atol=1e-5)
    assert one.evaluate()["eval/reward_mean"] == pytest.approx(logs["full"][-1]["eval/reward_mean"], abs=1e-5)
    assert r0["eval_reward"] == r1["eval_reward"] == pytest.approx(logs["full"][-1]["eval/reward_mean"], abs=1e-5)
    assert r0["scored"] == r1["scored"] == len(PROMPTS) // 2, "each process scores its share of the images, once"


def _check_credit_spans_both_processes(c0: dict, c1: dict) -> None:
    """Each process's advantages are its rows of the credit computed on both processes' rows together (groups
    kept apart; "global" balancing over all of them); with a batch std that differs from one process alone."""
    from flowalign.credit import assign_credit

    settings = {"batch_std": {}, "tp_global": dict(credit="turning_point", balance="global")}
    for name, over in settings.items():
        a, b = c0[name], c1[name]
        p = int(a["group_ids"].max()) + 1
        both = assign_credit(  # the union of both processes' rows as one batch: no scope_ids
            None if a["values"] is None else torch.cat([a["values"], b["values"]]),
            torch.cat([a["totals"], b["totals"]]),
            torch.cat([a["group_ids"], b["group_ids"] + p]),
            n=a["advantages"].shape[1],
            std_scope="batch",
            **over,
        )
        got = torch.cat([a["advantages"], b["advantages"]])
        torch.testing.assert_close(got, both.advantages, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(torch.cat([a["turning"], b["turning"]]), both.turning), name
        alone = assign_credit(a["values"], a["totals"], a["group_ids"], n=got.shape[1], std_scope="batch", **over)
        assert not torch.allclose(alone.advantages, a["advantages"]), name  # the union's std, not one process's


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora", "full"])
def test_comparison_rows_are_the_untrained_model_and_the_trained_one_from_the_same_noise(tmp_path, lora_rank):
    """The before/after grid's base row must be the model as it was before training (LoRA off, or the frozen copy
    of a full fine-tune), drawn from the noise of the aligned row, so the two differ only by training."""
    from flowalign.api import comparison_rows

    prompts = PROMPTS[:2]
    untrained = _trainer(tmp_path / "untrained", lora_rank=lora_rank).generate(prompts, seed=3)
    trainer = _trainer(tmp_path / "run", lora_rank=lora_rank, max_steps=2, learning_rate=1e-3, grid_prompts=2)
    trainer.train(progress=False)
    rows = comparison_rows(trainer, prompts, [3, 4])
    assert list(rows) == ["base s3", "aligned s3", "base s4", "aligned s4"]
    torch.testing.assert_close(rows["base s3"], untrained, rtol=0, atol=1e-6)
    torch.testing.assert_close(rows["aligned s4"], trainer.generate(prompts, seed=4), rtol=0, atol=0)
    assert (rows["base s3"] - rows["aligned s3"]).abs().max() > 1e-3, "training changed the images"
    assert (rows["base s3"] - rows["base s4"]).abs().max() > 1e-2, "each seed its own noise"
    assert list(comparison_rows(trainer, prompts, [5])) == ["base", "aligned"]
    if lora_rank == 0:  # a full fine-tune that draws no grid keeps no base copy: a clear error, not PEFT's
        with pytest.raises(ValueError, match="kept no copy of its base model"):
            comparison_rows(_trainer(tmp_path / "nogrid", lora_rank=0, grid_prompts=0), prompts, [3])


def test_evaluation_and_the_grid_give_the_reward_each_prompts_own_columns(tmp_path):
    """A reward that reads a per-prompt column (as DINO similarity reads reference images) must get it with the
    right prompts in evaluation and the end-of-run grid too, not only in training (evaluation used to call it
    without columns, so a DINO run died at its step-0 evaluation). Here 6 evaluation entries cycle over 4 prompts
    in batches of 4, so the columns must be picked and sliced with the prompts."""
    from flowalign.api import write_summary_and_grid

    target = {p: 0.1 * (k + 2) for k, p in enumerate(PROMPTS)}  # a per-prompt target brightness

    def reward(images, prompts, target_brightness=None, **_):
        if target_brightness is None:
            raise ValueError("needs a 'target_brightness' column")
        assert list(target_brightness) == [target[p] for p in prompts], "columns out of step with prompts"
        return -(images.mean(dim=(1, 2, 3)) - torch.tensor(target_brightness)).abs()

    columns = {"target_brightness": [target[p] for p in PROMPTS]}
    trainer = _trainer(
        tmp_path, reward, columns=columns, max_steps=1, num_eval_prompts=6, eval_batch_size=4, grid_prompts=3
    )
    metrics = trainer.evaluate()
    images = trainer.generate(trainer.eval_prompts, seed=trainer.cfg.eval_seed)  # the same seeded batches
    expected = reward(images, trainer.eval_prompts, [target[p] for p in trainer.eval_prompts])
    assert trainer.eval_prompts == PROMPTS + PROMPTS[:2]
    assert metrics["eval/reward_mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    trainer.train(progress=False)
    write_summary_and_grid(trainer)
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert len(set(grid["prompts"])) == 3 and set(grid["scores"]) == {"base", "aligned"}


def test_the_cpu_base_copy_never_duplicates_weights_where_they_live(monkeypatch):
    """A full fine-tune's grid-only base copy goes to CPU memory; it must be made tensor by tensor into CPU memory
    (deep-copying the module first would hold a second copy on the GPU: ~24 GB for FLUX in bf16), keep tied
    weights tied, and leave the original untouched."""
    from flowalign.trainer import _copy_to_cpu

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    net[2].weight = net[0].weight  # tied, as embeddings often are
    deep_copied = []
    original = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(
        torch.nn.Parameter, "__deepcopy__", lambda self, memo: deep_copied.append(self) or original(self, memo)
    )
    ref = _copy_to_cpu(net)
    assert deep_copied == [], "no parameter may be deep-copied where it lives"
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b) and b.device.type == "cpu" and a.data_ptr() != b.data_ptr(), name
    assert ref[0].weight is ref[2].weight, "tied weights stay tied"
    with torch.no_grad():
        ref[1].running_mean.add_(1.0)
    assert not torch.equal(ref[1].running_mean, net[1].running_mean), "the copy's buffers are its own"


def test_nan_reward_names_reward_and_step_and_keeps_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts, **_):
        calls["n"] += 1
        out = images.mean(dim=(1, 2, 3))
        return out * float("nan") if calls["n"] > 3 else out  # call 1 = eval at step 0; steps 0,1 fine

    trainer = _trainer(tmp_path, reward=flaky, save_every=1)
    trainer.reward_name = "flaky"
    with pytest.raises(RewardError, match=r"'flaky'.*step 2"):
        trainer.train(progress=False)
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert latest == "step_000002"
    assert (tmp_path / "checkpoints" / latest / "trainable.safetensors").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_full_finetune_with_kl_and_batch_std(tmp_path):
    trainer = _trainer(tmp_path, lora_rank=0, kl_beta=0.1, adv_std="batch", max_steps=1, learning_rate=1e-4)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    recs = trainer.train(progress=False)
    assert recs[-1]["train/kl"] >= 0 and torch.isfinite(torch.tensor(recs[-1]["train/loss"]))
    changed = sum(not torch.equal(p, before[n]) for n, p in trainer.params.items())
    assert changed > len(before) // 2


@pytest.mark.parametrize("mode", ["ode", "x0"])
def test_turning_point_credit_moves_the_reward(tmp_path, mode):
    trainer = _trainer(tmp_path, credit="turning_point", step_reward_mode=mode, max_steps=10)
    base = _eval_brightness(trainer)
    records = trainer.train(progress=False)
    after = _eval_brightness(trainer)
    assert after.mean() - base.mean() > base.std(), (base.tolist(), after.tolist())
    # Cost: 8 samples x 4 rollout steps, plus completions from states 0, 1, 2 (ode: 4 + 3 + 2; x0: 3 each).
    per_sample = 4 + (9 if mode == "ode" else 3)
    assert records[1]["cost/model_evals"] == 8 * per_sample
    assert records[1]["cost/reward_calls"] == 8 * 4
    assert "train/credit/turning_points" in records[1]


def test_eval_subset_spreads_over_the_prompt_set():
    from flowalign import world
    from flowalign.trainer import evenly_spaced

    sub = evenly_spaced(world.eval_captions(), 24)
    counts = {}
    for caption in sub:
        cat = world.parse_caption(caption).category
        counts[cat] = counts.get(cat, 0) + 1
    assert counts == {c: 4 for c in world.CATEGORIES}  # a prefix would hold only the first categories
    assert evenly_spaced([1, 2, 3], 5) == [1, 2, 3, 1, 2]  # cycles: more images of a small held-out set


def test_nearly_collapsed_steps_are_not_trained_and_no_exploring_step_is_an_error(tmp_path):
    # The tiny model's 4-step schedule is 1, 0.86, 0.60, 0.009, 0: with cps the step to 0.009 has std ~0.009.
    trainer = _trainer(tmp_path, sampler="cps", max_steps=1)
    assert trainer._sde_steps(0) == [0, 1]
    traj = trainer.sample(0)
    assert traj.sde_mask.tolist() == [True, True, False, False]
    assert _trainer(tmp_path, sampler="cps", min_noise_std=0.0)._sde_steps(0) == [0, 1, 2]
    assert _trainer(tmp_path, sampler="cps", sde_window=2, sde_window_max_start=0)._sde_steps(0) == [0, 1]
    with pytest.raises(ValueError, match="raise noise_level"):
        _trainer(tmp_path, sampler="cps", noise_level=0.0)
    with pytest.raises(ValueError, match="in some sde_window"):
        _trainer(tmp_path, sampler="cps", sde_window=1, sde_window_max_start=2)


def test_sliding_window_moves_every_n_steps_and_trains_only_its_steps(tmp_path):
    # MixGRPO: window of 1 on the 4-step schedule (starts 0..2), one step later every 2 training steps, then stays.
    over = dict(sde_window=1, sde_window_max_start=2, sde_window_shift_every=2, min_noise_std=0.0)
    trainer = _trainer(tmp_path, **over)
    assert [trainer._sde_steps(s) for s in range(7)] == [[0], [0], [1], [1], [2], [2], [2]]
    assert trainer.sample(3).sde_mask.tolist() == [False, True, False, False]
    strided = _trainer(tmp_path, **{**over, "sde_window_stride": 2})
    assert [strided._sde_steps(s) for s in range(5)] == [[0], [0], [2], [2], [2]]
    with pytest.raises(ValueError, match="set sde_window > 0"):
        _trainer(tmp_path, sde_window_shift_every=2)
    with pytest.raises(ValueError, match="sde_window_stride must be >= 1"):
        _trainer(tmp_path, sde_window=1, sde_window_shift_every=2, sde_window_stride=0)


@pytest.mark.parametrize("kl_form", ["flow_grpo", "exact"])
def test_logged_kl_is_the_chosen_form_of_the_policy_to_reference_distance(tmp_path, kl_form):
    """train/kl of one minibatch (before its update) against an independent computation from replayed means:
    Flow-GRPO's mean((m - m_ref)^2) / (2 std_dev_t^2) with std_dev_t = a sqrt(sigma / (1 - sigma)), or the exact
    Gaussian KL, whose std also has the step's sqrt(sigma - sigma')."""
    from flowalign.samplers.rollout import replay_step

    trainer = _trainer(tmp_path, kl_beta=0.1, kl_form=kl_form, train_batch_size=8)
    with torch.no_grad():  # move the policy off the reference
        for p in trainer.params.values():
            p.add_(0.05 * torch.randn_like(p))
    traj = trainer.sample(0)
    credit, _ = trainer.assign_credit(traj, trainer.score(traj.images, traj.prompts))
    s, a = traj.sigmas, trainer.cfg.noise_level
    expected = []
    with torch.no_grad():
        for k in torch.nonzero(traj.sde_mask).flatten().tolist():
            mean = replay_step(trainer.adapter, traj, k).mean
            with trainer.reference_policy():
                ref = replay_step(trainer.adapter, traj, k).mean
            sigma = float(s[k])
            var = a**2 * sigma / (1 - (float(s[1]) if sigma == 1 else sigma))
            if kl_form == "exact":
                var *= float(s[k] - s[k + 1])
            expected.append((((mean - ref) ** 2).flatten(1).mean(1) / (2 * var)).mean())
    metrics = trainer.train_on(traj, credit, 0)
    assert metrics["train/kl"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
    assert metrics["train/kl"] > 0


def test_group_shared_noise_gives_each_group_one_initial_noise(tmp_path):
    shared = _trainer(tmp_path, group_shared_noise=True).sample(0)
    x_t, x_1 = shared.latents[:, 0], shared.latents[:, 1]
    for g in range(2):  # prompts_per_step=2, group_size=4
        rows = slice(4 * g, 4 * g + 4)
        assert torch.equal(x_t[rows], x_t[4 * g].expand_as(x_t[rows]))
        assert not torch.equal(x_1[4 * g], x_1[4 * g + 1])  # the SDE noise still differs within a group
    assert not torch.equal(x_t[0], x_t[4])
    plain = _trainer(tmp_path).sample(0).latents[:, 0]
    assert not torch.equal(plain[0], plain[1])


def test_renoise_evaluation_is_seeded_and_differs_from_the_ode(tmp_path):
    """`eval_sampler: renoise` draws fresh noise every step, so its images differ from the ODE's from the same initial
    noise, yet the same seed gives the same images (evaluations stay comparable across a run and across processes)."""
    ode = _trainer(tmp_path / "ode")
    renoise = _trainer(tmp_path / "renoise", eval_sampler="renoise")
    a, b = renoise.generate(PROMPTS, 3), renoise.generate(PROMPTS, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, renoise.generate(PROMPTS, 4))
    assert (a - ode.generate(PROMPTS, 3)).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="eval_sampler"):
        _trainer(tmp_path / "bad", eval_sampler="sde")


def test_untrained_renoise_rollouts_share_the_trained_step_and_differ_after(tmp_path):
    """`untrained_sampler: renoise` changes only the steps training does not replay: the trained first step draws the
    same noise as with the ODE rest, the re-noised steps after it do not follow the ODE, and training still runs."""
    over = dict(sde_window=1, sde_window_max_start=0, max_steps=1)
    ode = _trainer(tmp_path / "ode", **over).sample(0)
    trainer = _trainer(tmp_path / "renoise", untrained_sampler="renoise", **over)
    renoise = trainer.sample(0)
    assert renoise.sde_mask.tolist() == [True, False, False, False]
    assert torch.equal(renoise.latents[:, :2], ode.latents[:, :2])
    assert (renoise.latents[:, 2] - ode.latents[:, 2]).abs().mean() > 1e-3
    assert (renoise.log_probs[:, 1:] == 0).all()
    records = trainer.train(progress=False)
    assert records[-1]["step"] == 1 and math.isfinite(records[-1]["train/loss"])
    with pytest.raises(ValueError, match="untrained_sampler"):
        _trainer(tmp_path / "bad", untrained_sampler="sde")


def test_evaluation_reports_the_reward_mean_and_its_standard_error(tmp_path):
    """The evaluation's standard error is the yardstick the end-of-run table uses: sample std over sqrt(n)."""
    t = _trainer(tmp_path)
    metrics = t.evaluate()
    per_image = t.score(t.generate(t.eval_prompts, t.cfg.eval_seed), t.eval_prompts).total.double().numpy()
    n = len(per_image)
    assert n > 1 and metrics["eval/reward_mean"] == pytest.approx(per_image.mean(), abs=1e-6)
    assert metrics["eval/reward_mean_se"] == pytest.approx(per_image.std(ddof=1) / n**0.5, abs=1e-6)
    assert metrics["eval/reward_mean_se"] > 0


def test_a_run_directory_is_never_overwritten_or_mixed_without_being_asked(tmp_path, caplog):
    first = _trainer(tmp_path / "a", max_steps=2, save_every=1)
    first.train(progress=False)
    log = (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds another run.*--resume auto.*--overwrite"):
        _trainer(tmp_path / "a", max_steps=2, seed=5).train(progress=False)
    with pytest.raises(FileExistsError, match="holds another run"):  # another run's checkpoint into this one
        _trainer(tmp_path / "a", max_steps=3).train(resume=_other_run(tmp_path), progress=False)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == log, "refused before touching anything"
    # a resume from this run's earlier checkpoint keeps the later log aside; a run dir works as the resume path
    _trainer(tmp_path / "a", max_steps=2).train(resume=tmp_path / "a" / "checkpoints" / "step_000001", progress=False)
    aside = (tmp_path / "a" / "metrics.after_step_1.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside] == [2]
    resumed = _trainer(tmp_path / "a", max_steps=3)
    resumed.train(resume=tmp_path / "a", progress=False)
    assert resumed.step == 3
    _trainer(tmp_path / "a", max_steps=1).train(progress=False, overwrite=True)
    assert [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    left = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert left == ["latest", "step_000001"], "nothing of the replaced run may be resumed into this one"
    assert not list((tmp_path / "a").glob("metrics.after_step_*"))


def _other_run(tmp_path):
    other = _trainer(tmp_path / "other", max_steps=1)
    other.train(progress=False)
    return tmp_path / "other" / "checkpoints"


def test_resume_names_a_checkpoint_of_another_model_and_an_older_kl(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train(progress=False)
    step = tmp_path / "checkpoints" / "step_000001"
    saved = json.loads((step / "state.json").read_text())
    assert saved["num_processes"] == 1
    # saved without a fingerprint, the name is all there is to compare (a renamed copy with one is silent)
    (step / "state.json").write_text(json.dumps({**saved, "model": "someone/else", "base_fingerprint": None}))
    config = (step / "config.yaml").read_text()
    (step / "config.yaml").write_text("".join(ln for ln in config.splitlines(True) if not ln.startswith("kl_form")))
    with caplog.at_level("WARNING"):
        _trainer(tmp_path, max_steps=2, kl_beta=0.1).train(resume="auto", progress=False)
    assert "trained on model 'someone/else', this run loads 'tiny'" in caplog.text
    assert "weighed its KL as kl_form 'exact', this run uses 'flow_grpo'" in caplog.text  # read as it predates it


def test_a_checkpoint_of_other_base_weights_is_named_when_loaded(tmp_path, caplog):
    """Two versions of one model share a name; the base weights' fingerprint in state.json tells them apart."""
    from flowalign.testing import tiny_sd3_pipeline
    from flowalign.trainer import LEGACY_FINGERPRINTS, weights_fingerprint

    layer = torch.nn.Linear(8, 8)
    copied = copy.deepcopy(layer)
    assert weights_fingerprint(copied) == weights_fingerprint(layer) == weights_fingerprint(copied.bfloat16())
    with torch.no_grad():
        layer.weight[3, 5] += 0.01
    assert weights_fingerprint(layer) != weights_fingerprint(copied)
    assert weights_fingerprint(torch.nn.Linear(8, 8, device="meta")) is None  # offloaded: nothing to compare

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train(progress=False)
    step = tmp_path / "checkpoints" / "step_000001"
    saved = json.loads((step / "state.json").read_text())
    base = weights_fingerprint(tiny_sd3_pipeline().transformer)  # the base as built, before any LoRA
    assert saved["base_fingerprint"] == trainer.base_fingerprint == base
    fresh = _trainer(tmp_path / "fresh")
    (step / "state.json").write_text(json.dumps({**saved, "model": "moved/copy"}))
    with caplog.at_level("WARNING"):
        fresh.load(step)
    assert "other base weights" not in caplog.text and "trained on model" not in caplog.text
    (step / "state.json").write_text(json.dumps({**saved, "base_fingerprint": "0123456789abcdef"}))
    with caplog.at_level("WARNING"):
        fresh.load(step)
    assert "other base weights than this run loads (fingerprint 0123456789abcdef" in caplog.text
    caplog.clear()  # saved before fingerprints: a `shapes` checkpoint was trained on base v2
    legacy = {k: v for k, v in saved.items() if k != "base_fingerprint"}
    (step / "state.json").write_text(json.dumps(legacy))
    with caplog.at_level("WARNING"):
        fresh.load(step)
    assert "other base weights" not in caplog.text
    (step / "state.json").write_text(json.dumps({**legacy, "model": "shapes"}))
    with caplog.at_level("WARNING"):
        fresh.load(step)
    assert f"(fingerprint {LEGACY_FINGERPRINTS['shapes']}, these {base})" in caplog.text


def test_statistics_combine_over_processes_as_their_kind_requires(monkeypatch):
    """ratio_min / ratio_max are the batch's extremes, not means of each process's."""
    from types import SimpleNamespace

    import accelerate.utils

    parts = [{"train/ratio_min": 0.5, "train/ratio_max": 2.0, "train/loss": 1.0}, {"train/ratio_min": 0.9,
             "train/ratio_max": 3.0, "train/loss": 3.0, "train/only_here": 4.0}]  # fmt: skip
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: parts)
    fake = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2))
    out = GRPOTrainer._over_processes(fake, parts[0])
    assert out == {"train/ratio_min": 0.5, "train/ratio_max": 3.0, "train/loss": 2.0, "train/only_here": 4.0}


def test_an_older_runs_config_keeps_its_kl_meaning_and_checker(tmp_path, monkeypatch):
    from flowalign import config
    from flowalign.config import load_config, load_run_config, to_yaml

    text = to_yaml(load_config("shapes", {"kl_beta": 0.04, "checker": 3}))
    older = "".join(ln for ln in text.splitlines(True) if not ln.startswith(("kl_form", "checker")))
    (tmp_path / "config.yaml").write_text(older)
    # as if v3 were today's default: a config that names no checker gets 3 unless the legacy value fills it in
    make = config.make_config
    monkeypatch.setattr(config, "make_config", lambda values: make({"checker": 3, **values}))
    old = load_run_config(tmp_path)
    assert old.kl_form == "exact"  # what kl_beta meant when the run was made
    assert old.checker == 2  # what graded it: a v3 default must not relabel old runs
    (tmp_path / "config.yaml").write_text(text)
    new = load_run_config(tmp_path)
    assert (new.kl_form, new.checker) == ("flow_grpo", 3)


def test_a_fork_starts_its_log_with_its_source_run(tmp_path):
    _trainer(tmp_path / "src", max_steps=2, save_every=1).train(progress=False)
    source = [json.loads(x) for x in (tmp_path / "src" / "metrics.jsonl").read_text().splitlines()]
    fork = _trainer(tmp_path / "fork", max_steps=3)
    fork.train(resume=tmp_path / "src" / "checkpoints" / "step_000001", progress=False)
    log = [json.loads(x) for x in (tmp_path / "fork" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert log[:2] == source[:2], "the source's step-0 baseline and step 1, as they were logged"
    assert (tmp_path / "src" / "metrics.jsonl").read_text().count("\n") == 3, "the source run is left alone"
