"""Evaluation for clipgen: FID (+ blurred FID-k), Inception Score, CLIP score, shapes-world accuracy.

Each number follows one trusted tool exactly (docs/results.md holds the cross-checks):
- FID: pytorch-fid 0.3.0 (inception.py; x/255, bilinear resize to 299, 2x - 1; float64 mu and sigma with ddof 1;
  scipy's sqrtm with its eps retry and imaginary-part check; its .npz files). FID-k (DALL-E, CogView): both sets
  blurred by PIL's GaussianBlur(radius=k) before the resize. Files go through data.open_image, not convert("RGB").
- IS: torch-fidelity 0.4.0 (uint8, TF1 bilinear resize, (x - 128)/128, bias-free logits, RandomState(2020), 10 splits).
- CLIP score: 100 * max(cos(image, caption), 0) per pair, averaged, for any CLIP that clip.load loads.
- Shapes world: colour by an exact palette analysis, shape and size by the nearest of data.py's drawn shapes.
"""
import functools
import json
import os
import random
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import clip
import data
import inception
import sample
from data import UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
GEN_FLAGS = ("weights", "clip", "vqgan", "gpt", "candidates", "top_k", "top_p", "temperature", "cfg", "seed")

# -----------------------------------------------------------------------------
# the FID network with its weights; images -> Inception inputs per tool; features of a folder


def load_inception(path=None, device="cpu"):
    """The FID network with pytorch-fid's weights, loaded strictly: `path`, else the clipgen or torch.hub cache, else
    a download checked against the SHA256 prefix its name carries (the torch.hub convention)."""
    name = FID_WEIGHTS_URL.rsplit("/", 1)[1]
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / name
    if not path and not (path := next((p for p in (data.CACHE / name, hub) if p.is_file()), None)):
        path = data.download(FID_WEIGHTS_URL, data.CACHE / name)
        if not (digest := data.file_sha256(path)).startswith("6726825d"):
            path.unlink()
            raise UserError(f"{FID_WEIGHTS_URL} arrived with SHA256 {digest[:16]}..., not 6726825d... — run again")
    model = inception.InceptionV3()
    # BatchNorm's num_batches_tracked is bookkeeping that never changes an output: some exports carry it, some do not
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    with data.loading(path, "FID Inception"):  # one line for a corrupt file, pickled code or missing/unexpected keys
        model.load_state_dict(counters | torch.load(path, map_location="cpu", weights_only=True))
    print(f"loaded FID Inception v3 from {path}")
    return model.eval().requires_grad_(False).to(device)


class InceptionFolder(data.ImageFolder):
    """Every image under root, whole, blurred if asked -> (3, 299, 299) inputs of pytorch-fid or torch-fidelity."""

    def __init__(self, root, blur=0, tool="fid"):
        super().__init__(root, resolution=299, train=False)
        self.blur, self.tool = blur, tool

    def __getitem__(self, index):
        img = data.open_or_skip(self.files[index])
        if img is None:
            return None
        if self.blur:  # DALL-E / CogView FID-k; PIL's radius is the Gaussian's standard deviation
            img = img.filter(ImageFilter.GaussianBlur(self.blur))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None]  # (1, 3, H, W) in [0, 255]
        x = inception.fid_input(x / 255) if self.tool == "fid" else inception.fidelity_input(x)  # / 255: ToTensor's
        return dict(image=x[0], index=index)


@torch.no_grad()
def folder_features(model, root, blur=0, tool="fid", dims=2048, batch_size=50, device="cpu"):
    """Every readable image under root -> float64 (N, dims) pytorch-fid features, or (N, 1008) IS logits (tool "is")."""
    ds, out, skipped = InceptionFolder(root, blur, tool), [], 0
    desc = f"inception {tool} {Path(root).name}" + (f" blur {blur}" if blur else "")
    for batch in data.progress(data.make_loader(ds, batch_size, train=False), desc=desc, leave=False):
        skipped += batch["skipped"]
        if "image" in batch:
            x = batch["image"].to(device)
            out.append((model(x, dims) if tool == "fid" else model.logits(x)).double().cpu())
    if skipped:
        print(f"{root}: skipped {skipped} unreadable image(s) of {len(ds)}")
    if not out:
        raise UserError(f"{root}: none of its {len(ds)} image files could be read — see the warnings above")
    return torch.cat(out).numpy()


