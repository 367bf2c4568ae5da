"""Text (or an image) -> images with CLIP-GEN (Wang et al. 2022, arXiv 2203.00386, sec. 3.3), with CLIP re-ranking.

    python sample.py "a red circle on a blue background"       # the shipped shapes-world checkpoints
    python sample.py "oil painting of a dog" --weights hfai-coco  # HFAiLab's COCO release (downloaded on first use)

main(): CLIP embeds the prompt (1, D) -> generate(): the GPT samples `candidates` token grids (C, h*w) on it, the
VQGAN decodes them (C, 3, H, W), CLIP scores each against the prompt -> main(): the best `n` as PNGs and one grid.
"""
import functools
import itertools
import json
import os
import re
import warnings
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip as clip_lib
import data
from gpt import GPT, NO_NULL
from vqgan import VQGAN

SHIPPED = {k: str(Path(__file__).resolve().parent / f"checkpoints/shapes/{k}.pt") for k in ("clip", "vqgan", "gpt")}
# HFAiLab's CLIP-GEN release v0.1.0 (MS-COCO, no published checksums); env CLIPGEN_HFAI_URL replaces the address
HFAI_URL = "https://github.com/HFAiLab/clip-gen/releases/download/v0.1.0"
HFAI_FILES = {"clip": "clip_vit_b32.pt", "vqgan": "vqgan_coco.pt", "gpt": "gpt_coco.pt"}
# flags not given: ours, or HFAiLab's demo.py settings for a GPT in their layout
DEFAULTS = {"clipgen": dict(n=4, candidates=64), "hfai": dict(n=8, candidates=64, top_k=500, top_p=0.95)}
Models = namedtuple("Models", "clip preprocess vqgan gpt meta")  # meta: the GPT's record of its training data


def fetch_release(folder=None):
    """HFAiLab's three files in the cache, downloaded on first use; SHA256 recorded then and checked on every run."""
    folder, base = Path(folder or data.CACHE / "hfai-coco"), os.environ.get("CLIPGEN_HFAI_URL", HFAI_URL)
    record = folder / "sha256.json"
    sums = json.loads(record.read_text()) if record.is_file() else {}
    for name in HFAI_FILES.values():
        try:
            path = folder / name if (folder / name).is_file() else data.download(f"{base}/{name}", folder / name)
        except data.UserError as e:  # offline: say where all three files go
            raise data.UserError(f"{e}, beside {' and '.join(n for n in HFAI_FILES.values() if n != name)}") from None
        digest = data.file_sha256(path)
        if sums.setdefault(name, digest) != digest:
            raise data.UserError(f"{path} changed since it was first fetched (SHA256 {digest[:12]}..., recorded "
                                 f"{sums[name][:12]}... in {record}) — delete it to download it again")
    data.save_atomic(json.dumps(sums, indent=1), record)
    return {kind: str(folder / name) for kind, name in HFAI_FILES.items()}


def load_models(clip=SHIPPED["clip"], vqgan=SHIPPED["vqgan"], gpt=SHIPPED["gpt"], device="cpu", dtype=None):
    """Load CLIP, VQGAN and GPT (ours, taming's, OpenAI's or HFAiLab's) and refuse a combination that does not fit."""
    paths, dtype = {"clip": clip, "vqgan": vqgan, "gpt": gpt}, dtype or torch.float32
    load_clip = functools.partial(clip_lib.load, device=device, dtype=dtype)
    clip_model, preprocess = (load_clip(clip) if clip in clip_lib.available_models() and not Path(clip).is_file()
                              else data.load_model(load_clip, clip, "clip"))  # a name: downloaded and verified
    vq = data.load_model(lambda p: VQGAN.from_checkpoint(p, device=device), vqgan, "vqgan").to(dtype)
    g = data.load_model(lambda p: GPT.from_checkpoint(p, device=device), gpt, "gpt").to(dtype)
    ckpt = torch.load(gpt, map_location="cpu", weights_only=True, mmap=True)  # for its record of its training data
    meta = dict(ckpt.get("data_meta") or {}, layout="clipgen" if "config" in ckpt else "hfai")
    c, v, d = g.config, vq.config, clip_model.embed_dim
    problems = [m for bad, m in [
        (c.vocab_size != v.n_embed, f"the GPT predicts {c.vocab_size} token ids, the VQGAN has {v.n_embed} codes"),
        (c.block_size != v.grid ** 2, f"the GPT makes {c.block_size} tokens, the VQGAN's grid is {v.grid}x{v.grid}"),
        (c.cond_dim != d, f"the GPT takes {c.cond_dim}-d conditions, this CLIP makes {d}-d embeddings")] if bad]
    # train_gpt.py records the CLIP and VQGAN files of its training data: another one of the same size does not fit
    for kind in ("clip", "vqgan"):
        if (want := meta.get(f"{kind}_sha256")) and want != paths[kind] and data.file_sha256(paths[kind]) != want:
            problems.append(f"its training data was made with {kind} {meta.get(kind)} (sha256 {want[:12]}...)")
    if problems:
        raise data.UserError(f"{gpt} does not fit --clip {clip} / --vqgan {vqgan}: " + "; ".join(problems)
                             + " — pass the CLIP and VQGAN the GPT was trained with (train_gpt.py records them)")
    if "vqgan_sha256" not in meta:
        print(f"note: {gpt} records no CLIP or VQGAN file it was trained with: only their sizes were checked")
    return Models(clip_model, preprocess, vq, g, meta)


