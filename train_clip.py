"""
Train a small CLIP on the shapes world: it stands in for OpenAI's CLIP where there is no network (see DESIGN.md).

    python train_clip.py --preset shapes --export checkpoints/shapes/clip.pt    # ~5 min on 2 CPU cores
    python train_clip.py --preset tiny                                          # a smoke test in seconds

Contrastive training exactly as CLIP (Radford et al. 2021, sec. 2.5, Fig. 3): a batch of B images and their
captions, both towers, L2-normalised embeddings, logits = exp(logit_scale) * cosine (learnable temperature),
symmetric cross-entropy. Shapes captions repeat (a few hundred distinct ones), so every caption equal to an
image's own is a positive too (multi-positive targets), not a false negative.
The image tower is clip.py's ModifiedResNet at a tiny width: a ViT of this size does not learn shape in minutes,
a conv tower does (reference/shapes_world.md). Text goes through the real BPE tokenizer and the causal
transformer. The checkpoint {"model", "config", "step"} uses OpenAI's key names: clip.load(path) loads it.
Reports zero-shot accuracy on held-out images (another world seed): colour and shape against the 48 short
prompts "a red circle", and the full caption among all 672 "a {size} {colour} {shape} on a {bg} background".
"""
import argparse
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import clip
import data

PRESETS = {
    # ~5 min on a quiet CPU (0.56 s of CPU time per step on one thread); 32 px input (rendered at 64, resized by
    # preprocess_tensor). Measured: zero-shot colour 1.00, shape 0.98, caption 0.96 after 500 steps
    "shapes": dict(resolution=32, vision_layers=[1, 1, 1, 1], vision_width=16, embed_dim=128, text_width=64,
                   text_layers=3, batch_size=256, lr=2e-3, weight_decay=0.1, warmup=30, max_steps=500,
                   eval_interval=100, eval_n=1000, log_interval=20),
    # tests: seconds
    "tiny": dict(resolution=32, vision_layers=[1, 1, 1, 1], vision_width=8, embed_dim=32, text_width=32,
                 text_layers=1, batch_size=32, lr=2e-3, weight_decay=0.1, warmup=2, max_steps=20,
                 eval_interval=0, eval_n=96, log_interval=5),
}


def get_lr(step, args):
    # linear warm-up, then cosine decay to a tenth
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def get_batch(dataset, step, args, token_of, caption_id):
    """Batch `step` is a function of (seed, step) only, so a resumed run sees exactly the same data."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    items = [dataset[i] for i in torch.randint(len(dataset), (args.batch_size,), generator=g).tolist()]
    images = torch.stack([it["image"] for it in items])                       # (B, 3, 64, 64) in [-1, 1]
    tokens = torch.stack([token_of(it["caption"]) for it in items])          # (B, 77)
    ids = torch.tensor([caption_id.setdefault(it["caption"], len(caption_id)) for it in items])
    return images, tokens, ids


def contrastive_loss(model, images, tokens, ids):
    """Symmetric InfoNCE; targets spread evenly over all captions equal to the image's own."""
    logits_per_image, logits_per_text = model(clip.preprocess_tensor(images, model.visual.input_resolution), tokens)
    same = (ids[:, None] == ids[None, :]).float()                            # (B, B), symmetric, diagonal 1
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


