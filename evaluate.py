"""Evaluation for clipgen: FID (+ blurred FID-k), Inception Score, CLIP score, shapes-world accuracy.

The numbers follow the trusted tools exactly (see the README, "Evaluation"):
- FID: pytorch-fid 0.3.0. The TF-ported Inception v3 ("pool3", TF graph inception-2015-12-05, with the FID patches:
  TF-style average pools, a max pool in Mixed_7c, BatchNorm eps 1e-3) reads pytorch-fid's weight file
  `pt_inception-2015-12-05-6726825d.pth` with its torchvision key names. Images: x/255, bilinear resize to 299
  (align_corners=False, no antialias), 2x - 1; 2048-d pool features; mu, sigma (ddof 1) in float64; the Frechet
  distance through scipy's sqrtm with pytorch-fid's eps retry and imaginary-part check. `.npz` stats are pytorch-fid's.
- FID-k (DALL-E, CogView): both sets blurred by PIL's GaussianBlur(radius=k) on the uint8 images before the resize.
- IS: torch-fidelity 0.4.0 (its preprocessing: uint8, TF1 bilinear resize, (x - 128)/128; bias-free 1008-way logits,
  shuffled with RandomState(2020), 10 splits, float64).
- CLIP score: 100 * max(cos(image, caption), 0) per pair, averaged, for any CLIP that clip.load loads.
- Shapes world: colour by an exact palette analysis, shape by a small CNN trained here on data.py's procedural images.
"""
import argparse
import csv
import json
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

import data

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries the first 8 hex of its SHA256
CACHE = Path(os.environ.get("CLIPGEN_CACHE", Path.home() / ".cache" / "clipgen"))

# -----------------------------------------------------------------------------
# the FID Inception v3 (pytorch-fid's FIDInceptionA/C/E_1/E_2 + torchvision's B/D, same module and key names)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon; torch's 1e-5 changes features by ~1e3

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def add_convs(module, **spec):  # name=(in, out, kernel, stride, padding): torchvision's branch names, for the keys
    for name, args in spec.items():
        setattr(module, name, BasicConv2d(*args))


def chain(module, x, *names):
    for name in names:
        x = getattr(module, name)(x)
    return x


