"""
Stage 2 of CLIP-GEN: train the GPT p(image tokens | CLIP image embedding) on unlabeled images.

    python train_gpt.py --vqgan checkpoints/shapes/vqgan.pt --clip checkpoints/shapes/clip.pt   # shapes preset
    python train_gpt.py --preset coco --data data/coco --vqgan vqgan.pt --clip ViT-B/32 --prepare-only
    torchrun --standalone --nproc_per_node 8 train_gpt.py --preset coco --out out/gpt_coco

Two phases, flat like nanoGPT's train.py. prepare (--vqgan given, one process): the centre crops through the VQGAN
encoder and the CLIP image tower, once, into <data-dir>/tokens.npy (N, h*w), clip_emb.npy (N, D) float16 unit-norm
and meta.json, which a later run must match. train: memory-mapped random batches, AdamW + cosine schedule, LAFITE
embedding noise, condition dropout (for guidance), optionally the paper's CLIP embedding-reconstruction loss. At each
eval interval: <out>/ckpt.pt (resumable), gpt.pt (fp16 + data_meta: what sample.py reads), samples_<step>.png.
"""
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import clip
import data
import gpt
import vqgan

# Named runs (plain dicts; a flag given on the command line wins over its preset value). coco / imagenet: the paper's
# sizes, lr from HFAiLab's 5e-4 per 256 images of total batch, here for 8 GPUs x 32.
PRESETS = {
    "tiny": dict(model="tiny", n_images=64, batch_size=8, max_steps=20, warmup=2, lr=3e-3, min_lr=1e-4,
                 eval_interval=10, eval_iters=2, log_interval=5),
    # 6k steps of 32 on 40k images, each a different picture, data.HELD_OUT's pairs left out. Dropout 0.1 lets it train
    # that long (without, 5k steps lost the held-out pairs); emb_noise 0.75 (LAFITE). Sweeps: docs/shapes.md
    "shapes": dict(data="shapes", model="shapes", n_images=40_000, batch_size=32, max_steps=6000, warmup=100, lr=2e-3,
                   min_lr=1e-4, dropout=0.1, eval_interval=1000, log_interval=100, emb_noise=0.75,
                   exclude_held_out=True),
    "coco": dict(data="data/coco", model="gpt2-medium", batch_size=32, max_steps=200_000, warmup=5000, lr=5e-4,
                 min_lr=5e-5, eval_interval=2000),
    "imagenet": dict(data="imagenet", model="gpt2-xl", batch_size=16, grad_accum=2, max_steps=400_000, warmup=5000,
                     lr=5e-4, min_lr=5e-5, eval_interval=5000),
}
OUTPUTS = ("gpt.pt", "samples_*.png")  # what a run writes besides ckpt.pt (a new run deletes an earlier run's)
PREPARE_BATCH = 64  # images per encoding batch


