"""
Text (or an image) -> images with CLIP-GEN (Wang et al. 2022, arXiv 2203.00386, sec. 3.3), with CLIP re-ranking.

    python sample.py "a red circle on a blue background"          # the shipped shapes-world checkpoints
    python sample.py "oil painting of a dog" --clip ViT-B/32 --vqgan vqgan.ckpt --gpt out/gpt/ckpt.pt --candidates 64

One prompt, end to end: CLIP's text tower embeds it (1, D) -> the GPT samples `candidates` token grids (C, h*w),
conditioned on that embedding where training showed it CLIP *image* embeddings -> the VQGAN decoder paints them
(C, 3, H, W) -> CLIP's image tower scores each against the prompt (cosine) -> the best `n` are kept, written as PNGs
and drawn into one labelled grid. `--image` conditions on an image's embedding instead (variations).
evaluate.py imports load_models, text_embeddings, image_embeddings and generate from here.
"""
import argparse
import re
import warnings
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import clip as clip_lib
from gpt import GPT
from train_gpt import fingerprint  # the sha256 that train_gpt.py records for the CLIP and VQGAN files
from vqgan import VQGAN

ROOT = Path(__file__).resolve().parent
SHIPPED = {k: f"checkpoints/shapes/{k}.pt" for k in ("clip", "vqgan", "gpt")}  # made by scripts/train_shapes.sh


# clip: text tower for prompts, image tower for variations and re-ranking; preprocess: PIL -> (3, R, R) CLIP input;
# vqgan: tokens (B, h, w) -> pixels; gpt: CLIP embedding -> tokens (B, h*w)
Models = namedtuple("Models", "clip preprocess vqgan gpt")


def find_checkpoint(kind, path):
    """A checkpoint path that exists (relative to the working directory or the repo), else an error naming its maker."""
    if kind == "clip" and path in clip_lib.available_models():
        return path  # an OpenAI name: clip.load downloads and verifies it
    for p in (Path(path), ROOT / path):
        if p.is_file():
            return str(p)
    maker = "scripts/train_shapes.sh" if path == SHIPPED[kind] else f"train_{kind}.py"
    raise FileNotFoundError(f"{kind} checkpoint {path} not found: make it with {maker}, or pass --{kind} PATH")


def load_models(clip=SHIPPED["clip"], vqgan=SHIPPED["vqgan"], gpt=SHIPPED["gpt"], device="cpu", dtype=None):
    """Load CLIP, VQGAN and GPT and refuse a combination the GPT was not trained for."""
    paths = {k: find_checkpoint(k, p) for k, p in (("clip", clip), ("vqgan", vqgan), ("gpt", gpt))}
    dtype = dtype or torch.float32
    clip_model, preprocess = clip_lib.load(paths["clip"], device=device, dtype=dtype)
    vq = VQGAN.from_checkpoint(paths["vqgan"], device=device).to(dtype)
    g = GPT.from_checkpoint(paths["gpt"], device=device).to(dtype)
    c, v = g.config, vq.config
    grid = v.resolution // 2 ** (len(v.ch_mult) - 1)  # VQGAN tokens per side (f = 2**(levels-1))
    problems = []
    if c.vocab_size != v.n_embed:
        problems.append(f"the GPT predicts {c.vocab_size} token ids but the VQGAN's codebook has {v.n_embed} codes")
    if c.block_size != grid * grid:
        problems.append(f"the GPT makes {c.block_size} tokens per image but the VQGAN's grid is {grid}x{grid}")
    if c.cond_dim != clip_model.embed_dim:
        problems.append(f"the GPT takes {c.cond_dim}-d conditions, this CLIP makes {clip_model.embed_dim}-d embeddings")
    # train_gpt.py records the exact CLIP and VQGAN files that made its training tokens (sha256, or an OpenAI name):
    # another CLIP of the same width, or another VQGAN with as many codes, fits the shapes but not the meaning
    meta = torch.load(paths["gpt"], map_location="cpu", weights_only=True, mmap=True).get("data_meta") or {}
    for kind in ("clip", "vqgan"):
        want = meta.get(f"{kind}_sha256")
        if want and fingerprint(paths[kind]) != want:
            problems.append(f"its training tokens were made with {kind} {meta.get(kind)} (sha256 {want[:12]}...), "
                            f"not with this file")
    if problems:
        raise ValueError(f"{paths['gpt']} does not fit --clip {clip} / --vqgan {vqgan}: " + "; ".join(problems)
                         + ". Pass the CLIP and VQGAN the GPT was trained with (train_gpt.py prepare records them)")
    return Models(clip_model, preprocess, vq, g)


