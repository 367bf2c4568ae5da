"""
VQGAN: the image tokenizer of CLIP-GEN (stage 1; Esser et al. 2021, "Taming Transformers", used as-is by
Wang et al. 2022, sec. 3.1). An image (B, 3, H, W) in [-1, 1] becomes a grid of codebook indices (B, h, w) and back.

The module and parameter names are taming-transformers' (CompVis/taming-transformers, `VQModel`), so its public
checkpoints (`vqgan_imagenet_f16_16384`, `..._f16_1024`, pytorch-lightning `.ckpt` files) load with a copy loop:
`VQGAN.from_checkpoint(path)` reads them without lightning and without unpickling anything unsafe. It also reads
HFAiLab's released CLIP-GEN COCO VQGAN (`vqgan_coco.pt`) through the key map at the end of this file.
Our own checkpoints are `{"model": state_dict, "config": dict, "step": int}`.
"""
import math
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    resolution: int = 256             # training image side; only decides at which levels attention sits
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128                     # base width; every width must be a multiple of 32 (GroupNorm(32))
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per level; len - 1 stride-2 downsamples -> f = 2**(len-1)
    num_res_blocks: int = 2           # encoder blocks per level (the decoder uses one more, as in taming)
    attn_resolutions: tuple = (16,)   # feature-map sides that get self-attention after each res block
    z_channels: int = 256             # encoder output width before quant_conv
    double_z: bool = False            # taming's VAE option; VQGAN never uses it, kept so configs map 1:1
    dropout: float = 0.0
    norm_groups: int = 32             # GroupNorm groups (taming: 32); 0 = no normalisation (the shapes preset)
    norm_eps: float = 1e-6            # GroupNorm eps: taming's 1e-6; HFAiLab's plain nn.GroupNorm uses 1e-5
    n_embed: int = 16384              # codebook size (= GPT vocabulary)
    embed_dim: int = 256              # code vector width (quant_conv maps z_channels -> embed_dim)
    beta: float = 0.25                # commitment weight
    legacy: bool = True               # taming's beta placement (beta on the codebook term); public weights used it
    l2_norm: bool = False             # cosine lookup on l2-normalised codes (ViT-VQGAN): fights dead codes
    restart_every: int = 0            # >0: the trainer re-seeds dead codes with encoder outputs every this many steps
    restart_threshold: float = 0.03   # a code is dead when its usage count per batch (EMA, decay 0.9) is below this

    @property
    def grid(self):  # tokens per side for a `resolution` image
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


PRESETS = {
    # the paper's tokenizer = taming's vqgan_imagenet_f16_16384: 256 px -> 16x16 tokens, 76.1M parameters
    "f16-16384": dict(),
    "f16-1024": dict(n_embed=1024),
    # shapes world, 32 px -> f4 -> 8x8 = 64 tokens, small enough for a CPU; no GroupNorm, because per-image
    # normalisation erases the absolute colour of flat images; l2-normalised 16-d codes with restarts against dead
    # codes. The runs that chose these settings: docs/results.md, "The shapes world's VQGAN"
    "shapes": dict(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=0,
                   z_channels=64, n_embed=512, embed_dim=16, legacy=False, l2_norm=True, restart_every=10),
    # the smallest thing that exercises every code path (attention at 8 px included), for tests
    "tiny": dict(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 z_channels=32, n_embed=64, embed_dim=16),
}


def Normalize(c, cfg):
    if cfg.norm_groups == 0:  # the shapes preset: no normalisation at all (see its comment)
        return nn.Identity()
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=c, eps=cfg.norm_eps, affine=True)


