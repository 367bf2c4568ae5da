"""Datasets for clipgen, shared by the trainers and evaluate.py, plus the plumbing every script shares.

Two worlds (see README):
- real images: an ImageNet-style tree (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`) or any folder of images, nested
  or flat. Corrupt files are skipped with a warning and counted, never fatal.
- the procedural `shapes` world: one coloured shape, centred, on a plain background, deterministic from (seed, index),
  with a caption and its attribute labels. It lets the whole method train on a CPU in minutes.

Every item is a dict: `image` (3, R, R) float in [-1, 1], `index`, `caption` ("" for folders), `label` (class index
for ImageNet-style trees, else -1); shapes items also carry `color`, `shape`, `size`, `bg` indices.
"""
import argparse
import contextlib
import hashlib
import http.client
import itertools
import math
import os
import pickle
import random
import re
import sys
import urllib.request
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# -----------------------------------------------------------------------------
# the shapes world

COLORS = {  # name -> RGB; saturated and far apart, so an exact palette analysis can judge generated images
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 170), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]  # drawn upright: a diamond is not a square
SIZES = ["small", "large"]
# half-extent as a fraction of the side. A small shape spans >= 14 px at 32 px, 3-4 tokens of the f4 tokenizer: at
# 0.17-0.23 the tokenizer lost the points of 70 % of the small stars (docs/shapes.md)
RADIUS = {"small": (0.22, 0.27), "large": (0.32, 0.40)}
# colour x shape pairs the GPT never sees (train_gpt.py --exclude-held-out); CLIP and the VQGAN train on everything, as
# a web-scale CLIP and a generic tokenizer would. Prompting them tests generation of unseen combinations.
HELD_OUT = [("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "cross"), ("purple", "diamond"),
            ("white", "square")]
HELD_OUT_IDS = {(COLOR_NAMES.index(c), SHAPES.index(s)) for c, s in HELD_OUT}  # (colour index, shape index)
# continuous variation that keeps every attribute unambiguous: the radius spans its size's range (the sizes do not
# overlap) and each RGB channel of shape and background moves by up to `rgb` (palette colours are >= 80 apart, so the
# nearest one is still the named one). Centre shifts of +-1 px and turns of +-10 degrees were measured and left out:
# the GPT then drew blobs (docs/shapes.md)
JITTER = dict(rgb=12)


def shape_attributes(seed, index, centred=True):
    """The (deterministic) attributes of shapes image `index` of the world `seed`.

    centred=True, the world everything trains on: the shape sits in the middle, with a continuous radius within its
    size's range and a continuous shade of its colours (JITTER), so no two images are the same picture. At a random
    position (centred=False) the shapes GPT drew blobs (docs/results.md, "How the world came to be centred")."""
    rng = np.random.default_rng([seed, index])
    color = int(rng.integers(len(COLORS)))
    bg = int(rng.integers(len(COLORS) - 1))
    bg += bg >= color  # any palette colour but the shape's own
    size = int(rng.integers(len(SIZES)))
    r = float(rng.uniform(*RADIUS[SIZES[size]]))
    cx, cy = rng.uniform(r, 1 - r, size=2)
    if centred:  # drawn all the same, so the labels of image i do not depend on the layout
        cx, cy = 0.5, 0.5
    drop_size, drop_bg = rng.random(2) < 0.5  # caption variants, so "a red circle" is in distribution
    shape = int(rng.integers(len(SHAPES)))
    # drawn after the labels, so the colours, shape, size and caption of image i are those of the older worlds
    shade = rng.integers(-JITTER["rgb"], JITTER["rgb"] + 1, size=(2, 3))  # (fill, background) x RGB offsets
    return dict(color=color, shape=shape, size=size, bg=bg, r=r, cx=float(cx), cy=float(cy), shade=shade.tolist(),
                drop_size=bool(drop_size), drop_bg=bool(drop_bg))


def shaded(color, offset):
    """Palette colour `color` (an index) moved by an RGB offset, clipped to 0..255."""
    return tuple(int(v) for v in np.clip(np.array(COLORS[COLOR_NAMES[color]]) + offset, 0, 255))


def _polygon(shape, cx, cy, r):
    """Vertices (in pixels) of the polygonal shapes, upright."""
    if shape == "square":
        s = r * 0.85  # a square of half-side r looks much bigger than a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":  # equilateral, centred on its centroid, pointing up
        return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    if shape == "star":  # five points, inner radius 0.45 r
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":  # a plus sign with arms 0.36 r thick
        t = 0.36 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(attrs, resolution=64):
    """Draw one shapes image (RGB, no anti-aliasing: two flat colours, each within JITTER of its palette colour)."""
    shade = attrs.get("shade", [(0, 0, 0), (0, 0, 0)])  # (fill, background) RGB offsets; none: the exact palette
    img = Image.new("RGB", (resolution, resolution), shaded(attrs["bg"], shade[1]))
    draw = ImageDraw.Draw(img)
    cx, cy, r = attrs["cx"] * resolution, attrs["cy"] * resolution, attrs["r"] * resolution
    fill = shaded(attrs["color"], shade[0])
    shape = SHAPES[attrs["shape"]]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img


def caption(attrs):
    """'a {size} {color} {shape} on a {bg} background', with size and background each dropped half the time."""
    words = ([] if attrs["drop_size"] else [SIZES[attrs["size"]]]) + [COLOR_NAMES[attrs["color"]], SHAPES[attrs["shape"]]]
    text = with_article(" ".join(words))
    return text if attrs["drop_bg"] else f"{text} on {with_article(COLOR_NAMES[attrs['bg']])} background"


def with_article(phrase):
    """'orange circle' -> 'an orange circle'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def prompt(color, shape):
    """The short prompt of a colour-shape pair (indices), e.g. 'a red circle': what the shapes evaluation asks for."""
    return with_article(f"{COLOR_NAMES[color]} {SHAPES[shape]}")


def shapes_prompts(full=False, seed=0):
    """What the shapes evaluation asks for, one prompt per colour x shape pair: dicts of text and the color, shape, size
    and bg indices it names (size and bg None in the short form, "a red circle"). full: "a {size} {colour} {shape} on
    a {bg} background", size and background drawn from `seed`."""
    rng, out = np.random.default_rng(seed), []
    for color in range(len(COLORS)):
        for shape in range(len(SHAPES)):
            size, bg = int(rng.integers(len(SIZES))), int(rng.integers(len(COLORS) - 1))
            a = dict(color=color, shape=shape, size=size, bg=bg + (bg >= color), drop_size=not full, drop_bg=not full)
            out.append(dict(text=caption(a), color=color, shape=shape, size=size if full else None,
                            bg=a["bg"] if full else None))  # the background is never the shape's colour
    return out


def shapes_words():
    """Every word a shapes caption can hold (each colour, shape, size, background): what the shapes models know."""
    ranges = [range(len(names)) for names in (COLOR_NAMES, SHAPES, SIZES, COLOR_NAMES)]
    return {w for c, s, z, b in itertools.product(*ranges)
            for w in caption(dict(color=c, shape=s, size=z, bg=b, drop_size=False, drop_bg=False)).split()}


def to_tensor(img):
    """PIL RGB (H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1)


class Shapes(Dataset):
    """n procedural images of the world `seed`; the validation split is another world (seed + 1_000_003).
    exclude_held_out: the world's images of the HELD_OUT colour x shape pairs are skipped (the next ones fill in), so
    item i is world image ids[i]; its `index` is that world index."""

    def __init__(self, n=50_000, resolution=64, seed=0, train=True, centred=True, exclude_held_out=False):
        self.n, self.resolution, self.seed, self.train, self.centred = n, resolution, seed, train, centred
        self.exclude_held_out, self.ids = exclude_held_out, None
        if exclude_held_out:
            ids, i = [], 0
            while len(ids) < n:
                a = shape_attributes(seed, i, centred)
                if (a["color"], a["shape"]) not in HELD_OUT_IDS:
                    ids.append(i)
                i += 1
            self.ids = np.array(ids)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        index = index if self.ids is None else int(self.ids[index])
        a = shape_attributes(self.seed, index, self.centred)
        # no flip augmentation: every shape here is left-right symmetric, a flip only moves it
        return dict(image=to_tensor(render(a, self.resolution)), index=index, caption=caption(a), label=-1,
                    color=a["color"], shape=a["shape"], size=a["size"], bg=a["bg"])


# -----------------------------------------------------------------------------
# folders of real images

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def resize_crop(img, resolution, train, rng=random):
    """Resize the shorter side to `resolution` (bicubic), then a random (train) or centre crop; random flip in train."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    if train:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if train and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


class ImageFolder(Dataset):
    """Every image file under `root` (recursively). With class sub-folders, `label` is the folder's index."""

    def __init__(self, root, resolution=256, train=True):
        self.root, self.resolution, self.train = Path(root), resolution, train
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            found = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(f"no images under {self.root} (looked recursively for {found}) — put image files there or "
                            f"pass another folder")
        classes = sorted({p.parent for p in self.files})
        self.class_index = {c: i for i, c in enumerate(classes)} if len(classes) > 1 else {}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        img = open_or_skip(path)
        if img is None:
            return None
        return dict(image=to_tensor(resize_crop(img, self.resolution, self.train)), index=index, caption="",
                    label=self.class_index.get(path.parent, -1))


def get_dataset(name_or_path, split="train", resolution=256, train=True, n=None, exclude_held_out=False):
    """'shapes', 'imagenet' ($IMAGENET_DIR or data/imagenet) or a folder (its <split>/ when it has train/ and val/).
    exclude_held_out: shapes only, leave out the HELD_OUT colour x shape pairs."""
    if exclude_held_out and name_or_path != "shapes":
        raise UserError(f"--exclude-held-out leaves out the shapes world's HELD_OUT pairs; --data is {name_or_path} "
                        f"— drop --exclude-held-out, or use --data shapes")
    if name_or_path == "shapes":
        if split not in ("train", "val"):
            raise ValueError(f"shapes has splits 'train' and 'val', not {split!r}")
        seed = 0 if split == "train" else 1_000_003
        return Shapes(n or (50_000 if split == "train" else 2_000), resolution, seed=seed, train=train,
                      exclude_held_out=exclude_held_out)
    if name_or_path == "imagenet":
        root = Path(os.environ.get("IMAGENET_DIR", "data/imagenet"))
        if not (root / split).is_dir():
            raise UserError(f"--data imagenet: no folder {root / split} — set IMAGENET_DIR to a folder holding train/ "
                            f"and val/ class folders (ILSVRC2012, val sorted into classes), or pass --data FOLDER")
    else:
        root = Path(name_or_path)
        if not root.is_dir():
            raise UserError(f"--data {name_or_path}: {'is a file' if root.exists() else 'no such folder'} — pass "
                            f"'shapes', 'imagenet' or a folder of images")
    if (root / "train").is_dir() and (root / "val").is_dir():
        root = root / split
    dataset = ImageFolder(root, resolution, train)
    if n is not None:
        dataset.files = dataset.files[:n]
    return dataset


def collate(items):
    """Stack the items that decoded; `skipped` counts the ones that did not (their __getitem__ returned None)."""
    good = [it for it in items if it is not None]
    batch = torch.utils.data.default_collate(good) if good else {}
    batch["skipped"] = len(items) - len(good)
    return batch


def make_loader(dataset, batch_size, train, workers=None, sampler=None, seed=0):
    """A DataLoader that keeps up: worker processes, pinned memory on CUDA, shuffling unless a sampler is given."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(dataset) > 10_000 else 0
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=train,
                      generator=g, persistent_workers=workers > 0)


# -----------------------------------------------------------------------------
# plumbing shared by every script: errors, flags, devices, files, checkpoints, RNG, distributed set-up

CACHE = Path(os.environ.get("CLIPGEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "clipgen")  # downloaded weights: LPIPS, FID Inception, HFAiLab's release


class UserError(Exception):
    """Something the user can fix. The message reads '<what is wrong> — <what to do>'; scripts print it as one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show or the help text already says it."""

    def _get_help_string(self, action):
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors: 'prog: error: argument --cfg: ... — see prog --help'.

    presets={name: {dest: value}}: the trainers' named runs. The parser's own `--preset` flag picks one, whose values
    become the defaults (so `--preset shapes --help` shows them); a flag given explicitly still wins. Without
    --preset, `--data NAME` picks the preset of that name, and `--data FOLDER` picks real_preset (the paper's sizes).
    """

    def __init__(self, *args, presets=None, real_preset=None, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)
        self.presets, self.real_preset, self.base_defaults = presets or {}, real_preset, None

    def parse_known_args(self, args=None, namespace=None):
        if self.presets:
            if self.base_defaults is None:  # restored before each preset, so a parser can be reused
                self.base_defaults = {a.dest: a.default for a in self._actions if a.default is not argparse.SUPPRESS}
            first = argparse.ArgumentParser(add_help=False)
            first.add_argument("--preset")
            first.add_argument("--data")
            given = first.parse_known_args(args)[0]
            # no --preset: the one named like --data (shapes, imagenet), the paper's sizes for any other folder
            name = given.preset or (self.base_defaults["preset"] if given.data is None else given.data
                                    if given.data in self.presets else self.real_preset)
            preset = self.presets.get(name, {})  # an unknown name is refused by --preset's choices
            if unknown := set(preset) - set(self.base_defaults):
                raise ValueError(f"preset {name!r} sets {sorted(unknown)}, which are not flags")
            self.set_defaults(**{**self.base_defaults, **preset, "preset": name})
        return super().parse_known_args(args, namespace)

    def error(self, message):
        print(f"{self.prog}: error: {message} — see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def add_run_flags(p, name, default_preset="shapes"):
    """The flags every trainer shares, same names and meaning: the preset, where the run lives, how it runs."""
    p.add_argument("--preset", default=default_preset, choices=sorted(p.presets), help="named run (the PRESETS "
                   "dict); it sets the defaults shown here, and a flag given explicitly wins. Unset: the preset named "
                   f"like --data, {p.real_preset!r} for another --data folder, else")
    p.add_argument("--out", default=f"out/{name}", help="the run's folder: ckpt.pt (resumable), the fp16 export, grids")
    p.add_argument("--resume", action="store_true", help="continue <out>/ckpt.pt exactly")
    p.add_argument("--overwrite", action="store_true", help="delete the run in <out> and start a new one")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available; under torchrun: its GPU)")
    p.add_argument("--threads", type=num(int, 1), help="CPU threads (default: torch's choice); 1 is faster on a CPU "
                   "shared with other jobs (idle intra-op threads spin)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=num(int, 0), default=0, help="RNG seed (rank r uses seed + r)")
    p.add_argument("--stop-after", type=num(int, 1), help="leave, with a checkpoint, after this many steps of this "
                   "run (a time-limited job); --resume continues exactly")


def cli(main, parser, argv=None):
    """Parse the flags and run main(args); a UserError becomes one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def num(kind=float, lo=None, hi=None, lo_open=False):
    """An argparse type: a finite int or float in [lo, hi] ((lo, hi] with lo_open); inf, nan and overflow refused."""
    def parse(text):
        try:
            x = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if kind is int and abs(x) >= 2 ** 63:
            raise argparse.ArgumentTypeError(f"{text} is too large: integers here are at most 2**63 - 1")
        if not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi):
            bounds = " and ".join(b for b in (lo is not None and f"{'>' if lo_open else '>='} {lo}",
                                              hi is not None and f"<= {hi}") if b) or "finite"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def pick_device(name=None):
    """'cpu', 'cuda', 'cuda:1', 'mps', or None for the best there is -> torch.device, or a UserError naming --device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: unknown device — use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                        f"{'no GPU found' if torch.backends.cuda.is_built() else 'a CPU-only build'}) "
                        f"— use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) — use cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here — use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: clipgen runs on cpu, cuda or mps — use one of those")
    return device


def progress(iterable=None, disable=False, **kwargs):
    """tqdm on a terminal; nothing at all when stderr is a file (a log then holds the scripts' own lines, not \\r).
    Lines printed with its .write() do not break the bar."""
    return tqdm(iterable, disable=True if disable else None, dynamic_ncols=True, **kwargs)


def open_image(path):
    """Any image file -> RGB PIL image, decoded faithfully (pixel values, not just 'no crash').

    EXIF orientation applied; animations give their first frame; 16/32-bit integer greyscale is scaled from its
    bit depth and float greyscale from [0, 1] (convert('RGB') would clip both at 255); transparency (RGBA, LA,
    palette with a transparent colour) is composited on white, as a viewer shows it; CMYK, 1-bit, YCbCr via PIL.
    Raises whatever PIL raises for a file that is not a readable image.
    """
    with Image.open(path) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)  # a decoded copy, upright
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit files decode as I;16 or as I (values < 65536); a wider I image is scaled by its own maximum
        top = 1.0 if img.mode == "F" else 65535.0 if img.mode.startswith("I;16") or a.max() < 65536 else a.max()
        a = np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def open_or_skip(path):
    """open_image(path), or None and a warning for a file that does not decode: a dataset skips it (collate counts)."""
    try:
        return open_image(path)  # decoded fully here, so a truncated file fails now rather than in a resize
    except Exception as e:  # PIL raises many types for bad files; any of them means "skip this one"
        warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        return None