@torch.no_grad()
def text_embeddings(models, prompts):
    """N prompts -> (N, D) L2-normalised CLIP text embeddings; over-long prompts are truncated with a warning."""
    for p in (p for p in prompts if len(clip_lib.get_tokenizer().encode(p)) + 2 > models.clip.context_length):
        warnings.warn(f"prompt {p[:40]!r}... is over CLIP's {models.clip.context_length} tokens: truncated")
    tokens = clip_lib.tokenize(prompts, models.clip.context_length, truncate=True)
    return F.normalize(models.clip.encode_text(tokens.to(models.clip.text_projection.device)).float(), dim=-1)


@torch.no_grad()
def generate(models, cond, n=1, candidates=None, texts_for_ranking=None, temperature=1.0, top_k=None, top_p=None,
             cfg=1.0, seed=0, batch_size=16, as_float=False, progress=False):
    """cond (N, D) CLIP embeddings -> per row the best n of max(candidates, n) samples by CLIP cosine to
    texts_for_ranking ((N, D), default cond): uint8 (N, n, H, W, 3) (as_float: (N, n, 3, H, W) in [0, 1]) and scores
    (N, n), best first. The same seed and batch_size give the same images."""
    candidates, device, grid = max(candidates or n, n), models.gpt.head.weight.device, models.vqgan.config.grid
    rows = cond.to(device).repeat_interleave(candidates, 0)                      # (N*C, D): prompt i at i*C .. i*C+C-1
    rank = F.normalize((cond if texts_for_ranking is None else texts_for_ranking).float().to(device), dim=-1)
    rank = rank.repeat_interleave(candidates, 0)
    generator, images, scores = torch.Generator(device).manual_seed(seed), [], []
    starts = range(0, len(rows), batch_size)
    for s in data.progress(starts, desc=f"batches of {batch_size} candidates") if progress else starts:
        tokens = models.gpt.generate(rows[s:s + batch_size], cfg_scale=cfg, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=generator)      # (b, h*w) raster order
        x = models.vqgan.decode(tokens.view(-1, grid, grid)).float()         # (b, 3, H, W) in [-1, 1]
        # CLIP sees what its training saw: a bicubic resize to its resolution and its mean/std normalisation
        e = models.clip.encode_image(clip_lib.preprocess_tensor(x, models.clip.visual.input_resolution))
        scores.append((F.normalize(e.float(), dim=-1) * rank[s:s + batch_size]).sum(-1))  # cosine, (b,)
        images.append(((x + 1) / 2).clamp(0, 1).cpu())
    N = cond.shape[0]
    images = torch.cat(images).view(N, candidates, *images[0].shape[1:])        # (N, C, 3, H, W)
    scores, best = torch.cat(scores).view(N, candidates).cpu().topk(n, dim=1)  # keep the n best, best first
    images = images[torch.arange(N)[:, None], best]                             # (N, n, 3, H, W)
    if not as_float:
        images = images.mul(255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)  # (N, n, H, W, 3)
    return images, scores


def labelled_grid(images, scores, labels, cell=128):
    """uint8 (N, n, H, W, 3) -> one PIL grid: a row per prompt under its label, each image over its CLIP score."""
    N, n, H, W, _ = images.shape
    w, h = W * max(1, cell // W), H * max(1, cell // W)  # nearest upscale: small (32-px) shapes stay visible, crisp
    text_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t) for t in labels)  # the widest label
    draw = ImageDraw.Draw(grid := Image.new("RGB", (max(n * (w + 4), int(text_w) + 4) + 4, N * (h + 28) + 4), "white"))
    for i, k in itertools.product(range(N), range(n)):
        x, y = 4 + k * (w + 4), 4 + i * (h + 28)
        draw.text((4, y), labels[i], fill="black")
        grid.paste(Image.fromarray(images[i, k].numpy()).resize((w, h), Image.NEAREST), (x, y + 12))
        draw.text((x, y + 12 + h), f"{scores[i, k]:.3f}", fill="black")
    return grid


