import time, pytest
from safetensors.torch import load_file
from steps.config import LoraSettings, TrainConfig, PreferenceSettings, EarlyStopping
from steps.train import train_model
from helpers import sft_dataset, kind_dataset, labelled_rows, preference_rows

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
F = dict(distributed="fsdp")
CASES = {
    "fsdp-full": ("sft", dict(method="full", checkpoint_every=1, **F)),
    "fsdp-lora-gc": ("sft", dict(lora=LORA, gradient_checkpointing=True, **F)),
    "fsdp-dpo": ("preference", dict(lora=LORA, **F)),
    "fsdp-classification-head": ("classification", dict(method="head", **F)),
    "fsdp-reft-early": ("sft", dict(method="reft", early_stopping=EarlyStopping(eval_every=1, patience=5), **F)),
}

@pytest.mark.parametrize("case", list(CASES))
def test_probe(store, tmp_path, tiny_model, case):
    kind, extra = CASES[case]
    if kind == "sft":
        data = sft_dataset(store, tmp_path, tiny_model, n=30)
    elif kind == "preference":
        data = kind_dataset(store, tmp_path, tiny_model, kind, preference_rows(30))
    else:
        data = kind_dataset(store, tmp_path, tiny_model, kind, labelled_rows(kind, 30))
    cfg = TrainConfig(**{**dict(max_steps=3, batch_size=5, grad_accum_steps=2, learning_rate=1e-3, warmup_steps=1,
                     checkpoint_every=0), **extra})
    t = time.time()
    a = train_model(cfg, data, tiny_model, store)
    b = train_model(cfg.model_copy(update={"processes": 2}), data, tiny_model, store)
    fa, fb = store.download(a.adapter), store.download(b.adapter)
    files = sorted(p.name for p in fa.glob("*.safetensors"))
    worst = 0.0
    for f in files:
        x, y = load_file(fa / f), load_file(fb / f)
        assert x.keys() == y.keys()
        worst = max([worst] + [(x[k] - y[k]).abs().max().item() for k in x])
    la, lb = store.read_json(a.adapter, "train_log.json"), store.read_json(b.adapter, "train_log.json")
    logdiff = max(abs(p[k] - q[k]) for p, q in zip(la, lb) for k in p)
    rb = store.read_json(b.adapter, "train_report.json")
    print(f"\nPROBE {case}: files {files} worst weight diff {worst:.2e}, worst log diff {logdiff:.2e}, "
          f"tokens {a.adapter.stats['tokens_seen']} vs {b.adapter.stats['tokens_seen']}, {rb['processes']} {rb['distributed']} evals {len(rb['evals'])} {time.time()-t:.0f}s")
    assert worst < 1e-5 and logdiff < 1e-4 and a.adapter.stats['tokens_seen'] == b.adapter.stats['tokens_seen']
