"""DPO and ORPO losses of steps/train/preference.py, checked against TRL's own implementation.

TRL's code is called, not re-typed: ``DPOTrainer._compute_loss`` (sigmoid loss, rewards) and
``ORPOTrainer.odds_ratio_loss`` / ``get_batch_loss_metrics`` / ``get_batch_logps`` run on bare
instances (``object.__new__``) given only the attributes those methods read. DPO runs both on
given log-probs (a stand-in model returning them) and end to end on a tiny random Llama with
TRL's fused LM head (``add_fused_lm_head``) and TRL's own reference forward.
"""

from __future__ import annotations

import copy
import os
import types
from collections import defaultdict

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head, selective_log_softmax  # noqa: E402

from steps.config import PreferenceSettings  # noqa: E402
from steps.core.contract import IGNORE  # noqa: E402
from steps.train.batching import collate  # noqa: E402
from steps.train.preference import dpo_loss, forward_logps, orpo_loss, pair_loss, reference_logps, sequence_logps, sides  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BETAS = [0.01, 0.1, 0.5, 2.0]
VOCAB = 64
CPU = torch.device("cpu")
ACCELERATOR = types.SimpleNamespace(device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t)


def assert_close32(actual: float, expected: float) -> None:
    """Scalars read off float32 tensors with float32's tolerances: as Python floats assert_close would
    hold them to float64's 1e-7, and a mean over float32 values moves by more than that with the
    order of summation (vectorised reductions differ between implementations and CPUs)."""
    assert_close(torch.tensor(actual, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32))


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config)


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Synthetic pairs with a shared prompt and answers of different lengths (so batches pad)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    rows = []
    for i in range(n):
        prompt, good, bad = draw(3 + i % 3), draw(2 + i % 4), draw(5 - i % 3)
        rows.append({"input_ids": prompt + good, "labels": [IGNORE] * len(prompt) + good,
                     "rejected_ids": prompt + bad, "rejected_labels": [IGNORE] * len(prompt) + bad})
    return rows