@torch.no_grad()
def zero_shot(model, images, attrs, batch_size=250):
    """Held-out images (N, 3, H, W) in [-1, 1] -> accuracy of colour, shape (48 short prompts) and caption (672)."""
    model.eval()
    dev = model.text_projection.device
    n_c, n_s = len(data.COLORS), len(data.SHAPES)
    short = [data.prompt(c, s) for c in range(n_c) for s in range(n_s)]
    full = [(z, c, s, b) for z in range(len(data.SIZES)) for c in range(n_c) for s in range(n_s)
            for b in range(n_c) if b != c]
    full_text = [data.caption(dict(size=z, color=c, shape=s, bg=b, drop_size=False, drop_bg=False))
                 for z, c, s, b in full]

    def embed_texts(texts):
        return F.normalize(model.encode_text(clip.tokenize(texts, model.context_length).to(dev)).float(), dim=-1)
    t_short, t_full = embed_texts(short), embed_texts(full_text)
    img = torch.cat([F.normalize(model.encode_image(clip.preprocess_tensor(images[i:i + batch_size].to(dev),
                     model.visual.input_resolution)).float(), dim=-1) for i in range(0, len(images), batch_size)])
    pred = (img @ t_short.t()).argmax(dim=1).cpu()                           # (N,) index c * n_s + s
    pred_full = torch.tensor(full)[(img @ t_full.t()).argmax(dim=1).cpu()]   # (N, 4) size, colour, shape, bg
    truth = torch.tensor([[a["size"], a["color"], a["shape"], a["bg"]] for a in attrs])
    return {"colour": (pred // n_s == truth[:, 1]).float().mean().item(),
            "shape": (pred % n_s == truth[:, 2]).float().mean().item(),
            "caption": (pred_full == truth).all(dim=1).float().mean().item()}


def export(model, config, step, path):
    """The checkpoint that ships: OpenAI key names, fp16 floats (clip.load casts back to fp32), no optimizer."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    data.save_atomic({"model": sd, "config": asdict(config), "step": step}, path)


def main(args):
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    config = clip.Config(embed_dim=args.embed_dim, image_resolution=args.resolution,
                         vision_layers=list(args.vision_layers), vision_width=args.vision_width, vision_patch_size=0,
                         transformer_width=args.text_width, transformer_layers=args.text_layers)
    model = clip.CLIP(config).to(device)
    print(f"CLIP {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"(image tower {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f}M), {config}")

    # weight decay on matrices and convs only; not on norms, biases, embeddings or the temperature
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                                  eps=1e-6, fused=device.type == "cuda")
    step = 0
    if args.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    train_set = data.get_dataset("shapes", split="train", resolution=64, train=True, n=1_000_000)
    val_set = data.get_dataset("shapes", split="val", resolution=64, train=False, n=args.eval_n)
    val_items = [val_set[i] for i in range(len(val_set))]
    val_images = torch.stack([it["image"] for it in val_items])
    token_cache, caption_id = {}, {}

    def token_of(text):  # few hundred distinct captions: tokenize each once
        if text not in token_cache:
            token_cache[text] = clip.tokenize(text, config.context_length)[0]
        return token_cache[text]

    def save():
        data.save_atomic({"model": model.state_dict(), "config": asdict(config), "step": step,
                          "optimizer": optimizer.state_dict(), "rng": data.rng_state(), "args": vars(args)},
                         ckpt_path)

    losses, t0 = [], time.time()
    while step < args.max_steps and not (args.stop_after and step >= args.stop_after):
        model.train()
        images, tokens, ids = get_batch(train_set, step, args, token_of, caption_id)
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = contrastive_loss(model, images.to(device), tokens.to(device), ids.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature never goes below 0.01
        losses.append(loss.item())
        step += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            dt = (time.time() - t0) / args.log_interval
            print(f"step {step} | loss {sum(losses[-args.log_interval:]) / len(losses[-args.log_interval:]):.4f} | "
                  f"scale {model.logit_scale.exp().item():.1f} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                  f"{args.batch_size / dt:.0f} img/s")
            t0 = time.time()
        if args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
            acc = zero_shot(model, val_images, val_items)
            print(f"step {step} | zero-shot colour {acc['colour']:.3f} | shape {acc['shape']:.3f} | "
                  f"caption {acc['caption']:.3f}")
        if args.ckpt_interval and step % args.ckpt_interval == 0:
            save()
    save()
    acc = zero_shot(model, val_images, val_items)
    print(f"final step {step} | zero-shot on {len(val_items)} held-out images: colour {acc['colour']:.3f} | "
          f"shape {acc['shape']:.3f} | caption {acc['caption']:.3f}")
    if args.export:
        export(model, config, step, args.export)
        exported, _ = clip.load(args.export, device="cpu")  # checks the shipped file, fp16 rounding included
        acc_exported = zero_shot(exported, val_images, val_items)
        print(f"exported {args.export} ({os.path.getsize(args.export) / 1e6:.1f} MB): colour "
              f"{acc_exported['colour']:.3f} | shape {acc_exported['shape']:.3f} | caption {acc_exported['caption']:.3f}")
        acc = {**acc, "exported": acc_exported}
    return {"losses": losses, "accuracy": acc, "step": step}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    p.add_argument("--out-dir", default="out/clip", help="training checkpoint (resumable) goes to OUT_DIR/ckpt.pt")
    p.add_argument("--export", default=None, help="also write the slim fp16 checkpoint here (e.g. checkpoints/shapes/clip.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice); 1 is much faster on a CPU shared with other jobs")
    p.add_argument("--ckpt-interval", type=int, default=100, help="0: only at the end")
    p.add_argument("--stop-after", type=int, default=0, help="stop (and save) at this step, keeping the schedule of "
                   "--max-steps: an interrupted run, for tests of --resume")
    # preset values, overridable one by one
    p.add_argument("--resolution", type=int, help="CLIP input size (multiple of 32); images are rendered at 64")
    p.add_argument("--vision-layers", type=int, nargs=4, help="bottlenecks per ResNet stage")
    p.add_argument("--vision-width", type=int, help="ResNet stem width; the pooled feature is 32x this")
    p.add_argument("--embed-dim", type=int, help="joint image-text space")
    p.add_argument("--text-width", type=int)
    p.add_argument("--text-layers", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--eval-interval", type=int, help="0: only at the end")
    p.add_argument("--eval-n", type=int, help="held-out images for zero-shot accuracy")
    p.add_argument("--log-interval", type=int)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.resolution % 32:
        p.error(f"--resolution {args.resolution} must be a multiple of 32 (the ResNet tower's total stride)")
    return args


if __name__ == "__main__":
    main(get_args())