def swish(x):
    return x * torch.sigmoid(x)  # taming's form; F.silu rounds differently (~1e-5 apart after a deep decoder)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, cfg):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin, cfg), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout, cfg), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(cfg.dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)  # taming's name for the 1x1 projection shortcut

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with taming's 1x1-conv q/k/v/proj_out."""

    def __init__(self, c, cfg):
        super().__init__()
        self.norm = Normalize(c, cfg)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, C, H, W) -> (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, as taming's two bmm's
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # taming pads (0,1,0,1) (right, bottom) before the stride-2 conv: padding=1 would shift the sampling grid
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c, cfg):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(c, c, cfg), AttnBlock(c, cfg)
        self.block_2 = ResnetBlock(c, c, cfg)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: res blocks (each followed by attention where configured), then an optional resample."""

    def __init__(self, cin, cout, n_blocks, attn, cfg):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, cfg) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, cfg) for _ in range(n_blocks)) if attn else nn.ModuleList()

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]  # in_ch_mult = (1,) + ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, res = nn.ModuleList(), cfg.resolution
        for i in range(len(cfg.ch_mult)):
            level = Level(chs[i], chs[i + 1], cfg.num_res_blocks, res in cfg.attn_resolutions, cfg)
            if i < len(cfg.ch_mult) - 1:
                level.downsample, res = Downsample(chs[i + 1]), res // 2
            self.down.append(level)
        self.mid = Mid(chs[-1], cfg)
        self.norm_out = Normalize(chs[-1], cfg)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):                                  # (B, 3, H, W)
        h = self.conv_in(x)                                # (B, ch, H, W)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)                    # halves H, W
        h = self.mid(h)                                    # (B, ch*ch_mult[-1], h, w)
        return self.conv_out(swish(self.norm_out(h)))     # (B, z_channels, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        L = len(cfg.ch_mult)
        c, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // 2 ** (L - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c, cfg)
        up = []
        for i in reversed(range(L)):  # built coarse to fine, stored so that up[i] is level i (taming's layout)
            cout = cfg.ch * cfg.ch_mult[i]
            level = Level(c, cout, cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg)
            if i != 0:
                level.upsample, res = Upsample(cout), res * 2
            up.insert(0, level)
            c = cout
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(c, cfg)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):                                  # (B, z_channels, h, w)
        h = self.mid(self.conv_in(z))                      # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):                    # coarsest level first: up[L-1] ... up[0]
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)                      # doubles H, W
        return self.conv_out(swish(self.norm_out(h)))     # (B, 3, H, W), unbounded (no tanh, as taming)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with a straight-through gradient (taming's VectorQuantizer2)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / cfg.n_embed, 1.0 / cfg.n_embed)  # taming's (tiny) init
        # EMA of how often each code is picked per batch; not persistent (taming files have no buffers), the
        # trainer saves it beside the model for exact resume
        self.register_buffer("usage", torch.zeros(cfg.n_embed), persistent=False)  # all "dead": the first restart
        # seeds every unused code from encoder outputs (a data-dependent init)
        self.recent = None

    def codebook(self):
        e = self.embedding.weight.float()
        return F.normalize(e, dim=1) if self.cfg.l2_norm else e

    def nearest(self, z):
        """(N, D) fp32 -> (N,) indices of the nearest codes, by one matmul: ||z||^2 - 2 z.e + ||e||^2."""
        e = self.codebook()
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)  # (N, n_embed)
        return d.argmin(1)

    def forward(self, z):
        """z (B, D, h, w) -> (z_q straight-through (B, D, h, w), loss scalar, indices (B, h, w)). Runs in fp32."""
        B, D, h, w = z.shape
        with torch.autocast("cuda" if z.is_cuda else "cpu", enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (B, D, h, w) -> (B*h*w, D)
            if self.cfg.l2_norm:
                z = F.normalize(z, dim=1)
            idx = self.nearest(z.detach())
            z_q = F.embedding(idx, self.codebook())
            commit, codebook = F.mse_loss(z, z_q.detach()), F.mse_loss(z_q, z.detach())
            # legacy (taming's shipped bug): commitment weight 1, codebook weight beta; else VQ-VAE's convention
            loss = commit + self.cfg.beta * codebook if self.cfg.legacy else self.cfg.beta * commit + codebook
            if self.training and self.cfg.restart_every:
                counts = torch.bincount(idx, minlength=self.cfg.n_embed).float()
                self.usage.mul_(0.9).add_(counts, alpha=0.1)  # a code unpicked for ~30 steps falls below 0.03
                self.recent = z.detach()  # candidates for restart_dead_codes(), called after the optimizer step
            z_q = z + (z_q - z).detach()  # straight-through: forward = codes, backward = identity to the encoder
        # contiguous NCHW, as taming: a channels-last view makes the next conv take another kernel (~1e-5 apart)
        return z_q.view(B, h, w, D).permute(0, 3, 1, 2).contiguous(), loss, idx.view(B, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, generator=None):
        """Dead-code restart (Jukebox, SoundStream): codes whose EMA use per batch fell below the threshold are moved
        onto random encoder outputs of the last batch. Call between optimizer steps (never inside a forward)."""
        if getattr(self, "recent", None) is None:
            return 0
        dead = (self.usage < self.cfg.restart_threshold).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(0, len(self.recent), (len(dead),), generator=generator).to(self.recent.device)
            self.embedding.weight.data[dead] = self.recent[pick].to(self.embedding.weight.dtype)
            self.usage[dead] = 0.5  # ~20 steps to be picked before they can count as dead again
        self.recent = None
        return len(dead)


def codebook_usage(indices, n_embed):
    """Fraction of the codebook used by `indices` (any shape) and the perplexity of their histogram."""
    return usage_from_counts(torch.bincount(indices.flatten(), minlength=n_embed))


def usage_from_counts(counts):
    p = counts.double() / counts.sum().clamp(min=1)
    return {"usage": (p > 0).float().mean().item(), "perplexity": math.exp(-(p * (p + 1e-12).log()).sum().item())}


class VQGAN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (xrec (B, 3, H, W) unclamped, vq loss, indices (B, h, w))."""
        z_q, loss, idx = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q.to(x.dtype))), loss, idx

    @torch.no_grad()
    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> indices LongTensor (B, H/f, W/f), raster order."""
        return self.quantize(self.quant_conv(self.encoder(x)))[2]

    def decode_latent(self, z):
        """z (B, embed_dim, h, w) codebook vectors -> image (B, 3, H, W) clamped to [-1, 1]; differentiable."""
        if self.config.l2_norm:
            z = F.normalize(z, dim=1)  # lets raw embedding rows be passed in
        return self.decoder(self.post_quant_conv(z.contiguous())).clamp(-1, 1)  # NCHW-contiguous: same conv kernels

    @torch.no_grad()
    def decode(self, indices):
        """indices (B, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        z = F.embedding(indices, self.quantize.codebook()).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        return self.decode_latent(z.to(self.post_quant_conv.weight.dtype))

    @classmethod
    def from_checkpoint(cls, path_or_dict, device="cpu", verbose=True):
        """An eval model from ours ({"model", "config", "step"}), taming's (.ckpt with "state_dict", bare or
        lightning) or HFAiLab's release ({"model", "epoch"}), given as a path or as the loaded dict."""
        name = "checkpoint dict" if isinstance(path_or_dict, dict) else str(path_or_dict)
        ckpt = path_or_dict if isinstance(path_or_dict, dict) else read_checkpoint(path_or_dict)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{name} holds a {type(ckpt).__name__}, not a VQGAN checkpoint dict")
        dropped = []
        if "model" in ckpt and "config" in ckpt:
            sd, kind = ckpt["model"], f"clipgen checkpoint, step {ckpt.get('step', '?')}"
            names = {f.name for f in fields(Config)}
            cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items() if k in names})
        elif "model" in ckpt and "quantizer.embedding.weight" in ckpt["model"]:
            dropped = [k for k in ckpt["model"] if k.startswith(HFAI_DROPPED)]
            sd, kind = from_hfai(ckpt["model"]), f"HFAiLab CLIP-GEN checkpoint, epoch {ckpt.get('epoch', '?')}"
            cfg = replace(config_from_state_dict(sd), norm_eps=1e-5, beta=0.2)  # their plain nn.GroupNorm; beta 0.2
        elif "state_dict" in ckpt:
            sd = {k.removeprefix("first_stage_model."): v for k, v in ckpt["state_dict"].items()}
            dropped = [k for k in sd if k.startswith("loss.")]  # LPIPS + discriminator of the training loss
            sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "cond_stage_model.", "transformer."))}
            cfg, kind = config_from_state_dict(sd), "taming checkpoint"
        else:
            raise ValueError(f"{name} is not a VQGAN checkpoint (ours: 'model' + 'config'; taming: 'state_dict'; "
                             f"HFAiLab: 'model' with 'quantizer.*'); top-level keys: {sorted(map(str, ckpt))[:10]}")
        model = cls(cfg)
        model.load_state_dict(sd)  # strict: torch names every missing and unexpected key
        if verbose:
            n = sum(p.numel() for p in model.parameters())
            gone = f" ({len(dropped)} {dropped[0].split('.')[0]}.* dropped)" if dropped else ""
            print(f"loaded {name}: {kind}, {len(sd)} tensors{gone}, codebook {cfg.n_embed}x{cfg.embed_dim}, "
                  f"f{2 ** (len(cfg.ch_mult) - 1)}, {n / 1e6:.1f}M params")
        return model.to(device).eval()

    def checkpoint(self, step=0, half=False):
        """Our checkpoint dict; half=True stores fp16 weights (loads back into fp32 modules)."""
        sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        return {"model": sd, "config": asdict(self.config), "step": step}


