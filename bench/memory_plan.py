"""The memory planner (steps/train/planner.py) against measured peaks, for every family of bench/zoo.py.

Each (family, method) trains a few steps in its own process on random tokens with the methods' own
``prepare`` and AdamW, measured with the planner's ``PeakMeter`` (CPU: resident-memory growth from
before the model loads to the loop's high-water mark; CUDA: max allocated), next to the planner's
estimate for the same shape, batch and sequence length.

    python bench/memory_plan.py [--scale 32] [--batch 4] [--seq 256] [--out bench/results]

Writes ``<date>-memory-plan-<device>.json`` (one row per run) and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def measure(family: str, method: str, folder: Path, batch: int, seq: int, steps: int) -> dict:
    """One run, in this process: the estimate, then the measured peak of ``steps`` training steps."""
    import torch

    import zoo
    from steps.config import TrainConfig
    from steps.core.contract import Task
    from steps.core.device import pick_device
    from steps.train import methods, planner

    device = pick_device("auto")
    task = Task(kind="classification", labels=["a", "b"]) if family in zoo.ENCODERS else Task(kind="sft")
    cfg = TrainConfig(method=method, batch_size=batch)
    shape = planner.model_shape(cfg, folder, task)  # also imports the architecture's code: not training memory
    estimate = planner.estimate_memory(cfg, shape, device, seq, batch)
    planner.import_method_libraries(method)
    meter = planner.PeakMeter(device)
    meter.start()
    torch.manual_seed(0)
    net = methods.prepare(cfg, folder, device, task)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    vocab = net.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(10, vocab, (batch, seq), device=device)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), device=device) if task.sequence_head else ids
        loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = meter.peak_gib()
    total = estimate["total"] / planner.GIB
    return {"family": family, "method": method, "device": device, "parameters": shape["parameters"],
            "trainable": shape["trainable"], "batch": batch, "seq": seq,
            "estimate_gib": round(total, 4), "measured_gib": measured,
            "error": round(total / measured - 1, 3) if measured else None,
            "parts_gib": {k: round(v / planner.GIB, 4) for k, v in estimate.items() if k != "total"}}


def main(argv: list[str] | None = None) -> list[dict]:
    import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=32, help="width multiple of the zoo's tiny shape")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(zoo.CAUSAL + zoo.ENCODERS))
    parser.add_argument("--methods", nargs="*", default=["full", "lora"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--one", nargs=3, metavar=("FAMILY", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        family, method, folder = args.one
        print(json.dumps(measure(family, method, Path(folder), args.batch, args.seq, args.steps)))
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = zoo.build(family, Path(tmp) / family, zoo.corpus(), scale=args.scale)
            for method in args.methods:
                out = subprocess.run([sys.executable, __file__, "--one", family, method, str(folder),
                                      "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
                                     capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if out.returncode == 0 and lines else \
                    {"family": family, "method": method, "error": out.stderr[-500:]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    (args.out / f"{time.strftime('%Y-%m-%d')}-memory-plan-{device}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| family | method | parameters | estimate GiB | measured GiB | error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "estimate_gib" in r:
            print(f"| {r['family']} | {r['method']} | {r['parameters']:,} | {r['estimate_gib']:.3f} | "
                  f"{r['measured_gib']:.3f} | {r['error']:+.0%} |")
    return rows


if __name__ == "__main__":
    main()