def trl_dpo(beta: float, model=None, ref_model=None, precompute: bool = True) -> DPOTrainer:
    """A bare DPOTrainer with the attributes ``_compute_loss`` reads (sigmoid loss, standard reverse KL)."""
    trainer = object.__new__(DPOTrainer)
    vars(trainer).update(
        model=model, ref_model=ref_model, accelerator=ACCELERATOR, beta=beta, loss_types=["sigmoid"],
        loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl", precompute_ref_logps=precompute,
        aux_loss_enabled=False, use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    return trainer


def trl_orpo(beta: float) -> ORPOTrainer:
    trainer = object.__new__(ORPOTrainer)
    vars(trainer).update(beta=beta, accelerator=ACCELERATOR, is_encoder_decoder=False, padding_value=0,
                         aux_loss_enabled=False)
    return trainer


class GivenLogps(torch.nn.Module):
    """Stands in for a fused-head model: returns the given summed log-probs as one completion token per row."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = logps

    def forward(self, **_: object) -> FusedCausalLMOutput:
        zeros = torch.zeros(len(self.logps), 1)
        return FusedCausalLMOutput(log_probs=self.logps.unsqueeze(1), entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())


def trl_dpo_on_logps(beta, chosen, rejected, ref_chosen, ref_rejected):
    """TRL's DPO loss and metrics for given summed log-probs."""
    n = len(chosen)
    model = GivenLogps(torch.cat([chosen, rejected]))
    trainer = trl_dpo(beta, model=model)
    inputs = {"input_ids": torch.ones(2 * n, 2, dtype=torch.long), "attention_mask": torch.ones(2 * n, 2),
              "completion_mask": torch.ones(2 * n, 2, dtype=torch.long),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def random_logps(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64).float() * 40 for _ in range(4)]


# ---- DPO ----

@pytest.mark.parametrize("beta", BETAS)
def test_dpo_loss_and_gradients_match_trl(beta):
    chosen, rejected, ref_chosen, ref_rejected = random_logps(6, seed=int(beta * 100))
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    trl_c, trl_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()

    loss, good, bad = dpo_loss(ours_c, ours_r, ref_chosen, ref_rejected, beta)
    trl_loss, metrics = trl_dpo_on_logps(beta, trl_c, trl_r, ref_chosen, ref_rejected)
    assert_close(loss, trl_loss)
    assert_close32(good.mean().item(), metrics["rewards/chosen"][0])
    assert_close32(bad.mean().item(), metrics["rewards/rejected"][0])
    assert_close32((good - bad).mean().item(), metrics["rewards/margins"][0])
    assert (good > bad).float().mean().item() == metrics["rewards/accuracies"][0]

    loss.backward()
    trl_loss.backward()
    assert_close(ours_c.grad, trl_c.grad)
    assert_close(ours_r.grad, trl_r.grad)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_rewards_per_pair_match_trl(beta):
    chosen, rejected, ref_chosen, ref_rejected = random_logps(6, seed=7)
    _, good, bad = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    for i in range(6):
        one = slice(i, i + 1)
        trl_loss, metrics = trl_dpo_on_logps(beta, chosen[one], rejected[one], ref_chosen[one], ref_rejected[one])
        assert_close32(good[i].item(), metrics["rewards/chosen"][0])
        assert_close32(bad[i].item(), metrics["rewards/rejected"][0])
        ours_i, _, _ = dpo_loss(chosen[one], rejected[one], ref_chosen[one], ref_rejected[one], beta)
        assert_close(ours_i, trl_loss)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_pair_loss_matches_trl_end_to_end(beta):
    """Same tiny policy and reference: TRL's fused-head log-probs, reference forward and loss vs ours."""
    rows = pairs(6)
    policy, ref = tiny_llama(0), tiny_llama(1)
    reference_logps(ref.eval(), rows, batch_size=4, pad_id=0, device="cpu")
    trl_policy, trl_ref = copy.deepcopy(policy).train(), copy.deepcopy(ref).eval()
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(trl_ref)

    batch = collate(sides(rows), pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long()}
    trainer = trl_dpo(beta, model=trl_policy, ref_model=trl_ref, precompute=False)
    trl_loss = trainer._compute_loss(trl_policy, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]

    loss, tokens, ours = pair_loss(policy.train(), rows, PreferenceSettings(loss="dpo", beta=beta), 0, "cpu")
    assert_close(loss, trl_loss)
    assert_close32(ours["reward_margin"], metrics["rewards/margins"][0])
    assert ours["reward_accuracy"] == metrics["rewards/accuracies"][0]
    assert tokens == int(batch["attention_mask"].sum())
    logps, _, _ = forward_logps(policy, rows, 0, "cpu")
    assert_close32(logps[:6].mean().item(), metrics["logps/chosen"][0])
    assert_close32(logps[6:].mean().item(), metrics["logps/rejected"][0])

    loss.backward()
    trl_loss.backward()
    grads = dict(trl_policy.named_parameters())
    for name, p in policy.named_parameters():
        assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- ORPO ----

@pytest.mark.parametrize("beta", BETAS)
def test_orpo_loss_and_gradients_match_trl(beta):
    g = torch.Generator().manual_seed(int(beta * 100))
    # Length-normalised log-probs (mean per token), the range real models give.
    chosen = -(torch.rand(6, generator=g) * 6 + 0.05)
    rejected = -(torch.rand(6, generator=g) * 6 + 0.05)
    nll = torch.rand((), generator=g) * 5
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    trl_c, trl_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()

    loss, log_odds = orpo_loss(ours_c, ours_r, nll, beta)
    losses, good, bad, _, trl_log_odds = trl_orpo(beta).odds_ratio_loss(trl_c, trl_r)
    trl_loss = nll - losses.mean()  # how ORPOTrainer.get_batch_loss_metrics combines them
    assert_close(loss, trl_loss)
    assert_close(log_odds.mean(), trl_log_odds.detach())
    assert_close(beta * chosen, good)
    assert_close(beta * rejected, bad)

    loss.backward()
    trl_loss.backward()
    assert_close(ours_c.grad, trl_c.grad)
    assert_close(ours_r.grad, trl_r.grad)


def test_orpo_log_odds_match_trl_near_certainty_in_float64():
    """Same formula where log(1 - e^p) needs care (TRL's log1mexp branches at -ln 2); float64 to compare exactly."""
    chosen = -torch.logspace(-6, 0.5, 6, dtype=torch.float64)
    rejected = -torch.logspace(-5, 0.8, 6, dtype=torch.float64).flip(0)
    _, log_odds = orpo_loss(chosen, rejected, torch.tensor(0.0, dtype=torch.float64), 0.1)
    trainer = trl_orpo(0.1)
    for i in range(6):  # TRL casts to float32 internally; compare per element via its mean on one pair
        *_, trl_log_odds = trainer.odds_ratio_loss(chosen[i : i + 1], rejected[i : i + 1])
        assert_close(log_odds[i].float(), trl_log_odds, rtol=1e-4, atol=1e-4)


def orpo_trl_batch(rows):
    chosen = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], 0)
    rejected = collate([{"input_ids": r["rejected_ids"], "labels": r["rejected_labels"]} for r in rows], 0)
    return {f"{side}_{key}": batch[k] for side, batch in (("chosen", chosen), ("rejected", rejected))
            for key, k in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("labels", "labels"))}


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_pair_loss_odds_ratio_term_matches_trl_end_to_end(beta):
    """Same tiny model: the length-normalised log-probs and the odds-ratio term agree with TRL's."""
    rows = pairs(6)
    net = tiny_llama(0).eval()
    with torch.no_grad():
        trl_loss, metrics = trl_orpo(beta).get_batch_loss_metrics(net, orpo_trl_batch(rows))
        loss, _, ours = pair_loss(net, rows, PreferenceSettings(loss="orpo", beta=beta), 0, "cpu")
        logps, counts, _ = forward_logps(net, rows, 0, "cpu")
    mean = logps / counts
    assert_close32(mean[:6].mean().item(), metrics["logps/chosen"])
    assert_close32(mean[6:].mean().item(), metrics["logps/rejected"])
    assert_close(ours["log_odds"], metrics["log_odds_chosen"])
    # loss = NLL - beta * mean log sigmoid(log_odds): the odds-ratio term on its own.
    assert_close((loss - ours["chosen_nll"]).item(), trl_loss.item() - metrics["nll_loss"], rtol=1e-5, atol=1e-6)