def config_from_state_dict(sd):
    """Infer taming's ddconfig + codebook from tensor shapes (meta tensors work too)."""
    if "quantize.proj.weight" in sd:
        raise ValueError("this is a GumbelVQ checkpoint (quantize.proj.*): only VQModel checkpoints are supported")
    for key in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
                "decoder.conv_out.weight", "quantize.embedding.weight"):
        if key not in sd:
            raise ValueError(f"cannot infer a VQGAN config: key {key!r} is missing from the state_dict")
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    # the resolution is not stored in the weights; both public models are 256 px, and the pair (resolution,
    # attn_resolutions) only places attention, so any consistent pair builds the same modules
    resolution = 256
    attn = tuple(resolution // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    return Config(resolution=resolution, in_channels=int(in_channels),
                  out_ch=int(sd["decoder.conv_out.weight"].shape[0]), ch=int(ch), ch_mult=ch_mult,
                  num_res_blocks=blocks, attn_resolutions=attn, z_channels=int(z_channels),
                  double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels, n_embed=int(n_embed),
                  embed_dim=int(embed_dim), legacy=True)  # taming's VQModel never passes legacy=False


def read_checkpoint(path, tries=8):
    """torch.load(weights_only=True) that gets past pytorch-lightning classes pickled into a .ckpt (taming's files).

    PL 1.0.8 (taming's) stores `callbacks` as {ModelCheckpoint class: state}: the class object itself is pickled
    as a GLOBAL. The weights-only unpickler refuses it; we allow-list an empty local stand-in class under exactly
    that dotted name (only `pytorch_lightning.*` / `lightning.*` names), so nothing from lightning is imported or run.
    """
    allowed = []
    for _ in range(tries):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError text names the refused global
            m = re.search(r"GLOBAL ((?:pytorch_lightning|lightning)\.[\w.]+)", str(e))
            if m is None:
                raise
            allowed.append((type(m.group(1).rsplit(".", 1)[1], (), {}), m.group(1)))
    raise RuntimeError(f"{path}: gave up after stubbing {len(allowed)} lightning classes: {[n for _, n in allowed]}")