def get_parser():
    p = data.ArgumentParser(prog=Path(__file__).name, description=__doc__.strip().split("\n")[0], presets=PRESETS,
                            real_preset="coco")
    data.add_run_flags(p, "gpt")
    # data: prepare, then the token files
    p.add_argument("--data", default="shapes", help="'shapes', 'imagenet' ($IMAGENET_DIR) or a folder of images")
    p.add_argument("--n-images", type=data.num(int, 1), help="encode the first N images only")
    p.add_argument("--vqgan", help="VQGAN checkpoint (ours or taming's); given: prepare, or check, the token files")
    p.add_argument("--clip", default="ViT-B/32", help="CLIP model name or checkpoint file, for prepare")
    p.add_argument("--flip", action="store_true", help="also encode horizontally flipped copies")
    p.add_argument("--exclude-held-out", action="store_true", help="shapes: leave out data.HELD_OUT's pairs")
    p.add_argument("--data-dir", help="tokens.npy, clip_emb.npy and meta.json (default: <out>/data)")
    p.add_argument("--prepare-only", action="store_true", help="encode the dataset and stop")
    p.add_argument("--val-frac", type=data.num(float, 0, 0.5, lo_open=True), default=0.02, help="held-out share of "
                   "the images")
    # model
    p.add_argument("--model", default="shapes", choices=sorted(gpt.PRESETS), help="gpt.py size preset")
    p.add_argument("--dropout", type=data.num(float, 0, 1), help="default: the model preset's")
    # optimisation
    p.add_argument("--max-steps", type=data.num(int, 1), default=1500, help="length of the run")
    p.add_argument("--batch-size", type=data.num(int, 1), default=32, help="per process and micro-step")
    p.add_argument("--grad-accum", type=data.num(int, 1), default=1, help="micro-steps per step")
    p.add_argument("--lr", type=data.num(float, 0, lo_open=True), default=2e-3, help="peak, after warm-up")
    p.add_argument("--min-lr", type=data.num(float, 0), default=1e-4, help="end of the cosine decay")
    p.add_argument("--warmup", type=data.num(int, 0), default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=data.num(float, 0), default=0.01, help="AdamW (0.9, 0.95); HFAiLab: 0.01")
    p.add_argument("--grad-clip", type=data.num(float, 0), default=1.0, help="0: no clipping")
    # conditioning
    p.add_argument("--emb-noise", type=data.num(float, 0), default=0.0, help="LAFITE xi: e <- normalize(e + xi u)")
    p.add_argument("--cond-drop", type=data.num(float, 0, 1), default=0.1, help="probability of the null condition "
                   "(trains classifier-free guidance)")
    p.add_argument("--lambda-emb", type=data.num(float, 0), default=0.0, help="weight of the CLIP embedding-"
                   "reconstruction loss")
    p.add_argument("--emb-rows", type=data.num(int, 0), default=0, help="apply --lambda-emb to the first N rows of "
                   "each batch only (0: all); its VQGAN decode + CLIP pass cost ~4x the GPT step on shapes")
    # logging
    p.add_argument("--log-interval", type=data.num(int, 1), default=100, help="steps per log line")
    p.add_argument("--eval-interval", type=data.num(int, 0), default=500, help="losses, grid and checkpoint every N "
                   "steps (0: at the end only)")
    p.add_argument("--eval-iters", type=data.num(int, 1), default=10, help="batches per split and evaluation")
    return p


# -----------------------------------------------------------------------------
# prepare: one pass of the centre crops through the VQGAN and CLIP

def fingerprint(path):
    """What meta.json records of a CLIP or VQGAN: a file's sha256, or an OpenAI model name as it is."""
    return data.file_sha256(path) if Path(path).is_file() else str(path)


def image_list_id(ds):
    if hasattr(ds, "files"):  # a folder: hash of the sorted relative paths
        return "sha256:" + hashlib.sha256("\n".join(str(p.relative_to(ds.root)) for p in ds.files).encode()).hexdigest()
    return f"shapes seed={ds.seed} n={ds.n}" + (" held-out pairs excluded" if ds.exclude_held_out else "")


def load_frozen(kind, name_or_path, device):
    """The VQGAN or CLIP (a file, or an OpenAI model name) -> fp32, eval mode, no gradients."""
    if kind == "clip" and name_or_path in clip.available_models():
        model = clip.load(name_or_path, device=device)[0]  # downloaded to clip.py's cache
    else:
        model = data.load_model(lambda p: vqgan.VQGAN.from_checkpoint(p, verbose=False) if kind == "vqgan"
                                else clip.load(p, device=device)[0], name_or_path, kind)
    return model.float().to(device).eval().requires_grad_(False)


