"""dattn quickstart: runs as written on a CPU (python examples/python/quickstart.py)."""

import torch

import dattn

torch.manual_seed(0)
print("backends:", dattn.backends())

# 1. The functional form on q, k, v of shape [B, N, H, D].
B, N, H, D = 2, 1024, 8, 64
q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
out = dattn.dilated_attention(q, k, v, segment_lengths=[256, 512, 1024], dilation_rates=[1, 2, 4], is_causal=True)
print("dilated_attention:", tuple(out.shape))

# With key padding: the last 100 positions of the second sequence are padding.
padding = torch.zeros(B, N, dtype=torch.bool)
padding[1, -100:] = True
out, lse = dattn.dilated_attention(q, k, v, [256, 512, 1024], [1, 2, 4], key_padding_mask=padding,
                                   return_lse=True)
print("with padding and lse:", tuple(out.shape), tuple(lse.shape))

# 2. The multi-head module on hidden states [B, N, E] (the PyTorch LongNet library's arguments).
E = 512
attention = dattn.MultiheadDilatedAttention(E, 8, dilation_rates=[1, 2, 4], segment_lengths=[256, 512, 1024])
x = torch.randn(B, N, E, requires_grad=True)
y = attention(x, is_causal=True)
y.sum().backward()
print("MultiheadDilatedAttention:", tuple(y.shape), "grad", tuple(x.grad.shape))

fused = dattn.ImprovedMultiheadDilatedAttention(E, 8, [1, 2, 4], [256, 512, 1024])
y, _ = fused(x)  # the fused module always returns (output, None)
print("ImprovedMultiheadDilatedAttention:", tuple(y.shape))

# 3. Block-sparse attention with a named pattern (one softmax over all allowed keys of a row).
sparse = dattn.BlockSparseRingDilatedAttention([256], [1], dattn.get_block_sparse_preset("local", window_size=256))
print("block-sparse:", tuple(sparse(q, k, v, is_causal=True).shape))

# 4. The float64 reference, for checking: same function, exact arithmetic.
q64, k64, v64 = q.double(), k.double(), v.double()
reference = dattn.dilated_attention(q64, k64, v64, [256, 512, 1024], [1, 2, 4], is_causal=True)
fast = dattn.dilated_attention(q, k, v, [256, 512, 1024], [1, 2, 4], is_causal=True)
error = ((fast.double() - reference).norm() / reference.norm()).item()
print(f"float32 vs float64 reference: relative error {error:.2e}")
assert error <= 1e-5
