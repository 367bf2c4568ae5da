"""Files in exactly the layout of HFAiLab's CLIP-GEN release (docs/real_images.md), built from torch's own modules
with random weights, and a check that our loaders compute what those modules compute.

    python scripts/check_hfai_layout.py                 # real sizes: f16-16384 VQGAN, 24 x 1024 GPT (minutes, ~8 GB)
    python scripts/check_hfai_layout.py --keep DIR      # also keep clip_vit_b32.pt, vqgan_coco.pt, gpt_coco.pt in DIR

Their modules are rebuilt here after HFAiLab/clip-gen@97420d3 models/{codec,quantizer,gpt}.py (names, shapes, order
of operations): res block = Sequential(GroupNorm(32), SiLU, Conv3x3, GroupNorm(32), SiLU, Dropout, Conv3x3) + 1x1
shortcut, attention = GroupNorm + nn.MultiheadAttention(C, 1), quantizer = cdist argmin, GPT block =
nn.TransformerEncoderLayer(norm_first=True, activation=F.gelu) with a bool causal-mask buffer. test_all.py uses the
same builders at small sizes.
"""
import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clip  # noqa: E402
import gpt  # noqa: E402
import vqgan  # noqa: E402


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                   nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.block(x)


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.attn = nn.GroupNorm(32, c), nn.MultiheadAttention(c, 1, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        return x + self.attn(h, h, h, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def their_vqgan(ch=128, ch_mult=(1, 1, 2, 2, 4), z=256, codes=16384, seed=0):
    """Their VQGAN(codes, z) with 256-px attention placement (at 16x16), random weights, a spread codebook."""
    torch.manual_seed(seed)
    m, blocks, c, res = nn.Module(), [], ch, 256
    m.encoder, m.decoder, m.quantizer = nn.Module(), nn.Module(), nn.Module()
    m.encoder.conv_in = nn.Conv2d(3, ch, 3, padding=1)
    for level, mult in enumerate(ch_mult):
        for _ in range(2):
            blocks += [ResBlock(c, ch * mult)] + ([Attn(ch * mult)] if res == 16 else [])
            c = ch * mult
        if level != len(ch_mult) - 1:
            blocks, res = blocks + [Down(c)], res // 2
    m.encoder.down = nn.Sequential(*blocks)
    m.encoder.mid = nn.Sequential(ResBlock(c, c), Attn(c), ResBlock(c, c))
    m.encoder.final = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, z, 3, padding=1), nn.Conv2d(z, z, 1))
    m.decoder.quant_conv_in, m.decoder.conv_in = nn.Conv2d(z, z, 1), nn.Conv2d(z, c, 3, padding=1)
    m.decoder.mid = nn.Sequential(ResBlock(c, c), Attn(c), ResBlock(c, c))
    blocks = []
    for level in reversed(range(len(ch_mult))):
        for _ in range(3):
            blocks += [ResBlock(c, ch * ch_mult[level])] + ([Attn(ch * ch_mult[level])] if res == 16 else [])
            c = ch * ch_mult[level]
        if level != 0:
            blocks, res = blocks + [Up(c)], res * 2
    m.decoder.up = nn.Sequential(*blocks)
    m.decoder.final = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
    m.quantizer.embedding = nn.Embedding(codes, z)  # N(0, 1): spread out, so the argmin is not degenerate
    # their PatchGAN (3 layers, 64 wide): 22 tensors with BatchNorm statistics, dropped by our loader
    feats = [nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2)]
    for i, (a, b) in enumerate([(64, 128), (128, 256), (256, 512)]):
        feats += [nn.Conv2d(a, b, 4, 2 if i < 2 else 1, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
    m.discriminator = nn.Module()
    m.discriminator.features, m.discriminator.head = nn.Sequential(*feats), nn.Conv2d(512, 1, 4, 1, 1)
    with torch.no_grad():  # GroupNorm/BatchNorm affine params away from 1/0, so a swapped norm would show
        for name, p in m.named_parameters():
            if ".block.0." in name or ".block.3." in name or ".norm." in name or "final.0" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@torch.no_grad()
def their_encode(m, x):
    """(B, 3, H, W) -> (B, h, w) indices: encoder, then Euclidean cdist argmin over the codebook (their quantizer)."""
    z = m.encoder.final(m.encoder.mid(m.encoder.down(m.encoder.conv_in(x))))
    B, C, h, w = z.shape
    return torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, C), m.quantizer.embedding.weight).argmin(1).view(B, h, w)


@torch.no_grad()
def their_decode(m, idx):
    """(B, h, w) indices -> (B, 3, H, W) unclamped, as demo.py: embedding lookup, permute, decoder."""
    d = m.decoder
    z = m.quantizer.embedding(idx).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w), non-contiguous as theirs
    return d.final(d.up(d.mid(d.conv_in(d.quant_conv_in(z)))))