def file_sha256(path):
    """SHA256 hex digest of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None):
    """url -> path, atomically (temp file + rename) with a progress bar; sha256 checked when given. Returns path.

    A failed or interrupted download, or a wrong hash, leaves no file behind and raises a UserError that says
    where to put the file by hand.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        hasher = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as out:
            total = int(src.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and hasher.hexdigest() != sha256:
            raise UserError(f"{url} arrived with SHA256 {hasher.hexdigest()[:16]}..., expected {sha256[:16]}... "
                            f"(interrupted or altered download) — run again, or put a verified copy at {path}")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError; ValueError: a bad URL
        raise UserError(f"cannot download {url} ({e}) — without a network, fetch it elsewhere and put it at "
                        f"{path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj, path):
    """torch.save (PIL's save for an image, plain text for a str) to a temporary file beside `path`, then rename: a
    crash never leaves a half-written file, only a temp file that remove_stale_temps deletes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(obj, Image.Image):
            obj.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        elif isinstance(obj, str):
            tmp.write_text(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(folder):
    """Delete the temp files of checkpoint writes that a killed process left in `folder`; returns how many."""
    stale = list(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def half_state_dict(sd):
    """fp16 copy of a state dict's floating tensors (what ships and what inference reads; ~3 significant digits)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


# What a checkpoint holds, told from its keys: (kind, what it is). kind is the flag it belongs to (clip, vqgan, gpt) or
# None. Containers: ours {"model", "config", "step"}, HFAiLab's {"model", "epoch"}, taming's {"state_dict"}, bare.
def describe_checkpoint(obj):
    if not isinstance(obj, dict):
        return None, f"a pickled {type(obj).__name__}, not a dict of tensors"
    sd, maker = obj, "a state dict"
    if isinstance(obj.get("model"), dict):
        sd, maker = obj["model"], "a clipgen checkpoint" if "config" in obj else "HFAiLab's release layout"
    elif isinstance(obj.get("state_dict"), dict):
        sd, maker = obj["state_dict"], "a taming-transformers checkpoint"
    keys = {k.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("first_stage_model.")
            for k in map(str, sd)}

    def has(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    if "text_projection" in keys:
        return "clip", f"a CLIP model ({maker})"
    if has("encoder.conv_in.", "encoder.down.") and has("decoder."):
        return "vqgan", f"a VQGAN ({maker})"
    if "tok_emb.weight" in keys and has("blocks."):
        return "gpt", f"a GPT ({maker}{', no null condition' if 'null_cond' not in keys else ''})"
    if has("features.") and has("classifier."):
        return None, "torchvision VGG weights"
    if has("lin0.", "net.lin0."):
        return None, "LPIPS linear-layer weights"
    if has("Conv2d_1a_3x3."):
        return None, "Inception weights (FID)"
    return None, f"{maker} with keys {sorted(keys)[:5]}{' ...' if len(keys) > 5 else ''}"


def _first_keys(text, label):
    """The quoted keys after `label` in torch's load_state_dict error."""
    m = re.search(label + r"[^:]*: (.*?)\.\s*(?:\n|$)", text)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def explain_load_error(path, e, kind):
    """One line for a load failure the file explains, or None (a genuine bug: let the traceback show)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            return f"{path} is truncated or corrupt (an incomplete zip archive) — download or write it again"
        if not head.startswith(b"\x80"):  # a legacy (pre-1.6) torch file is a bare pickle
            return f"{path} is not a PyTorch checkpoint (it starts with {head[:4]!r}) — pass the .pt/.ckpt file"
    else:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):  # every torch.save archive has one; .npz, .zip do not
            return f"{path} is a zip archive of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}, not a " \
                   f"PyTorch checkpoint — pass the .pt/.ckpt file"
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        return (f"{path} holds pickled Python code ({found.group(1) if found else 'an object'}) that clipgen never "
                f"runs — load it where it was made and save its tensors alone: torch.save(model.state_dict(), path)")
    name = {"gpt": "GPT", "vqgan": "VQGAN", "clip": "CLIP"}.get(kind, kind)
    try:
        found, what = describe_checkpoint(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # unreadable as a plain checkpoint (e.g. a TorchScript archive): judge by the error alone
        found, what = kind, None
    if kind in ("clip", "vqgan", "gpt") and found != kind:  # other kinds (LPIPS, VGG16) describe_checkpoint can't tell
        fix = f"pass it as --{found}" if found else f"pass a {name} file"
        return f"{path} is {what}, not a {name} checkpoint — {fix}"
    if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e):
        parts = []
        for label, words in (("Missing key", "missing"), ("Unexpected key", "unexpected")):
            if keys := _first_keys(str(e), label):
                parts.append(f"{len(keys)} {words} ({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})")
        if shapes := re.findall(r"size mismatch for ([^:]+):", str(e)):
            more = ", ..." if len(shapes) > 10 else ""
            parts.append(f"{len(shapes)} of another shape ({', '.join(shapes[:10])}{more})")
        return f"{path} does not fit the {name} it describes: {'; '.join(parts) or str(e)[:300]} — is it complete?"
    return None


@contextlib.contextmanager
def loading(path, kind):
    """Run a model file's loader; a failure that the file at `path` explains becomes one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'} — pass the {kind} "
                        f"checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty — download or write it again")
    try:
        yield
    except Exception as e:
        message = explain_load_error(path, e, kind)
        if message is None:
            raise
        raise UserError(message) from None


def load_model(loader, path, kind):
    """loader(path) (e.g. GPT.from_checkpoint) with every failure the file can cause told in one line."""
    with loading(path, kind):
        return loader(str(path))


def setup_distributed(device=None):
    """(rank, local_rank, world_size, device) from torchrun's environment; a plain process is rank 0 of 1 on
    pick_device(device). Under torchrun every process takes the GPU of its local rank (NCCL), or the CPU (gloo)."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def mixed_precision(device):
    """(autocast context, GradScaler) for training: bf16 on a GPU that has it, else fp16 with loss scaling (the
    scaler is a pass-through otherwise); bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX: 1.45x faster GPT
    and 1.6x faster VQGAN steps on a Zen 4 core, docs/speed.md); fp32 on MPS and other CPUs, which would emulate it."""
    dtype = None  # fp32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        dtype = torch.bfloat16
    amp = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    return amp, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def start_run(out, resume, overwrite=False, outputs=(), kind=None):
    """What a trainer finds in its --out folder: the checkpoint dict to continue (resume=True) or None (a new run).

    A folder holding a run (ckpt.pt) is never overwritten by accident: without --resume or --overwrite it is
    refused. A new run deletes the files an earlier run left (ckpt.pt and the glob patterns `outputs`: exports, sample
    grids), so two runs never mix; every start deletes the temp files of a checkpoint write that was killed.
    """
    out, ckpt = Path(out), Path(out) / "ckpt.pt"
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite deletes it — pass one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file — pass a folder (it is created if needed)")
    if is_master() and (n := remove_stale_temps(out)):
        print(f"removed {n} temp file(s) of a checkpoint write that was interrupted, in {out}")
    if resume:
        if not ckpt.is_file():
            raise UserError(f"--resume: there is no {ckpt} — drop --resume to start a new run, or pass the --out of "
                            f"the run to continue")
        return read_checkpoint(ckpt, kind)
    if ckpt.is_file() and not overwrite:
        try:
            at = f"at step {read_checkpoint(ckpt, kind)['step']}"
        except (UserError, KeyError):  # unreadable: still a run
            at = "(its ckpt.pt is unreadable)"
        raise UserError(f"found a run {at} in {out} — pass --resume to continue it or choose another --out "
                        f"(--overwrite deletes it)")
    old = sorted({p for pattern in ("ckpt.pt", *outputs) for p in out.glob(pattern)}) if out.is_dir() else []
    if is_master() and old:
        for p in old:
            p.unlink()
        print(f"deleted {len(old)} file(s) of an earlier run in {out}: {', '.join(p.name for p in old[:5])}"
              f"{', ...' if len(old) > 5 else ''}")
    if is_master():
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # nobody writes before rank 0 has cleared the folder
    return None


def save_checkpoint(out, model, step, export, export_extra=None, **state):
    """A trainer's checkpoint. Every rank calls it (each contributes its RNG state); rank 0 writes two files:

    <out>/ckpt.pt, to resume exactly: {"model", "config", "step", "rng": [one per rank], **state}, where state holds
    "optimizer", "scaler", "args" and the trainer's extras; then <out>/<export>, what the next stage and sample.py
    read: {"model" (fp16), "config", "step", **export_extra}. Each is written atomically; a kill between the two
    leaves an export one checkpoint older than ckpt.pt, and its "step" says which.
    """
    rngs = [rng_state()]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if is_master():
        sd, config = model.state_dict(), asdict(model.config)
        save_atomic({"model": sd, "config": config, "step": step, "rng": rngs, **state}, Path(out) / "ckpt.pt")
        save_atomic({"model": half_state_dict(sd), "config": config, "step": step, **(export_extra or {})},
                    Path(out) / export)


def diverged(step, out):
    """The UserError of a trainer whose loss became inf or nan."""
    last = Path(out) / "ckpt.pt"
    return UserError(f"non-finite loss at step {step} — lower --lr; " + (
        f"the last checkpoint, {last}, is intact: --resume continues it" if last.exists() else "no checkpoint written"))


def restore_rng(states):
    """This rank's RNGs from a checkpoint's per-rank list; left as seeded (and said so) if the world size changed."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world:
        set_rng_state(states[rank])
    elif rank == 0:
        print(f"the checkpoint holds the RNG states of {len(states)} processes, this run has {world}: the random "
              f"streams restart from the seed, so the run continues, but not bit for bit")


def read_checkpoint(path, kind):
    """torch.load(path, weights_only=True), with every failure the file explains told in one line (see loading)."""
    with loading(path, kind):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    """Every RNG a training step draws from, as tensors and plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
