"""
Stage 2 of CLIP-GEN: train the GPT p(image tokens | CLIP image embedding) on unlabeled images.

Two phases in one script (flat, in the spirit of karpathy/nanoGPT's train.py):
  prepare  encode the dataset once -- centre crops through the VQGAN encoder and the CLIP image tower -- into
           <data-dir>/tokens.npy (N, h*w), clip_emb.npy (N, D) float16 L2-normalised, meta.json. Reused when meta
           matches, refused (naming what differs) when it does not. Skipped when --vqgan is not given.
  train    memory-mapped random batches, AdamW + cosine schedule, bf16 autocast on CUDA, DDP via torchrun,
           exact resume, LAFITE embedding noise, condition dropout (classifier-free guidance), and optionally the
           paper's CLIP embedding-reconstruction loss (--lambda-emb).

  python train_gpt.py --preset shapes --vqgan checkpoints/shapes/vqgan.pt --clip checkpoints/shapes/clip.pt
  torchrun --standalone --nproc_per_node 8 train_gpt.py --preset coco --data-dir out/coco_data   (after prepare)
"""

import argparse
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import gpt

# Named runs. shapes: 1.5k steps of batch 32 (~5 minutes on 2 cores); the centred shapes world has 672 distinct
# images and the GPT fits them by step ~1000 (val loss 0.015 at 1500). 192 steps were not enough to become
# conditional (reference/shapes_world.md). coco / imagenet: the paper's sizes; lr follows HFAiLab's 5e-4 per 256
# images of total batch, here for 8 GPUs x 32.
PRESETS = {
    "tiny": dict(model="tiny", n_images=64, batch_size=8, max_steps=20, warmup=2, lr=3e-3, eval_interval=10,
                 eval_iters=2, log_interval=5, sample_interval=0),
    # shapes: emb_noise 1.5. A GPT that fits 672 images exactly is sharp around each image embedding, and a short
    # prompt ("a red circle") names no size or background, so its text embedding sits between images (cos 0.78 to
    # a matching one). Same data, 1500 steps, evaluate.py shapes --n 8 --candidates 32 (colour / shape):
    # xi 0.5 0.83 / 0.61, 0.75 0.91 / 0.76, 1.0 0.90 / 0.78, 1.5 0.94 / 0.79, 2.0 0.90 / 0.81
    "shapes": dict(data="shapes", model="shapes", n_images=20_000, batch_size=32, max_steps=1500, warmup=100,
                   lr=2e-3, min_lr=1e-4, eval_interval=500, eval_iters=10, log_interval=100, sample_interval=750,
                   emb_noise=1.5),
    "coco": dict(data="data/coco", model="gpt2-medium", batch_size=32, max_steps=200_000, warmup=5000, lr=5e-4,
                 min_lr=5e-5, eval_interval=2000, sample_interval=5000),
    "imagenet": dict(data="imagenet", model="gpt2-xl", batch_size=16, grad_accum=2, max_steps=400_000, warmup=5000,
                     lr=5e-4, min_lr=5e-5, eval_interval=5000, sample_interval=10_000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named run; explicit flags override it")
    # prepare
    p.add_argument("--data", default="shapes", help="'shapes', 'imagenet' or an image folder (see data.py)")
    p.add_argument("--n-images", type=int, help="encode only the first N images")
    p.add_argument("--vqgan", help="VQGAN checkpoint (ours or taming .ckpt); given = prepare/check the token files")
    p.add_argument("--clip", default="ViT-B/32", help="CLIP model name or checkpoint path")
    p.add_argument("--flip", action="store_true", help="also encode horizontally flipped copies")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--prepare-batch", type=int, default=64)
    p.add_argument("--workers", type=int, help="data loader workers for prepare (default: data.py's choice)")
    # io
    p.add_argument("--out", default="out/gpt", help="checkpoints, sample grids")
    p.add_argument("--data-dir", help="tokens.npy / clip_emb.npy / meta.json (default: <out>/data)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt exactly")
    p.add_argument("--stop-after", type=int, help="leave (with a checkpoint) after this many steps of this run, "
                                                   "e.g. to fit a time-limited job; --resume continues exactly")
    # model
    p.add_argument("--model", default="shapes", choices=sorted(gpt.PRESETS), help="GPT size preset")
    p.add_argument("--dropout", type=float)
    # optimisation
    p.add_argument("--batch-size", type=int, default=64, help="per process, per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01, help="HFAiLab: 0.01")
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-frac", type=float, default=0.02, help="held-out fraction of the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); 1 is much faster for small "
                   "models on a CPU shared with other jobs (intra-op threads spin-wait)")
    # the modality gap and guidance
    p.add_argument("--emb-noise", type=float, default=0.0, help="LAFITE xi: e <- normalize(e + xi * unit direction)")
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null condition (trains CFG)")
    p.add_argument("--lambda-emb", type=float, default=0.0, help="weight of the CLIP embedding-reconstruction loss")
    p.add_argument("--emb-rows", type=int, default=0, help="apply --lambda-emb to the first N rows of each batch "
                   "only (0 = all); its VQGAN decode + CLIP pass cost ~4x the GPT step on the shapes preset")
    # logging
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--sample-interval", type=int, default=1000, help="0 = no sample grids")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--sample-cfg", type=float, default=1.0)
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# prepare: one pass over the centre crops through the VQGAN and CLIP

