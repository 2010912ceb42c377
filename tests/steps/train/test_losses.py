"""steps/train/losses.py: the chunked output projection + cross-entropy equals the model's own loss,
alone and on packed rows (the data-parallel shares: tests/steps/train/test_parallel.py)."""

import torch

from helpers import token_documents as documents
from steps.config import LoraSettings, TrainConfig
from steps.train import batching, losses
from steps.train.batching import collate
from steps.train.methods import lora
from steps.train.methods.common import load_base


def test_fast_path_gives_the_plain_path_gradients(base_dir):
    """LoRA on packed rows with the chunked loss == LoRA on padded rows with the model's loss."""
    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    rows = documents()
    grads = []
    for fast in (False, True):
        torch.manual_seed(0)
        net = lora.prepare(cfg, base_dir, "cpu")
        for name, p in net.named_parameters():  # B starts at zero: give it values so A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        if fast:
            loss = losses.chunked_loss(net, batching.pack(rows, 10_000), chunk_tokens=7)
        else:
            loss = net(**collate(rows, 0)).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_equals_the_model_loss_without_packing(base_dir):
    net = load_base(None, base_dir, "cpu").eval()
    batch = collate(documents(), 0)
    with torch.no_grad():
        torch.testing.assert_close(losses.chunked_loss(net, batch, 5), net(**batch).loss, rtol=1e-5, atol=1e-5)
