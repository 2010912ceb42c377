"""Online RL (steps/train/rl.py, steps/train/rewards.py): GRPO/RLOO advantages and the clipped loss
against TRL 1.16, the reference model never updated, generation with the KV cache, rewards, and the
prompt-record pipeline through train and evaluate on a tiny random Llama.

TRL's loss is TRL's code: ``GRPOTrainer._compute_loss`` runs on a bare instance (``object.__new__``)
given only the attributes it reads, with a stand-in for ``_get_per_token_logps_and_entropies`` that
returns the fixed log-probs. TRL computes advantages inline in ``_generate_and_score_completions``
(trl/trainer/grpo_trainer.py, the ``sum_then_normalize`` branch) and ``RLOOTrainer._generate_and_score_completions``
(trl/trainer/rloo_trainer.py, "RLOO advantages computation"); those lines are reproduced verbatim in
``trl_grpo_advantages`` / ``trl_rloo_advantages`` with TRL's own ``nanstd``.
"""

from __future__ import annotations

import math
import os
import re
import types
from collections import defaultdict

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from steps.config import RewardSpec, RlSettings  # noqa: E402
from steps.core.errors import ConfigError  # noqa: E402
from steps.train.rewards import build_rewards, score  # noqa: E402
from steps.train.rl import clipped_loss, completion_mask, group_advantages  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, _generate_and_score_completions, multi_objective_aggregation "sum_then_normalize"
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    # trl/trainer/rloo_trainer.py, _generate_and_score_completions, "RLOO advantages computation"
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    return torch.nan_to_num(advantages, nan=0.0)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 1.0, 0.0, 0.3, 0.0, 0.0, 0.9, 0.1])


@pytest.mark.parametrize("group", [2, 3, 4, 6])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_equal_trl(group, scale):
    ours = group_advantages(REWARDS, group, "grpo", scale)
    assert_close(ours, trl_grpo_advantages(REWARDS, group, "group" if scale else "none"))


@pytest.mark.parametrize("group", [2, 3, 4, 6])
def test_rloo_advantages_equal_trl(group):
    assert_close(group_advantages(REWARDS, group, "rloo"), trl_rloo_advantages(REWARDS, group))


def test_a_group_of_equal_rewards_has_zero_advantage():
    assert torch.equal(group_advantages(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0]), 3)[:3], torch.zeros(3))


def trl_loss(logps, old, ref, advantages, mask, beta, epsilon, epsilon_high, loss_type):
    """``GRPOTrainer._compute_loss`` on a bare instance: TRL's own code on the same tensors."""
    trainer = object.__new__(GRPOTrainer)
    B, T = logps.shape
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon_high if epsilon_high is not None else epsilon, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t,
                                          gather_for_metrics=lambda t: t, sync_gradients=True),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )
    trainer.args.steps_per_generation = 1
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_clipped_loss_and_gradients_equal_trl(loss_type, beta, epsilon_high):
    g = torch.Generator().manual_seed(7)
    B, T = 6, 5
    base = -torch.rand(B, T, generator=g) * 3
    old = base + 0.3 * torch.randn(B, T, generator=g)  # ratios far from 1: the clip binds on some tokens
    ref = base + 0.5 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    ours_in = base.clone().requires_grad_(True)
    trl_in = base.clone().requires_grad_(True)
    ours, metrics = clipped_loss(ours_in, old, ref, advantages, mask, beta, 0.2, epsilon_high, loss_type)
    expected, trl_metrics = trl_loss(trl_in, old, ref, advantages, mask, beta, 0.2, epsilon_high, loss_type)
    assert_close(ours, expected)
    ours.backward()
    expected.backward()
    assert_close(ours_in.grad, trl_in.grad)
    assert ours_in.grad.abs().sum() > 0
    assert metrics["clip_ratio"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert 0 < metrics["clip_ratio"] < 1
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][0], rel=1e-5)