def fingerprint(path):
    """A checkpoint file's sha256 (clip.file_sha256); a bare model name (e.g. 'ViT-B/32') stays itself."""
    import clip
    return clip.file_sha256(path) if Path(path).is_file() else str(path)


def image_list_id(ds):
    if hasattr(ds, "files"):  # a folder: hash of the sorted relative paths
        names = "\n".join(str(p.relative_to(ds.root)) for p in ds.files)
        return "sha256:" + hashlib.sha256(names.encode()).hexdigest()
    return f"shapes seed={ds.seed} n={ds.n}"


def load_frozen(args, device):
    """The VQGAN and CLIP used by prepare, the lambda-emb loss and sample grids: eval mode, no gradients."""
    import clip
    import vqgan as vq
    v = vq.VQGAN.from_checkpoint(args.vqgan, device=device)
    c, _ = clip.load(args.clip, device=device)
    for m in (v, c):
        m.float().eval().requires_grad_(False)
    return v, c, clip


def prepare(args, data_dir, device):
    """Encode the dataset (or reuse matching files); returns the metadata dict."""
    vqgan, clip_model, clip = load_frozen(args, device)
    vcfg = vqgan.config
    ds = data.get_dataset(args.data, "train", vcfg.resolution, train=False, n=args.n_images)
    want = {"dataset": args.data, "resolution": vcfg.resolution, "n_images": len(ds), "flip": args.flip,
            "images": image_list_id(ds), "vqgan": str(Path(args.vqgan).resolve()),
            "vqgan_sha256": fingerprint(args.vqgan),
            "codebook_size": vcfg.n_embed, "grid": [vcfg.grid, vcfg.grid], "clip": args.clip,
            "clip_sha256": fingerprint(args.clip), "clip_dim": clip_model.embed_dim}
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        diff = [f"{k}: files have {have.get(k)!r}, this run wants {v!r}" for k, v in want.items()
                if k != "vqgan" and have.get(k) != v]
        if diff:
            raise SystemExit(f"{data_dir} holds tokens made differently -- " + "; ".join(diff) +
                             ". Pass another --data-dir, or delete that folder to re-encode.")
        print(f"reusing {data_dir}: {have['rows']} rows of {have['grid'][0]}x{have['grid'][1]} tokens")
        return have
    data_dir.mkdir(parents=True, exist_ok=True)
    rows_max = len(ds) * (2 if args.flip else 1)
    tok_dtype = np.uint16 if vcfg.n_embed <= 65536 else np.int32  # uint16 halves the file (16384 codes fit)
    T, D = vcfg.grid ** 2, clip_model.embed_dim
    tok = np.lib.format.open_memmap(data_dir / "tokens.tmp.npy", "w+", tok_dtype, (rows_max, T))
    emb = np.lib.format.open_memmap(data_dir / "clip_emb.tmp.npy", "w+", np.float16, (rows_max, D))
    res = clip_model.visual.input_resolution
    loader = data.make_loader(ds, args.prepare_batch, train=False, workers=args.workers)
    from tqdm import tqdm
    n, skipped = 0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"encoding {args.data}", unit="batch"):
            skipped += batch["skipped"]
            if "image" not in batch:
                continue
            x = batch["image"].to(device)
            if args.flip:  # each image is followed by its mirror: rows 2i, 2i+1 (B, 3, H, W) -> (2B, 3, H, W)
                x = torch.stack([x, x.flip(3)], 1).flatten(0, 1)
            t = vqgan.encode(x).flatten(1)                      # (B, h, w) -> (B, h*w) raster order
            e = F.normalize(clip_model.encode_image(clip.preprocess_tensor(x, res)).float(), dim=-1)
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
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # meta last: its presence means the .npy files are complete
    print(f"wrote {data_dir}: {n} rows, tokens {tok_dtype.__name__} (N, {T}), clip_emb float16 (N, {D}); "
          f"{skipped} unreadable images skipped")
    return meta