@torch.no_grad()
def text_embeddings(models, prompts):
    """N prompts -> (N, D) L2-normalised CLIP text embeddings; over-long prompts are truncated with a warning."""
    n_ctx = models.clip.context_length
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt: describe the image, e.g. \"a red circle on a blue background\"")
        n = len(clip_lib.get_tokenizer().encode(p)) + 2  # + start and end tokens
        if n > n_ctx:
            warnings.warn(f"prompt {p[:40]!r}... is {n} tokens, over CLIP's {n_ctx}: truncated")
    tokens = clip_lib.tokenize(prompts, context_length=n_ctx, truncate=True).to(models.clip.text_projection.device)
    return F.normalize(models.clip.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def image_embeddings(models, pil_images):
    """N PIL images -> (N, D) L2-normalised CLIP image embeddings."""
    x = torch.stack([models.preprocess(im.convert("RGB")) for im in pil_images])  # (N, 3, R, R)
    return F.normalize(models.clip.encode_image(x.to(models.clip.text_projection.device)).float(), dim=-1)


def check_knobs(n=1, candidates=1, temperature=1.0, top_k=None, top_p=None, cfg=1.0, batch_size=1):
    rules = [(n >= 1, f"--n {n}: keep at least 1 image per prompt"),
             (candidates >= n, f"--candidates {candidates} < --n {n}: re-ranking keeps n of the candidates"),
             (temperature > 0, f"--temperature {temperature}: must be > 0 (1 = the model's own distribution)"),
             (top_k is None or top_k >= 1, f"--top-k {top_k}: must be >= 1 (or unset)"),
             (top_p is None or 0 < top_p <= 1, f"--top-p {top_p}: must be in (0, 1]"),
             (cfg >= 0, f"--cfg {cfg}: guidance scale must be >= 0 (1 = off)"),
             (batch_size >= 1, f"--batch-size {batch_size}: must be >= 1")]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


@torch.no_grad()
def generate(models, cond, n=1, candidates=None, texts_for_ranking=None, temperature=1.0, top_k=None, top_p=None,
             cfg=1.0, seed=0, batch_size=16, as_float=False, progress=False):
    """
    cond (N, D): CLIP embeddings (text or image) -> for each row, max(candidates, n) samples ranked by CLIP cosine
    to `texts_for_ranking` (N prompts, or an (N, D) embedding; default: cond itself); the best n are kept.
    Returns images uint8 (N, n, H, W, 3) (or float in [0, 1] (N, n, 3, H, W) with as_float) and scores (N, n),
    best first. The same seed and batch_size give the same images.
    """
    candidates = max(candidates or n, n)  # fewer candidates than kept images: no choice to make, sample n
    check_knobs(n, candidates, temperature, top_k, top_p, cfg, batch_size)
    device = models.gpt.head.weight.device
    rank = cond if texts_for_ranking is None else texts_for_ranking
    if isinstance(rank, (list, tuple)):
        rank = text_embeddings(models, list(rank))
    rows = cond.to(device).repeat_interleave(candidates, 0)                      # (N*C, D): prompt i at i*C .. i*C+C-1
    rank = F.normalize(rank.float().to(device), dim=-1).repeat_interleave(candidates, 0)
    generator = torch.Generator(device).manual_seed(seed)
    grid = int(models.gpt.config.block_size ** 0.5)
    images, scores = [], []
    with tqdm(total=len(rows), desc="candidates", unit="img", disable=not progress) as bar:
        for s in range(0, len(rows), batch_size):
            tokens = models.gpt.generate(rows[s:s + batch_size], cfg_scale=cfg, temperature=temperature, top_k=top_k,
                                         top_p=top_p, generator=generator)      # (b, h*w) raster order
            x = models.vqgan.decode(tokens.view(-1, grid, grid)).float()         # (b, 3, H, W) in [-1, 1]
            e = models.clip.encode_image(clip_lib.preprocess_tensor(x, models.clip.visual.input_resolution))
            scores.append((F.normalize(e.float(), dim=-1) * rank[s:s + batch_size]).sum(-1))  # cosine, (b,)
            images.append(((x + 1) / 2).clamp(0, 1).cpu())
            bar.update(len(x))
    N = cond.shape[0]
    images = torch.cat(images).view(N, candidates, *images[0].shape[1:])       # (N, C, 3, H, W)
    scores, best = torch.cat(scores).view(N, candidates).cpu().topk(n, dim=1)  # keep the n best, best first
    images = images[torch.arange(N)[:, None], best]                             # (N, n, 3, H, W)
    if not as_float:
        images = images.mul(255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)  # (N, n, H, W, 3)
    return images, scores


def labelled_grid(images, scores, labels, cell=128):
    """uint8 (N, n, H, W, 3) -> one PIL grid: a row per prompt under its label, each image over its CLIP score."""
    N, n, H, W, _ = images.shape
    s = max(1, cell // W)  # nearest-neighbour upscale, so small (32-px) shapes are visible and stay crisp
    w, h, pad, line = W * s, H * s, 4, 12
    text_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t)) for t in labels)
    grid = Image.new("RGB", (max(n * (w + pad), text_w + pad) + pad, N * (line + h + line + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(N):
        y = pad + i * (line + h + line + pad)
        draw.text((pad, y), labels[i], fill="black")
        for k in range(n):
            x = pad + k * (w + pad)
            grid.paste(Image.fromarray(images[i, k].numpy()).resize((w, h), Image.NEAREST), (x, y + line))
            draw.text((x, y + line + h), f"{scores[i, k]:.3f}", fill="black")
    return grid


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # missing, not an image, truncated: PIL raises many types
        raise ValueError(f"cannot read --image {path}: {type(e).__name__}: {e}") from None


def main(args):
    check_knobs(args.n, args.candidates, args.temperature, args.top_k, args.top_p, args.cfg, args.batch_size)
    prompts = list(args.prompt)
    if args.prompts:  # one prompt per line; blank lines are skipped
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file")
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    pictures = [read_image(path) for path in args.image or []]
    if not prompts and not pictures:
        raise ValueError("nothing to draw: give a prompt, --prompts FILE or --image PATH")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else None)
    models = load_models(args.clip, args.vqgan, args.gpt, device=device, dtype=dtype)
    cond = torch.cat(([text_embeddings(models, prompts)] if prompts else [])
                     + ([image_embeddings(models, pictures)] if pictures else []))
    labels = prompts + [f"variations of {Path(p).name}" for p in args.image or []]
    images, scores = generate(models, cond, n=args.n, candidates=args.candidates,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg=args.cfg,
                              seed=args.seed, batch_size=args.batch_size, progress=True)
    out, paths = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60] or "prompt"
        for k in range(args.n):
            paths.append(out / f"{i:03d}-{slug}-{k}.png")
            Image.fromarray(images[i, k].numpy()).save(paths[-1])
            print(f"{paths[-1]}  clip score {scores[i, k]:.3f}")
    labelled_grid(images, scores, labels).save(grid := out / "grid.png")
    print(f"{grid}  ({len(labels)} rows x {args.n}, best of {args.candidates} by CLIP score)")
    return paths, scores


def get_parser():
    p = argparse.ArgumentParser(description="CLIP-GEN: text or image -> images, re-ranked by CLIP",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="*", help="one or more text prompts")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--image", action="append", help="variations of this image (its CLIP embedding); repeatable")
    p.add_argument("--clip", default=SHIPPED["clip"], help=f"CLIP: one of {clip_lib.available_models()} or a path")
    p.add_argument("--vqgan", default=SHIPPED["vqgan"], help="VQGAN checkpoint (ours or taming's .ckpt)")
    p.add_argument("--gpt", default=SHIPPED["gpt"], help="GPT checkpoint from train_gpt.py")
    p.add_argument("--n", type=int, default=4, help="images kept per prompt")
    p.add_argument("--candidates", type=int, default=64,
                   help="images sampled per prompt, re-ranked by CLIP (the shipped shapes GPT draws the asked shape in "
                        "about half of its samples; 64 keep 4 that match, in about a second on a CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and batch size give the same images")
    p.add_argument("--batch-size", type=int, default=16, help="candidates sampled at once")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...; default: cuda if available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else fp32")
    p.add_argument("--out", default="out/samples", help="output folder for the PNGs and grid.png")
    return p


if __name__ == "__main__":
    parser = get_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        parser.exit(2, f"sample.py: error: {e}\n")