class Block(nn.Module):
    def __init__(self, C, heads, T):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(C, heads, 4 * C, 0.1, activation=F.gelu, batch_first=True,
                                                  norm_first=True)
        self.register_buffer("mask", ~torch.tril(torch.ones(T, T, dtype=torch.bool)))  # True = masked

    def forward(self, x):
        return self.encoder(x, self.mask[:x.shape[1], :x.shape[1]])


def their_gpt(vocab=16384, n_layer=24, C=1024, T=256, cond=512, seed=0):
    """Their GPT (gpt2_medium at the defaults): pos_emb a (1, T, C) parameter, head with a bias."""
    torch.manual_seed(seed)
    m = nn.Module()
    m.tok_emb, m.pos_emb = nn.Embedding(vocab, C), nn.Parameter(0.02 * torch.randn(1, T, C))
    m.cond_proj = nn.Linear(cond, C)
    m.blocks = nn.Sequential(*[Block(C, C // 64, T) for _ in range(n_layer)])
    m.norm, m.head = nn.LayerNorm(C), nn.Linear(C, vocab)
    with torch.no_grad():  # LayerNorm affine params away from 1/0, so a swapped norm would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@torch.no_grad()
def their_logits(m, idx, embed):
    """idx (B, L) tokens, embed (B, cond) as given -> logits (B, L+1, vocab), as their GPT.forward."""
    x = torch.cat([m.cond_proj(embed)[:, None], m.tok_emb(idx)], 1)
    return m.head(m.norm(m.blocks(x + m.pos_emb[:, :x.shape[1]])))


def clip_file(path, seed=0, **sizes):
    """A bare OpenAI-keyed CLIP state dict, as their clip_vit_b32.pt (ViT-B/32 at the defaults)."""
    torch.manual_seed(seed)
    torch.save(clip.CLIP(clip.Config(**sizes)).state_dict(), path)


def compare(folder, ch=128, z=256, codes=16384, n_layer=24, C=1024, vocab=16384, res=256, batch=2):
    """Write their files into `folder`, load them with ours, return the figures of the comparison."""
    folder, out = Path(folder), {}
    t = time.time()
    theirs = their_vqgan(ch=ch, z=z, codes=codes)
    torch.save({"model": theirs.state_dict(), "epoch": 0}, folder / "vqgan_coco.pt")
    ours = vqgan.VQGAN.from_checkpoint(folder / "vqgan_coco.pt")
    x = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x[0] = F.interpolate(x[:1, :, ::16, ::16], size=res, mode="bilinear")  # one smooth image beside the noise
    idx, ref_idx = ours.encode(x), their_encode(theirs, x)
    out["indices_equal"], out["indices"] = int((idx == ref_idx).sum()), idx.numel()
    ref = their_decode(theirs, ref_idx)
    out["decode_max_abs"] = (ours.decode(ref_idx) - ref.clamp(-1, 1)).abs().max().item()
    out["decode_range"] = ref.abs().max().item()
    out["vqgan_s"] = time.time() - t
    del theirs, ours
    t = time.time()
    theirs = their_gpt(vocab=vocab, n_layer=n_layer, C=C)
    torch.save({"model": theirs.state_dict(), "epoch": 0}, folder / "gpt_coco.pt")
    ours = gpt.GPT.from_checkpoint(folder / "gpt_coco.pt")
    T = ours.config.block_size
    embed = F.normalize(torch.randn(batch, 512, generator=torch.Generator().manual_seed(2)), dim=-1)
    tokens = torch.randint(0, vocab, (batch, T - 1), generator=torch.Generator().manual_seed(3))
    ref = their_logits(theirs, tokens, embed)
    with torch.no_grad():
        out["logits_max_abs"] = (ours(tokens, embed)[0] - ref).abs().max().item()
    out["logits_range"] = ref.abs().max().item()
    # greedy: our KV-cached sampler's tokens are their argmax at every position given the same prefix
    greedy = ours.generate(embed, temperature=0)
    out["greedy_equal"] = int((their_logits(theirs, greedy[:, :-1], embed).argmax(-1) == greedy).sum())
    out["greedy"] = greedy.numel()
    out["gpt_s"] = time.time() - t
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keep", help="folder to keep the three files in (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        r = compare(folder)
        clip_file(folder / "clip_vit_b32.pt")
    print(f"VQGAN f16-16384: encode indices {r['indices_equal']}/{r['indices']} identical; decode max |diff| "
          f"{r['decode_max_abs']:.2e} (outputs up to {r['decode_range']:.2f}); {r['vqgan_s']:.0f} s")
    print(f"GPT 24 x 1024: logits max |diff| {r['logits_max_abs']:.2e} (logits up to {r['logits_range']:.2f}); "
          f"greedy tokens {r['greedy_equal']}/{r['greedy']} identical; {r['gpt_s']:.0f} s")
    ok = r["indices_equal"] == r["indices"] and r["decode_max_abs"] < 1e-4 and r["logits_max_abs"] < 1e-4 \
        and r["greedy_equal"] == r["greedy"]
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
