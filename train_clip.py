"""
Train a small CLIP on the shapes world: it stands in for OpenAI's CLIP where there is no network (see DESIGN.md).

    python train_clip.py                       # the shapes preset: ~5 min on 2 CPU cores
    python train_clip.py --preset tiny         # a smoke test in seconds

Contrastive training exactly as CLIP (Radford et al. 2021, sec. 2.5, Fig. 3): a batch of B images and their
captions, both towers, L2-normalised embeddings, logits = exp(logit_scale) * cosine (learnable temperature),
symmetric cross-entropy. Shapes captions repeat (a few hundred distinct ones), so every caption equal to an
image's own is a positive too (multi-positive targets), not a false negative.
The image tower is clip.py's ModifiedResNet at a tiny width: a ViT of this size does not learn shape in minutes,
a conv tower does (docs/training.md). Text goes through the real BPE tokenizer and the causal transformer.
At every eval interval it reports zero-shot accuracy on held-out images (another world seed): colour and shape
against the 48 short prompts "a red circle", and the full caption among all 672 "a {size} {colour} {shape} on a {bg}
background"; and writes <out>/ckpt.pt (resumable) and <out>/clip.pt (fp16 model only, OpenAI's key names:
clip.load(path) reads it).
"""
import functools
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import clip
import data

# Model sizes (clip.Config fields). The ResNet tower's pooled feature is 32 x vision_width wide.
MODELS = {
    "shapes": dict(embed_dim=128, image_resolution=32, vision_layers=[1, 1, 1, 1], vision_width=16,
                   vision_patch_size=0, transformer_width=64, transformer_layers=3),
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=[1, 1, 1, 1], vision_width=8, vision_patch_size=0,
                 transformer_width=32, transformer_layers=1),
}
# Named runs (plain dicts; a flag given on the command line wins over its preset value).
PRESETS = {
    # ~5 min on a quiet CPU (0.56 s of CPU time per step on one thread); 32 px input (rendered at 64, resized by
    # preprocess_tensor)
    "shapes": dict(model="shapes", batch_size=256, lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup=30, max_steps=500,
                   eval_interval=100, eval_images=1000, log_interval=20),
    # tests: seconds
    "tiny": dict(model="tiny", batch_size=32, lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup=2, max_steps=20,
                 eval_interval=0, eval_images=96, log_interval=5),
}
OUTPUTS = ("clip.pt",)  # what a run writes besides ckpt.pt (a new run deletes an earlier run's)


def get_parser():
    p = data.ArgumentParser(prog=Path(__file__).name, description=__doc__.strip().split("\n")[0], presets=PRESETS)
    data.add_run_flags(p, "clip")
    # model
    p.add_argument("--model", default="shapes", choices=sorted(MODELS), help="size, from MODELS")
    # optimisation
    p.add_argument("--max-steps", type=data.num(int, 1), default=500, help="length of the run")
    p.add_argument("--batch-size", type=data.num(int, 2), default=256, help="per process")
    p.add_argument("--lr", type=data.num(float, 0, lo_open=True), default=2e-3, help="peak, after warm-up")
    p.add_argument("--min-lr", type=data.num(float, 0), default=2e-4, help="end of the cosine decay")
    p.add_argument("--warmup", type=data.num(int, 0), default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=data.num(float, 0), default=0.1, help="AdamW (0.9, 0.98), eps 1e-6 (CLIP)")
    # logging
    p.add_argument("--log-interval", type=data.num(int, 1), default=20, help="steps per log line")
    p.add_argument("--eval-interval", type=data.num(int, 0), default=100, help="zero-shot accuracy and checkpoint "
                   "every N steps (0: at the end only)")
    p.add_argument("--eval-images", type=data.num(int, 1), default=1000, help="held-out images for zero-shot accuracy")
    return p


def get_lr(step, args):
    """Linear warm-up, then cosine decay to min_lr (nanoGPT)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    ratio = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


@functools.lru_cache(maxsize=None)
def tokenize(text, context_length):  # a few hundred distinct captions: each is tokenized once
    return clip.tokenize(text, context_length)[0]


def get_batch(dataset, gen, batch_size, context_length, caption_ids):
    """batch_size random shapes items (drawn with `gen`) -> images (B, 3, 64, 64) in [-1, 1], tokens (B, 77) and
    caption ids (B,), equal for equal captions (caption_ids grows as new captions appear)."""
    items = [dataset[i] for i in torch.randint(len(dataset), (batch_size,), generator=gen).tolist()]
    tokens = torch.stack([tokenize(it["caption"], context_length) for it in items])
    ids = torch.tensor([caption_ids.setdefault(it["caption"], len(caption_ids)) for it in items])
    return torch.stack([it["image"] for it in items]), tokens, ids


def contrastive_loss(model, images, tokens, ids, resolution):
    """Symmetric InfoNCE; targets spread evenly over all captions equal to the image's own."""
    logits_per_image, logits_per_text = model(clip.preprocess_tensor(images, resolution), tokens)
    same = (ids[:, None] == ids[None, :]).float()                            # (B, B), symmetric, diagonal 1
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


