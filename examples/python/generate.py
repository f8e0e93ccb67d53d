"""Token-by-token generation with dattn's key/value cache (CPU).

A toy decoder-only model (token embedding, causal multi-head dilated attention layers with
grouped-query heads, a tied output head, untrained weights) reads a prompt in one step, then
generates greedily one token per step: each layer's `decode` appends the new keys and values to
its cache and attends over the cached ones, so a step costs the keys a token's segments select,
not the whole sequence. At the end the whole sequence is recomputed once to show they agree.

    python examples/python/generate.py [--tokens 300]
"""

import argparse

import torch
from torch import nn

import dattn


class TinyDecoder(nn.Module):
    def __init__(self, vocab=256, embed_dim=64, heads=8, kv_heads=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.layers = nn.ModuleList(
            dattn.MultiheadDilatedAttention(embed_dim, heads, dilation_rates=[1, 2, 4], segment_lengths=[64, 256, 1024],
                                            num_kv_heads=kv_heads) for _ in range(layers))

    def logits(self, h):
        return h @ self.embed.weight.t()

    def forward(self, tokens):  # the whole sequence at once (training, or checking)
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h, is_causal=True)
        return self.logits(h)

    def step(self, tokens, caches):  # new tokens only; the caches hold everything before them
        h = self.embed(tokens)
        for layer, cache in zip(self.layers, caches):
            h = h + layer.decode(h, cache)
        return self.logits(h)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="tokens to generate after a 32-token prompt")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    prompt = torch.randint(0, 256, (1, 32))
    max_len = prompt.size(1) + args.tokens
    with torch.no_grad():
        caches = [layer.new_cache(1, max_len) for layer in model.layers]
        tokens = prompt
        next_token = model.step(prompt, caches)[:, -1:].argmax(-1)  # the prompt in one step
        for _ in range(args.tokens):
            tokens = torch.cat([tokens, next_token], dim=1)
            next_token = model.step(next_token, caches)[:, -1:].argmax(-1)
        full = model(tokens)[:, -1:].argmax(-1)  # recompute the whole sequence once
    print(f"generated {args.tokens} tokens after a {prompt.size(1)}-token prompt; cache holds "
          f"{int(caches[0].seqlens[0])} tokens; last token {int(next_token)} (whole-sequence recompute: {int(full)})")
    assert torch.equal(full, next_token), "the cached steps and the whole sequence disagree"


if __name__ == "__main__":
    main()