def test_with_one_iteration_the_ratio_is_one_and_the_loss_is_minus_the_mean_advantage_plus_kl():
    logps = -torch.rand(4, 3)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, metrics = clipped_loss(logps, logps.detach(), logps.detach(), advantages, torch.ones(4, 3), 0.1, 0.2)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)  # KL of identical models is 0
    assert metrics["kl"] == 0.0 and metrics["clip_ratio"] == 0.0


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_stop():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9], [4, 3, 4, 3, 3]])
    assert completion_mask(ids, {2, 3}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0],
                                                      [1, 1, 0, 0, 0]]


# --- rewards -----------------------------------------------------------------------------------

RECORDS = [{"id": "a", "prompt": "What is 2 + 2?", "answer": "4"}, {"id": "b", "prompt": "JSON?", "answer": "42"}]


def test_builtin_rewards_and_their_weighted_sum():
    rewards = build_rewards([RewardSpec(function="exact_match"),
                             RewardSpec(function="regex", pattern=r"^\d+$", weight=0.5),
                             RewardSpec(function="json", weight=0.25),
                             RewardSpec(function="length", min_chars=1, max_chars=3, weight=2.0)])
    total, per = score(rewards, [r["prompt"] for r in RECORDS], [" 4. ", "42.0 is it"], RECORDS)
    assert per == {"exact_match": [1.0, 0.0], "regex": [0.0, 0.0], "json": [0.0, 0.0], "length": [0.0, 0.0]}
    total, per = score(rewards, [r["prompt"] for r in RECORDS], ["4", "42.0"], RECORDS)
    assert per["exact_match"] == [1.0, 1.0] and per["regex"] == [1.0, 0.0] and per["json"] == [1.0, 1.0]
    assert total == [1.0 + 0.5 + 0.25 + 2.0, 1.0 + 0.25]


def test_number_match_credits_the_last_number_of_a_sentence():
    rewards = build_rewards([RewardSpec(function="number_match")])
    records = [{"id": "a", "answer": "12"}, {"id": "b", "answer": "-3"}, {"id": "c", "answer": "1000"}]
    _, per = score(rewards, ["p"] * 3, ["14 - 2 = 12.", "2 - 5 is -3 (not 3)", "1,000"], records)
    assert per["number_match"] == [1.0, 0.0, 1.0]
    _, per = score(rewards, ["p"] * 3, ["12 apples, not 13", "-3", "no number"], records)
    assert per["number_match"] == [0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="record 'x' has no numeric answer"):
        score(rewards, ["p"], ["1"], [{"id": "x", "answer": "many"}])


def brevity(prompts, completions, records):  # a user's reward, imported as tests...test_rl:brevity
    return [1.0 / (1 + len(c)) for c in completions]


def raises(prompts, completions, records):
    raise RuntimeError("scorer is down")


def not_numbers(prompts, completions, records):
    return ["good" for _ in completions]


def too_few(prompts, completions, records):
    return [1.0]


def test_a_module_function_reward_is_imported_by_path_and_weighted():
    total, per = score(build_rewards([RewardSpec(function=f"{__name__}:brevity", weight=3.0)]), ["p", "p"],
                       ["", "abc"], RECORDS)
    assert per[f"{__name__}:brevity"] == [1.0, 0.25] and total == [3.0, 0.75]


@pytest.mark.parametrize("name, message", [
    ("raises", "raised RuntimeError: scorer is down"),
    ("not_numbers", "returned 'good' for completion 0: expected a finite number"),
    ("too_few", "returned 1 values for 2 completions"),
])
def test_a_broken_reward_function_is_a_clear_error_naming_it(name, message):
    with pytest.raises(ConfigError) as err:
        score(build_rewards([RewardSpec(function=f"{__name__}:{name}")]), ["p", "p"], ["1", "2"], RECORDS)
    assert f"reward function '{__name__}:{name}' {message}" in str(err.value)