def image_ids(meta):
    """Image id of every row, so that an image and its flipped copy (the next row) land in the same split."""
    return np.arange(meta["rows"]) // (2 if meta["flip"] else 1)


# -----------------------------------------------------------------------------
# the embedding-reconstruction loss (--lambda-emb)

def emb_reconstruction_loss(logits, target, vqgan, clip_model, clip):
    """
    logits (B, T, V) teacher-forced predictions; target (B, D) normalised CLIP embeddings of the inputs.
    softmax -> straight-through one-hot (hard forward, softmax gradient; HFAiLab logits_to_z) -> codebook vectors
    -> VQGAN decoder -> CLIP-normalised crop at CLIP resolution -> CLIP image tower -> 1 - cosine.
    1 - cos = ||a - b||^2 / 2 for unit vectors: HFAiLab's MSE is the same up to a factor 2/D, which at D = 512 makes
    its term ~250x weaker for the same lambda -- one reason it may have shown "no gain". Gradients reach only the
    GPT: VQGAN and CLIP parameters have requires_grad False.
    """
    B, T, V = logits.shape
    p = logits.float().softmax(-1)
    hard = F.one_hot(p.argmax(-1), V).to(p.dtype)
    st = p + (hard - p).detach()
    codebook = vqgan.quantize.codebook()                                   # (V, D_code)
    h = w = int(math.isqrt(T))
    z = (st @ codebook).transpose(1, 2).reshape(B, -1, h, w)              # (B, T, V) @ (V, Dc) -> (B, Dc, h, w)
    img = vqgan.decode_latent(z)                                            # (B, 3, H, W) in [-1, 1]
    e = clip_model.encode_image(clip.preprocess_tensor(img, clip_model.visual.input_resolution))
    return 1 - (F.normalize(e.float(), dim=-1) * target).sum(-1).mean()


def add_emb_noise(e, xi, gen):
    """LAFITE: normalize(e + xi * u), u a unit-norm Gaussian direction; e (B, D) unit vectors."""
    if xi <= 0:
        return e
    u = F.normalize(torch.randn(e.shape, generator=gen), dim=-1).to(e.device)
    return F.normalize(e + xi * u, dim=-1)


# -----------------------------------------------------------------------------

