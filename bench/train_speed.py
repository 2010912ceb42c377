"""Training speed, side by side in one job: the plain recipe users write (Hugging Face
Trainer + peft, dynamic padding) against tuneline's training step, on identical synthetic
data (same lengths, same model shape, same tokens per optimizer step).

    python bench/train_speed.py                      # GPU: Llama-3.2-1B shape, all variants
    python bench/train_speed.py --shape tiny --steps 3 --warmup 1   # CPU smoke (CI)
    python bench/train_speed.py --only baseline_lora ours_lora_packed_chunked
    python bench/train_speed.py --shape tiny --precision bf16 --only ours_full_packed_chunked   # CUDA dtype on CPU

Our variants run the real training step's code (``steps.train.methods`` prepare, ``steps.train.step``
optimizer and ``batch_loss``, ``steps.train.batching`` packing, ``steps.train.losses`` chunked loss,
``steps.train.fastpath`` compile and kernels), one technique at a time. ``--precision`` sets train.precision
for our variants (auto: bf16 on CUDA, with fp32 master weights for full fine-tuning).
Rows go to ``bench/results/<date>-<device>.json``: name, mode, tokens_per_s (real tokens,
padding excluded), mfu_pct (4·N FLOPs/token for LoRA/QLoRA, 6·N for full, against
``--peak-tflops``, CUDA only), peak_mem_gib, tokens_per_step, speedup_vs_baseline (against the
baseline row of the same mode), plus versions and device.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # the reference baseline's model (../shared/bench/hf_baseline.py): 1.24B parameters, 128k vocabulary
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
               tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=True),
}
LORA = dict(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])


def lengths(n: int, seed: int = 0, median: int = 300, cap: int = 2048) -> list[int]:
    """Instruction-like lengths: lognormal around ``median``, clamped to 32..cap (as the baseline)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(median))
    return [int(min(cap, max(32, v))) for v in x]


def examples(n: int, vocab: int, median: int, cap: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (n_,), generator=g).tolist()} for n_ in lengths(n, 0, median, cap)]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