def prepare(args, data_dir, device):
    """Encode the dataset (or reuse matching files); returns the metadata dict."""
    vq, clip_model = load_frozen("vqgan", args.vqgan, device), load_frozen("clip", args.clip, device)
    vc = vq.config
    ds = data.get_dataset(args.data, "train", vc.resolution, False, args.n_images, args.exclude_held_out)
    want = {"dataset": args.data, "resolution": vc.resolution, "n_images": len(ds), "flip": args.flip,
            "held_out_excluded": [f"{c} {s}" for c, s in data.HELD_OUT] if args.exclude_held_out else [],
            "images": image_list_id(ds), "vqgan": str(Path(args.vqgan).resolve()),
            "vqgan_sha256": fingerprint(args.vqgan), "codebook_size": vc.n_embed, "grid": [vc.grid, vc.grid],
            "clip": args.clip, "clip_sha256": fingerprint(args.clip), "clip_dim": clip_model.embed_dim}
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        diff = [f"{k}: files have {have.get(k)!r}, this run wants {v!r}" for k, v in want.items()
                if k != "vqgan" and have.get(k) != v]
        if diff:
            raise data.UserError(f"{data_dir} holds tokens made differently ({'; '.join(diff)}) — pass another "
                                 f"--data-dir, or delete that folder to encode again")
        print(f"reusing {data_dir}: {have['rows']} rows of {have['grid'][0]}x{have['grid'][1]} tokens")
        return have
    data_dir.mkdir(parents=True, exist_ok=True)
    rows_max = len(ds) * (2 if args.flip else 1)
    tok_dtype = np.uint16 if vc.n_embed <= 65536 else np.int32  # uint16 halves the file (16384 codes fit)
    T, D = vc.grid ** 2, clip_model.embed_dim
    tok = np.lib.format.open_memmap(data_dir / "tokens.tmp.npy", "w+", tok_dtype, (rows_max, T))
    emb = np.lib.format.open_memmap(data_dir / "clip_emb.tmp.npy", "w+", np.float16, (rows_max, D))
    n, skipped = 0, 0
    with torch.no_grad():
        for batch in data.progress(data.make_loader(ds, PREPARE_BATCH, train=False), desc=f"encoding {args.data}",
                                   unit="batch"):
            skipped += batch["skipped"]
            if "image" not in batch:
                continue
            x = batch["image"].to(device)
            if args.flip:  # each image is followed by its mirror: rows 2i, 2i+1 (B, 3, H, W) -> (2B, 3, H, W)
                x = torch.stack([x, x.flip(3)], 1).flatten(0, 1)
            t = vq.encode(x).flatten(1)                      # (B, h, w) -> (B, h*w) raster order
            e = F.normalize(clip_model.encode_image(clip.preprocess_tensor(x, clip_model.visual.input_resolution))
                            .float(), dim=-1)
            tok[n:n + len(t)] = t.cpu().numpy().astype(tok_dtype)
            emb[n:n + len(t)] = e.cpu().numpy().astype(np.float16)
            n += len(t)
    tok.flush(), emb.flush()
    for name, arr in (("tokens", tok), ("clip_emb", emb)):
        if n < rows_max:  # corrupt images were dropped: keep the written rows only
            np.save(data_dir / f"{name}.npy", np.asarray(arr[:n]))
            os.remove(data_dir / f"{name}.tmp.npy")
        else:
            os.replace(data_dir / f"{name}.tmp.npy", data_dir / f"{name}.npy")
    meta = {**want, "rows": n, "skipped": skipped}
    data.save_atomic(json.dumps(meta, indent=1), meta_path)  # meta last: its presence means the .npy files are complete
    print(f"wrote {data_dir}: {n} rows, tokens {tok_dtype.__name__} (N, {T}), clip_emb float16 (N, {D}); "
          f"{skipped} unreadable images skipped")
    return meta


def split_rows(meta, val_frac):
    """Row indices of the train and val splits, split by image so an image and its flipped copy stay together."""
    ids = np.arange(meta["rows"]) // (2 if meta["flip"] else 1)
    n_img = int(ids.max()) + 1
    is_val = np.isin(ids, np.random.default_rng(1234).permutation(n_img)[:max(1, int(n_img * val_frac))])
    return {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}


# -----------------------------------------------------------------------------
# training pieces

def get_batch(tokens, embs, rows, batch_size, gen, device):
    """batch_size random rows (drawn with `gen`) -> tokens (B, T) int64, embeddings (B, D) float32."""
    rows = np.sort(rows[torch.randint(len(rows), (batch_size,), generator=gen)])
    return (torch.from_numpy(tokens[rows].astype(np.int64)).to(device),
            torch.from_numpy(embs[rows].astype(np.float32)).to(device))