def test_unknown_rewards_are_configuration_errors():
    with pytest.raises(ConfigError, match="reward 'nosuchmodule:f' cannot be loaded"):
        build_rewards([RewardSpec(function="nosuchmodule:f")])
    with pytest.raises(ValueError, match="neither a built-in"):
        RewardSpec(function="exactmatch")
    with pytest.raises(ValueError, match="needs its pattern"):
        RewardSpec(function="regex")
    with pytest.raises(ConfigError, match="record 'x' has no answer"):
        score(build_rewards([RewardSpec(function="exact_match")]), ["p"], ["1"], [{"id": "x", "prompt": "p"}])


# --- the policy, its reference and the training loop on a tiny random Llama ----------------------

def prompt_dataset(store, model, n: int = 40):
    """arithmetic:<n> -> validate (prompt) -> scrub -> tokenize: the tokenized DatasetRef."""
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=f"arithmetic:{n}"), store)
    valid = validate_records(ValidateConfig(record_kind="prompt"), raw, store)
    clean = scrub_records(ScrubConfig(near_dedup=False), valid, store)  # the prompts differ in a few digits only
    return tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=64, leakage_threshold=None), clean,
                            model, store)


SETTINGS = RlSettings(prompts_per_step=2, group_size=3, max_new_tokens=6, beta=0.1, iterations=2,
                      rewards=[RewardSpec(function="exact_match"), RewardSpec(function="length", max_chars=8)])


def rollout_for(method: str, base_dir, settings: RlSettings = SETTINGS):
    from transformers import AutoTokenizer

    from steps.config import LoraSettings, TrainConfig
    from steps.core.contract import Task
    from steps.train import methods
    from steps.train.ppo import make_rollout

    torch.manual_seed(0)
    adapters = method in ("lora", "qlora")
    cfg = TrainConfig(method=method, lora=LoraSettings(r=4, alpha=8, dropout=0.0) if adapters else LoraSettings())
    net = methods.prepare(cfg, base_dir, "cpu", Task(kind="rl"))
    return net, make_rollout(net, AutoTokenizer.from_pretrained(base_dir), base_dir, settings, "cpu", 0)


