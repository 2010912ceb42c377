"""CUDA check of steps/train/rl.py (GRPO): a random bf16 Llama (4 layers, 256 wide) with LoRA, groups sampled
with the KV cache, the reference = the adapters switched off, 40 steps on a toy verifiable reward (the share
of completion tokens below 128), and resume determinism (weights, optimizer, torch and CUDA RNG states
restored: the same samples and losses). Runs on the CPU too (float32).

    STEPS=40 python bench/rl_cuda.py

Needs only torch, transformers and peft: steps.config (pydantic) is replaced by a stand-in with the fields
rl.py reads, so it runs on an accelerator image without the project's environment. Measured results:
bench/RESULTS.md, "GRPO on CUDA"."""
import copy
import dataclasses
import json
import sys
import time
import types

sys.path.insert(0, ".")
# steps.config needs pydantic (not on the device image): a stand-in with the fields rl.py reads.
@dataclasses.dataclass
class RewardSpec:
    function: str; weight: float = 1.0; pattern: str | None = None; min_chars: int = 0; max_chars: int | None = None
@dataclasses.dataclass
class RlSettings:
    algorithm: str = "grpo"; prompts_per_step: int = 8; group_size: int = 8; max_new_tokens: int = 16
    temperature: float = 1.0; top_k: int = 0; beta: float = 0.04; epsilon: float = 0.2; epsilon_high: float | None = None
    iterations: int = 2; loss_type: str = "dapo"; scale_rewards: bool = True; rewards: list = dataclasses.field(default_factory=list)
fake = types.ModuleType("steps.config"); fake.RewardSpec, fake.RlSettings = RewardSpec, RlSettings
errors = types.ModuleType("steps.core.errors")
class ConfigError(Exception): pass
errors.ConfigError = ConfigError
sys.modules["steps.config"] = fake; sys.modules["steps.core.errors"] = errors
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from steps.train.rewards import Reward
from steps.train.rl import Rollout, token_logps

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = int(os.environ.get("STEPS", "40"))
out = {"device": DEV}
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=2, pad_token_id=0, bos_token_id=1)
base = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
base.generation_config.eos_token_id = 2
net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
class Tok:
    eos_token_id = 2
    def decode(self, ids, skip_special_tokens=True): return " ".join(str(i) for i in ids if i not in (0, 2))
low = lambda p, c, r: [sum(int(t) < 128 for t in x.split()) / max(1, len(x.split())) for x in c]  # learnable toy reward
settings = RlSettings()
ro = Rollout(net, Tok(), None, settings, DEV, 0, rewards=[Reward("low_tokens", 1.0, low)])
rows = [{"id": str(i), "prompt": f"p{i}", "input_ids": torch.randint(3, 512, (5 + i % 4,)).tolist()} for i in range(64)]
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
calls = []
gen = net.generate
net.generate = lambda **kw: calls.append(kw.get("use_cache")) or gen(**kw)
probe = ro.sample(rows[:8]); tensors = (probe.prompt_ids, probe.prompt_mask, probe.completion_ids, probe.completion_mask)
ref0 = ro.reference_logps(*tensors)
def step(batch_rows):
    b = ro.sample(batch_rows)
    for it in range(settings.iterations):
        loss, m = ro.loss(b); loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    return b.metrics | m | {"loss": loss.item()}
t = time.time(); hist = []
net.train()
for s in range(STEPS):
    hist.append(step(rows[(s * 8) % 64:(s * 8) % 64 + 8]))
(torch.cuda.synchronize() if DEV == "cuda" else None); out["seconds_steps"] = round(time.time() - t, 1)
out["reward_first5"] = round(sum(h["reward"] for h in hist[:5]) / 5, 4)
out["reward_last5"] = round(sum(h["reward"] for h in hist[-5:]) / 5, 4)
out["kl_last"] = round(hist[-1].get("kl", -1), 4); out["clip_ratio_max"] = max(h["clip_ratio"] for h in hist)
out["generate_use_cache_all_true"] = all(c is True for c in calls) and len(calls) > 0
out["reference_unchanged"] = bool(torch.equal(ro.reference_logps(*tensors), ref0))
with torch.no_grad():
    pol = token_logps(net.eval(), *tensors); net.train()
out["policy_moved_max_abs"] = round(float((pol - ref0).abs().max()), 4)
out["logps_dtype"] = str(pol.dtype); out["any_nan"] = bool(torch.isnan(pol).any())
# Resume determinism: snapshot weights, optimizer and RNG; run 3 steps twice from it.
snap = ({k: v.clone() for k, v in net.state_dict().items()}, copy.deepcopy(opt.state_dict()), torch.get_rng_state(), torch.cuda.get_rng_state() if DEV == "cuda" else None)
runs = []
for _ in range(2):
    net.load_state_dict(snap[0]); opt.load_state_dict(copy.deepcopy(snap[1])); torch.set_rng_state(snap[2]); (torch.cuda.set_rng_state(snap[3]) if DEV == "cuda" else None)
    runs.append([(h["reward"], h["completion_length"], round(h["loss"], 6)) for h in (step(rows[i * 8:(i + 1) * 8]) for i in range(3))])
out["resume_same_samples_and_losses"] = runs[0] == runs[1]; out["resume_runs"] = runs
print(json.dumps(out, indent=1))
