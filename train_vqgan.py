"""
Stage 1 of CLIP-GEN: train the VQGAN tokenizer (taming-transformers' recipe, `VQLPIPSWithDiscriminator`).

    python train_vqgan.py --data imagenet                  # the paper's f16-16384 at 256 px (one GPU)
    torchrun --nproc_per_node 8 train_vqgan.py --data imagenet
    python train_vqgan.py --data shapes                    # small f8 model on a CPU in minutes
    python train_vqgan.py --data path/to/images --resume   # any folder; continues out/<name>/ckpt.pt exactly

Loss per step: L1 + perceptual_weight * LPIPS(VGG16) + codebook/commitment + adaptive_weight * hinge-GAN (after
disc_start); then one PatchGAN discriminator step. Writes <out>/ckpt.pt (resumable), <out>/vqgan.pt (the model only,
what sample.py / train_gpt.py read) and <out>/rec_<step>.png (top: inputs, bottom: reconstructions).
"""
import argparse
import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import vqgan

PRESETS = {
    # taming's vqgan_imagenet_f16_16384 run: batch 12/GPU, lr = 4.5e-6 * total batch, Adam (0.5, 0.9), D with 2 layers
    # from step 0 at weight 0.75, LPIPS weight 1. Maintainers advise a few epochs without D first: raise --disc-start.
    "imagenet": dict(model="f16-16384", resolution=256, batch_size=12, base_lr=4.5e-6, max_steps=1_000_000,
                     disc_start=0, disc_weight=0.75, disc_layers=2, perceptual_weight=1.0, log_interval=100,
                     eval_interval=5000, eval_images=500, workers=None),
    # shapes world: 32 px, f4 -> 8x8 tokens. Perceptual weight 0: the VGG16 weights are not available offline, and flat
    # colours need no texture loss. GAN off (disc_start past the end): L1 already gives sharp flat-colour edges, and D
    # would cost a third more CPU. Usage is kept up by the preset's l2-normalised 16-d codes and dead-code restarts.
    # lr 1e-3 at batch 16 (without normalisation, 2e-3 diverged).
    "shapes": dict(model="shapes", resolution=32, batch_size=16, base_lr=6.25e-5, max_steps=1500, disc_start=10**9,
                   disc_weight=0.75, disc_layers=2, perceptual_weight=0.0, log_interval=50, eval_interval=250,
                   eval_images=512, workers=0),
}
LPIPS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"  # taming's vgg_lpips (v0.1 lin layers)
LPIPS_MD5 = "d507d7349b931f0638a25a48a722f98a"  # = lpips==0.1.4's lpips/weights/v0.1/vgg.pth
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"           # torchvision IMAGENET1K_V1; sha256 prefix
CACHE = Path(os.environ.get("CLIPGEN_CACHE", Path.home() / ".cache" / "clipgen"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes", help="'shapes', 'imagenet' or an image folder")
    p.add_argument("--preset", default=None, help="training preset (imagenet | shapes); default: shapes for shapes, "
                                                  "else imagenet")
    p.add_argument("--model", default=None, help=f"vqgan.py preset {list(vqgan.PRESETS)} (default from the preset)")
    p.add_argument("--init", default=None, help="start from these weights (ours or a taming .ckpt), e.g. to fine-tune")
    p.add_argument("--out", default=None, help="output folder (default out/vqgan_<data name>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/ckpt.pt exactly")
    for name, typ in [("resolution", int), ("batch_size", int), ("base_lr", float), ("max_steps", int),
                      ("disc_start", int), ("disc_weight", float), ("disc_layers", int), ("perceptual_weight", float),
                      ("log_interval", int), ("eval_interval", int), ("eval_images", int), ("workers", int)]:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help="default from the preset")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; default base_lr * total batch (taming)")
    p.add_argument("--codebook-weight", type=float, default=1.0)
    p.add_argument("--restart-every", type=int, default=None, help="dead-code restart period (default: the model's)")
    p.add_argument("--lpips", default=None, help="LPIPS weights: a taming .ckpt (has loss.perceptual_loss.*) or a "
                                                 f"folder with vgg16-397923af.pth and vgg.pth (default {CACHE})")
    p.add_argument("--n-train", type=int, default=None, help="use only this many training images")
    p.add_argument("--ckpt-interval", type=int, default=None, help="default: eval interval")
    p.add_argument("--amp", choices=["auto", "off"], default="auto", help="bf16 (or fp16+scaler) autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stop-after", type=int, default=None, help="stop (as if killed) after this step; for tests")
    p.add_argument("--no-bar", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("shapes" if args.data == "shapes" else "imagenet")]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = Path(args.out or f"out/vqgan_{Path(args.data).name}")
    return args


# -----------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, v0.1 "vgg"), as taming's copy: key names equal its loss.perceptual_loss.* entries

class LPIPS(nn.Module):
    SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # VGG16 features -> relu1_2 .. relu5_3

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))  # ImageNet mean in [-1,1]
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        layers, c = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:  # torchvision
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v if v != "M" else c
        self.net = nn.Module()
        for k, (a, b) in enumerate(self.SLICES):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), layers[i])  # keep torchvision's global index: net.slice3.10.weight
            setattr(self.net, f"slice{k + 1}", s)
        for k, c in enumerate([64, 128, 256, 512, 512]):  # Dropout + 1x1 conv without bias -> key lin{k}.model.1
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False)

    def load(self, source):
        """Weights from a taming .ckpt or a folder holding torchvision's VGG16 file and LPIPS' vgg.pth."""
        source = Path(source)
        if source.is_file():
            sd = vqgan._load_without_lightning(source)["state_dict"]
            sd = {k[len("loss.perceptual_loss."):]: v for k, v in sd.items() if k.startswith("loss.perceptual_loss.")}
            sd = {k.replace("scaling_layer.", ""): v for k, v in sd.items()}
        else:
            vgg = torch.load(source / Path(VGG_URL).name, map_location="cpu", weights_only=True)
            lin = torch.load(source / "vgg.pth", map_location="cpu", weights_only=True)
            where = {i: k + 1 for k, (a, b) in enumerate(self.SLICES) for i in range(a, b)}
            sd = {f"net.slice{where[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in vgg.items()
                  if k.startswith("features.")}  # classifier.* is not used by LPIPS
            sd |= lin | {"shift": self.shift, "scale": self.scale}
        vqgan.load_strict(self, sd, source)
        return self

    def forward(self, x, y):
        """x, y (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        out = 0
        for k in range(5):
            h = getattr(self.net, f"slice{k + 1}")(h)
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise over channels
            fx, fy = f.chunk(2)
            out = out + getattr(self, f"lin{k}").model((fx - fy) ** 2).mean((2, 3))
        return out.flatten()


def _check(path, algo, want):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(want):
        raise SystemExit(f"{path}: {algo} {h.hexdigest()} does not match the published {want}; delete it and rerun")


def get_lpips(source, device):
    """LPIPS with published weights from `source`, else the cache (downloading + verifying there when possible)."""
    if source is None:
        vgg, lin = CACHE / Path(VGG_URL).name, CACHE / "vgg.pth"
        if not (vgg.exists() and lin.exists()):
            try:
                import clip  # our clip.py: download(url, root, sha256=None) -> path, atomic
                if not vgg.exists():
                    clip.download(VGG_URL, str(CACHE))
                if not lin.exists():
                    os.replace(clip.download(LPIPS_URL, str(CACHE)), lin)
            except Exception as e:
                raise SystemExit(
                    f"LPIPS needs VGG16 + LPIPS weights in {CACHE} (vgg16-397923af.pth from {VGG_URL}; vgg.pth from "
                    f"`pip download --no-deps lpips==0.1.4`, file lpips/weights/v0.1/vgg.pth) or --lpips a taming "
                    f".ckpt; "
                    f"download failed ({type(e).__name__}: {e}). Or train without it: --perceptual-weight 0") from None
        _check(vgg, "sha256", "397923af")
        _check(lin, "md5", LPIPS_MD5)
        source = CACHE
    return LPIPS().load(source).to(device).eval()


# -----------------------------------------------------------------------------
# PatchGAN discriminator (pix2pix NLayerDiscriminator as in taming; keys main.N like its loss.discriminator.*)

class Discriminator(nn.Module):
    def __init__(self, n_layers=3, ndf=64):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf
        for n in range(1, n_layers + 1):
            cout = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, cout, 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(0.2)]
            c = cout
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 1, h', w') patch logits


def save_grid(x, xrec, path):
    """Two rows of images in [-1, 1] (inputs over reconstructions) -> PNG, with PIL."""
    grid = torch.cat([torch.cat(list(x), 2), torch.cat(list(xrec), 2)], 1)  # (3, 2H, n*W)
    img = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(img)).save(path)


@torch.no_grad()
def evaluate(model, dataset, batch_size, device):
    """Held-out L1 (on the [-1, 1] scale, taming's rec_loss) and codebook usage over the whole set."""
    model.eval()
    l1, n, idx = 0.0, 0, []
    for batch in data.make_loader(dataset, batch_size, train=False, workers=0):
        if "image" not in batch:
            continue
        x = batch["image"].to(device)
        xrec, _, i = model(x)
        l1 += (xrec.clamp(-1, 1) - x).abs().mean((1, 2, 3)).sum().item()
        n, idx = n + len(x), idx + [i.cpu()]
    model.train()
    return {"l1": l1 / n, **vqgan.codebook_usage(torch.cat(idx), model.config.n_embed)}, x[:8], xrec[:8]


def main(args):
    rank, local_rank, world, device = data.setup_distributed()
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    use_amp = device.type == "cuda" and args.amp == "auto"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()  # CPU runs fp32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    # data: a fixed permutation per epoch from (seed, epoch), split across ranks, so a resume can skip exactly
    train_set = data.get_dataset(args.data, "train", args.resolution, train=True, n=args.n_train)
    val_set = data.get_dataset(args.data, "val", args.resolution, train=False, n=args.eval_images)
    steps_per_epoch = len(train_set) // (args.batch_size * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images < one batch of {args.batch_size} x {world} ranks")

    # models and optimizers (taming: two Adams, betas (0.5, 0.9), lr = base_lr * total batch)
    if args.init:
        model = vqgan.VQGAN.from_checkpoint(args.init, verbose=master).train()
    else:
        model = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS[args.model]))
    if args.restart_every is not None:
        model.config.restart_every = args.restart_every
    model.to(device)
    disc = Discriminator(args.disc_layers).to(device)
    lpips = get_lpips(args.lpips, device) if args.perceptual_weight > 0 else None
    lr = args.lr or args.base_lr * args.batch_size * world
    fused = dict(fused=True) if device.type == "cuda" else {}
    opt_ae = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9), **fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9), **fused)
    step, ckpt_path = 0, args.out / "ckpt.pt"
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start fresh")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        vqgan.load_strict(model, ck["model"], ckpt_path)
        disc.load_state_dict(ck["disc"])
        opt_ae.load_state_dict(ck["opt_ae"])
        opt_d.load_state_dict(ck["opt_d"])
        scaler.load_state_dict(ck["scaler"])
        model.quantize.usage.copy_(ck["usage"])
        data.set_rng_state(ck["rng"][min(rank, len(ck["rng"]) - 1)])
        step = ck["step"]
        if master:
            print(f"resumed {ckpt_path} at step {step}")
    raw_model, raw_disc = model, disc  # (D is never DDP-wrapped; see the D step)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    last_layer = raw_model.decoder.conv_out.weight  # the adaptive weight balances gradients here
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"vqgan {args.model}: {n_params / 1e6:.2f}M params, {raw_model.config.grid}x{raw_model.config.grid} "
              f"tokens, codebook {raw_model.config.n_embed} | {len(train_set)} images, "
              f"batch {args.batch_size}x{world}, "
              f"lr {lr:.2e} | {device}{' ' + str(amp_dtype) if use_amp else ''}")

    def checkpoint(path):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, data.rng_state())
        else:
            rngs = [data.rng_state()]
        if master:
            data.save_atomic({"model": raw_model.state_dict(), "config": raw_model.checkpoint()["config"], "step": step,
                              "disc": raw_disc.state_dict(), "opt_ae": opt_ae.state_dict(), "opt_d": opt_d.state_dict(),
                              "scaler": scaler.state_dict(), "usage": raw_model.quantize.usage, "rng": rngs,
                              "args": {k: str(v) for k, v in vars(args).items()}}, path)
            data.save_atomic(raw_model.checkpoint(step, half=True), args.out / "vqgan.pt")  # for inference (fp16)

    def batches(start):
        while True:
            epoch, skip = divmod(start, steps_per_epoch)
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            mine = perm[rank::world][skip * args.batch_size: steps_per_epoch * args.batch_size].tolist()
            yield from data.make_loader(train_set, args.batch_size, train=True, workers=args.workers, sampler=mine)
            start = (epoch + 1) * steps_per_epoch

    ckpt_interval = args.ckpt_interval or args.eval_interval
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    bar = tqdm(total=args.max_steps, initial=step, disable=not master or args.no_bar, dynamic_ncols=True, leave=False)
    acc, counts, t0, seen, skipped = {}, torch.zeros(raw_model.config.n_embed, device=device), time.time(), 0, 0
    it = batches(step)
    while step < stop:
        batch = next(it)
        skipped += batch["skipped"]
        if "image" not in batch:  # every file of this batch was unreadable
            step += 1
            continue
        x = batch["image"].to(device, non_blocking=True)
        gan_on = step >= args.disc_start  # taming's adopt_weight: 0 before disc_start (D is not trained either)

        # autoencoder step: nll = L1 + w * LPIPS; + adaptive_weight * -D(xrec); + codebook/commitment
        with ctx:
            xrec, qloss, idx = model(x)
        xrec = xrec.float()
        rec = (x - xrec).abs().mean()
        p = lpips(x, xrec).mean() if lpips is not None else torch.zeros((), device=device)
        nll = rec + args.perceptual_weight * p
        if gan_on:
            raw_disc.requires_grad_(False)  # taming's toggle_optimizer: the AE loss leaves D's grads alone
            with ctx:
                g_loss = -raw_disc(xrec).float().mean()
            g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach() * args.disc_weight
        else:
            g_loss = d_weight = torch.zeros((), device=device)
        loss = nll + d_weight * g_loss + args.codebook_weight * qloss
        finite = torch.isfinite(loss.detach()).float()
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            checkpoint(args.out / f"nan_step{step}.pt")
            raise SystemExit(f"non-finite loss at step {step} (rec {rec.item():.4g}, q {qloss.item():.4g}, g "
                             f"{g_loss.item():.4g}); state saved to {args.out / f'nan_step{step}.pt'}")
        opt_ae.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_ae)

        # discriminator step (hinge), on this step's reconstructions (taming re-runs the updated AE; we reuse xrec)
        if gan_on:
            raw_disc.requires_grad_(True)
            with ctx:  # two calls, as taming: BatchNorm (train mode) sees real and fake batches separately
                logits_real, logits_fake = raw_disc(x).float(), raw_disc(xrec.detach()).float()
            d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            if world > 1:  # averaged by hand: DDP cannot take two forwards before one backward
                for q in raw_disc.parameters():
                    dist.all_reduce(q.grad, op=dist.ReduceOp.AVG)
            scaler.step(opt_d)
        else:
            d_loss = torch.zeros((), device=device)
        scaler.update()
        step += 1
        if raw_model.config.restart_every and step % raw_model.config.restart_every == 0:
            raw_model.quantize.restart_dead_codes()
            if world > 1:  # every rank restarted from its own batch: rank 0's codebook wins
                dist.broadcast(raw_model.quantize.embedding.weight.data, 0)
                dist.broadcast(raw_model.quantize.usage, 0)

        # bookkeeping
        for k, v in dict(loss=loss, rec=rec, p=p, q=qloss, g=g_loss, d=d_loss, dw=d_weight).items():
            acc[k] = acc.get(k, 0.0) + v.item()
        counts += torch.bincount(idx.flatten(), minlength=len(counts))
        seen += len(x) * world
        bar.update(1)
        if step % steps_per_epoch == 0 and skipped:
            print(f"rank {rank}: epoch {step // steps_per_epoch - 1}: skipped {skipped} unreadable images", flush=True)
            skipped = 0
        if step % args.log_interval == 0 or step == stop:
            n, dt = step % args.log_interval or args.log_interval, time.time() - t0
            use = vqgan.usage_from_counts(counts)  # over this interval's batches (this rank's)
            if master:
                line = (f"step {step} | loss {acc['loss'] / n:.4f} | rec {acc['rec'] / n:.4f} | p {acc['p'] / n:.4f} | "
                        f"q {acc['q'] / n:.4f} | g {acc['g'] / n:.3f} | d {acc['d'] / n:.3f} | "
                        f"dw {acc['dw'] / n:.3g} | "
                        f"usage {use['usage']:.2f} | ppl {use['perplexity']:.0f} | {dt / n * 1000:.0f} ms | "
                        f"{seen / dt:.1f} img/s")
                tqdm.write(line) if not args.no_bar else print(line, flush=True)
            acc, counts, t0, seen = {}, counts.zero_(), time.time(), 0
        if step % args.eval_interval == 0 or step == args.max_steps:
            if master:
                ev, xs, xr = evaluate(raw_model, val_set, 64, device)
                save_grid(xs, xr, args.out / f"rec_{step:07d}.png")
                print(f"eval step {step} | held-out L1 {ev['l1']:.4f} | usage {ev['usage']:.3f} "
                      f"({round(ev['usage'] * raw_model.config.n_embed)}/{raw_model.config.n_embed}) | "
                      f"perplexity {ev['perplexity']:.1f} | {len(val_set)} images", flush=True)
        if step % ckpt_interval == 0 or step == stop:
            checkpoint(ckpt_path)
    bar.close()
    if world > 1:
        dist.barrier()
    return raw_model


if __name__ == "__main__":
    main(get_args())
    if dist.is_initialized():
        dist.destroy_process_group()