def prompt_rows(tokenizer, n: int = 2) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"What is {i} + 3? Answer with the number only."
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        rows.append({"id": str(i), "prompt": prompt, "answer": str(i + 3),
                     "input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
    return rows


def train_a_few_steps(net, rollout, rows, steps: int = 3):
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-2)
    net.train()
    for _ in range(steps):
        batch = rollout.sample(rows)
        batch.advantages = torch.linspace(-1, 1, len(batch.advantages))  # a signal even when rewards tie
        loss, _ = rollout.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_reference_is_the_policy_with_adapters_off_and_never_moves(base_dir, tiny_tokenizer, method):
    from steps.train.rl import token_logps

    net, rollout = rollout_for(method, base_dir)
    assert rollout.frozen is None  # no second copy of the model for LoRA
    rows = prompt_rows(tiny_tokenizer)
    batch = rollout.sample(rows)
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    net.eval()
    with torch.no_grad():
        policy_before = token_logps(net, *tensors)
    reference_before = rollout.reference_logps(*tensors)
    assert_close(batch.ref_logps, reference_before)
    assert_close(policy_before, reference_before)  # LoRA starts as the identity (B = 0)
    train_a_few_steps(net, rollout, rows)
    net.eval()
    with torch.no_grad():
        policy_after = token_logps(net, *tensors)
    assert (policy_after - policy_before).abs().max() > 1e-3  # the policy moved
    assert torch.equal(rollout.reference_logps(*tensors), reference_before)  # adapters-off outputs did not


def test_full_fine_tuning_reference_is_a_frozen_copy_that_never_moves(base_dir, tiny_tokenizer):
    net, rollout = rollout_for("full", base_dir)
    assert rollout.frozen is not None and not any(p.requires_grad for p in rollout.frozen.parameters())
    frozen = {k: v.clone() for k, v in rollout.frozen.state_dict().items()}
    policy = {k: v.clone() for k, v in net.state_dict().items()}
    train_a_few_steps(net, rollout, prompt_rows(tiny_tokenizer))
    assert all(torch.equal(frozen[k], v) for k, v in rollout.frozen.state_dict().items())
    assert any(not torch.equal(policy[k], v) for k, v in net.state_dict().items())


def test_sampling_uses_the_kv_cache(base_dir, tiny_tokenizer, monkeypatch):
    """generate() is asked for the cache, and after the prompt each forward feeds one new token."""
    net, rollout = rollout_for("lora", base_dir, SETTINGS.model_copy(update={"beta": 0.0, "iterations": 1}))
    calls, widths = [], []
    generate = net.generate
    monkeypatch.setattr(net, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    model = net.get_base_model()
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        batch = rollout.sample(prompt_rows(tiny_tokenizer))
    finally:
        hook.remove()
    assert calls and all(kw["use_cache"] is True and kw["do_sample"] is True for kw in calls)
    steps = batch.completion_ids.shape[1]
    assert widths[0] == batch.prompt_ids.shape[1] and widths[1:steps] == [1] * (steps - 1)


def test_prompt_records_train_with_grpo_log_rewards_and_evaluate_mean_reward(store, tiny_model):
    from peft import PeftModel

    from steps.config import EvaluateConfig, LoraSettings, TrainConfig
    from steps.evaluate import evaluate_model
    from steps.train.methods.common import load_base
    from steps.train.step import train_model

    data = prompt_dataset(store, tiny_model)
    assert data.stats["task"] == "rl" and data.stats["train_records"] + data.stats["eval_records"] == 40
    row = store.read_jsonl(data, "train.jsonl")[0]
    assert set(row) == {"id", "input_ids", "prompt", "answer"} and row["prompt"].startswith("What is ")
    cfg = TrainConfig(method="lora", max_steps=3, learning_rate=1e-2, warmup_steps=0, record_losses=False,
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0), rl=SETTINGS, checkpoint_every=0)
    tuned = train_model(cfg, data, tiny_model, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    assert [h["step"] for h in log] == [1, 2, 3]
    for h in log:
        assert {"loss", "lr", "reward", "reward_std", "kl", "completion_length", "clip_ratio",
                "reward_exact_match", "reward_length"} <= h.keys()
        assert 1 <= h["completion_length"] <= SETTINGS.max_new_tokens and h["kl"] >= 0
    base_dir = store.download(tiny_model.base)
    trained = PeftModel.from_pretrained(load_base(None, base_dir, "cpu"), store.download(tuned.adapter)).eval()
    base = load_base(None, base_dir, "cpu").eval()
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad(), trained.disable_adapter():
        assert torch.equal(trained(input_ids=ids).logits, base(input_ids=ids).logits)

    ecfg = EvaluateConfig(rewards=SETTINGS.rewards, reward_prompts=6, max_new_tokens=6, reference_blocks=0,
                          smoke_prompts=["Hi"], smoke_max_new_tokens=4)
    reports = {role: evaluate_model(ecfg, m, data, store, role=role) for role, m in
               (("base", tiny_model), ("candidate", tuned))}
    assert reports["base"].stats["kl_to_reference"] == 0.0
    assert math.isfinite(reports["candidate"].stats["kl_to_reference"])  # (tests below check its value)
    for report in reports.values():
        assert 0.0 <= report.stats["mean_reward"] <= 2.0 and report.stats["reward_prompts"] == 6
        assert "perplexity" not in report.stats and "bleu" not in report.stats
        samples = store.read_jsonl(report, "samples.jsonl")
        assert len(samples) == 6 and {"id", "reference", "prediction", "reward"} <= samples[0].keys()
        assert sum(s["reward"] for s in samples) / 6 == pytest.approx(report.stats["mean_reward"], abs=1e-5)


RESUME_SCRIPT = """
import json, sys
from steps.core import lineage
args = json.loads(sys.argv[1])
lineage.code_version = lambda: args["code"]  # the parent's run key, even if a file of steps/ changes meanwhile
from steps.config import TrainConfig
from steps.core.store import ArtifactStore, DatasetRef, ModelRef
from steps.train.step import train_model
train_model(TrainConfig.model_validate(args["cfg"]), DatasetRef.model_validate(args["data"]),
            ModelRef.model_validate(args["model"]), ArtifactStore.from_env(args["prefix"]))
"""


def test_sigkill_mid_grpo_run_then_retry_samples_and_ends_like_an_uninterrupted_run(store, tiny_model):
    """Checkpoints hold the step, optimizer, scheduler, RNG (sampling draws from it; LoRA dropout too) and
    the data position: the resumed run samples the same completions, gets the same rewards and weights."""
    import uuid

    from safetensors.torch import load_file

    from helpers import kill_at_first_checkpoint
    from steps.config import LoraSettings, TrainConfig
    from steps.core.lineage import code_version
    from steps.core.store import ArtifactStore
    from steps.train.step import train_model

    data = prompt_dataset(store, tiny_model)
    cfg = TrainConfig(method="lora", max_steps=9, checkpoint_every=3, learning_rate=1e-2, warmup_steps=2,
                      record_losses=False, lora=LoraSettings(r=4, alpha=8, dropout=0.1), seed=5,
                      rl=SETTINGS.model_copy(update={"temperature": 1.5, "rewards": [
                          RewardSpec(function="exact_match"), RewardSpec(function=f"{__name__}:brevity")]}))
    reference = train_model(cfg, data, tiny_model, store)
    killed = ArtifactStore.from_env(f"test-{uuid.uuid4().hex[:10]}")
    args = {"cfg": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
            "model": tiny_model.model_dump(mode="json"), "prefix": killed.prefix, "code": code_version()}
    env = os.environ | {"PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    kill_at_first_checkpoint(RESUME_SCRIPT, args, killed, env, timeout=180)  # env: brevity's module importable

    resumed = train_model(cfg, data, tiny_model, killed)
    start = resumed.adapter.stats["resumed_from"]
    assert start is not None and 3 <= start < cfg.max_steps and start % 3 == 0
    ref_log = store.read_json(reference.adapter, "train_log.json")
    new_log = killed.read_json(resumed.adapter, "train_log.json")
    assert [h["step"] for h in new_log] == list(range(1, cfg.max_steps + 1))
    rewards = {h["reward"] for h in ref_log}
    assert len(rewards) > 1  # the samples differ from step to step (a real test of the sampling RNG)
    for a, b in zip(ref_log[start:], new_log[start:]):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], (a, b)
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["kl"] - b["kl"]) < 1e-5 and a["lr"] == b["lr"], (a, b)
    expected = load_file(store.download(reference.adapter) / "adapter_model.safetensors")
    got = load_file(killed.download(resumed.adapter) / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"rl": {"group_size": 3}}}, "train.rl settings apply to prompt records, not to 'chat' records"),
    ({"validate": {"record_kind": "prompt"}, "train": {"method": "reft"}},
     "train.method 'reft' intervenes at prompt positions of chat records, not on 'prompt' records"),
    ({"validate": {"record_kind": "prompt"}, "train": {"grad_accum_steps": 2}}, "set train.grad_accum_steps 1"),
    ({"validate": {"record_kind": "prompt"}, "register": {"metric": "perplexity"}},
     "register.metric 'perplexity' is not measured"),
    ({"validate": {"record_kind": "prompt"}, "train": {"rl": {"group_size": 1}}}, "group_size"),
])
def test_inconsistent_rl_settings_are_configuration_errors(overrides, message):
    from steps.config import PipelineParams

    with pytest.raises(ConfigError, match=re.escape(message)):
        PipelineParams.parse(overrides)


