"""
Stage 1 of CLIP-GEN: train the VQGAN image tokenizer with taming-transformers' loss (`VQLPIPSWithDiscriminator`).

    python train_vqgan.py                                  # the shapes preset: a small f4 model on a CPU in minutes
    python train_vqgan.py --preset imagenet                # the paper's f16-16384 at 256 px (one GPU)
    torchrun --nproc_per_node 8 train_vqgan.py --preset imagenet --lr 4.32e-4
    python train_vqgan.py --preset imagenet --data path/to/images --out out/mine --resume   # continue exactly

Loss per step: L1 + perceptual_weight * LPIPS(VGG16) + codebook/commitment + adaptive_weight * hinge-GAN (from
disc_start on); then one PatchGAN discriminator step. At every eval interval it writes <out>/ckpt.pt (resumable),
<out>/vqgan.pt (fp16 model only, what train_gpt.py and sample.py read) and <out>/rec_<step>.png (top: held-out
inputs, bottom: reconstructions).
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import vqgan

# Named runs (plain dicts; a flag given on the command line wins over its preset value).
PRESETS = {
    # taming's vqgan_imagenet_f16_16384: batch 12 per GPU, lr 4.5e-6 x total batch (the value here is for one GPU:
    # scale it with the GPU count), D from step 0 at weight 0.75, LPIPS weight 1. The maintainers advise a few epochs
    # without D first: raise --disc-start.
    "imagenet": dict(data="imagenet", model="f16-16384", batch_size=12, lr=5.4e-5, max_steps=1_000_000, disc_start=0,
                     perceptual_weight=1.0, log_interval=100, eval_interval=5000, eval_images=500, workers=None),
    # 32 px, f4 -> 8x8 tokens. No LPIPS: flat colours need no texture loss (and VGG16 is not available offline); no
    # GAN (disc_start past the end): L1 already gives sharp flat-colour edges, and D would cost a third more CPU.
    # lr 1e-3 at batch 16 (= taming's rule with base 6.25e-5; without l2-normalised codes, 2e-3 diverged).
    "shapes": dict(data="shapes", model="shapes", batch_size=16, lr=1e-3, max_steps=1500, disc_start=10**9,
                   perceptual_weight=0.0, log_interval=50, eval_interval=250, eval_images=512, workers=0),
    # tests: seconds, every code path (GAN from step 2, dead-code restarts)
    "tiny": dict(data="shapes", model="tiny", n_images=64, batch_size=4, lr=1e-3, max_steps=6, disc_start=2,
                 restart_every=2, perceptual_weight=0.0, log_interval=2, eval_interval=3, eval_images=8, workers=0),
}
OUTPUTS = ("vqgan.pt", "rec_*.png")  # what a run writes besides ckpt.pt (a new run deletes an earlier run's)
LPIPS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"  # taming's vgg_lpips (v0.1 lin layers)
LPIPS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"  # lpips==0.1.4's v0.1/vgg.pth
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1
VGG_SHA256_PREFIX = "397923af"  # torchvision publishes the first 8 hex digits, in the file name


def get_parser():
    p = data.ArgumentParser(prog=Path(__file__).name, description=__doc__.strip().split("\n")[0], presets=PRESETS,
                            real_preset="imagenet")
    data.add_run_flags(p, "vqgan")
    # data and model
    p.add_argument("--data", default="shapes", help="'shapes', 'imagenet' ($IMAGENET_DIR) or a folder of images")
    p.add_argument("--n-images", type=data.num(int, 1), help="train on the first N images only")
    p.add_argument("--workers", type=data.num(int, 0), help="data loader processes (default: data.py's choice)")
    p.add_argument("--model", default="shapes", choices=sorted(vqgan.PRESETS), help="vqgan.py size preset; its "
                   "resolution is the training resolution")
    p.add_argument("--init", help="start from these weights (ours, taming's .ckpt or HFAiLab's), e.g. to fine-tune")
    p.add_argument("--restart-every", type=data.num(int, 0), help="dead-code restart period (default: the model's)")
    # optimisation and loss
    p.add_argument("--max-steps", type=data.num(int, 1), default=1500, help="length of the run")
    p.add_argument("--batch-size", type=data.num(int, 1), default=16, help="per process")
    p.add_argument("--lr", type=data.num(float, 0, lo_open=True), default=1e-3, help="Adam (0.5, 0.9), both nets")
    p.add_argument("--perceptual-weight", type=data.num(float, 0), default=1.0, help="LPIPS weight; 0 = no LPIPS")
    p.add_argument("--lpips", help="LPIPS weights: a taming .ckpt (loss.perceptual_loss.*) or a folder holding "
                   f"{Path(VGG_URL).name} and vgg.pth (default: downloaded to {data.CACHE})")
    p.add_argument("--disc-start", type=data.num(int, 0), default=0, help="first step of the GAN loss and D training")
    p.add_argument("--disc-weight", type=data.num(float, 0), default=0.75, help="GAN loss weight, times taming's "
                   "adaptive weight")
    p.add_argument("--disc-layers", type=data.num(int, 1, 8), default=2, help="PatchGAN depth")
    # logging
    p.add_argument("--log-interval", type=data.num(int, 1), default=50, help="steps per log line")
    p.add_argument("--eval-interval", type=data.num(int, 0), default=250, help="held-out L1, grid and checkpoint "
                   "every N steps (0: at the end only)")
    p.add_argument("--eval-images", type=data.num(int, 1), default=512, help="held-out images per evaluation")
    return p


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
        """Weights from a taming .ckpt, or a folder holding torchvision's VGG16 file and LPIPS' vgg.pth; loaded
        strictly, so a file with a missing or extra tensor is refused in one line that names the keys."""
        source = Path(source)
        if not source.exists():
            raise data.UserError(f"--lpips {source}: no such file or folder — pass a taming .ckpt, or a folder holding "
                                 f"{Path(VGG_URL).name} and vgg.pth")
        if source.is_file():
            with data.loading(source, "LPIPS"):  # a taming .ckpt: read as vqgan.py reads it, without lightning
                sd = vqgan.read_checkpoint(source)
            sd = sd.get("state_dict", {}) if isinstance(sd, dict) else {}
            sd = {k[len("loss.perceptual_loss."):].replace("scaling_layer.", ""): v for k, v in sd.items()
                  if k.startswith("loss.perceptual_loss.")}
            with data.loading(source, "LPIPS"):
                self.load_state_dict(sd)
            return self
        vgg_path, lin_path = source / Path(VGG_URL).name, source / "vgg.pth"
        where = {i: k + 1 for k, (a, b) in enumerate(self.SLICES) for i in range(a, b)}  # feature index -> slice
        vgg = data.read_checkpoint(vgg_path, "VGG16")
        vgg = {f"slice{where.get(int(k.split('.')[1]), '?')}.{k.split('.', 1)[1]}": v for k, v in vgg.items()
               if k.startswith("features.")}  # classifier.* is not used by LPIPS; '?': not a layer of ours
        with data.loading(vgg_path, "VGG16"):
            self.net.load_state_dict(vgg)
        lin = data.read_checkpoint(lin_path, "LPIPS")
        with data.loading(lin_path, "LPIPS"):
            nn.ModuleDict({f"lin{k}": getattr(self, f"lin{k}") for k in range(5)}).load_state_dict(lin)
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


def get_lpips(source, device):
    """LPIPS with the published weights from `source`, else from the cache (downloaded and verified there)."""
    if source is None:
        source, vgg = data.CACHE, data.CACHE / Path(VGG_URL).name
        if not vgg.exists():
            data.download(VGG_URL, vgg)
        if not data.file_sha256(vgg).startswith(VGG_SHA256_PREFIX):
            raise data.UserError(f"{vgg} is not torchvision's VGG16 (its SHA256 does not start with "
                                 f"{VGG_SHA256_PREFIX}) — delete it and run again")
        if not (data.CACHE / "vgg.pth").exists():
            data.download(LPIPS_URL, data.CACHE / "vgg.pth", LPIPS_SHA256)
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


# -----------------------------------------------------------------------------

def batches(dataset, start, args, rank, world):
    """Training batches from step `start` on: a fixed permutation per epoch from (seed, epoch), split across ranks, so
    a resumed run sees exactly the batches it would have seen."""
    steps_per_epoch = len(dataset) // (args.batch_size * world)
    while True:
        epoch, skip = divmod(start, steps_per_epoch)
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        mine = perm[rank::world][skip * args.batch_size: steps_per_epoch * args.batch_size].tolist()
        yield from data.make_loader(dataset, args.batch_size, train=True, workers=args.workers, sampler=mine)
        start = (epoch + 1) * steps_per_epoch


@torch.no_grad()
def evaluate(model, dataset, batch_size, device):
    """Held-out L1 (on the [-1, 1] scale, taming's rec_loss) and codebook usage over the whole set; and the first 8
    inputs and reconstructions of the last batch."""
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


def save_grid(x, xrec, path):
    """Two rows of images in [-1, 1] (inputs over reconstructions) -> PNG."""
    grid = torch.cat([torch.cat(list(x), 2), torch.cat(list(xrec), 2)], 1)  # (3, 2H, n*W)
    img = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    data.save_atomic(Image.fromarray(np.ascontiguousarray(img)), path)


def main(args):
    # setup: device and DDP from torchrun's environment, threads
    rank, local_rank, world, device = data.setup_distributed(args.device)
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.lpips and not args.perceptual_weight:
        raise data.UserError("--lpips is unused with --perceptual-weight 0 (the shapes preset's) — pass "
                             "--perceptual-weight 1 too, or --preset imagenet")
    if args.init and args.resume:
        raise data.UserError("--init starts a new run from weights, --resume continues one — pass one of them")
    ckpt = data.start_run(out, args.resume, args.overwrite, OUTPUTS, "vqgan")
    amp, scaler = data.mixed_precision(device)

    # model: the run to continue, the weights to fine-tune, or a vqgan.py preset
    torch.manual_seed(args.seed + rank)  # a seed per rank, right before the weights are drawn
    if ckpt:
        model = vqgan.VQGAN(vqgan.Config(**ckpt["config"]))
    elif args.init:
        model = data.load_model(vqgan.VQGAN.from_checkpoint, args.init, "vqgan").train()
    else:
        model = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS[args.model]))
    if args.restart_every is not None:
        model.config.restart_every = args.restart_every  # the quantizer reads the same config object
    disc = Discriminator(args.disc_layers)

    # data: shapes, ImageNet or a folder, at the model's resolution (checked before LPIPS' downloads)
    res = model.config.resolution
    train_set = data.get_dataset(args.data, "train", res, train=True, n=args.n_images)
    val_set = data.get_dataset(args.data, "val", res, train=False, n=args.eval_images)
    steps_per_epoch = len(train_set) // (args.batch_size * world)
    if steps_per_epoch == 0:
        raise data.UserError(f"--batch-size {args.batch_size}: {len(train_set)} training images are less than one "
                             f"batch on each of {world} process(es) — lower --batch-size")
    lpips = get_lpips(args.lpips, device) if args.perceptual_weight > 0 else None

    # optimizers (taming: two Adams, betas (0.5, 0.9)) and the state of the run to continue
    model.to(device), disc.to(device)
    fused = dict(fused=True) if device.type == "cuda" else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), **fused)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), **fused)
    step = 0
    if ckpt:
        with data.loading(out / "ckpt.pt", "vqgan"):
            model.load_state_dict(ckpt["model"])
            disc.load_state_dict(ckpt["disc"])
        optimizer.load_state_dict(ckpt["optimizer"])
        disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        model.quantize.usage.copy_(ckpt["usage"])
        step = ckpt["step"]
        data.restore_rng(ckpt["rng"])
        if master:
            print(f"resumed {out / 'ckpt.pt'} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:  # D is never DDP-wrapped: see the D step
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    last_layer = raw_model.decoder.conv_out.weight  # the adaptive weight balances the two gradients here
    if master:
        c = raw_model.config
        print(f"VQGAN {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, {res} px -> "
              f"{c.grid}x{c.grid} tokens, codebook {c.n_embed} | {args.data}: {len(train_set)} images, batch "
              f"{args.batch_size}x{world}, lr {args.lr:.2e} | {device}")

    # training loop: one autoencoder step, then one discriminator step
    stop = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    bar = data.progress(total=stop, initial=step, disable=not master, leave=False)
    counts = torch.zeros(raw_model.config.n_embed, device=device)  # how often each code was picked in the interval
    sums, t0, t_step, skipped = {}, time.time(), step, 0
    log, evals = [], []
    it = batches(train_set, step, args, rank, world)
    while step < stop:
        batch = next(it)
        skipped += batch["skipped"]
        if "image" in batch:  # else every file of this batch was unreadable: the step passes without an update
            x = batch["image"].to(device, non_blocking=True)
            gan_on = step >= args.disc_start  # taming's adopt_weight: 0 before disc_start (D is not trained either)

            # autoencoder: nll = L1 + w * LPIPS; + adaptive_weight * -D(xrec); + codebook/commitment
            with amp:
                xrec, qloss, idx = model(x)
            xrec = xrec.float()
            rec = (x - xrec).abs().mean()
            p = lpips(x, xrec).mean() if lpips is not None else torch.zeros((), device=device)
            nll = rec + args.perceptual_weight * p
            if gan_on:
                disc.requires_grad_(False)  # taming's toggle_optimizer: the AE loss leaves D's grads alone
                with amp:
                    g_loss = -disc(xrec).float().mean()
                g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
                d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach() * args.disc_weight
            else:
                g_loss = d_weight = torch.zeros((), device=device)
            loss = nll + d_weight * g_loss + qloss
            if not torch.isfinite(loss):
                raise data.diverged(step, out)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)

            # discriminator (hinge), on this step's reconstructions (taming re-runs the updated AE; we reuse xrec)
            d_loss = torch.zeros((), device=device)
            if gan_on:
                disc.requires_grad_(True)
                with amp:  # two calls, as taming: BatchNorm (train mode) sees real and fake batches separately
                    logits_real, logits_fake = disc(x).float(), disc(xrec.detach()).float()
                d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
                disc_optimizer.zero_grad(set_to_none=True)
                scaler.scale(d_loss).backward()
                if world > 1:  # averaged by hand: DDP cannot take two forwards before one backward
                    for q in disc.parameters():
                        dist.all_reduce(q.grad, op=dist.ReduceOp.AVG)
                scaler.step(disc_optimizer)
            scaler.update()
            for k, v in dict(loss=loss, rec=rec, p=p, q=qloss, g=g_loss, d=d_loss, dw=d_weight).items():
                sums[k] = sums.get(k, 0.0) + v.item()
            counts += torch.bincount(idx.flatten(), minlength=len(counts))
        step += 1
        bar.update()
        if raw_model.config.restart_every and step % raw_model.config.restart_every == 0:
            raw_model.quantize.restart_dead_codes()
            if world > 1:  # every rank restarted from its own batch: rank 0's codebook wins
                dist.broadcast(raw_model.quantize.embedding.weight.data, 0)
                dist.broadcast(raw_model.quantize.usage, 0)
        if step % steps_per_epoch == 0 and skipped:
            print(f"rank {rank}: epoch {step // steps_per_epoch - 1}: skipped {skipped} unreadable images", flush=True)
            skipped = 0

        # log: means over the interval and the usage of the codes picked in it (this rank's)
        if step % args.log_interval == 0 or step == stop:
            n, dt = max(1, step - t_step), time.time() - t0
            use = vqgan.usage_from_counts(counts)
            log.append((step, {k: v / n for k, v in sums.items()}))
            if master:
                bar.write(" | ".join([f"step {step}", *(f"{k} {v / n:.4f}" for k, v in sums.items()),
                                      f"usage {use['usage']:.2f}", f"ppl {use['perplexity']:.0f}",
                                      f"{dt / n * 1000:.0f} ms", f"{n * args.batch_size * world / dt:.1f} img/s"]))
            sums, t0, t_step = {}, time.time(), step
            counts.zero_()

        # evaluate, reconstruction grid and checkpoint, all of the same step
        if args.eval_interval and step % args.eval_interval == 0 or step == stop:
            t_eval = time.time()
            if master:
                ev, xs, xr = evaluate(raw_model, val_set, 64, device)
                evals.append((step, ev))
                save_grid(xs, xr, out / f"rec_{step:07d}.png")
                bar.write(f"eval step {step} | held-out L1 {ev['l1']:.4f} | usage {ev['usage']:.3f} "
                          f"({round(ev['usage'] * raw_model.config.n_embed)}/{raw_model.config.n_embed}) | "
                          f"perplexity {ev['perplexity']:.1f} | {len(val_set)} images")
            data.save_checkpoint(out, raw_model, step, "vqgan.pt", optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), args=vars(args), disc=disc.state_dict(),
                                 disc_optimizer=disc_optimizer.state_dict(), usage=raw_model.quantize.usage)
            t0 += time.time() - t_eval  # evaluations and checkpoints do not count in the step time
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return {"model": raw_model, "log": log, "evals": evals}


if __name__ == "__main__":
    data.cli(main, get_parser())