class Meter:
    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> "Meter":
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_gib(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None

    def __exit__(self, *exc: Any) -> None:
        return None


def save_random_model(shape: str, folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def baseline(args: Any, mode: str, folder: Path, data: list[dict], n_params: int, device: str) -> dict:
    """Trainer + peft + dynamic padding, micro-batch ``args.batch_size``: the recipe of hf_baseline.py."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    bf16 = device == "cuda"
    with Meter(device) as meter:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                     attn_implementation="sdpa").to(device)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        bs, steps, warm = args.batch_size, args.steps, args.warmup
        rows = data[: bs * (steps + warm)]
        stamps: dict[str, float] = {}

        def collate(batch: list[dict]) -> dict:
            width = max(len(b["input_ids"]) for b in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, b in enumerate(batch):
                n = len(b["input_ids"])
                ids[i, :n] = torch.tensor(b["input_ids"])
                labels[i, :n] = ids[i, :n]
                mask[i, :n] = 1
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
                meter.sync()
                if state.global_step == warm:
                    stamps["t0"] = time.perf_counter()
                stamps["t1"] = time.perf_counter()

        out = tempfile.mkdtemp(prefix="bench-baseline-")
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=bs, max_steps=steps + warm,
                                  learning_rate=2e-4, bf16=bf16, logging_steps=10_000, save_strategy="no",
                                  report_to=[], remove_unused_columns=False, lr_scheduler_type="cosine",
                                  warmup_steps=2, optim="adamw_torch_fused" if bf16 else "adamw_torch",
                                  use_cpu=device == "cpu", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
        trainer.train()
        seconds = stamps["t1"] - stamps["t0"]
        timed = rows[warm * bs:]
        tokens = sum(len(r["input_ids"]) for r in timed)
        row = result(f"baseline_{mode}", mode, tokens / seconds, n_params, meter.peak_gib(), device, args,
                     tokens_per_step=tokens / steps)
        del trainer, model
    return row


def ours(args: Any, name: str, mode: str, folder: Path, data: list[dict], n_params: int, device: str,
         packing: bool, chunk: int, budget: int, extra: dict[str, Any]) -> dict:
    """The training step's own code path with the chosen techniques on."""
    import torch

    from steps.config import LoraSettings, TrainConfig
    from steps.core.contract import Task
    from steps.train import fastpath, methods
    from steps.train.batching import batch_order, pack_order
    from steps.train.losses import batch_loss
    from steps.train.step import make_optimizer

    lora = LoraSettings(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, target_modules=LORA["target_modules"])
    settings: dict[str, Any] = {"method": mode, "batch_size": args.batch_size, "max_steps": args.steps + args.warmup,
                                "packing": packing, "loss_chunk_tokens": chunk, "device": device,
                                "precision": args.precision, **extra}
    if mode in ("lora", "qlora"):
        settings["lora"] = lora
    if packing:
        settings["tokens_per_batch"] = budget
    cfg = TrainConfig(**settings)
    fastpath.check_switches(cfg, device)
    with Meter(device) as meter:
        torch.manual_seed(0)
        net = methods.prepare(cfg, folder, device, Task())
        fastpath.speed_up(cfg, net)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params, device)
        lens = [len(r["input_ids"]) for r in data]
        order = pack_order(lens, budget, 0) if packing else batch_order(lens, cfg.batch_size, 0)
        tokens = 0
        for step in range(args.steps + args.warmup):
            if step == args.warmup:
                meter.sync()
                started, tokens = time.perf_counter(), 0
            loss, n, _ = batch_loss(net, [data[i] for i in next(order)], Task(), cfg, 0, device, budget)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += n
        meter.sync()
        seconds = time.perf_counter() - started
        row = result(name, mode, tokens / seconds, n_params, meter.peak_gib(), device, args,
                     tokens_per_step=tokens / args.steps)
        del net, optimizer
    return row


def baseline_tokens_per_step(args: Any, data: list[dict]) -> int:
    """Mean real tokens in one baseline optimizer step (micro-batch of ``batch_size`` rows)."""
    bs = args.batch_size
    timed = data[args.warmup * bs : (args.warmup + args.steps) * bs]
    return max(16, round(sum(len(r["input_ids"]) for r in timed) / args.steps))


def result(name: str, mode: str, tps: float, n_params: int, peak: float | None, device: str, args: Any,
           tokens_per_step: float) -> dict:
    flops = (6 if mode == "full" else 4) * n_params
    return {"name": name, "mode": mode, "tokens_per_s": round(tps, 1),
            "mfu_pct": round(100 * tps * flops / (args.peak_tflops * 1e12), 2) if device == "cuda" else None,
            "peak_mem_gib": peak, "tokens_per_step": round(tokens_per_step), "params_m": round(n_params / 1e6, 2)}


VARIANTS: dict[str, tuple[str, str, bool, bool, dict[str, Any]]] = {
    # name: (runner, mode, packing, chunked loss, other train settings)
    "baseline_lora": ("baseline", "lora", False, False, {}),
    "ours_lora_padded": ("ours", "lora", False, False, {}),
    "ours_lora_packed": ("ours", "lora", True, False, {}),
    "ours_lora_packed_chunked": ("ours", "lora", True, True, {}),
    # the same, with the baseline's own real tokens per optimizer step as the budget (the memory comparison)
    "ours_lora_packed_chunked_baseline_tokens": ("ours", "lora", True, True, {}),
    "ours_lora_packed_chunked_compile": ("ours", "lora", True, True, {"compile": True}),
    "ours_lora_packed_chunked_liger": ("ours", "lora", True, True, {"kernels": "liger"}),  # CUDA + liger-kernel
    "ours_qlora_packed_chunked": ("ours", "qlora", True, True, {}),
    "baseline_full": ("baseline", "full", False, False, {}),
    "ours_full_packed_chunked": ("ours", "full", True, True, {}),  # bf16 weights: fp32 master weights
    "ours_full_packed_chunked_pure_bf16": ("ours", "full", True, True, {"master_weights": False}),
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline micro-batch (sequences)")
    parser.add_argument("--budget", type=int, default=16384, help="our token budget per packed micro-batch")
    parser.add_argument("--chunk", type=int, default=4096, help="label tokens per loss chunk")
    parser.add_argument("--median", type=int, default=300, help="median sequence length")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="train.precision of our variants (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cap = min(2048, SHAPES[args.shape]["max_position_embeddings"])
    steps_needed = (args.steps + args.warmup) * max(args.batch_size, args.budget // 32)
    data = examples(max(4 * args.batch_size * (args.steps + args.warmup), min(steps_needed, 20000)),
                    SHAPES[args.shape]["vocab_size"], args.median, cap)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        folder = Path(tmp)
        n_params = save_random_model(args.shape, folder)
        for name in args.only or list(VARIANTS):
            runner, mode, packing, chunked, extra = VARIANTS[name]
            if mode == "qlora" and device == "cpu" and args.shape != "tiny":
                continue
            try:
                if runner == "baseline":
                    row = baseline(args, mode, folder, data, n_params, device)
                else:
                    budget = baseline_tokens_per_step(args, data) if name.endswith("_baseline_tokens") else args.budget
                    row = ours(args, name, mode, folder, data, n_params, device, packing,
                               args.chunk if chunked else 0, budget, extra)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
                row = {"name": name, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            path = write_report(args, rows)  # after every row: a run stopped by a time limit keeps what it measured
    print(f"wrote {path}")
    return rows


def write_report(args: Any, rows: list[dict]) -> Path:
    """The JSON report of the rows so far, each with its speed-up against the baseline row of its mode."""
    for row in rows:
        mode = "lora" if row.get("mode") == "qlora" else row.get("mode")
        base = next((r for r in rows if r["name"] == f"baseline_{mode}" and "tokens_per_s" in r), None)
        if base and "tokens_per_s" in row:
            row["speedup_vs_baseline"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    report = {"date": datetime.date.today().isoformat(), "device": device_name(), "shape": args.shape,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")} | {"only": args.only},
              "versions": versions(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_name().lower().replace(" ", "-").replace("/", "-")
    path = args.out / f"{report['date']}-{slug}-{args.shape}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