# -----------------------------------------------------------------------------
# HFAiLab's released COCO VQGAN (vqgan_coco.pt; docs/real_images.md): taming's f16-16384 network under
# other names. Their levels are flat nn.Sequentials numbered in execution order; this table names ours, in order.

HFAI_DOWN = ("0.block.0 0.block.1 0.downsample 1.block.0 1.block.1 1.downsample 2.block.0 2.block.1 2.downsample "
             "3.block.0 3.block.1 3.downsample 4.block.0 4.attn.0 4.block.1 4.attn.1").split()   # encoder.down.0..15
HFAI_UP = ("4.block.0 4.attn.0 4.block.1 4.attn.1 4.block.2 4.attn.2 4.upsample 3.block.0 3.block.1 3.block.2 "
           "3.upsample 2.block.0 2.block.1 2.block.2 2.upsample 1.block.0 1.block.1 1.block.2 1.upsample "
           "0.block.0 0.block.1 0.block.2").split()                                              # decoder.up.0..21
HFAI_MODULES = {"encoder.conv_in": "encoder.conv_in", "encoder.final.0": "encoder.norm_out",
                "encoder.final.2": "encoder.conv_out", "encoder.final.3": "quant_conv",
                "decoder.quant_conv_in": "post_quant_conv", "decoder.conv_in": "decoder.conv_in",
                "decoder.final.0": "decoder.norm_out", "decoder.final.2": "decoder.conv_out",
                "quantizer.embedding": "quantize.embedding",
                **{f"{p}.mid.{i}": f"{p}.mid.{m}" for p in ("encoder", "decoder")
                   for i, m in enumerate(("block_1", "attn_1", "block_2"))},
                **{f"encoder.down.{i}": f"encoder.down.{m}" for i, m in enumerate(HFAI_DOWN)},
                **{f"decoder.up.{i}": f"decoder.up.{m}" for i, m in enumerate(HFAI_UP)}}
