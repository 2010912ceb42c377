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


def _reference_nll(net, batch):
    """Per row: the summed next-token NLL of the label tokens from every position's logits, and the count."""
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                            ignore_index=-100, reduction="none").view(targets.shape)
    return nll.sum(dim=1), (targets != -100).sum(dim=1)


def _labelled_rows(vocab: int) -> list[dict]:
    """Rows of several lengths whose labels sit at different positions; one row has none."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for n, answer in ((9, 3), (14, 5), (6, 0), (11, 11)):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - answer) + ids[n - answer:]})
    return rows


def test_label_nll_scores_only_label_positions_with_the_models_own_head(base_dir):
    """Per row, the same NLL as from every position's logits: a LoRA model (through peft's wrapper), and
    a Gemma 2 whose head soft-caps its logits (so the head cannot be bypassed)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    peft_net = lora.prepare(cfg, base_dir, "cpu")
    for name, p in peft_net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=0.05))
    for net, vocab in ((peft_net, 1000), (gemma, 300)):
        net.eval()
        assert losses.keeps_logits(net)
        batch = collate(_labelled_rows(vocab), 0)
        with torch.no_grad():
            got, want = losses.label_nll(net, batch), _reference_nll(net, batch)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert got[1].tolist() == want[1].tolist() == [3, 5, 0, 10]


def test_chunked_loss_applies_the_heads_soft_capping():
    """Gemma 2 soft-caps its logits in its head; the chunked projection must do the same."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    net = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         final_logit_softcapping=0.05)).eval()
    batch = collate(_labelled_rows(300), 0)
    with torch.no_grad():
        torch.testing.assert_close(losses.chunked_loss(net, batch, 3), net(**batch).loss, rtol=1e-5, atol=1e-5)
