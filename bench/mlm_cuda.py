"""CUDA check of steps/train/mlm.py (masked-LM): a random bf16 BERT of all-MiniLM-L6-v2's shape (6 layers, 384
wide, 30,522 words), full and LoRA (peft's generic model, the head's own layers in modules_to_save):

- the head on the chosen positions only (``chosen_logits``) gives the full forward's logits there;
- step time, fwd + bwd + AdamW on 64 blocks of 128 tokens: the loss through ``masked_loss`` (only the 15% chosen
  positions projected onto the vocabulary) against the same masks scored on every position's logits;
- learning: masked accuracy on fixed held-out masks (``masked_scores``) before and after 60 steps on a toy
  language (each block repeats one of 8 random 16-token phrases), full at 1e-4, LoRA at 1e-3;
- resume: 10 steps straight vs 5 steps, a saved state (weights, AdamW, torch and CUDA RNG), 5 more steps: the
  same masks (the CPU generator) and losses.

    STEPS=60 python bench/mlm_cuda.py       # runs on the CPU too (float32, smaller batches)

Needs only torch, transformers and peft: steps.config and steps.core.contract (pydantic) are replaced by
stand-ins with the fields mlm.py reads. Results: bench/RESULTS.md, "Masked-LM on CUDA"."""
import copy
import dataclasses
import json
import os
import sys
import time
import types
from typing import Literal

sys.path.insert(0, ".")


@dataclasses.dataclass
class MlmSettings:  # steps.config.MlmSettings' fields and defaults
    probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word: bool = False


@dataclasses.dataclass
class Task:
    kind: str = "mlm"
    labels: list = dataclasses.field(default_factory=list)
    mask_token_id: int | None = 103

    sequence_head = False
    causal_lm = False


class TrainConfig:  # what steps.train.methods reads of it: the method names
    model_fields = {"method": types.SimpleNamespace(annotation=Literal["full", "head", "lora", "qlora", "reft"])}


config = types.ModuleType("steps.config")
config.MlmSettings, config.TrainConfig = MlmSettings, TrainConfig
contract = types.ModuleType("steps.core.contract")
contract.IGNORE, contract.Task, contract.CAUSAL = -100, Task, Task(kind="sft")
sys.modules["steps.config"] = config
sys.modules["steps.core.contract"] = contract

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from steps.train import mlm  # noqa: E402
from steps.train.batching import collate  # noqa: E402
from steps.train.methods.common import masked_lm_head_names  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
BATCH = 64 if DEV == "cuda" else 4
STEPS = int(os.environ.get("STEPS", "60"))
LR = {"full": 1e-4, "lora": 1e-3}  # full: bf16 weights on CUDA (no fp32 master copy), a small rate
TASK = Task()
out: dict = {"device": DEV, "dtype": str(DTYPE), "batch": BATCH}


def model(lora: bool = False):
    torch.manual_seed(0)
    net = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536)).to(DEV, DTYPE)
    if lora:
        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["query", "key", "value", "attention.output.dense"],
                                             modules_to_save=masked_lm_head_names(net)))
    return net


def blocks(n: int, seed: int) -> list[dict]:
    """Blocks of [CLS] + 126 tokens + [SEP], each repeating one of 8 phrases of 16 tokens (one word each)."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(1000, 2000, (8, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for i in range(n):
        body = phrases[int(torch.randint(8, (1,), generator=g))].repeat(8)[:126].tolist()
        rows.append({"id": f"b{seed}-{i}", "input_ids": [101, *body, 102], "word_ids": [None, *range(126), None]})
    return rows


def step(net, opt, rows) -> float:
    loss, _, _ = mlm.masked_loss(net, rows, MlmSettings(), TASK, 0, DEV)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def full_logits_step(net, opt, rows) -> float:
    """``masked_loss`` with every position's logits (what the model's own forward does): the same batch
    preparation and masks, the cross-entropy over the labelled positions of the full logits."""
    batch = collate([{"input_ids": r["input_ids"]} for r in rows], 0)
    inputs, labels = mlm.mask_tokens(batch["input_ids"], mlm.word_tensor(rows, batch["input_ids"].size(1)),
                                     MlmSettings(), 103, 30522)
    logits = net(input_ids=inputs.to(DEV), attention_mask=batch["attention_mask"].to(DEV)).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(DEV).flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn, net, rows, n: int = 30) -> float:
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):
        fn(net, opt, rows)
    if DEV == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        fn(net, opt, rows)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / n


def accuracy(net, rows) -> float:
    net.eval()
    scores = mlm.masked_scores(net, rows, 103, 32, 0, DEV)
    net.train()
    return sum(s[2] for s in scores) / max(sum(s[1] for s in scores), 1)


for name, lora in (("full", False), ("lora", True)):
    result: dict = {}
    net = model(lora)
    rows, held_out = blocks(BATCH, 1), blocks(64, 2)
    # chosen-only head == the full forward's logits at those positions
    net.eval()
    ids = torch.tensor([r["input_ids"] for r in rows[:8]])
    chosen = mlm.word_tensor(rows[:8], ids.size(1)) >= 0
    chosen &= torch.rand(chosen.shape, generator=torch.Generator().manual_seed(3)) < 0.15
    with torch.no_grad():
        part = mlm.chosen_logits(net, ids, torch.ones_like(ids), chosen, DEV).float()
        whole = net(input_ids=ids.to(DEV)).logits.float()[chosen.to(DEV)]
    result["chosen_vs_full_max_diff"] = float((part - whole).abs().max())
    net.train()
    result["step_s_chosen_head"] = round(timed(step, net, rows), 4)
    result["step_s_full_logits"] = round(timed(full_logits_step, net, rows), 4)
    # learning on the toy language
    net = model(lora)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR[name])
    before = accuracy(net, held_out)
    torch.manual_seed(5)
    losses = [step(net, opt, blocks(BATCH, 100 + s)) for s in range(STEPS)]
    result |= {"masked_accuracy_before": round(before, 4), "masked_accuracy_after": round(accuracy(net, held_out), 4),
               "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}
    # resume: 10 steps straight, or 5 + a restored state + 5
    net = model(lora)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(9)
    straight = [step(net, opt, blocks(BATCH, 200 + s)) for s in range(10)]
    final = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net = model(lora)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(9)
    first = [step(net, opt, blocks(BATCH, 200 + s)) for s in range(5)]
    saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state(),
             torch.cuda.get_rng_state() if DEV == "cuda" else None)
    torch.manual_seed(12345)  # anything drawn in between must not matter
    torch.rand(100)
    net = model(lora)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    if saved[3] is not None:
        torch.cuda.set_rng_state(saved[3])
    resumed = first + [step(net, opt, blocks(BATCH, 200 + s)) for s in range(5, 10)]
    result |= {"resume_max_loss_diff": max(abs(a - b) for a, b in zip(straight, resumed)),
               "resume_max_weight_diff": max(float((final[k].float() - v.float()).abs().max())
                                             for k, v in net.state_dict().items())}
    out[name] = result
    print(name, json.dumps(result), flush=True)

if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "mlm_cuda.json"), "w") as fh:
        json.dump(out, fh, indent=2)
print(json.dumps(out, indent=2))