def test_orpo_chosen_nll_covers_answer_tokens_only():
    """A deliberate difference: TRL's ORPOTrainer.concatenated_forward
    (trl/experimental/orpo/orpo_trainer.py:796-800) takes the chosen NLL over prompt and answer;
    ours, like the ORPO paper and our SFT masking, over the answer tokens only."""
    rows = pairs(6)
    net = tiny_llama(0).eval()
    with torch.no_grad():
        _, metrics = trl_orpo(0.1).get_batch_loss_metrics(net, orpo_trl_batch(rows))
        _, _, ours = pair_loss(net, rows, PreferenceSettings(loss="orpo", beta=0.1), 0, "cpu")
        scored = [loop_logps(net(torch.tensor([r["input_ids"]])).logits, torch.tensor([r["labels"]])) for r in rows]
    total, count = sum(s[0][0] for s in scored), sum(s[1][0] for s in scored)
    assert_close(ours["chosen_nll"], -total / count, rtol=1e-5, atol=1e-6)
    assert abs(ours["chosen_nll"] - metrics["nll_loss"]) > 1e-4  # TRL's prompt-inclusive NLL differs


# ---- sequence log-probs ----

def loop_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Plain reference: token t is predicted by position t - 1; -100 labels are skipped."""
    sums, counts = [], []
    for row_logits, row_labels in zip(logits.double(), labels.tolist()):
        total, count = 0.0, 0
        for t in range(1, len(row_labels)):
            if row_labels[t] != IGNORE:
                total += torch.log_softmax(row_logits[t - 1], dim=-1)[row_labels[t]].item()
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def masked_labels(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.4] = IGNORE
    labels[0, :3] = IGNORE  # a prompt
    labels[1, -4:] = IGNORE  # padding
    labels[2] = IGNORE  # nothing to score
    labels[3, 0] = 5  # a label at position 0 has no predicting position: never scored
    labels[3, 1:] = IGNORE
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_logps_matches_plain_loop(seed):
    logits, labels = masked_labels(6, 12, seed)
    logps, counts = sequence_logps(logits, labels)
    sums, expected_counts = loop_logps(logits, labels)
    assert counts.tolist() == expected_counts
    assert counts[2] == 0 and counts[3] == 0 and logps[2] == 0 and logps[3] == 0
    assert_close(logps.double(), torch.tensor(sums, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_trl_gathering(dtype):
    logits, labels = masked_labels(6, 12, seed=3)
    logits = logits.to(dtype)
    logps, counts = sequence_logps(logits, labels)
    # TRL's summed and length-averaged log-probs (shift by one, -100 masked, selective_log_softmax underneath).
    trl_sum = ORPOTrainer.get_batch_logps(logits.float(), labels, average_log_prob=False)
    assert_close(logps, trl_sum, rtol=1e-5, atol=1e-5)
    scored = counts > 0
    trl_mean = ORPOTrainer.get_batch_logps(logits.float(), labels, average_log_prob=True)
    assert_close((logps / counts)[scored], trl_mean[scored], rtol=1e-5, atol=1e-5)
    # And selective_log_softmax directly.
    targets = labels[:, 1:]
    per_token = selective_log_softmax(logits[:, :-1].float(), targets.clamp(min=0))
    assert_close(logps, (per_token * (targets != IGNORE)).sum(-1), rtol=1e-5, atol=1e-5)


# ---- behaviour ----

@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_training_on_pair_loss_widens_the_margin(loss):
    rows = pairs(4, seed=11)
    net = tiny_llama(0)
    if loss == "dpo":
        reference_logps(net.eval(), rows, batch_size=4, pad_id=0, device="cpu")
    net.train()
    settings = PreferenceSettings(loss=loss, beta=0.1)

    def margin() -> float:
        with torch.no_grad():
            logps, _, _ = forward_logps(net, rows, 0, "cpu")
        return (logps[:4] - logps[4:]).mean().item()

    before = margin()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        value, _, _ = pair_loss(net, rows, settings, 0, "cpu")
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    after = margin()
    assert after > before + 1.0, (before, after)
    assert losses[-1] < losses[0]
    if loss == "dpo":
        _, _, metrics = pair_loss(net, rows, settings, 0, "cpu")
        assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
