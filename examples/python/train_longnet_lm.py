"""Train a small dattn.LongNetLM on the CPU for a few seconds and watch the loss go down
(python examples/python/train_longnet_lm.py). The data is a synthetic language with structure a
causal model can learn: each token repeats the token 8 positions back, plus 1 (mod vocabulary)."""

import time

import torch
import torch.nn.functional as F

import dattn

torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
VOCAB, LENGTH, BATCH, STEPS = 32, 128, 16, 400


def batch() -> torch.Tensor:
    start = torch.randint(0, VOCAB, (BATCH, 8))
    rows = [start]
    while sum(r.size(1) for r in rows) < LENGTH + 1:
        rows.append((rows[-1] + 1) % VOCAB)
    return torch.cat(rows, dim=1)[:, :LENGTH + 1]


model = dattn.LongNetLM(VOCAB, d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128,
                        segment_lengths=[32, 64, 128], dilation_rates=[1, 2, 4])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
began = time.perf_counter()
losses = []
for step in range(STEPS):
    tokens = batch()
    logits = model(tokens[:, :-1], is_causal=True)  # causal: position t sees tokens <= t only
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 50 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}")
seconds = time.perf_counter() - began
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"{STEPS} steps in {seconds:.1f} s; mean loss of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
assert last < 0.5 * first, "the loss did not go down"