# inside a module: res block = Sequential(GroupNorm, SiLU, Conv, GroupNorm, SiLU, Dropout, Conv) + 1x1 shortcut;
# attention = GroupNorm + nn.MultiheadAttention(C, 1) (its in_proj is split below)
HFAI_PARTS = {"": "", "block.0": "norm1", "block.2": "conv1", "block.3": "norm2", "block.6": "conv2",
              "shortcut": "nin_shortcut", "norm": "norm", "attn.out_proj": "proj_out", "conv": "conv"}
HFAI_DROPPED = "discriminator."  # their PatchGAN: training only


def from_hfai(sd):
    """HFAiLab's `model` state dict -> ours (taming's names); discriminator.* dropped. A key the table does not
    know passes through unchanged, so the strict load names it."""
    out = {}
    for key, v in sd.items():
        if key.startswith(HFAI_DROPPED):
            continue
        parts = key.split(".")
        n = next((n for n in (3, 2) if ".".join(parts[:n]) in HFAI_MODULES), None)
        sub, leaf = ".".join(parts[n:-1]) if n else None, parts[-1]
        split = sub == "attn" and leaf in ("in_proj_weight", "in_proj_bias")
        if n is None or not (split or sub in HFAI_PARTS):
            out[key] = v
            continue
        ours = HFAI_MODULES[".".join(parts[:n])]
        if split:  # in_proj (3C, C) stacks [W_q; W_k; W_v]: one head of width C = three 1x1 convs
            kind = leaf.removeprefix("in_proj_")
            for qkv, t in zip("qkv", v.chunk(3)):
                out[f"{ours}.{qkv}.{kind}"] = t[:, :, None, None] if kind == "weight" else t
        else:  # out_proj is a Linear (C, C): as a 1x1 conv it needs (C, C, 1, 1)
            reshape = sub == "attn.out_proj" and leaf == "weight"
            out[".".join(filter(None, (ours, HFAI_PARTS[sub], leaf)))] = v[:, :, None, None] if reshape else v
    return out