# -----------------------------------------------------------------------------
# metrics


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed exactly as pytorch-fid 0.3.0 does."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"the two statistics differ in size ({mu1.shape[0]} vs {mu2.shape[0]}) — use the same --dims")
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
    logits, n, scores = torch.as_tensor(np.asarray(logits)).double(), len(logits), []
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    for part in (slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)):
        q = p[part].mean(0, keepdim=True)  # p(y) of the split
        scores.append((p[part] * (log_p[part] - q.log())).sum(1).mean().exp().item())  # exp(E KL(p(y|x) || p(y)))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def clip_score(model, preprocess, images, captions, batch_size=64):
    """100 * max(cos(E_image, E_caption), 0) per pair, for `images` (PIL or paths) and their `captions` -> (N,)."""
    p, out = next(model.parameters()), []
    for i in range(0, len(images), batch_size):  # paths are opened one batch at a time
        pil = [data.open_image(im) if isinstance(im, (str, Path)) else im for im in images[i:i + batch_size]]
        x = torch.stack([preprocess(im) for im in pil]).to(p.device, p.dtype)
        tokens = clip.tokenize(captions[i:i + batch_size], model.context_length, truncate=True).to(p.device)
        cos = F.cosine_similarity(model.encode_image(x).float(), model.encode_text(tokens).float(), dim=-1)
        out.append(100 * cos.clamp(min=0).cpu())
    return torch.cat(out).numpy()


# -----------------------------------------------------------------------------
# shapes-world accuracy: colour by palette analysis, shape and size by drawn templates (never the generator's CLIP)

PALETTE = torch.tensor(list(data.COLORS.values()), dtype=torch.float32) / 255  # (8, 3), data.COLORS' order
JUDGE_RES = 64  # data.py's shapes resolution: the judge sees every image at this size


def palette_counts(labels):  # (N, L) palette indices -> (N, 8) how many of each colour
    return torch.zeros(len(labels), len(PALETTE), dtype=torch.long).scatter_add_(1, labels, torch.ones_like(labels))


def palette_analysis(x):
    """x (N, 3, H, W) in [0, 1] -> (shape colour (N,), background (N,)) palette indices; -1 = no shape pixels. Each
    pixel takes its nearest palette colour; the background is the commonest on the border, the shape's the next."""
    # nearest palette colour: argmin ||x - p||^2 = argmin (||p||^2 - 2 x.p)
    labels = ((PALETTE ** 2).sum(1)[:, None, None] - 2 * torch.einsum("nchw,kc->nkhw", x, PALETTE)).argmin(1)
    bg = palette_counts(torch.cat([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], 1)).argmax(1)
    counts = palette_counts(labels.flatten(1))  # (N, 8) pixels per palette colour
    counts[torch.arange(len(x)), bg] = 0
    return torch.where(counts.max(1).values > 0, counts.argmax(1), -1), bg