def test_prompt_records_gate_on_mean_reward_scored_with_the_training_rewards_unless_given():
    from steps.config import PipelineParams

    rl = {"rewards": [{"function": "number_match"}, {"function": "length", "max_chars": 5, "weight": 0.5}]}
    params = PipelineParams.parse({"validate": {"record_kind": "prompt"}, "train": {"rl": rl}})
    assert params.task == "rl" and params.register_.metric == "mean_reward"
    assert params.evaluate.rewards == params.train.rl.rewards
    own = PipelineParams.parse({"validate": {"record_kind": "prompt"}, "train": {"rl": rl},
                                "evaluate": {"rewards": [{"function": "exact_match"}]}})
    assert [r.function for r in own.evaluate.rewards] == ["exact_match"]


# --- PPO (steps/train/ppo.py) in the same loop --------------------------------------------------

PPO = RlSettings(algorithm="ppo", prompts_per_step=2, group_size=2, max_new_tokens=6, beta=0.1, kl_target=0.5,
                 kl_horizon=20, iterations=2, rewards=[RewardSpec(function="number_match"),
                                                       RewardSpec(function=f"{__name__}:brevity", weight=2.0)])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_value_head_learns_the_returns_and_the_reference_never_moves(base_dir, tiny_tokenizer, method):
    """Updates on one sampled batch: the value loss falls, the policy moves, the reference does not (LoRA:
    the policy with adapters off, no second copy; full: a frozen copy)."""
    from steps.train.rl import token_logps

    net, rollout = rollout_for(method, base_dir, PPO)
    assert (rollout.frozen is None) == (method == "lora")
    assert [n for n, _ in rollout.parameters()] == ["value_head.weight", "value_head.bias"]
    rows = prompt_rows(tiny_tokenizer)
    batch = rollout.sample(rows)
    assert batch.advantages.shape == batch.completion_ids.shape == batch.returns.shape
    assert batch.metrics["kl_coef"] == PPO.beta and batch.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    reference = rollout.reference_logps(*batch.tensors)
    net.eval()
    with torch.no_grad():
        policy_before = token_logps(net, *batch.tensors)
    optimizer = torch.optim.AdamW([{"params": [p for p in net.parameters() if p.requires_grad], "lr": 1e-3},
                                   {"params": [p for _, p in rollout.parameters()], "lr": 2e-3}])
    value_losses = []
    for _ in range(8):
        loss, metrics = rollout.loss(batch)
        value_losses.append(metrics["value_loss"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert value_losses[-1] < value_losses[0], value_losses
    with torch.no_grad():
        assert (token_logps(net, *batch.tensors) - policy_before).abs().max() > 1e-4  # the policy moved
    assert torch.equal(rollout.reference_logps(*batch.tensors), reference)
    later = rollout.sample(rows)
    assert later.metrics["kl"] > 0 and later.metrics["kl_coef"] != PPO.beta  # the coefficient adapted


def test_ppo_loss_is_the_clipped_policy_loss_plus_the_weighted_value_loss(base_dir, tiny_tokenizer):
    from steps.train import ppo
    from steps.train.rl import token_logps

    net, rollout = rollout_for("lora", base_dir, PPO)
    batch = rollout.sample(prompt_rows(tiny_tokenizer))
    mask = batch.completion_mask.float()
    # the sample's advantages and returns: KL-in-reward at the coefficient used, GAE, whitened
    rewards, _ = ppo.kl_rewards(torch.tensor([float(m) for m in _scores(rollout, batch)]), batch.old_logps,
                                batch.ref_logps, mask, PPO.beta)
    advantages, returns = ppo.gae(rewards, batch.old_values, mask, PPO.gamma, PPO.lam)
    assert_close(batch.returns, returns)
    assert_close(batch.advantages, ppo.whiten(advantages, mask) * mask)
    net.eval()
    loss, metrics = rollout.loss(batch)
    with torch.no_grad():
        logps, hidden = token_logps(net, *batch.tensors, hidden=True)
        values = rollout.value_head(hidden).squeeze(-1)
    expected = (ppo.policy_loss(logps, batch.old_logps, batch.advantages, mask, PPO.epsilon)[0]
                + PPO.value_coef * ppo.value_loss(values, batch.old_values, batch.returns, mask, PPO.value_clip)[0])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def _scores(rollout, batch):
    from steps.train.rewards import score
    from steps.train.rl import decode

    texts = decode(rollout.tokenizer, batch.completion_ids, batch.completion_mask)
    group = [r for r in prompt_rows(rollout.tokenizer) for _ in range(PPO.group_size)]
    return score(rollout.rewards, [r["prompt"] for r in group], texts, group)[0]


def test_sigkill_mid_ppo_run_then_retry_ends_like_an_uninterrupted_run(store, tiny_model):
    """PPO's checkpoint adds the value head and the adaptive KL coefficient to what GRPO's holds."""
    import uuid

    from safetensors.torch import load_file

    from helpers import kill_at_first_checkpoint
    from steps.config import LoraSettings, TrainConfig
    from steps.core.lineage import code_version
    from steps.core.store import ArtifactStore
    from steps.train.step import train_model

    data = prompt_dataset(store, tiny_model)
    cfg = TrainConfig(method="lora", max_steps=9, checkpoint_every=3, learning_rate=1e-2, warmup_steps=1,
                      record_losses=False, lora=LoraSettings(r=4, alpha=8, dropout=0.0), seed=3,
                      rl=PPO.model_copy(update={"temperature": 1.5}))
    reference = train_model(cfg, data, tiny_model, store)
    ref_log = store.read_json(reference.adapter, "train_log.json")
    assert {"reward", "kl", "kl_coef", "policy_loss", "value_loss", "value", "return"} <= ref_log[0].keys()
    assert len({h["kl_coef"] for h in ref_log}) > 1  # adapted toward kl_target: resume must restore it
    assert "value_head" not in str(load_file(store.download(reference.adapter) / "adapter_model.safetensors").keys())
    killed = ArtifactStore.from_env(f"test-{uuid.uuid4().hex[:10]}")
    args = {"cfg": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
            "model": tiny_model.model_dump(mode="json"), "prefix": killed.prefix, "code": code_version()}
    env = os.environ | {"PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    kill_at_first_checkpoint(RESUME_SCRIPT, args, killed, env, timeout=180)  # env: brevity's module importable

    resumed = train_model(cfg, data, tiny_model, killed)
    start = resumed.adapter.stats["resumed_from"]
    assert start is not None and 3 <= start < cfg.max_steps
    new_log = killed.read_json(resumed.adapter, "train_log.json")
    for a, b in zip(ref_log[start:], new_log[start:]):
        assert a["reward"] == b["reward"] and a["kl_coef"] == pytest.approx(b["kl_coef"], rel=1e-9), (a, b)
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["value"] - b["value"]) < 1e-5, (a, b)
    expected = load_file(store.download(reference.adapter) / "adapter_model.safetensors")
    got = load_file(killed.download(resumed.adapter) / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_evaluation_kl_is_the_mean_log_ratio_to_the_separately_loaded_base_over_answer_tokens(base_dir,
                                                                                              tiny_tokenizer):
    from steps.train.methods.common import load_base
    from steps.train.rewards import build_rewards
    from steps.train.rl import greedy_rewards

    net, _ = rollout_for("lora", base_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B away from 0
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    net.eval()
    rows = prompt_rows(tiny_tokenizer, 3)
    rewards = build_rewards([RewardSpec(function="length", max_chars=100)])
    _, answers, kl = greedy_rewards(net, tiny_tokenizer, rows, rewards, 5, 2, 0, "cpu", reference=net)
    base = load_base(None, base_dir, "cpu").eval()
    total, count = 0.0, 0
    for row in rows:  # one prompt at a time, no padding: the answer's tokens re-generated, scored by both models
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)[0, ids.shape[1]:].tolist()
            stops = {tiny_tokenizer.eos_token_id}
            answer = out[: next((i + 1 for i, t in enumerate(out) if t in stops), len(out))]
            full = torch.tensor([row["input_ids"] + answer])
            for model, sign in ((net, 1.0), (base, -1.0)):
                logps = torch.log_softmax(model(input_ids=full).logits[0, len(row["input_ids"]) - 1 : -1].float(), -1)
                total += sign * float(logps[torch.arange(len(answer)), torch.tensor(answer)].sum())
        count += len(answer)
    assert kl == pytest.approx(total / count, rel=1e-3, abs=1e-4) and kl != 0.0
    _, _, none = greedy_rewards(net, tiny_tokenizer, rows, rewards, 5, 2, 0, "cpu")
    assert none is None

