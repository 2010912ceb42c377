"""The C allocator's settings for tensor work (``steps.core.device.tune_allocator``): CPU time of the
same training steps with glibc's defaults and with the settings train and evaluate apply.

    python bench/allocator.py                 # 30 steps of the tiny Llama (batch 4 x 64 tokens), 3 rounds
    python bench/allocator.py --steps 10 --rounds 1   # smoke size

Each round runs both variants back to back, each in a fresh process (malloc settings are per
process) with one compute thread; reported: user and system CPU seconds, page faults, and the
ratio plain / tuned of the total CPU time. Results go to ``bench/results/<date>-allocator.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEPS = """
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from steps.core.device import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
steps, batch, seq = (int(x) for x in sys.argv[2:5])
torch.manual_seed(0)
net = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
ids = torch.randint(0, 49152, (batch, seq))
start = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    net(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tuned": tuned, "user_s": end.ru_utime - start.ru_utime, "sys_s": end.ru_stime - start.ru_stime,
                  "page_faults": end.ru_minflt - start.ru_minflt}))
"""


def run(mode: str, steps: int, batch: int, seq: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", STEPS, mode, str(steps), str(batch), str(seq)], capture_output=True,
                         text=True, check=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        plain, tuned = run("plain", args.steps, args.batch, args.seq), run("tuned", args.steps, args.batch, args.seq)
        ratio = (plain["user_s"] + plain["sys_s"]) / max(tuned["user_s"] + tuned["sys_s"], 1e-9)
        rounds.append({"plain": plain, "tuned": tuned, "cpu_ratio": round(ratio, 2)})
        print(f"round {i + 1}: plain user {plain['user_s']:.2f} s sys {plain['sys_s']:.2f} s "
              f"faults {plain['page_faults']} | tuned user {tuned['user_s']:.2f} s sys {tuned['sys_s']:.2f} s "
              f"faults {tuned['page_faults']} | plain/tuned CPU {ratio:.2f}x", flush=True)
    result = {"bench": "allocator", "steps": args.steps, "batch": args.batch, "seq": args.seq,
              "host_cpus": os.cpu_count(), "rounds": rounds,
              "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds)}
    print(f"median plain/tuned CPU time: {result['median_cpu_ratio']:.2f}x")
    out = args.out or REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-allocator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