def foreground_map(x, color, bg):
    """Where the shape is, centred: (N, 1, 64, 64), how far each pixel is along the background -> shape colour line
    from the border's level (shades and generators move colours off the palette), clamped to [0, 1], then moved so
    that its centroid is the centre (generated shapes drift). Colour-free, and graceful under blur and noise."""
    x = F.interpolate(x, size=(JUDGE_RES, JUDGE_RES), mode="bilinear", antialias=True, align_corners=False)
    b, c = PALETTE[bg][:, :, None, None], PALETTE[color.clamp(min=0)][:, :, None, None]  # (N, 3, 1, 1)
    t = ((x - b) * (c - b)).sum(1) / ((c - b) ** 2).sum(1).clamp(min=1e-6)  # (N, 64, 64)
    lo = torch.cat([t[:, 0], t[:, -1], t[:, :, 0], t[:, :, -1]], 1).median(1).values[:, None, None]  # (N, 1, 1)
    m = (t - lo).clamp(0, 1)[:, None] * (color >= 0)[:, None, None, None]  # (N, 1, 64, 64)
    grid = torch.linspace(-1 + 1 / JUDGE_RES, 1 - 1 / JUDGE_RES, JUDGE_RES)  # pixel centres in grid_sample's [-1, 1]
    mass = m.sum((2, 3))[..., None].clamp(min=1e-6)  # (N, 1, 1)
    centroid = torch.stack([(m.sum(2) * grid).sum(-1), (m.sum(3) * grid).sum(-1)], -1) / mass  # (N, 1, 2): x, y
    theta = torch.cat([torch.eye(2).expand(len(m), 2, 2), centroid.mT], 2)  # (N, 2, 3): pixel p samples p + centroid
    return F.grid_sample(m, F.affine_grid(theta, list(m.shape), align_corners=False), align_corners=False)


@functools.lru_cache
def shape_templates(resolution):
    """Each shape drawn by data.render at `resolution`, at 5 radii over each size's range (2 were too few; the ranges
    do not overlap), through foreground_map -> maps (T, 64*64), labels (T, 2): shape, size. Nothing is trained."""
    attrs = [dict(color=0, bg=1, shape=shape, size=size, r=float(r), cx=0.5, cy=0.5)  # red on green: any pair does
             for size, name in enumerate(data.SIZES) for r in np.linspace(*data.RADIUS[name], 5)
             for shape in range(len(data.SHAPES))]
    x = (torch.stack([data.to_tensor(data.render(a, resolution)) for a in attrs]) + 1) / 2  # (T, 3, R, R) in [0, 1]
    fg = foreground_map(x, torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long))
    return fg.flatten(1), torch.tensor([(a["shape"], a["size"]) for a in attrs])