@torch.no_grad()
def zero_shot(model, images, items, batch_size=250):
    """Held-out images (N, 3, H, W) in [-1, 1] -> accuracy of colour, shape (48 short prompts) and caption (672)."""
    model.eval()
    dev = model.text_projection.device
    n_c, n_s = len(data.COLORS), len(data.SHAPES)
    short = [data.prompt(c, s) for c in range(n_c) for s in range(n_s)]
    full = [(z, c, s, b) for z in range(len(data.SIZES)) for c in range(n_c) for s in range(n_s)
            for b in range(n_c) if b != c]
    full_text = [data.caption(dict(size=z, color=c, shape=s, bg=b, drop_size=False, drop_bg=False))
                 for z, c, s, b in full]
    t_short, t_full = (F.normalize(model.encode_text(clip.tokenize(t, model.context_length).to(dev)).float(), dim=-1)
                       for t in (short, full_text))
    img = torch.cat([F.normalize(model.encode_image(clip.preprocess_tensor(images[i:i + batch_size].to(dev),
                     model.visual.input_resolution)).float(), dim=-1) for i in range(0, len(images), batch_size)])
    pred = (img @ t_short.t()).argmax(dim=1).cpu()                           # (N,) index c * n_s + s
    pred_full = torch.tensor(full)[(img @ t_full.t()).argmax(dim=1).cpu()]   # (N, 4) size, colour, shape, bg
    truth = torch.tensor([[a["size"], a["color"], a["shape"], a["bg"]] for a in items])
    model.train()
    return {"colour": (pred // n_s == truth[:, 1]).float().mean().item(),
            "shape": (pred % n_s == truth[:, 2]).float().mean().item(),
            "caption": (pred_full == truth).all(dim=1).float().mean().item()}


def main(args):
    # setup: device and DDP from torchrun's environment, threads
    rank, local_rank, world, device = data.setup_distributed(args.device)
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = data.start_run(out, args.resume, args.overwrite, OUTPUTS, "clip")
    amp, scaler = data.mixed_precision(device)

    # data: the shapes world, images rendered at 64 px with their captions; held-out images from another world seed
    train_set = data.get_dataset("shapes", split="train", resolution=64, train=True, n=1_000_000)
    val_set = data.get_dataset("shapes", split="val", resolution=64, train=False, n=args.eval_images)
    val_items = [val_set[i] for i in range(len(val_set))]
    val_images = torch.stack([it["image"] for it in val_items])

    # model: the run to continue, or a size from MODELS
    torch.manual_seed(args.seed + rank)  # a seed per rank, right before the weights are drawn
    config = clip.Config(**(ckpt["config"] if ckpt else MODELS[args.model]))
    model = clip.CLIP(config).to(device)
    # weight decay on matrices and convs only; not on norms, biases, embeddings or the temperature
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6, fused=device.type == "cuda")
    step = 0
    if ckpt:
        with data.loading(out / "ckpt.pt", "clip"):
            model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        data.restore_rng(ckpt["rng"])
        if master:
            print(f"resumed {out / 'ckpt.pt'} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if master:
        print(f"CLIP: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params (image tower "
              f"{sum(p.numel() for p in raw_model.visual.parameters()) / 1e6:.2f}M), {config} | batch "
              f"{args.batch_size}x{world} | {device}")

    # training loop
    stop = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    bar = data.progress(total=stop, initial=step, disable=not master, leave=False)
    caption_ids, log, evals = {}, [], []
    sums, t0, t_step = {"loss": 0.0}, time.time(), step
    while step < stop:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the batch of a step comes from (seed, rank, step): a resumed run sees exactly the same data
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + step)
        images, tokens, ids = get_batch(train_set, gen, args.batch_size, config.context_length, caption_ids)
        with amp:
            loss = contrastive_loss(model, images.to(device), tokens.to(device), ids.to(device),
                                    config.image_resolution)
        if not torch.isfinite(loss):
            raise data.diverged(step, out)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature never goes below 0.01
        step += 1
        bar.update()
        sums["loss"] += loss.item()

        # log: means over the interval (this rank's)
        if step % args.log_interval == 0 or step == stop:
            n, dt = step - t_step, time.time() - t0
            mean = {k: v / n for k, v in sums.items()}
            log.append((step, mean))
            if master:
                bar.write(f"step {step} | loss {mean['loss']:.4f} | scale {raw_model.logit_scale.exp().item():.1f} | "
                          f"lr {lr:.2e} | {dt / n * 1000:.0f} ms | {n * args.batch_size * world / dt:.0f} img/s")
            sums, t0, t_step = {"loss": 0.0}, time.time(), step

        # evaluate and checkpoint, of the same step
        if args.eval_interval and step % args.eval_interval == 0 or step == stop:
            t_eval = time.time()
            if master:
                acc = zero_shot(raw_model, val_images, val_items)
                evals.append((step, acc))
                bar.write(f"eval step {step} | zero-shot on {len(val_items)} held-out images: colour "
                          f"{acc['colour']:.3f} | shape {acc['shape']:.3f} | caption {acc['caption']:.3f}")
            data.save_checkpoint(out, raw_model, step, "clip.pt", optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), args=vars(args))
            t0 += time.time() - t_eval  # evaluations and checkpoints do not count in the step time
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return {"model": raw_model, "log": log, "evals": evals}


if __name__ == "__main__":
    data.cli(main, get_parser())