def main(args):
    prompts, out = args.prompt, Path(args.out)
    try:  # missing, unreadable, not an image, truncated: PIL raises many types (their messages name the file)
        pictures = [data.open_image(path) for path in args.image or []]
    except Exception as e:
        raise data.UserError(f"cannot read --image ({type(e).__name__}: {e}) — pass an image file") from None
    if not prompts and not pictures or any(not p.strip() for p in prompts):
        raise data.UserError('nothing to draw — give a prompt (e.g. "a red circle on a blue background") or --image')
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):  # fail now, not after the sampling
        raise data.UserError(f"--out {out} is a file or inside one — pass a folder (each run adds a sub-folder)")
    device, files = data.pick_device(args.device), (fetch_release() if args.weights == "hfai-coco" else SHIPPED)
    models = load_models(*(getattr(args, k) or files[k] for k in ("clip", "vqgan", "gpt")), device=device,
                         dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cfg != 1 and not models.gpt.config.null_cond:
        raise data.UserError(f"--cfg {args.cfg}: {NO_NULL} — use --cfg 1")
    words = {w for p in prompts for w in re.findall(r"[a-z]+", p.lower())}
    if models.meta.get("dataset") == "shapes" and (unknown := sorted(words - data.shapes_words())):
        print(f"note: the shapes-world models know only coloured shapes, not {', '.join(unknown)}; for real images: "
              f"python sample.py \"{prompts[0]}\" --weights hfai-coco")
    knobs = {k: DEFAULTS[models.meta["layout"]].get(k) if getattr(args, k) is None else getattr(args, k)
             for k in ("n", "candidates", "top_k", "top_p")}
    cond = [text_embeddings(models, prompts)] if prompts else []
    if pictures:  # variations: the images' own CLIP embeddings, (N, 3, R, R) -> (N, D)
        with torch.no_grad():
            x = torch.stack([models.preprocess(im) for im in pictures]).to(device)
            cond.append(F.normalize(models.clip.encode_image(x).float(), dim=-1))
    labels = prompts + [f"variations of {Path(p).name}" for p in args.image or []]
    images, scores = generate(models, torch.cat(cond), temperature=args.temperature, cfg=args.cfg, seed=args.seed,
                              batch_size=args.batch_size, progress=True, **knobs)
    run = next(out / f"{i:03d}" for i in itertools.count() if not (out / f"{i:03d}").exists())  # a new sub-folder
    run.mkdir(parents=True)
    paths = []
    for (i, label), k in itertools.product(enumerate(labels), range(knobs["n"])):
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60] or "prompt"
        paths.append(run / f"{i:03d}-{slug}-{k}.png")
        Image.fromarray(images[i, k].numpy()).save(paths[-1])
        print(f"{paths[-1]}  clip score {scores[i, k]:.3f}")
    labelled_grid(images, scores, labels).save(run / "grid.png")
    print(f"{run / 'grid.png'}  (best {knobs['n']} of {knobs['candidates']} by CLIP, top-k {knobs['top_k']}, "
          f"top-p {knobs['top_p']})")
    return paths, scores


def get_parser():
    num, p = data.num, data.ArgumentParser(prog="sample.py", description="CLIP-GEN: text or image -> images")
    p.add_argument("prompt", nargs="*", help="one or more text prompts")
    p.add_argument("--image", action="append", help="variations of this image (its CLIP embedding); repeatable")
    p.add_argument("--weights", choices=["shapes", "hfai-coco"], default="shapes", help="the shipped shapes world, "
                   f"or HFAiLab's MS-COCO release (~2.3 GB, downloaded into {data.CACHE / 'hfai-coco'} on first use)")
    p.add_argument("--clip", help=f"CLIP instead of --weights': one of {clip_lib.available_models()} or a file")
    p.add_argument("--vqgan", help="VQGAN file instead of --weights' (ours, taming's .ckpt or HFAiLab's)")
    p.add_argument("--gpt", help="GPT file instead of --weights' (from train_gpt.py, or HFAiLab's gpt_coco.pt)")
    p.add_argument("--n", type=num(int, 1), help="images kept per prompt; unset: 4, or 8 for HFAiLab's GPT")
    p.add_argument("--candidates", type=num(int, 1), help="images sampled per prompt, re-ranked by CLIP; unset: 64")
    p.add_argument("--temperature", type=num(float, 0, lo_open=True), default=1.0, help="softmax temperature")
    p.add_argument("--top-k", type=num(int, 1), help="keep the k likeliest tokens; unset: all, 500 for HFAiLab's GPT")
    p.add_argument("--top-p", type=num(float, 0, 1, lo_open=True), help="nucleus mass; unset: 1, HFAiLab's GPT 0.95")
    p.add_argument("--cfg", type=num(float, 0, 100), default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=num(int, 0), default=0, help="the same seed and batch size give the same images")
    p.add_argument("--batch-size", type=num(int, 1), default=16, help="candidates sampled at once")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps; default: cuda if available (bfloat16 there)")
    p.add_argument("--out", default="out/samples", help="each run writes its PNGs and grid.png into a new "
                   "numbered sub-folder of this folder (000, 001, ...): runs never mix")
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