@torch.no_grad()
def shapes_accuracy(images, colors, shapes, sizes=None, bgs=None):
    """uint8 images (N, H, W, 3) and what each was asked for (indices into data.COLORS, SHAPES, SIZES, COLORS; sizes,
    bgs None where the prompts name none) -> {color, shape, both, [size, bg, all]}_acc, n and ok: (N,) bool, every
    named attribute right. Shape and size: the template's with the highest soft IoU with the image's foreground."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W) in [0, 1]
    color, bg = palette_analysis(x)
    templates, labels = shape_templates(x.shape[-1])  # (T, 64*64), (T, 2)
    f = foreground_map(x, color, bg).flatten(1)  # (N, 64*64)
    inter = f @ templates.T  # (N, T) soft intersections
    iou = inter / (f.sum(1, keepdim=True) + templates.sum(1) - inter)  # intersection / union
    shape, size = labels[iou.argmax(1)].unbind(1)  # the best template's
    pred = {"color": color, "shape": shape, "size": size, "bg": bg}
    asked = {"color": colors, "shape": shapes, "size": sizes, "bg": bgs}
    hit = {name: pred[name] == torch.tensor(want) for name, want in asked.items() if want is not None}
    ok, rate = torch.stack(list(hit.values())).all(0), lambda t: t.double().mean().item()
    return {f"{name}_acc": rate(t) for name, t in hit.items()} | ({"all_acc": rate(ok)} if len(hit) > 2 else {}) | {
        "both_acc": rate(hit["color"] & hit["shape"]), "n": len(x), "ok": ok}


def near_match(x, ref, tol=1):
    """x (N, D), ref (M, D) uint8 -> (N,) bool: x[i] is within `tol` of some row of ref in every byte."""
    worst = [torch.cdist(x.float(), r.float(), p=float("inf")).amin(1) for r in ref.split(1024)]  # max |difference|
    return torch.stack(worst).amin(0) <= tol


def count_distinct(x, tol=1):
    """x (n, D) uint8 -> how many rows are not within `tol` (every byte) of an earlier row."""
    near = torch.cdist(x.float(), x.float(), p=float("inf")) <= tol             # (n, n)
    return int((~near.tril(-1).any(1)).sum())


@torch.no_grad()
def training_reconstructions(models):
    """The VQGAN reconstructions of the images the GPT trained on (its data_meta) -> uint8 (M, H*W*3), in the byte
    layout of sample.generate's images."""
    if (meta := models.meta).get("dataset") != "shapes":
        raise UserError(f"--copies redraws the shapes images a GPT trained on; this GPT's are {meta.get('dataset')!r} "
                        f"— drop --copies")
    ds = data.get_dataset("shapes", "train", meta["resolution"], False, meta["n_images"],
                          bool(meta.get("held_out_excluded")))
    out, device = [], next(models.vqgan.parameters()).device
    for batch in data.progress(data.make_loader(ds, 500, train=False, workers=0), desc="reconstructions", leave=False):
        x = models.vqgan.decode(models.vqgan.encode(batch["image"].to(device))).float().cpu()  # (b, 3, H, W), [-1, 1]
        out.append(((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).flatten(1))
    return torch.cat(out)


# -----------------------------------------------------------------------------
# commands


def fid_stats(model, src, args):
    """A folder or a pytorch-fid .npz -> ({blur: (mu, sigma)}, images used); FID-k adds mu_blur{k}, sigma_blur{k}."""
    if str(src).endswith(".npz"):
        keys = {k: ("mu", "sigma") if k == 0 else (f"mu_blur{k}", f"sigma_blur{k}") for k in args.blur}
        try:
            with np.load(src) as f:
                found, names, n = {k: (f[m][:], f[s][:]) for k, (m, s) in keys.items() if m in f}, sorted(f), f.get("n")
        except Exception as e:  # missing, truncated, not an archive: numpy raises many types
            raise UserError(f"cannot read {src} ({type(e).__name__}: {e}) — pass an .npz of evaluate.py stats")
        if missing := sorted(keys.keys() - found.keys()):
            raise UserError(f"{src} has no statistics for blur {missing} (keys {names}) — write them with python "
                            f"evaluate.py stats REF_FOLDER --out {src} --blur {' '.join(map(str, args.blur))}")
        return found, None if n is None else int(n)
    out = {}
    for k in args.blur:  # float64 mu and sigma with ddof 1: pytorch-fid's statistics
        f = folder_features(model, src, k, "fid", args.dims, args.batch_size, args.device)
        out[k] = f.mean(0), np.cov(f, rowvar=False)
    if len(f) < args.dims:
        print(f"warning: {src} has {len(f)} images, fewer than the {args.dims} a full-rank covariance needs: "
              f"FID is biased upwards and not comparable with published numbers (use 10k-50k)")
    return out, len(f)


def fids(model, a, b, args):
    (sa, _), (sb, _) = fid_stats(model, a, args), fid_stats(model, b, args)
    return {f"fid{k}": frechet_distance(*sa[k], *sb[k]) for k in args.blur}


def inception_scores(model, folder, args):
    logits = folder_features(model, folder, 0, "is", 2048, args.batch_size, args.device)
    if len(logits) < args.splits:
        raise UserError(f"--splits {args.splits}: {folder} has only {len(logits)} images — lower --splits")
    return dict(zip(("is", "is_std"), inception_score(logits, args.splits)), n=len(logits))


def read_captions(path, n, seed):
    """A .txt (one caption per line) or COCO's captions_*.json (one random caption of each image, the COCO-30k
    protocol) -> a seeded random subset of n captions, in file order."""
    if not (p := Path(path)).is_file():
        raise UserError(f"--captions {path}: no such file — pass a .txt (one per line) or COCO's captions_*.json")
    if p.suffix == ".json":
        per_image, rng = {}, random.Random(seed)
        try:
            for a in json.loads(p.read_text())["annotations"]:
                per_image.setdefault(a["image_id"], []).append(a["caption"].strip())
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not the captions layout
            raise UserError(f"--captions {path} is not COCO's captions json ({e!r}) — pass that or a .txt")
        captions = [rng.choice(caps) for _, caps in sorted(per_image.items())]
    else:
        captions = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not captions:
        raise UserError(f"--captions {path} holds no captions — one per line, or COCO's captions json")
    return [captions[i] for i in sorted(random.Random(seed).sample(range(len(captions)), min(n, len(captions))))]


def generator(args):
    """sample.py's models of `args` -> (models, generate(prompts, n): uint8 images (len(prompts), n, H, W, 3) drawn
    with the flags of `args`)."""
    files = sample.fetch_release() if args.weights == "hfai-coco" else sample.SHIPPED
    models = sample.load_models(*(getattr(args, k) or files[k] for k in ("clip", "vqgan", "gpt")), device=args.device)
    flags = {k: getattr(args, k) for k in ("candidates", "temperature", "top_k", "top_p", "cfg", "seed")}
    return models, lambda prompts, n: sample.generate(models, sample.text_embeddings(models, prompts), n=n,
                                                      batch_size=args.gen_batch_size, **flags)[0]


QUICKSTART = "a red circle on a blue background"  # the README's first command


def quickstart(models):
    """sample.py's defaults on QUICKSTART, seeds 0-7 -> how many kept images are a red circle on blue, and the fewest
    distinct images one seed kept."""
    p, right, distinct = sample.get_parser(), 0, []
    flags = {k: p.get_default(k) for k in ("temperature", "cfg", "batch_size")} | sample.DEFAULTS[models.meta["layout"]]
    red, circle, blue = ([i] * flags["n"] for i in (data.COLOR_NAMES.index("red"), data.SHAPES.index("circle"),
                                                      data.COLOR_NAMES.index("blue")))
    for seed in range(8):
        images = sample.generate(models, sample.text_embeddings(models, [QUICKSTART]), seed=seed, **flags)[0][0]
        right += int(shapes_accuracy(images, red, circle, bgs=blue)["ok"].sum())  # images (n, H, W, 3)
        distinct.append(count_distinct(images.flatten(1)))
    return {"quickstart_right": right, "quickstart_kept": 8 * flags["n"], "quickstart_min_distinct": min(distinct)}


def cmd_shapes(args):
    """Every colour x shape pair, args.n images each, judged; also the seen pairs and data.HELD_OUT's (which the GPT
    never saw) apart; duplicates among each prompt's images; on request copies of training images, the quick start."""
    models, generate = generator(args)
    prompts = data.shapes_prompts(full=args.prompts == "full")                  # one per colour x shape pair
    images = generate([p["text"] for p in prompts], args.n)                     # (P, n, H, W, 3) uint8
    asked = [p for p in prompts for _ in range(args.n)]                         # the prompt of each image
    results = {"n": len(asked)}
    held = [(p["color"], p["shape"]) in data.HELD_OUT_IDS for p in asked]       # per image: a pair the GPT never saw
    for group, take in (("", (False, True)), ("seen_", (False,)), ("held_out_", (True,))):
        rows = [i for i, h in enumerate(held) if h in take]
        named = [None if asked[0][k] is None else [asked[i][k] for i in rows] for k in ("color", "shape", "size", "bg")]
        acc = shapes_accuracy(images.flatten(0, 1)[rows], *named)
        results |= {group + k: v for k, v in acc.items() if k.endswith("_acc")}
    kept = images.flatten(2)                                                    # (P, n, H*W*3) bytes
    distinct = [count_distinct(k) for k in kept]                               # per prompt
    results |= {"duplicates": sum(args.n - d for d in distinct), "distinct_per_prompt": float(np.mean(distinct))}
    if args.copies:  # kept images within 1/255 of a training image's reconstruction
        results["copies"] = near_match(kept.flatten(0, 1), training_reconstructions(models)).float().mean().item()
    return results | (quickstart(models) if args.quickstart else {})


def cmd_coco(args, model):
    """One image per caption into --out/images (a rerun resumes), then FID-k against --ref-stats, IS and CLIP score."""
    captions, out = read_captions(args.captions, args.count, args.seed), Path(args.out)
    run = {"captions": captions} | {k: getattr(args, k) for k in GEN_FLAGS}  # what decides the images
    old = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
    # never mix two runs; a run.json without images (its generator failed to load) is simply replaced
    if out.is_file() or old != run and any((out / "images").glob("*.png")) or not old and any(out.glob("*")):
        what = ("is a file" if out.is_file() else "holds another run (its images were made from other captions or "
                "generation flags: run.json)" if old else "holds other files and no run.json")
        raise UserError(f"--out {out} {what} — choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run))
    todo = [i for i in range(len(captions)) if not (out / "images" / f"{i:05d}.png").exists()]
    generate = generator(args)[1] if todo else None
    for j in data.progress(range(0, len(todo), 256), desc="captions, by 256"):  # a kill loses at most one chunk
        ids = todo[j:j + 256]
        for i, im in zip(ids, generate([captions[i] for i in ids], 1)[:, 0].numpy()):
            Image.fromarray(im).save(out / "images" / f"{i:05d}.png")
    results = fids(model, out / "images", args.ref_stats, args) | inception_scores(model, out / "images", args)
    load_clip = functools.partial(clip.load, device=args.device)
    cm, pre = (load_clip(args.score_clip) if args.score_clip in clip.available_models()  # a name: downloaded, verified
               else data.load_model(load_clip, args.score_clip, "clip"))
    paths = [out / "images" / f"{i:05d}.png" for i in range(len(captions))]
    return results | {"clip_score": float(clip_score(cm, pre, paths, captions).mean())}


def main(args):
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions move FID features by ~1e-3: keep float32 exact
    args.device = data.pick_device(args.device)
    settings = {k: v for k, v in vars(args).items() if k in GEN_FLAGS + ("n", "prompts", "count", "blur", "dims",
                                                                         "ref_stats", "score_clip", "splits")}
    if args.cmd in ("shapes", "coco"):  # every setting that changes a number is printed with it
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if args.cmd == "stats" and Path(args.out).exists():
        raise UserError(f"--out {args.out} exists — remove it or choose another --out")
    model = load_inception(args.inception, args.device) if args.cmd != "shapes" else None
    if args.cmd == "stats":
        st, n = fid_stats(model, args.folder, args)
        np.savez_compressed(args.out, n=n, **{f"{m}_blur{k}" if k else m: v for k, pair in st.items()
                                              for m, v in zip(("mu", "sigma"), pair)})
        results = {"n": n, "written": args.out}
    elif args.cmd == "fid":
        results = fids(model, args.a, args.b, args)
    elif args.cmd == "is":
        results = inception_scores(model, args.folder, args)
    else:
        results = cmd_shapes(args) if args.cmd == "shapes" else cmd_coco(args, model)
    print(json.dumps({"command": args.cmd, "results": results, "settings": settings}) if args.json else "\n".join(
        f"{k:<24} {v:.4f}" if isinstance(v, float) else f"{k:<24} {v}" for k, v in results.items()))
    return results


def get_parser():
    p = data.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    helps = {"stats": "write the FID statistics (.npz) of a reference folder", "fid": "FID(-k) of two folders / .npz",
             "is": "Inception Score of a folder", "shapes": "shapes-world colour and shape accuracy of a generator",
             "coco": "generate one image per caption, then FID-k, IS and CLIP score against reference statistics"}
    cmds = {name: sub.add_parser(name, help=h, description=h) for name, h in helps.items()}
    count = data.num(int, lo=1)
    for name, q in cmds.items():
        q.add_argument("--json", action="store_true", help="print one JSON line instead of one line per metric")
        q.add_argument("--device", help="cpu, cuda, cuda:N or mps; None: cuda if there is one")
        if name != "shapes":
            q.add_argument("--inception", help=f"pytorch-fid's weight file; None: the copy in {data.CACHE} or "
                                               f"torch.hub's cache, else a download")
            q.add_argument("--batch-size", type=count, default=50, help="images per Inception batch")
        if name in ("stats", "fid", "coco"):
            q.add_argument("--blur", type=data.num(int, 0, 64), nargs="+", default=[0, 1, 2] if name == "coco" else [0],
                           help="FID-k radii: PIL GaussianBlur(k) of both sets (0 = plain FID)")
            q.add_argument("--dims", type=int, choices=inception.DIMS, default=2048, help="features, as pytorch-fid's")
        if name in ("is", "coco"):
            q.add_argument("--splits", type=count, default=10, help="IS splits (torch-fidelity: 10)")
        if name in ("shapes", "coco"):  # the generator, through sample.py
            q.add_argument("--weights", choices=["shapes", "hfai-coco"], default="shapes", help="as for sample.py")
            for kind in ("clip", "vqgan", "gpt"):
                q.add_argument(f"--{kind}", help=f"{kind} file instead of --weights' (as for sample.py)")
            q.add_argument("--candidates", type=count, default=1, help="samples per prompt, the best by CLIP kept")
            q.add_argument("--top-k", type=count, help="sample among the k likeliest tokens")
            q.add_argument("--top-p", type=data.num(float, 0, 1, lo_open=True), help="nucleus sampling mass")
            q.add_argument("--temperature", type=data.num(float, 0, lo_open=True), default=1.0)
            q.add_argument("--cfg", type=data.num(float, 0), default=1.0, help="classifier-free guidance (1 = off)")
            q.add_argument("--seed", type=data.num(int, 0), default=0)
            q.add_argument("--gen-batch-size", type=count, default=32, help="samples drawn at once")
    cmds["stats"].add_argument("folder")
    cmds["stats"].add_argument("--out", required=True, help="the .npz to write (pytorch-fid's keys)")
    cmds["fid"].add_argument("a", help="folder or .npz")
    cmds["fid"].add_argument("b", help="folder or .npz")
    cmds["is"].add_argument("folder")
    cmds["shapes"].add_argument("--n", type=count, default=8, help="images per colour-shape prompt (48 prompts)")
    cmds["shapes"].add_argument("--prompts", choices=["short", "full"], default="short", help="short: 'a red circle'; "
                                "full: 'a {size} {colour} {shape} on a {bg} background' (size and bg judged too)")
    cmds["shapes"].add_argument("--copies", action="store_true", help="also the share of kept images within 1/255 of "
                                "the VQGAN reconstruction of an image the GPT trained on")
    cmds["shapes"].add_argument("--quickstart", action="store_true", help=f"also {QUICKSTART!r} with sample.py's "
                                "defaults, seeds 0-7: kept images that are right, the fewest distinct per seed")
    q = cmds["coco"]
    q.add_argument("--captions", required=True, help="a .txt (one caption per line) or COCO's captions_*.json")
    q.add_argument("--ref-stats", required=True, help="reference .npz (evaluate.py stats --blur 0 1 2) or folder")
    q.add_argument("--count", type=count, default=30_000, help="captions used (a seeded random subset)")
    q.add_argument("--out", default="out/coco_eval", help="images/ and run.json go here; a rerun resumes")
    q.add_argument("--score-clip", default="ViT-B/32", help="the CLIP of the CLIP score (clip.load name or file)")
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