def tf_avg_pool(x):  # TF's average pool ignores the padded zeros (torchvision counts them)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d: (in, 35, 35) -> (224 + pool_features, 35, 35)
    def __init__(self, cin, pool_features):
        super().__init__()
        add_convs(self, branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                  branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                  branch_pool=(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, x, "branch5x5_1", "branch5x5_2"),
                          chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: (288, 35, 35) -> (768, 17, 17)
    def __init__(self, cin):
        super().__init__()
        add_convs(self, branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                  branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e: factorised 7x7 convolutions, (768, 17, 17) -> same
    def __init__(self, cin, c7):
        super().__init__()
        h, v = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7 and 7x1 kernels: (kernel, stride, padding)
        add_convs(self, branch1x1=(cin, 192, 1), branch7x7_1=(cin, c7, 1), branch7x7_2=(c7, c7, *h),
                  branch7x7_3=(c7, 192, *v), branch7x7dbl_1=(cin, c7, 1), branch7x7dbl_2=(c7, c7, *v),
                  branch7x7dbl_3=(c7, c7, *h), branch7x7dbl_4=(c7, c7, *v), branch7x7dbl_5=(c7, 192, *h),
                  branch_pool=(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, x, *(f"branch7x7_{i}" for i in (1, 2, 3))),
                          chain(self, x, *(f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: (768, 17, 17) -> (1280, 8, 8)
    def __init__(self, cin):
        super().__init__()
        add_convs(self, branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                  branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)), branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
                  branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        return torch.cat([chain(self, x, "branch3x3_1", "branch3x3_2"),
                          chain(self, x, *(f"branch7x7x3_{i}" for i in (1, 2, 3, 4))), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool branch) / Mixed_7c (max pool branch, a quirk of the TF graph)
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        h, v = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
        add_convs(self, branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *h),
                  branch3x3_2b=(384, 384, *v), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                  branch3x3dbl_3a=(384, 384, *h), branch3x3dbl_3b=(384, 384, *v), branch_pool=(cin, 192, 1))

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2")
        pool = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """x (B, 3, 299, 299) in [-1, 1] -> (pool3 features (B, 2048), bias-free logits (B, 1008))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # the TF softmax layer: only IS uses it, without its bias

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)  # ... (B, 288, 35, 35) (B, 768, 17, 17) (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)
        return pool, pool @ self.fc.weight.T  # torch-fidelity's "logits_unbiased"


def load_inception(path=None, device="cpu"):
    """The FID network with pytorch-fid's weights: `path`, else the caches, else a verified download."""
    name = FID_WEIGHTS_URL.rsplit("/", 1)[1]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    candidates = [Path(path)] if path else [CACHE / name, torch_home / "hub" / "checkpoints" / name]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and path:
        raise FileNotFoundError(f"--inception {path} does not exist; download {FID_WEIGHTS_URL} there")
    if found is None:
        try:
            import clip  # only for its verified, atomic downloader and file hash
            found = Path(clip.download(FID_WEIGHTS_URL, str(CACHE)))
        except Exception as e:
            raise FileNotFoundError(
                f"FID Inception weights not found (looked in {', '.join(map(str, candidates))}) and the download "
                f"failed ({type(e).__name__}: {e}); download {FID_WEIGHTS_URL} into {CACHE} or pass --inception FILE")
        digest = clip.file_sha256(found)  # chunked: the file is ~95 MB
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            found.unlink()
            raise RuntimeError(f"{name} has SHA256 {digest}, not {FID_WEIGHTS_SHA256_PREFIX}...: "
                               "a corrupt download; run again")
    model = InceptionV3()
    sd = torch.load(found, map_location="cpu", weights_only=True)
    # num_batches_tracked is bookkeeping: some exports carry it, some do not; it never changes an output
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{found} is not pytorch-fid's Inception file: missing keys {missing[:8]} "
                         f"({len(missing)}), unexpected keys {unexpected[:8]} ({len(unexpected)})")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{found}: wrong shapes: {bad[:8]}")
    with torch.no_grad():
        for k, v in own.items():  # state_dict tensors share storage with the parameters and buffers
            v.copy_(sd[k])
    print(f"loaded FID Inception v3 from {found} ({sum(v.numel() for v in own.values()) / 1e6:.2f}M numbers)")
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# preprocessing per tool, and batched features of a folder


def fid_input(x):
    """pytorch-fid: x (B, 3, H, W) float in [0, 1] (uint8 / 255) -> bilinear 299 (align_corners=False) -> [-1, 1]."""
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


def fidelity_input(x):
    """torch-fidelity: x (B, 3, H, W) float in [0, 255] -> TF1 legacy bilinear 299 (no half-pixel offset) -> /128."""
    def grid(n_in):  # source coordinate dst * in/out; neighbours floor and floor + 1 (clamped)
        g = torch.arange(299, dtype=torch.float32) * torch.tensor(n_in / 299, dtype=torch.float32)
        lo = g.long()
        return lo, (lo + 1).clamp_max(n_in - 1), g - lo.float()
    (y0, y1, dy), (x0, x1, dx) = grid(x.shape[2]), grid(x.shape[3])
    rows0, rows1 = x[:, :, y0], x[:, :, y1]  # (B, 3, 299, W)
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * dx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * dx
    return (top + (bottom - top) * dy[:, None] - 128) / 128


class InceptionFolder(data.ImageFolder):
    """Every image under `root`, full size (no crop), optionally blurred; corrupt files -> None (data.collate drops
    and counts them). Items carry the pytorch-fid input and, with `fidelity`, torch-fidelity's, both (3, 299, 299)."""

    def __init__(self, root, blur=0, fidelity=False):
        super().__init__(root, resolution=299, train=False)
        self.blur, self.fidelity = blur, fidelity

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("RGB")
        except Exception as e:  # as data.ImageFolder: any decoding error means "skip this one"
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None
        if self.blur > 0:  # DALL-E / CogView FID-k; PIL's radius is the Gaussian's standard deviation
            img = img.filter(ImageFilter.GaussianBlur(self.blur))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None]  # (1, 3, H, W) in [0, 255]
        item = dict(image=fid_input(x / 255)[0], index=index)  # / 255, not * (1/255): ToTensor's exact rounding
        if self.fidelity:
            item["fidelity"] = fidelity_input(x)[0]
        return item


@torch.no_grad()
def folder_features(model, root, blur=0, logits=False, batch_size=50, workers=2, device="cpu", pool=True):
    """-> dict(pool (N, 2048) float64 (pytorch-fid's input), logits (N, 1008) float64 (torch-fidelity's input), n,
    skipped); each computed only if asked."""
    ds = InceptionFolder(root, blur, fidelity=logits)
    loader = data.make_loader(ds, min(batch_size, len(ds)), train=False, workers=workers)
    pools, outs, skipped = [], [], 0
    for batch in tqdm(loader, desc=f"inception {Path(root).name} blur {blur}", leave=False, file=sys.stderr):
        skipped += batch["skipped"]
        if "image" not in batch:
            continue
        if pool:
            pools.append(model(batch["image"].to(device))[0].double().cpu())
        if logits:
            outs.append(model(batch["fidelity"].to(device))[1].double().cpu())
    if skipped:
        print(f"{root}: skipped {skipped} unreadable image(s) of {len(ds)}")
    pools, outs = (torch.cat(t).numpy() if t else None for t in (pools, outs))
    return dict(pool=pools, logits=outs, n=len(ds) - skipped, skipped=skipped)


# -----------------------------------------------------------------------------
# metrics


def stats(features):
    """(N, D) -> mu (D,), sigma (D, D), float64, as pytorch-fid (np.cov with ddof 1)."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed exactly as pytorch-fid 0.3.0 does."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; were both made by the same (2048-d) network?")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # a singular product: retry with a small diagonal offset
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off makes tiny imaginary parts; a large one means a broken covariance
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, shuffle=True, seed=2020):
    """torch-fidelity's IS of (N, C) logits -> (mean, std over the splits with ddof 0)."""
    logits = torch.as_tensor(np.asarray(logits))
    n = len(logits)
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    p, log_p = logits.double().softmax(1), logits.double().log_softmax(1)
    scores = []
    for i in range(splits):
        pc, lpc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        q = pc.mean(0, keepdim=True)
        scores.append((pc * (lpc - q.log())).sum(1).mean().exp().item())  # exp(E KL(p(y|x) || p(y)))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def clip_score(model, preprocess, images, captions, batch_size=64):
    """100 * max(cos(E_image, E_caption), 0) per pair, for `images` (PIL or paths) and their `captions` -> (N,)."""
    import clip
    p = next(model.parameters())
    load = lambda im: Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im  # paths: one batch in RAM
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([preprocess(load(im)) for im in images[i:i + batch_size]]).to(p.device, p.dtype)
        tokens = clip.tokenize(captions[i:i + batch_size], truncate=True).to(p.device)
        cos = F.cosine_similarity(model.encode_image(x).float(), model.encode_text(tokens).float(), dim=-1)
        out.append(100 * cos.clamp(min=0).cpu())
    return torch.cat(out).numpy()


def load_stats(path, blur=0):
    """mu, sigma of an .npz (pytorch-fid's keys for blur 0; ours add mu_blur{k}, sigma_blur{k})."""
    mk, sk = ("mu", "sigma") if blur == 0 else (f"mu_blur{blur}", f"sigma_blur{blur}")
    with np.load(path) as f:
        if mk not in f:
            raise KeyError(f"{path} has no statistics for blur radius {blur} (keys {sorted(f.keys())}); "
                           f"write them with: python evaluate.py stats REF_FOLDER --out {path} --blur 0 1 2")
        return f[mk][:], f[sk][:]


# -----------------------------------------------------------------------------
# shapes-world accuracy: colour by palette analysis, shape by a small CNN (never the CLIP behind the generator)

PALETTE = torch.tensor(list(data.COLORS.values()), dtype=torch.float32) / 255  # (8, 3), data.COLORS' order
JUDGE_RES = 64  # data.py's shapes resolution: the judge sees every image at this size


def as_float_images(images):
    """uint8 (N, H, W, 3) or (N, 3, H, W), or float (N, 3, H, W) in [0, 1] -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def count_labels(labels):  # (N, L) palette indices -> (N, 8) counts
    k = len(PALETTE)
    flat = (labels + k * torch.arange(len(labels))[:, None]).flatten()  # image i's labels land in bins i*k .. i*k+k-1
    return torch.bincount(flat, minlength=k * len(labels)).view(-1, k)


def palette_analysis(x):
    """x (N, 3, H, W) in [0, 1] -> (shape colour (N,), background (N,)) palette indices; -1 = no shape pixels.
    Each pixel takes its nearest palette colour; the background is the commonest colour on the border, the shape's
    colour the commonest other one."""
    n = len(x)
    # nearest palette colour: argmin ||x - p||^2 = argmin (||p||^2 - 2 x.p)
    labels = ((PALETTE ** 2).sum(1)[:, None, None] - 2 * torch.einsum("nchw,kc->nkhw", x, PALETTE)).argmin(1)
    border = torch.cat([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], 1)  # (N, 2H + 2W)
    bg = count_labels(border).argmax(1)
    counts = count_labels(labels.flatten(1))  # (N, 8) pixels per palette colour
    counts[torch.arange(n), bg] = 0
    return torch.where(counts.max(1).values > 0, counts.argmax(1), -1), bg


def foreground_map(x, color, bg):
    """How far each pixel is along the background -> shape colour line, clamped to [0, 1]: (N, 1, 64, 64).
    Colour-free, so the shape judge learns geometry only, and graceful under blur and noise."""
    x = F.interpolate(x, size=(JUDGE_RES, JUDGE_RES), mode="bilinear", antialias=True, align_corners=False)
    b, c = PALETTE[bg][:, :, None, None], PALETTE[color.clamp(min=0)][:, :, None, None]  # (N, 3, 1, 1)
    t = ((x - b) * (c - b)).sum(1, keepdim=True) / ((c - b) ** 2).sum(1, keepdim=True).clamp(min=1e-6)
    return t.clamp(0, 1) * (color >= 0).float()[:, None, None, None]


def shape_judge():
    def block(cin, cout):  # a stride-2 conv halves the size; BN + ReLU
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    # (N, 1, 64, 64) -> 32 -> 16 -> 8 -> 4 -> pooled (N, 48) -> (N, 6); small enough to train in seconds on a CPU
    return nn.Sequential(*block(1, 12), *block(12, 24), *block(24, 48), *block(48, 48),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, len(data.SHAPES)))


def degrade(x, g):
    """What a VQGAN reconstruction does to an image, roughly: blur (sigma 0-1.5 px), noise, colour drift."""
    n = len(x)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 1.5 + 1e-3
    w = torch.exp(-0.5 * (torch.arange(-3, 4).view(1, 7, 1, 1, 1) / sigma[:, None]) ** 2)  # (N, 7, 1, 1, 1)
    w = w / w.sum(1, keepdim=True)
    for dim in (2, 3):  # separable Gaussian as a weighted sum of shifted copies (edges replicated)
        p = F.pad(x, (3, 3, 0, 0) if dim == 3 else (0, 0, 3, 3), mode="replicate")
        x = sum(w[:, i] * p.narrow(dim, i, x.shape[dim]) for i in range(7))
    gain, shift = 1 + 0.1 * torch.randn(n, 3, 1, 1, generator=g), 0.05 * torch.randn(n, 3, 1, 1, generator=g)
    noise = torch.rand(n, 1, 1, 1, generator=g) * 0.08 * torch.randn(x.shape, generator=g)
    return (x * gain + shift + noise).clamp(0, 1)


def shapes_set(n, seed, g):
    """n procedural images -> judge inputs of the clean and of a degraded copy (2n, 1, 64, 64), shape labels (2n,)."""
    ds = data.Shapes(n, resolution=JUDGE_RES, seed=seed, centred=False)  # shapes anywhere, any radius
    items = [ds[i] for i in range(n)]
    x = (torch.stack([it["image"] for it in items]) + 1) / 2  # (n, 3, 64, 64) in [0, 1]
    color, bg = (torch.tensor([it[k] for it in items]) for k in ("color", "bg"))
    clean, degraded = [], []
    for i in range(0, n, 500):  # chunks keep the (N, H*W, 8) palette distances small
        clean.append(foreground_map(x[i:i + 500], color[i:i + 500], bg[i:i + 500]))
        d = degrade(x[i:i + 500], g)
        degraded.append(foreground_map(d, *palette_analysis(d)))  # as at test time: the colours are estimated
    return torch.cat(clean + degraded), torch.tensor([it["shape"] for it in items]).repeat(2)


def train_shape_judge(path, n_train=3_000, steps=300, n_val=1_000, seed=0):
    """Train the shape judge on data.py's procedural images (clean and degraded), save it -> (model, checkpoint)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # convs this small gain little from threads, and lose 5x on a shared CPU (measured)
    g = torch.Generator().manual_seed(seed)
    x, y = shapes_set(n_train, 7_000_001, g)  # worlds of their own, neither data.py's train nor its val split
    xv, yv = shapes_set(n_val, 7_000_002, g)
    model = shape_judge()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    for step in tqdm(range(steps), desc="training the shape judge", leave=False, file=sys.stderr):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    torch.set_num_threads(threads)
    with torch.no_grad():
        ok = (model(xv).argmax(1) == yv).float()
    clean, degraded = ok[:len(ok) // 2].mean().item(), ok[len(ok) // 2:].mean().item()
    ckpt = {"model": model.state_dict(), "config": {"res": JUDGE_RES, "shapes": data.SHAPES, "n_train": n_train},
            "step": steps, "val_acc": clean, "val_acc_degraded": degraded}
    data.save_atomic(ckpt, path)
    print(f"trained the shape judge: {steps} steps, held-out accuracy {clean:.4f} clean, {degraded:.4f} degraded "
          f"-> {path}")
    return model, ckpt


def load_shape_judge(path=None):
    """The cached shape judge (trained on first use, well under a minute on a CPU) -> (model, checkpoint dict)."""
    path = Path(path or CACHE / "shape_judge.pt")
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["config"]["shapes"] == data.SHAPES and ckpt["config"]["res"] == JUDGE_RES:
            model = shape_judge()
            model.load_state_dict(ckpt["model"])
            return model.eval(), ckpt
        print(f"{path} was trained for other shapes {ckpt['config']['shapes']}: retraining")
    return train_shape_judge(path)


@torch.no_grad()
def shapes_accuracy(images, colors, shapes, judge=None):
    """Images of known prompts -> dict(color_acc, shape_acc, both_acc, n, color_pred, shape_pred).
    images: (N, 3, H, W) in [0, 1], or uint8 (N, 3, H, W) / (N, H, W, 3); colors, shapes: prompted indices into
    data.COLORS / data.SHAPES, None where the prompt names none (left out of that accuracy)."""
    x = as_float_images(images)
    judge = judge or load_shape_judge()[0]
    color, bg = palette_analysis(x)
    shape = judge(foreground_map(x, color, bg)).argmax(1)
    want_c = torch.tensor([-2 if c is None else c for c in colors])
    want_s = torch.tensor([-2 if s is None else s for s in shapes])
    ok_c, ok_s = color == want_c, shape == want_s
    has_c, has_s = want_c >= 0, want_s >= 0
    acc = lambda ok, has: (ok & has).sum().item() / max(1, has.sum().item())
    return dict(color_acc=acc(ok_c, has_c), shape_acc=acc(ok_s, has_s), both_acc=acc(ok_c & ok_s, has_c & has_s),
                n=len(x), color_pred=color.tolist(), shape_pred=shape.tolist())


# -----------------------------------------------------------------------------
# commands


def set_stats(model, src, blurs, args, logits=False):
    """{blur: (mu, sigma)} of a folder or an .npz, plus the folder's IS logits and image count."""
    if str(src).endswith(".npz"):
        return {k: load_stats(src, k) for k in blurs}, None, None
    out, lg, n = {}, None, 0
    for k in blurs:
        f = folder_features(model, src, k, logits and k == 0, args.batch_size, args.workers, args.device)
        out[k], n, lg = stats(f["pool"]), f["n"], f["logits"] if k == 0 else lg
    if n < 2048:
        print(f"warning: {src} has {n} images, fewer than the 2048 a full-rank covariance needs: FID is biased "
              f"upwards and not comparable with published numbers (use 10k-50k)")
    return out, lg, n


def fids(sa, sb):
    return {f"fid{k}": frechet_distance(*sa[k], *sb[k]) for k in sa}


def generation_settings(args):
    return {k: getattr(args, k) for k in ("candidates", "top_k", "top_p", "temperature", "cfg", "seed")}


def generate_images(models, args, prompts, n):
    """prompts -> uint8 (len(prompts), n, H, W, 3) through sample.py, with the generation settings of `args`."""
    import sample
    emb = sample.text_embeddings(models, prompts)
    images, _ = sample.generate(models, emb, n=n, candidates=args.candidates, texts_for_ranking=emb,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg=args.cfg,
                                seed=args.seed, batch_size=args.gen_batch_size)
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:  # float (N, n, 3, H, W) in [0, 1] -> uint8 (N, n, H, W, 3)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    return images


def read_captions(path, n, seed):
    """A .txt (one per line), .csv/.tsv (a 'caption' column) or COCO captions_*.json (one random caption of each
    image, the COCO-30k protocol); a seeded random subset of n if n is smaller."""
    p = Path(path)
    if p.suffix == ".json":
        per_image = {}
        for a in json.loads(p.read_text())["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a["caption"].strip())
        rng = random.Random(seed)
        captions = [rng.choice(caps) for _, caps in sorted(per_image.items())]
    elif p.suffix in (".csv", ".tsv"):
        with open(p, newline="") as f:
            captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")]
    else:
        captions = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if n and n < len(captions):
        captions = [captions[i] for i in sorted(random.Random(seed).sample(range(len(captions)), n))]
    return captions


def main(args):
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions move FID features by ~1e-3: keep float32 exact
    results, settings = {}, {}
    if args.cmd in ("stats", "fid", "is", "coco"):
        model = load_inception(args.inception, args.device)
    if args.cmd == "stats":
        if Path(args.out).exists():
            raise FileExistsError(f"{args.out} exists; remove it or choose another --out")
        st, _, n = set_stats(model, args.folder, args.blur, args)
        arrays = {(f"{m}_blur{k}" if k else m): v
                  for k, (mu, sigma) in st.items() for m, v in (("mu", mu), ("sigma", sigma))}
        np.savez_compressed(args.out, n=n, **arrays)
        print(f"wrote {args.out}: mu, sigma of {n} images for blur radii {args.blur}")
        results["n"] = n
    elif args.cmd == "fid":
        results.update(fids(set_stats(model, args.a, args.blur, args)[0], set_stats(model, args.b, args.blur, args)[0]))
    elif args.cmd == "is":
        f = folder_features(model, args.folder, 0, True, args.batch_size, args.workers, args.device, pool=False)
        results["is"], results["is_std"] = inception_score(f["logits"], args.splits)
        results["n"] = f["n"]
    elif args.cmd == "shapes":
        settings = generation_settings(args) | {"n_per_prompt": args.n}
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        pairs = [(c, s) for c in range(len(data.COLORS)) for s in range(len(data.SHAPES))]
        import sample
        models = sample.load_models(clip=args.clip, vqgan=args.vqgan, gpt=args.gpt, device=args.device)
        images = generate_images(models, args, [data.prompt(c, s) for c, s in pairs], args.n).flatten(0, 1)
        judge, ckpt = load_shape_judge(args.judge)
        acc = shapes_accuracy(images, [c for c, _ in pairs for _ in range(args.n)],
                              [s for _, s in pairs for _ in range(args.n)], judge)
        results = {k: acc[k] for k in ("color_acc", "shape_acc", "both_acc", "n")}
        results["judge_val_acc"], results["judge_val_acc_degraded"] = ckpt["val_acc"], ckpt["val_acc_degraded"]
    elif args.cmd == "coco":
        captions = read_captions(args.captions, args.count, args.seed)
        settings = generation_settings(args) | {"count": len(captions), "ref_stats": args.ref_stats,
                                                "blur": args.blur, "score_clip": args.score_clip}
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        folder = Path(args.out) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "captions.txt").write_text("\n".join(captions) + "\n")
        todo = [i for i in range(len(captions)) if not (folder / f"{i:05d}.png").exists()]  # resumable
        if todo:
            import sample
            models = sample.load_models(clip=args.clip, vqgan=args.vqgan, gpt=args.gpt, device=args.device)
        for j in tqdm(range(0, len(todo), args.chunk), desc="generating", file=sys.stderr):
            ids = todo[j:j + args.chunk]
            for i, im in zip(ids, generate_images(models, args, [captions[i] for i in ids], 1)[:, 0].numpy()):
                Image.fromarray(im).save(folder / f"{i:05d}.png")
        gen, logits, _ = set_stats(model, folder, args.blur, args, logits=True)  # the blur-0 pass also gives logits
        results.update(fids(gen, set_stats(model, args.ref_stats, args.blur, args)[0]))
        if logits is None:
            f = folder_features(model, folder, 0, True, args.batch_size, args.workers, args.device, pool=False)
            logits = f["logits"]
        results["is"], results["is_std"] = inception_score(logits, args.splits)
        import clip
        cm, pre = clip.load(args.score_clip, device=args.device)
        results["clip_score"] = float(clip_score(cm, pre, [folder / f"{i:05d}.png" for i in range(len(captions))],
                                                 captions).mean())
    if args.json:
        print(json.dumps({"command": args.cmd, "results": results, "settings": settings}))
    else:
        for k, v in results.items():
            print(f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}")
    return results


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True)
    cmds = {"stats": "write the FID statistics (.npz) of a reference folder", "fid": "FID(-k) of two folders / .npz",
            "is": "Inception Score of a folder", "shapes": "shapes-world colour and shape accuracy of a generator",
            "coco": "generate one image per caption, then FID-k, IS and CLIP score against reference statistics"}
    sp = {name: sub.add_parser(name, help=h, description=h, formatter_class=fmt) for name, h in cmds.items()}
    for name, q in sp.items():
        q.add_argument("--json", action="store_true", help="print one JSON line instead of one line per metric")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name in ("stats", "fid", "is", "coco"):
            q.add_argument("--inception", default=None, help=f"pytorch-fid's weight file (default: the cache, {CACHE})")
            q.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
            q.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
        if name in ("stats", "fid", "coco"):
            q.add_argument("--blur", type=int, nargs="+", default=[0] if name != "coco" else [0, 1, 2],
                           help="FID-k radii: PIL GaussianBlur(k) of both sets (0 = plain FID)")
        if name in ("is", "coco"):
            q.add_argument("--splits", type=int, default=10)
        if name in ("shapes", "coco"):
            q.add_argument("--clip", default="checkpoints/shapes/clip.pt")
            q.add_argument("--vqgan", default="checkpoints/shapes/vqgan.pt")
            q.add_argument("--gpt", default="checkpoints/shapes/gpt.pt")
            q.add_argument("--candidates", type=int, default=1, help="samples per prompt, the best by CLIP kept")
            q.add_argument("--top-k", type=int, default=None)
            q.add_argument("--top-p", type=float, default=None)
            q.add_argument("--temperature", type=float, default=1.0)
            q.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--gen-batch-size", type=int, default=32)
    sp["stats"].add_argument("folder")
    sp["stats"].add_argument("--out", required=True, help="the .npz to write (pytorch-fid compatible)")
    sp["fid"].add_argument("a", help="folder or .npz")
    sp["fid"].add_argument("b", help="folder or .npz")
    sp["is"].add_argument("folder")
    sp["shapes"].add_argument("--n", type=int, default=8, help="images per colour-shape prompt (48 prompts)")
    sp["shapes"].add_argument("--judge", default=None, help=f"shape judge cache (default {CACHE}/shape_judge.pt)")
    q = sp["coco"]
    q.add_argument("--captions", required=True, help=".txt, .csv/.tsv with a 'caption' column, or COCO captions json")
    q.add_argument("--ref-stats", required=True, help="reference .npz (evaluate.py stats --blur 0 1 2) or folder")
    q.add_argument("--count", type=int, default=30_000, help="captions used (a seeded random subset)")
    q.add_argument("--out", default="out/coco_eval", help="images/ and captions.txt go here (resumable)")
    q.add_argument("--chunk", type=int, default=256, help="captions per generation call")
    q.add_argument("--score-clip", default="ViT-B/32", help="the CLIP of the CLIP score (clip.load name or path)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, FileExistsError, KeyError) as e:  # bad input: one line that names the fix
        sys.exit(f"error: {e.args[0] if e.args else e}")