def get_lr(step, args):
    """Linear warm-up, then cosine decay to min_lr (nanoGPT)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    ratio = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def add_emb_noise(e, xi, gen):
    """LAFITE: normalize(e + xi * u), u a unit-norm Gaussian direction; e (B, D) unit vectors."""
    if xi <= 0:
        return e
    u = F.normalize(torch.randn(e.shape, generator=gen), dim=-1).to(e.device)
    return F.normalize(e + xi * u, dim=-1)


def emb_reconstruction_loss(logits, target, vq, clip_model):
    """
    logits (B, T, V) teacher-forced predictions; target (B, D) normalised CLIP embeddings of the inputs.
    softmax -> straight-through one-hot (hard forward, softmax gradient; HFAiLab logits_to_z) -> codebook vectors
    -> VQGAN decoder -> CLIP-normalised crop at CLIP resolution -> CLIP image tower -> 1 - cosine.
    1 - cos = ||a - b||^2 / 2 for unit vectors: HFAiLab's MSE is the same up to a factor 2/D, which at D = 512 makes
    its term ~250x weaker for the same lambda. Gradients reach only the GPT (VQGAN and CLIP are frozen).
    """
    B, T, V = logits.shape
    p = logits.float().softmax(-1)
    st = p + (F.one_hot(p.argmax(-1), V).to(p.dtype) - p).detach()
    h = w = math.isqrt(T)
    z = (st @ vq.quantize.codebook()).transpose(1, 2).reshape(B, -1, h, w)  # (B, T, V) @ (V, Dc) -> (B, Dc, h, w)
    img = vq.decode_latent(z)                                                # (B, 3, H, W) in [-1, 1]
    e = clip_model.encode_image(clip.preprocess_tensor(img, clip_model.visual.input_resolution))
    return 1 - (F.normalize(e.float(), dim=-1) * target).sum(-1).mean()


@torch.no_grad()
def estimate_loss(model, tokens, embs, rows, args, amp, device):
    """Mean CE on eval_iters batches per split (fixed seed: comparable across evals); val_uncond: the null prefix."""
    model.eval()
    out = {}
    for split, uncond in (("train", False), ("val", False), ("val_uncond", True)):
        gen = torch.Generator().manual_seed(999)
        losses = []
        for _ in range(args.eval_iters):
            x, e = get_batch(tokens, embs, rows[split.split("_")[0]], args.batch_size, gen, device)
            with amp:
                losses.append(model(x[:, :-1], None if uncond else e, x)[1].item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


@torch.no_grad()
def save_samples(model, vq, tokens, embs, rows, amp, device, path, n=8):
    """Row 1: VQGAN reconstructions of n held-out images; row 2: samples conditioned on their CLIP embeddings."""
    x = torch.from_numpy(tokens[rows[:n]].astype(np.int64)).to(device)
    e = torch.from_numpy(embs[rows[:n]].astype(np.float32)).to(device)
    model.eval()
    with amp:
        s = model.generate(e, generator=torch.Generator(device).manual_seed(0))
    model.train()
    g = vq.config.grid
    imgs = ((vq.decode(torch.cat([x, s]).view(-1, g, g)).float() + 1) * 127.5).clamp(0, 255).byte().cpu()
    H = imgs.shape[-1]  # imgs (2n, 3, H, W): n originals, then their n samples
    grid = imgs.view(2, len(x), 3, H, H).permute(0, 3, 1, 4, 2).reshape(2 * H, len(x) * H, 3)  # (2H, n*W, 3)
    data.save_atomic(Image.fromarray(grid.numpy()), path)


def main(args):
    # setup: device and DDP from torchrun's environment, threads
    rank, local_rank, world, device = data.setup_distributed(args.device)
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = None if args.prepare_only else data.start_run(out, args.resume, args.overwrite, OUTPUTS, "gpt")
    amp, scaler = data.mixed_precision(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # data: prepared once (single process), then memory-mapped
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    if args.vqgan and world == 1:
        meta = prepare(args, data_dir, device)
    elif (data_dir / "meta.json").exists():
        meta = json.loads((data_dir / "meta.json").read_text())
    else:
        raise data.UserError(f"no prepared token files in {data_dir} — " + (
            f"run once without torchrun: train_gpt.py --vqgan CKPT --clip NAME --data-dir {data_dir} --prepare-only"
            if world > 1 else "pass --vqgan CKPT (and --clip) to encode the dataset, or the --data-dir that holds "
                              "them"))
    if args.prepare_only:
        return {"meta": meta}
    tokens, embs = (np.load(data_dir / f"{name}.npy", mmap_mode="r") for name in ("tokens", "clip_emb"))
    rows = split_rows(meta, args.val_frac)
    if ckpt and any(ckpt["data_meta"].get(k) != v for k, v in meta.items() if k != "vqgan"):  # "vqgan": where it was
        raise data.UserError(f"{out / 'ckpt.pt'} was trained on other token files than {data_dir} — pass the "
                             f"--data-dir of that run")

    # frozen models: the VQGAN for sample grids, CLIP too for --lambda-emb
    vq = load_frozen("vqgan", meta["vqgan"], device) if Path(meta["vqgan"]).is_file() else None
    clip_model = load_frozen("clip", meta["clip"], device) if args.lambda_emb > 0 else None
    if vq is None and args.lambda_emb > 0:
        raise data.UserError(f"--lambda-emb needs the VQGAN that made the tokens, {meta['vqgan']}, which is missing "
                             f"— put it back there, or train without --lambda-emb")

    # model: the run to continue, or a gpt.py preset sized by the token files
    torch.manual_seed(args.seed + rank)  # a seed per rank, right before the weights are drawn (prepare draws too)
    if ckpt:
        config = gpt.Config(**ckpt["config"])
    else:
        config = gpt.make_config(args.model, vocab_size=meta["codebook_size"], dropout=args.dropout,
                                 block_size=meta["grid"][0] * meta["grid"][1], cond_dim=meta["clip_dim"])
    model = gpt.GPT(config).to(device)
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95), device.type)
    step = 0
    if ckpt:
        with data.loading(out / "ckpt.pt", "gpt"):
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
        c, grids = config, "" if vq else f" | no sample grids: no {meta['vqgan']}"
        print(f"GPT: {raw_model.num_params() / 1e6:.2f}M params, vocab {c.vocab_size}, {c.block_size} tokens, cond "
              f"{c.cond_dim}-d | {len(rows['train'])} train / {len(rows['val'])} val rows, batch {args.batch_size}"
              f"x{args.grad_accum}x{world} | {device}{grids}")

    # training loop
    stop = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    bar = data.progress(total=stop, initial=step, disable=not master, leave=False)
    fpt, log, evals = raw_model.flops_per_token(), [], []
    sums, t0, t_step = {"loss": 0.0}, time.time(), step  # "loss" first in the log line, before any "emb"
    while step < stop:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every random draw of a step comes from (seed, rank, step): resume and DDP need no data-loader state
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, e = get_batch(tokens, embs, rows["train"], args.batch_size, gen, device)
            drop = (torch.rand(len(x), generator=gen) < args.cond_drop).to(device)
            cond = add_emb_noise(e, args.emb_noise, gen)
            if world > 1:
                model.require_backward_grad_sync = micro == args.grad_accum - 1  # all-reduce once per step
            with amp:
                logits, loss = model(x[:, :-1], cond, x, drop)
                if args.lambda_emb > 0:
                    k = args.emb_rows or len(x)
                    l_emb = emb_reconstruction_loss(logits[:k], e[:k], vq, clip_model)
                    loss = loss + args.lambda_emb * l_emb
                    sums["emb"] = sums.get("emb", 0.0) + l_emb.item() / args.grad_accum
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if not torch.isfinite(loss_sum):
            raise data.diverged(step, out)
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        sums["loss"] += loss_sum.item()

        # log: means over the interval (this rank's)
        if step % args.log_interval == 0 or step == stop:
            n, dt = step - t_step, time.time() - t0
            mean = {k: v / n for k, v in sums.items()}
            tok_s = n * args.batch_size * args.grad_accum * world * config.block_size / dt
            mfu = gpt.estimate_mfu(fpt, tok_s / world, device)
            log.append((step, mean))
            if master:
                bar.write(" | ".join([f"step {step}", *(f"{k} {v:.4f}" for k, v in mean.items()), f"lr {lr:.2e}",
                                      f"{dt / n * 1000:.0f} ms", f"{tok_s / 1e3:.1f}k tok/s",
                                      "mfu " + ("n/a" if mfu is None else f"{100 * mfu:.1f}%")]))
            sums, t0, t_step = {"loss": 0.0}, time.time(), step

        # evaluate, sample grid and checkpoint, all of the same step
        if args.eval_interval and step % args.eval_interval == 0 or step == stop:
            t_eval = time.time()
            if master:
                losses = estimate_loss(raw_model, tokens, embs, rows, args, amp, device)
                evals.append((step, losses))
                bar.write(f"eval step {step} | train {losses['train']:.4f} | val {losses['val']:.4f} | "
                          f"val uncond {losses['val_uncond']:.4f}")
                if vq is not None:
                    save_samples(raw_model, vq, tokens, embs, rows["val"], amp, device, out / f"samples_{step:07d}.png")
            data.save_checkpoint(out, raw_model, step, "gpt.pt", {"data_meta": meta}, optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), args=vars(args), data_meta=meta)
            t0 += time.time() - t_eval  # evaluations and checkpoints do not count in the step time
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return {"model": raw_model, "log": log, "evals": evals}


if __name__ == "__main__":
    data.cli(main, get_parser())
