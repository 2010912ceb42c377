import time, logging
from steps.config import LoraSettings, TrainConfig
from steps.train import train_model
from helpers import sft_dataset

def test_probe(store, tmp_path, tiny_model):
    data = sft_dataset(store, tmp_path, tiny_model, n=30)
    cfg = TrainConfig(method="lora", max_steps=4, batch_size=5, grad_accum_steps=2, learning_rate=1e-3, warmup_steps=1, seed=5,
            checkpoint_every=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0), processes=2)
    print("\nLAUNCH", time.strftime("%H:%M:%S"), flush=True)
    train_model(cfg, data, tiny_model, store)
    print("DONE", time.strftime("%H:%M:%S"), flush=True)