def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, local_rank, world, device = data.setup_distributed()
    device = torch.device(args.device) if args.device else device
    ddp, master = world > 1, rank == 0
    out = Path(args.out)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    if args.vqgan and not ddp:
        meta = prepare(args, data_dir, device)
    elif (data_dir / "meta.json").exists():
        meta = json.loads((data_dir / "meta.json").read_text())
    else:
        raise SystemExit(f"no prepared files in {data_dir}: run once without torchrun with --vqgan CKPT --clip NAME "
                         f"--data-dir {data_dir} --prepare-only" if ddp else
                         f"no prepared files in {data_dir}: pass --vqgan CKPT (and --clip) to encode the dataset")
    if args.prepare_only:
        return meta
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()  # CPU runs in fp32

    # data: memory-mapped, split by image id so flipped copies never leak into validation
    tokens = np.load(data_dir / "tokens.npy", mmap_mode="r")
    embs = np.load(data_dir / "clip_emb.npy", mmap_mode="r")
    ids = image_ids(meta)
    n_img = int(ids.max()) + 1
    val_imgs = np.random.default_rng(1234).permutation(n_img)[:max(1, int(n_img * args.val_frac))]
    is_val = np.isin(ids, val_imgs)
    split_rows = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}

    def get_batch(split, gen):
        rows = np.sort(split_rows[split][torch.randint(len(split_rows[split]), (args.batch_size,), generator=gen)])
        x = torch.from_numpy(tokens[rows].astype(np.int64)).to(device)
        e = torch.from_numpy(embs[rows].astype(np.float32)).to(device)
        return x, e

    # model and optimizer
    cfg = gpt.make_config(args.model, vocab_size=meta["codebook_size"], block_size=meta["grid"][0] * meta["grid"][1],
                          cond_dim=meta["clip_dim"], dropout=args.dropout)
    ckpt_path = out / "ckpt.pt"
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start, or pass the --out it used")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume else None
    if ckpt is not None:
        cfg = gpt.Config(**ckpt["config"])
    model = gpt.GPT(cfg).to(device)
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, args.beta2), device.type)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            data.set_rng_state(ckpt["rng"][rank])
        if master:
            print(f"resumed {ckpt_path} at step {step}")
    raw = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    frozen = None
    if args.lambda_emb > 0 or (args.sample_interval and master):
        if Path(meta["vqgan"]).is_file():
            frozen = load_frozen(argparse.Namespace(vqgan=meta["vqgan"], clip=meta["clip"]), device)
        elif args.lambda_emb > 0:
            raise SystemExit(f"--lambda-emb needs the VQGAN that made the tokens, {meta['vqgan']}, which is missing")
        else:
            print(f"no sample grids: the VQGAN {meta['vqgan']} that made the tokens is missing")
            args.sample_interval = 0
    if master:
        print(f"GPT {args.model}: {raw.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size}, {cfg.block_size} "
              f"tokens, cond {cfg.cond_dim}-d; {len(split_rows['train'])} train / {len(split_rows['val'])} val rows")
    fpt = raw.flops_per_token()

    def get_lr(it):  # linear warm-up, then cosine decay to min_lr (nanoGPT)
        if it < args.warmup:
            return args.lr * (it + 1) / args.warmup
        ratio = min(1.0, (it - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)

    @torch.no_grad()
    def estimate_loss():
        """Mean CE on train/val batches (fixed seed: comparable across evals); val_uncond = with the null prefix."""
        model.eval()
        out_ = {}
        for split, uncond in (("train", False), ("val", False), ("val_uncond", True)):
            gen = torch.Generator().manual_seed(999)
            losses = []
            for _ in range(args.eval_iters):
                x, e = get_batch(split.split("_")[0], gen)
                with amp:
                    losses.append(raw(x[:, :-1], None if uncond else e, x)[1].item())
            out_[split] = float(np.mean(losses))
        model.train()
        return out_

    def save(path, **extra):
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, data.rng_state())
        else:
            states[0] = data.rng_state()
        if master:
            data.save_atomic(raw.checkpoint(step=step, optimizer=optimizer.state_dict(), rng=states, args=vars(args),
                                            data_meta=meta, **extra), path)

    def sample_grid():
        """Row 1: VQGAN reconstructions of held-out images; row 2: samples conditioned on their CLIP embeddings."""
        from PIL import Image
        vqgan = frozen[0]
        x, e = tokens[split_rows["val"][:args.n_samples]].astype(np.int64), embs[split_rows["val"][:args.n_samples]]
        x, e = torch.from_numpy(x).to(device), torch.from_numpy(e.astype(np.float32)).to(device)
        raw.eval()
        with amp:
            s = raw.generate(e, cfg_scale=args.sample_cfg, generator=torch.Generator(device).manual_seed(0))
        raw.train()
        g = meta["grid"][0]
        imgs = vqgan.decode(torch.cat([x, s]).view(-1, g, g)).float()       # (2n, 3, H, W) in [-1, 1]
        imgs = ((imgs + 1) * 127.5).clamp(0, 255).byte().cpu()
        n, H = len(x), imgs.shape[-1]
        grid = imgs.view(2, n, 3, H, H).permute(0, 3, 1, 4, 2).reshape(2 * H, n * H, 3)  # (rows*H, cols*W, 3)
        path = out / f"samples_{step:06d}.png"
        Image.fromarray(grid.numpy()).save(path)
        print(f"saved {path}")

    # training loop
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    t0, t_step, history = time.time(), step, []
    stop = min(args.max_steps, step + args.stop_after) if args.stop_after else args.max_steps
    while step < stop:
        t_pause = time.time()
        if args.eval_interval and step % args.eval_interval == 0 and master:
            losses = estimate_loss()
            history.append((step, losses))
            print(f"step {step} | train {losses['train']:.4f} | val {losses['val']:.4f} | "
                  f"val uncond {losses['val_uncond']:.4f}")
        if args.eval_interval and step % args.eval_interval == 0 and step > 0:
            save(ckpt_path)
        if args.sample_interval and step % args.sample_interval == 0 and step > 0 and master:
            sample_grid()
        t0 += time.time() - t_pause  # evals, checkpoints and grids do not count in the step time
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every random draw of a step comes from (seed, rank, step): resume and DDP need no data-loader state
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 7919 + step)
        loss_sum, emb_sum = torch.zeros((), device=device), 0.0
        for micro in range(args.grad_accum):
            x, e = get_batch("train", gen)
            drop = (torch.rand(len(x), generator=gen) < args.cond_drop).to(device)
            cond = add_emb_noise(e, args.emb_noise, gen)
            if ddp:
                model.require_backward_grad_sync = micro == args.grad_accum - 1  # all-reduce once per step
            with amp:
                logits, loss = model(x[:, :-1], cond, x, drop)
                if args.lambda_emb > 0:
                    k = args.emb_rows or len(x)
                    l_emb = emb_reconstruction_loss(logits[:k], e[:k], frozen[0], frozen[1], frozen[2])
                    loss = loss + args.lambda_emb * l_emb
                    emb_sum += l_emb.item() / args.grad_accum
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss_sum):  # NaN guard: keep the state for a post-mortem and stop
            save(out / f"nan_step{step}.pt")
            raise SystemExit(f"non-finite loss at step {step}; state saved to {out / f'nan_step{step}.pt'}")
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % args.log_interval == 0 or step == stop):
            dt = (time.time() - t0) / (step - t_step)
            tok_s = args.batch_size * args.grad_accum * cfg.block_size / dt
            mfu = gpt.estimate_mfu(fpt, tok_s, device)
            print(f"step {step} | loss {loss_sum.item():.4f}" + (f" | emb {emb_sum:.4f}" if args.lambda_emb else "")
                  + f" | lr {lr:.2e} | {dt * 1000:.0f} ms | {tok_s / 1e3:.1f}k tok/s | mfu "
                  + ("n/a" if mfu is None else f"{100 * mfu:.1f}%"))
            t0, t_step = time.time(), step
    final = estimate_loss() if master and args.eval_iters else None
    if final:
        history.append((step, final))
        print(f"final step {step} | train {final['train']:.4f} | val {final['val']:.4f} | "
              f"val uncond {final['val_uncond']:.4f}")
    save(ckpt_path)
    if args.sample_interval and master:
        sample_grid()
    if ddp:
        dist.destroy_process_group()
    return {"step": step, "history": history, "ckpt": str(ckpt_path)}


if __name__ == "__main__":
    main(parse_args())
