"""clipgen test suite: CPU, tiny configs, a few minutes on 2 cores. Run: python -m pytest -q test_all.py"""
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import subprocess
import sys
import time
import types
import urllib.request
import warnings
from argparse import Namespace
from dataclasses import asdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"  # the CLIP BPE vocabulary and a test image, shipped in the repository
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import clip  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import gpt  # noqa: E402
import inception  # noqa: E402
import sample  # noqa: E402
import train_clip  # noqa: E402
import train_gpt  # noqa: E402
import train_vqgan  # noqa: E402
import vqgan  # noqa: E402
import vqgan as vq  # noqa: E402
from scripts import check_hfai_layout as hfai  # noqa: E402  (HFAiLab's file layouts, rebuilt from torch modules)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # the models here are tiny: intra-op threads only add hand-offs (several times slower on a busy 2-core CPU)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# =============================================================================
# data

def test_data_shapes_world_is_deterministic_and_labelled():
    a, b = data.Shapes(8, resolution=64)[5], data.Shapes(8, resolution=64)[5]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["image"].shape == (3, 64, 64) and -1 <= a["image"].min() and a["image"].max() <= 1
    assert data.COLOR_NAMES[a["color"]] in a["caption"] and data.SHAPES[a["shape"]] in a["caption"]
    assert len(data.COLORS) >= 8 and len(data.SHAPES) >= 6
    # the validation split is another world
    assert not torch.equal(data.get_dataset("shapes", "val", 64)[5]["image"], a["image"])


def test_data_shapes_pixels_are_two_shades_nearest_their_palette_colours():
    ds = data.Shapes(20, resolution=48)
    palette = torch.tensor(list(data.COLORS.values()))
    for i in range(20):
        item = ds[i]
        pix = ((item["image"] + 1) * 127.5).round().to(torch.uint8).reshape(3, -1).T
        colours = {tuple(c) for c in pix.tolist()}
        assert len(colours) == 2
        nearest = {c: int(((palette - torch.tensor(c)) ** 2).sum(1).argmin()) for c in colours}
        assert set(nearest.values()) == {item["color"], item["bg"]}
        assert all((torch.tensor(c) - palette[k]).abs().max() <= data.JITTER["rgb"] for c, k in nearest.items())


def test_data_shapes_world_is_centred_and_every_image_differs():
    centred = [data.shape_attributes(0, i) for i in range(200)]
    anywhere = [data.shape_attributes(0, i, centred=False) for i in range(200)]
    assert {(a["cx"], a["cy"]) for a in centred} == {(0.5, 0.5)}
    assert all(lo <= a["r"] <= hi for a in centred for lo, hi in [data.RADIUS[data.SIZES[a["size"]]]])
    assert len({data.render(a, 32).tobytes() for a in centred}) == 200  # continuous variation: no two pictures alike
    assert len({(a["cx"], a["cy"]) for a in anywhere}) == 200
    # the layout changes only where the shape is drawn: colours, shape and caption are the same
    keys = ("color", "bg", "shape", "size", "drop_size", "drop_bg")
    assert all({k: a[k] for k in keys} == {k: b[k] for k in keys} for a, b in zip(centred, anywhere))
    assert data.Shapes(4, resolution=32, centred=False)[1]["image"].shape == (3, 32, 32)


def test_data_shapes_held_out_pairs_are_left_out_on_request():
    full, kept = data.Shapes(300, resolution=32), data.Shapes(300, resolution=32, exclude_held_out=True)
    pairs = lambda ds: [(ds[i]["color"], ds[i]["shape"]) for i in range(len(ds))]  # noqa: E731
    assert len(data.HELD_OUT_IDS) == 6 and any(p in data.HELD_OUT_IDS for p in pairs(full))
    assert len(kept) == 300 and not any(p in data.HELD_OUT_IDS for p in pairs(kept))
    assert torch.equal(kept[0]["image"], full[kept[0]["index"]]["image"])  # the same world, held-out images skipped
    with pytest.raises(data.UserError, match="--exclude-held-out"):
        data.get_dataset("imagenet", exclude_held_out=True)


def test_data_shapes_render_at_any_resolution():
    a = data.shape_attributes(0, 3)
    assert data.render(a, 32).size == (32, 32) and data.render(a, 256).size == (256, 256)


def test_data_captions_cover_short_prompts_and_articles():
    caps = {data.caption(data.shape_attributes(0, i)) for i in range(2000)}
    assert "a red circle" in caps and "an orange square" in caps
    assert any(c.startswith("a large") and c.endswith("background") for c in caps)
    assert data.prompt(data.COLOR_NAMES.index("orange"), 0) == "an orange circle"


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_data_image_folder_skips_and_counts_corrupt_files(tmp_path):
    _write_images(tmp_path / "a", 3)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not an image at all")
    good = tmp_path / "a" / "0.png"
    (tmp_path / "a" / "truncated.png").write_bytes(good.read_bytes()[:60])
    ds = data.get_dataset(str(tmp_path), resolution=16, train=False)
    assert len(ds) == 5
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(data.make_loader(ds, batch_size=5, train=False))
    assert batches[0]["image"].shape == (3, 3, 16, 16) and batches[0]["skipped"] == 2


def test_data_imagenet_layout_splits_and_labels(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            _write_images(tmp_path / split / cls, 2, size=(50, 20))
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    ds = data.get_dataset("imagenet", "val", resolution=16, train=True)
    assert len(ds) == 4 and sorted(ds[i]["label"] for i in range(4)) == [0, 0, 1, 1]
    assert ds[0]["image"].shape == (3, 16, 16)


def test_data_missing_or_empty_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.UserError) as e:
        data.get_dataset("imagenet")
    assert str(e.value) == (f"--data imagenet: no folder {tmp_path / 'nowhere' / 'train'} — set IMAGENET_DIR to a "
                            f"folder holding train/ and val/ class folders (ILSVRC2012, val sorted into classes), or "
                            f"pass --data FOLDER")
    with pytest.raises(data.UserError) as e:
        data.get_dataset(str(tmp_path / "missing"))
    assert str(e.value) == (f"--data {tmp_path / 'missing'}: no such folder — pass 'shapes', 'imagenet' or a folder "
                            f"of images")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(data.UserError) as e:
        data.get_dataset(str(tmp_path / "empty"))
    assert str(e.value) == (f"no images under {tmp_path / 'empty'} (looked recursively for .bmp, .gif, .jpeg, .jpg, "
                            f".png, .ppm, .tif, .tiff, .webp) — put image files there or pass another folder")


def test_data_centre_crop_is_centred_and_train_crop_random():
    img = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(1, 60).repeat(20, 0)[..., None].repeat(3, 2))
    centre = np.asarray(data.resize_crop(img, 20, train=False))
    assert centre[0, 0, 0] == 20 and centre[0, -1, 0] == 39
    crops = {np.asarray(data.resize_crop(img, 20, train=True))[0, 0, 0] for _ in range(30)}
    assert len(crops) > 3


def test_data_atomic_save_and_rng_state_round_trip(tmp_path):
    path = tmp_path / "ck.pt"
    data.save_atomic({"rng": data.rng_state(), "x": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    state = torch.load(path, weights_only=True)["rng"]
    expected = (random.random(), np.random.rand(), torch.rand(1))
    data.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def exif_jpeg(path):
    """16x8 JPEG, left half red, right half blue, stored sideways: EXIF orientation 6 (rotate 90 degrees clockwise)."""
    img = Image.new("RGB", (16, 8), (255, 0, 0))
    img.paste((0, 0, 255), (8, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


def animated_gif(path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency(path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(path, transparency=1)  # palette index 1 (blue) is transparent


# (file name, writer, expected RGB pixels as a nested list, or (size, {pixel: RGB}) for the geometric cases)
IMAGE_MODES = {
    "I;16": ("grey16.png", lambda p: Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(p),
             [[[0] * 3, [128] * 3, [255] * 3]]),
    "I (32-bit)": ("grey32.tif", lambda p: Image.fromarray(np.array([[0, 100_000, 200_000]], np.int32), "I").save(p),
                   [[[0] * 3, [128] * 3, [255] * 3]]),
    "F": ("float.tif", lambda p: Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32), "F").save(p),
          [[[0] * 3, [64] * 3, [255] * 3]]),
    "P + transparency": ("palette.png", palette_with_transparency, [[[255, 0, 0], [255, 255, 255]]]),
    "CMYK": ("cmyk.tif", lambda p: Image.frombytes("CMYK", (2, 1), bytes([0, 255, 255, 0, 0, 0, 0, 128])).save(p),
             [[[255, 0, 0], [127, 127, 127]]]),
    "LA": ("la.png", lambda p: Image.frombytes("LA", (3, 1), bytes([100, 255, 100, 0, 0, 128])).save(p),
           [[[100] * 3, [255] * 3, [127] * 3]]),  # alpha 128 over white: 0 * 128/255 + 255 * 127/255
    "1": ("bits.png", lambda p: Image.frombytes("1", (2, 1), bytes([0b01000000])).save(p), [[[0] * 3, [255] * 3]]),
    "RGBA": ("rgba.png", lambda p: Image.frombytes("RGBA", (2, 1), bytes([10, 20, 30, 255, 10, 20, 30, 0])).save(p),
             [[[10, 20, 30], [255, 255, 255]]]),
    "1x1": ("tiny.png", lambda p: Image.new("RGB", (1, 1), (10, 20, 30)).save(p), [[[10, 20, 30]]]),
    "EXIF-rotated JPEG": ("rotated.jpg", exif_jpeg, ((8, 16), {(4, 3): (255, 0, 0), (4, 12): (0, 0, 255)})),
    "animated GIF": ("anim.gif", animated_gif, ((4, 4), {(0, 0): (255, 0, 0), (3, 3): (255, 0, 0)})),
    "large": ("large.png", lambda p: Image.new("RGB", (4000, 3000), (40, 80, 120)).save(p),
              ((4000, 3000), {(0, 0): (40, 80, 120), (3999, 2999): (40, 80, 120)})),
}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_data_open_image_decodes_every_mode_faithfully(tmp_path, mode):
    name, write, expected = IMAGE_MODES[mode]
    write(tmp_path / name)
    img = data.open_image(tmp_path / name)
    assert img.mode == "RGB"
    if isinstance(expected, list):
        assert np.asarray(img).tolist() == expected
    else:  # JPEG is lossy: within a few levels
        size, pixels = expected
        assert img.size == size
        for xy, rgb in pixels.items():
            assert np.abs(np.subtract(img.getpixel(xy), rgb)).max() <= 8, (xy, img.getpixel(xy))
    # and through a dataset: the tensor holds the same values, scaled to [-1, 1]
    item = data.ImageFolder(tmp_path, resolution=1, train=False)[0]
    assert item["image"].shape == (3, 1, 1) and -1 <= item["image"].min() <= item["image"].max() <= 1


def test_data_preset_follows_data_when_not_given():
    # `python train_vqgan.py --data imagenet` trains the paper's f16-16384, not the 32-px shapes model
    args = lambda mod, *argv: mod.get_parser().parse_args(list(argv))  # noqa: E731
    assert (args(train_vqgan, "--data", "imagenet").model, args(train_vqgan).model) == ("f16-16384", "shapes")
    assert args(train_vqgan, "--data", "photos/").preset == "imagenet"
    assert (args(train_gpt, "--data", "imagenet").model, args(train_gpt, "--data", "photos/").model) == \
        ("gpt2-xl", "gpt2-medium")
    assert args(train_gpt, "--data", "imagenet", "--preset", "tiny").model == "tiny"  # an explicit preset wins


def test_data_presets_set_defaults_and_explicit_flags_win(capsys):
    presets = {"small": dict(lr=0.5, steps=3), "big": dict(steps=9)}
    p = data.ArgumentParser(prog="t.py", presets=presets)
    p.add_argument("--preset", default="small", choices=sorted(presets))
    p.add_argument("--lr", type=data.num(float, 0, lo_open=True), default=1.0)
    p.add_argument("--steps", type=data.num(int, 1), default=1, help="training steps")
    assert vars(p.parse_args([])) == dict(preset="small", lr=0.5, steps=3)
    assert vars(p.parse_args(["--preset", "big"])) == dict(preset="big", lr=1.0, steps=9)  # no leftover from "small"
    assert vars(p.parse_args(["--steps", "5", "--preset=big"])) == dict(preset="big", lr=1.0, steps=5)
    for bad, message in [(["--lr", "0"], "argument --lr: 0 is out of range: it must be > 0"),
                         (["--lr", "nan"], "argument --lr: nan is out of range: it must be > 0"),
                         (["--steps", "99999999999999999999"], "argument --steps: 99999999999999999999 is too large: "
                                                               "integers here are at most 2**63 - 1"),
                         (["--preset", "huge"], "argument --preset: invalid choice: 'huge' (choose from 'big', "
                                                "'small')")]:
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        assert capsys.readouterr().err == f"t.py: error: {message} — see t.py --help\n"
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "big", "--help"])
    assert re.search(r"--steps STEPS\s+training steps \(default: 9\)", capsys.readouterr().out)  # the preset's value
    with pytest.raises(ValueError, match=r"preset 'big' sets \['typo'\], which are not flags"):
        presets["big"]["typo"] = 1
        p.parse_args(["--preset", "big"])


def test_data_save_atomic_and_stale_temps(tmp_path):
    data.save_atomic(Image.new("RGB", (2, 2), (1, 2, 3)), tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").getpixel((1, 1)) == (1, 2, 3)
    (tmp_path / ".ckpt.pt.123.tmp").write_bytes(b"half")
    (tmp_path / ".grid.png.9.tmp").write_bytes(b"half")
    assert data.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    assert data.remove_stale_temps(tmp_path / "missing") == 0


# =============================================================================
# clip

# ---------------------------------------------------------------------------- tokenizer

# Obtained by running OpenAI's reference tokenizer (clip-anytorch 2.6.0, whose simple_tokenizer.py and vocabulary
# are byte-identical to github.com/openai/CLIP) in a throwaway venv with ftfy 6.3.1 and regex 2026.5.9:
#   clip.tokenize(text)[0], padding stripped. The first and third rows are also in OpenAI's notebook / fact sheet.
REFERENCE_IDS = {
    "Hello World!": [49406, 3306, 1002, 256, 49407],
    "": [49406, 49407],
    "a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    "café naïve résumé façade": [49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 778, 10067, 1928, 49407],
    "Ångström ß Straße İstanbul ı": [49406, 23176, 10352, 807, 7255, 332, 127, 509, 1894, 127, 253, 324, 328, 16384,
                                     11231, 41901, 49407],
    "😀😂🤣": [49406, 12832, 1424, 9909, 49407],
    "I ❤️ NY 🗽": [49406, 328, 1752, 1350, 7045, 377, 49407],
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;apos&#39;": [49406, 261, 283, 321, 285, 8911, 34308, 321, 285,
                                                                     257, 336, 257, 262, 4089, 338, 262, 49407],
    "&amp;amp; &amp;lt;": [49406, 261, 283, 49407],
    "&lt;|endoftext|&gt;": [49406, 49407, 49407],
    "3.14159 -42 +7 1e-5 0x1F 1,000,000": [49406, 274, 269, 272, 275, 272, 276, 280, 268, 275, 273, 266, 278, 272, 324,
                                           268, 276, 271, 343, 272, 325, 272, 267, 271, 271, 271, 267, 271, 271, 271,
                                           49407],
    "!!!???...,,,;;;:::": [49406, 11194, 40017, 3002, 21340, 11, 34824, 26, 43818, 49407],
    "don't you're we've I'm she'll they'd it's": [49406, 847, 713, 592, 982, 649, 1200, 328, 880, 1043, 1342, 889, 1896,
                                                  585, 568, 49407],
    "before <|endoftext|> after": [49406, 1348, 49407, 953, 49407],
    "日本語のテキスト": [49406, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 49407],
    "ﬁ ﬂ Ⅰ Ⅱ ½ ² ①": [49406, 3589, 2685, 158, 227, 364, 158, 227, 365, 33613, 41175, 158, 239, 510, 49407],
}


def test_clip_tokenize_matches_reference_ids():
    texts = list(REFERENCE_IDS)
    tokens = clip.tokenize(texts)
    assert tokens.shape == (len(texts), 77) and tokens.dtype == torch.long
    for row, text in zip(tokens, texts):
        ids = REFERENCE_IDS[text]
        assert row[:len(ids)].tolist() == ids, text
        assert not row[len(ids):].any(), text  # padded with 0


def test_clip_tokenize_edge_cases():
    assert clip.tokenize("a cat").shape == (1, 77)
    explicit = str(ASSETS / "bpe_simple_vocab_16e6.txt.gz")
    assert torch.equal(clip.tokenize("a photo of a cat.", bpe_path=explicit), clip.tokenize("a photo of a cat."))
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        clip.tokenize("a", bpe_path="/nowhere.txt.gz")
    assert torch.equal(clip.tokenize(["A PHOTO OF A CAT"]), clip.tokenize(["a photo of a cat"]))
    assert torch.equal(clip.tokenize(["\t\n  \r\n"]), clip.tokenize([""]))
    assert clip.tokenize("1234567890")[0, 1:11].tolist() == clip.tokenize(list("1234567890"))[:, 1].tolist()
    assert clip.get_tokenizer().encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]


def test_clip_tokenize_length_limits():
    assert (clip.tokenize("word " * 75)[0] != 0).sum() == 77  # 75 tokens fit exactly
    text = " ".join(f"word{i % 10}" for i in range(500))
    with pytest.raises(ValueError, match="word0 word1"):
        clip.tokenize(text)
    row = clip.tokenize(text, truncate=True)[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row != 0).all()
    assert row[1:-1].tolist() == tok_ids(text)[:75]


def tok_ids(text):
    return clip.get_tokenizer().encode(text)

# ---------------------------------------------------------------------------- preprocessing


def test_clip_preprocess_png_matches_reference():
    img = Image.open(ASSETS / "CLIP.png")
    assert img.mode == "RGBA"
    x = clip.preprocess(img, 224)
    # sha256 of the float32 bytes of OpenAI's torchvision transform on this file (clip._transform(224), torchvision
    # 0.28, Pillow 13.0), computed once in a throwaway venv: pixel-identical means byte-identical
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == \
        "c8696575a09cf5af021703763f55d3d0bc46329512a4e2d3d0ec95d1c07ca29d"
    # converting to RGB before the resize (a classic clone bug) changes the result on this RGBA image
    assert not torch.equal(x, clip.preprocess(img.convert("RGB"), 224))


def test_clip_preprocess_tensor_matches_pil_path():
    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8)
    img = Image.fromarray(u8.numpy())
    x = u8.permute(2, 0, 1).float().div(127.5).sub(1)[None]        # (1, 3, 64, 48) in [-1, 1]
    # no resize needed (shorter side 48): crop + normalise must agree to float precision
    assert torch.allclose(clip.preprocess_tensor(x, 48)[0], clip.preprocess(img, 48), atol=1e-5)
    y = clip.preprocess_tensor(x.requires_grad_(), 32)
    assert y.shape == (1, 3, 32, 32)
    y.sum().backward()
    assert x.grad is not None

# ---------------------------------------------------------------------------- shapes, archives, loading

# published configurations; parameter and state-dict key counts measured on OpenAI's reference model.py
# (CLIP(...) built on the meta device; ViT-B/32's count is also in OpenAI's notebook)
PUBLISHED = {
    "RN50": (clip.Config(1024, 224, [3, 4, 6, 3], 64, 0, 77, 49408, 512, 12), 102007137, 489),
    "RN101": (clip.Config(512, 224, [3, 4, 23, 3], 64, 0, 77, 49408, 512, 12), 119688033, 795),
    "RN50x4": (clip.Config(640, 288, [4, 6, 10, 6], 80, 0, 77, 49408, 640, 12), 178300601, 669),
    "RN50x16": (clip.Config(768, 384, [6, 8, 18, 8], 96, 0, 77, 49408, 768, 12), 290979217, 921),
    "RN50x64": (clip.Config(1024, 448, [3, 15, 36, 10], 128, 0, 77, 49408, 1024, 12), 623258305, 1353),
    "ViT-B/32": (clip.Config(512, 224, 12, 768, 32, 77, 49408, 512, 12), 151277313, 302),
    "ViT-B/16": (clip.Config(512, 224, 12, 768, 16, 77, 49408, 512, 12), None, 302),
    "ViT-L/14": (clip.Config(768, 224, 24, 1024, 14, 77, 49408, 768, 12), None, 446),
    "ViT-L/14@336px": (clip.Config(768, 336, 24, 1024, 14, 77, 49408, 768, 12), 427944193, 446),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_clip_shape_inference_published_sizes(name):
    config, n_params, n_keys = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: no memory, no time
        model = clip.CLIP(config)
    sd = model.state_dict()
    assert len(sd) == n_keys
    if n_params:
        assert sum(p.numel() for p in model.parameters()) == n_params
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}
    assert clip.config_from_state_dict(shapes) == config


def tiny_vit():
    torch.manual_seed(0)
    return clip.CLIP(clip.Config(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                                 vision_patch_size=16, transformer_width=64, transformer_layers=2)).eval()


def test_clip_torchscript_archive_round_trip(tmp_path):
    """An archive laid out like OpenAI's (traced; fp16 conv/linear/attention, fp32 embeddings and norms, three
    integer extras) loads into a model equal to the saved one."""
    model = tiny_vit()
    fp16 = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
            "c_fc.bias", "c_proj.weight", "c_proj.bias", "visual.proj", "text_projection")
    for name, p in model.named_parameters():
        if name.endswith(fp16):
            p.data = p.data.half()  # OpenAI's convert_weights
    del model.context_length, model.vocab_size  # plain ints on our model; integer tensors in OpenAI's archive
    model.register_buffer("input_resolution", torch.tensor(32))
    model.register_buffer("context_length", torch.tensor(77))
    model.register_buffer("vocab_size", torch.tensor(49408))
    image = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": image.half()}, check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    sd = torch.jit.load(str(path)).state_dict()
    assert sd["visual.conv1.weight"].dtype == torch.float16 and sd["ln_final.weight"].dtype == torch.float32
    assert sd["input_resolution"].item() == 32 and len(sd) == len(model.state_dict())

    loaded, preprocess = clip.load(str(path), device="cpu")
    expected = {k: v.float() for k, v in model.state_dict().items() if k not in clip.ARCHIVE_EXTRAS}
    got = loaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # never fp16 on CPU
    reference = tiny_vit()
    reference.load_state_dict(expected)
    tokens = clip.tokenize(["a diagram", "a dog", "before <|endoftext|> after"])
    with torch.no_grad():
        li, lt = loaded(image, tokens)
        ri, _ = reference(image, tokens)
    assert torch.equal(li, ri) and torch.equal(lt, li.t())


def test_clip_load_state_dict_and_checkpoint(tmp_path):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": model.state_dict(), "config": {}, "step": 3}, tmp_path / "ckpt.pt")
    image, tokens = torch.randn(1, 3, 32, 32), clip.tokenize(["a red circle"])
    with torch.no_grad():
        want = model(image, tokens)[0]
        for name in ("sd.pt", "ckpt.pt"):
            loaded, pre = clip.load(str(tmp_path / name), device="cpu", dtype=torch.float16)  # fp16 ignored on CPU
            assert loaded.dtype == torch.float32 and loaded.visual.input_resolution == 32
            assert torch.allclose(loaded(image, tokens)[0], want, atol=1e-5)


def test_clip_reads_hfai_file_and_tokenizes_their_way():
    """HFAiLab's clip_vit_b32.pt is a bare OpenAI-keyed state dict (302 tensors, no extras, no attn_mask); their
    tokenizer gives OpenAI's ids for ordinary prompts (fact sheet: "a photo of a dog")."""
    with torch.device("meta"):
        sd = clip.CLIP(clip.Config()).state_dict()  # ViT-B/32 at the defaults
    assert len(sd) == 302 and not any(k in sd for k in clip.ARCHIVE_EXTRAS) and "attn_mask" not in str(list(sd))
    assert clip.config_from_state_dict(sd) == clip.Config()
    assert clip.tokenize("a photo of a dog")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_clip_strict_load_names_keys(tmp_path):
    sd = tiny_vit().state_dict()
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*visual\.ln_post\.bias.*Unexpected key.*visual\.extra\.weight"):
        clip.build_model(dict(sd))
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(data.UserError, match=r"keys.pt does not fit the CLIP.*1 missing \(visual\.ln_post\.bias\)"):
        data.load_model(clip.load, tmp_path / "keys.pt", "clip")
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-X/99'.*ViT-B/32"):
        clip.load("ViT-X/99")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(data.UserError, match="junk.pt is not a PyTorch checkpoint"):
        data.load_model(clip.load, tmp_path / "junk.pt", "clip")
    with open(tmp_path / "stats.npz", "wb") as f:  # a zip archive, but numpy's, not torch's
        np.savez(f, mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(data.UserError, match=r"stats.npz is a zip archive of mu.npy, sigma.npy, not a PyTorch checkp"):
        data.load_model(clip.load, tmp_path / "stats.npz", "clip")


def test_clip_text_pooling_at_first_end_token():
    model = tiny_vit()
    t = clip.tokenize(["a cat", "a cat <|endoftext|> and more words"])
    with torch.no_grad():
        e = model.encode_text(t)
    assert torch.allclose(e[0], e[1], atol=1e-6)  # causal: nothing after the first end token matters

# ---------------------------------------------------------------------------- download


def test_clip_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": "3000000"}

        def read(self, n=-1):
            if self.tell() > 1_000_000:
                raise ConnectionResetError("connection lost")
            return super().read(n)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Broken(b"x" * 3_000_000))
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="connection lost.*put it at"):
        clip.download("https://example.com/a/model.pt", str(root), sha256="0" * 64)
    assert list(root.iterdir()) == []


def test_clip_download_hash_mismatch_redownloads(tmp_path):
    payload = b"the right bytes" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    root = tmp_path / "cache"
    root.mkdir()
    (root / "src.bin").write_bytes(b"truncated")
    path = clip.download(src.as_uri(), str(root), sha256=sha)  # the wrong file is replaced
    assert Path(path).read_bytes() == payload and sorted(os.listdir(root)) == ["src.bin"]
    with pytest.raises(RuntimeError, match="SHA256"):  # served bytes themselves wrong: error, nothing kept
        clip.download(src.as_uri(), str(tmp_path / "other"), sha256="0" * 64)
    assert os.listdir(tmp_path / "other") == []


def test_clip_default_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert clip.default_root() == str(tmp_path / "clip")


def test_clip_cli_zero_shot_and_bad_inputs(tmp_path, capsys):
    torch.save(tiny_vit().state_dict(), tmp_path / "tiny.pt")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    probs = clip.main(["--model", str(tmp_path / "tiny.pt"), "--image", str(tmp_path / "red.png"), "--text", "a", "b"])
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-5 and "  a\n" in capsys.readouterr().out
    (tmp_path / "bad.jpg").write_bytes(b"no image")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for argv, message in [(["--image", str(tmp_path / "missing.jpg")], "cannot read --image .*missing.jpg"),
                          (["--image", str(tmp_path / "bad.jpg")], "cannot read --image .*bad.jpg"),
                          (["--image", str(tmp_path / "red.png"), "--model", str(tmp_path / "junk.pt")],
                           "cannot load --model .*junk.pt")]:
        with pytest.raises(SystemExit) as e:
            clip.main(argv + ["--text", "a"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and re.match("clip.py: error: " + message, err), err

# ---------------------------------------------------------------------------- train_clip


def trainer_error(capsys, module, *argv):
    """Run a script's command line in-process: it must refuse with exit status 2 and one line on stderr (returned)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.cli(module.main, module.get_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


def run_trainer(module, *argv):
    return module.main(module.get_parser().parse_args([str(a) for a in argv]))


def check_run_protection(capsys, module, out, *argv):
    """A finished run in `out` is refused without --resume; --resume needs a run; a start deletes the temp file of a
    killed checkpoint write; --overwrite starts over and deletes the earlier run's files."""
    prog = f"{module.__name__}.py"
    run_trainer(module, *argv, "--out", out)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert trainer_error(capsys, module, *argv, "--out", out) == (
        f"{prog}: error: found a run at step {step} in {out} — pass --resume to continue it or choose another --out "
        f"(--overwrite deletes it)")
    assert trainer_error(capsys, module, *argv, "--out", out.parent / "none", "--resume") == (
        f"{prog}: error: --resume: there is no {out.parent / 'none' / 'ckpt.pt'} — drop --resume to start a new run, "
        f"or pass the --out of the run to continue")
    assert trainer_error(capsys, module, *argv, "--out", out, "--resume", "--overwrite") == (
        f"{prog}: error: --resume continues the run in --out, --overwrite deletes it — pass one of them")
    (out / ".ckpt.pt.4242.tmp").write_bytes(b"half a checkpoint")
    run_trainer(module, *argv, "--out", out, "--resume", "--max-steps", step + 2)
    assert not list(out.glob(".*")) and torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 2
    later = {p.name for p in out.iterdir()}
    run_trainer(module, *argv, "--out", out, "--overwrite")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step
    return later - {p.name for p in out.iterdir()}  # the files of the discarded run's later steps: all gone


def test_train_clip_lowers_loss_and_loads(tmp_path):
    res = run_trainer(train_clip, "--preset", "tiny", "--out", tmp_path, "--max-steps", 12, "--eval-images", 48,
                      "--log-interval", 1, "--threads", 1)
    losses = [mean["loss"] for _, mean in res["log"]]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    model, _ = clip.load(str(tmp_path / "clip.pt"), device="cpu")  # the fp16 export, written at the checkpoint
    assert model.visual.input_resolution == 32 and model.embed_dim == 32
    assert torch.load(tmp_path / "clip.pt", weights_only=True)["step"] == 12
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert sorted(ckpt) == ["args", "config", "model", "optimizer", "rng", "scaler", "step"] and len(ckpt["rng"]) == 1
    trained = clip.build_model(dict(ckpt["model"]))
    image, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():  # the exported fp16 file is the trained model up to fp16 rounding
        assert torch.allclose(model.encode_image(image), trained.encode_image(image), atol=2e-2)
        assert torch.allclose(model.encode_text(tokens), trained.encode_text(tokens), atol=2e-2)


def test_train_clip_resume_is_exact(tmp_path):
    common = ["--preset", "tiny", "--eval-images", 8, "--threads", 1, "--batch-size", 16, "--max-steps", 4,
              "--log-interval", 1]
    full = run_trainer(train_clip, *common, "--out", tmp_path / "a")
    run_trainer(train_clip, *common, "--out", tmp_path / "b", "--stop-after", 2)  # a time-limited job
    resumed = run_trainer(train_clip, *common, "--out", tmp_path / "b", "--resume")
    assert resumed["log"] == full["log"][2:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_clip_never_overwrites_a_run(tmp_path, capsys):
    check_run_protection(capsys, train_clip, tmp_path / "run", "--preset", "tiny", "--max-steps", 2, "--batch-size",
                         8, "--eval-images", 8, "--threads", 1)


# =============================================================================
# vqgan

TINY = vqgan.Config(**vqgan.PRESETS["tiny"])


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = vqgan.VQGAN(replace(TINY, **kw))
    with torch.no_grad():  # a spread-out codebook, so indices are not all the same
        m.quantize.embedding.weight.normal_()
    return m.eval()


def images(n=2, res=32, seed=0):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vqgan_round_trip_shapes():
    m = tiny_model()
    x = images(3)
    idx = m.encode(x)
    assert idx.shape == (3, TINY.grid, TINY.grid) and idx.dtype == torch.long
    y = m.decode(idx)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    xrec, loss, idx2 = m(x)
    assert xrec.shape == x.shape and loss.ndim == 0 and torch.equal(idx, idx2)
    z = F.embedding(idx, m.quantize.codebook()).permute(0, 3, 1, 2)
    assert torch.allclose(m.decode_latent(z), y, atol=1e-6)
    # non-square inputs run too (resolution only places attention)
    assert m.encode(images(1, 48)[:, :, :, :32].contiguous()).shape == (1, 12, 8)


def test_vqgan_straight_through_gradient_reaches_encoder():
    m = tiny_model().train()
    xrec, qloss, _ = m(images())
    (xrec - images()).abs().mean().backward()  # reconstruction loss only: its gradient must cross the quantizer
    g = m.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("legacy", [True, False])
def test_vqgan_legacy_beta_placement(legacy):
    cfg = replace(TINY, legacy=legacy, n_embed=8, embed_dim=4)
    q = vqgan.VectorQuantizer(cfg)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    z_q, loss, idx = q(z)
    zq_ref = q.embedding.weight[idx].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
    mse = ((zq_ref - z) ** 2).mean()
    assert torch.allclose(loss, 1.25 * mse, rtol=1e-6)  # the forward value is the same for both placements
    loss.backward()
    n = z.numel()
    w_commit, w_book = (1.0, 0.25) if legacy else (0.25, 1.0)
    assert torch.allclose(z.grad, w_commit * 2 * (z - zq_ref).detach() / n, rtol=1e-5, atol=1e-9)
    g_book = torch.zeros_like(q.embedding.weight)
    g_book.index_add_(0, idx.flatten(), (w_book * 2 * (zq_ref - z).detach() / n).permute(0, 2, 3, 1).reshape(-1, 4))
    assert torch.allclose(q.embedding.weight.grad, g_book, rtol=1e-5, atol=1e-9)
    assert torch.allclose(z_q, zq_ref, atol=1e-6)  # straight-through value = the codes


def fake_lightning_ckpt(model, path):
    """A file laid out like PL 1.0.8's taming .ckpt: the ModelCheckpoint *class* as a callbacks key, two Adam states,
    the model's keys interleaved with loss.* (LPIPS + discriminator), pickled while a fake `pytorch_lightning`
    exists."""
    mods = {}
    for name in ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]:
        mods[name] = sys.modules[name] = types.ModuleType(name)
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    sd = model.state_dict()
    enc_dec = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder."))}
    rest = {k: v for k, v in sd.items() if k not in enc_dec}
    disc = train_vqgan.Discriminator(2)
    loss = {f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}
    loss |= {"loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
             "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1)}
    adam = torch.optim.Adam(model.parameters(), betas=(0.5, 0.9))
    try:
        torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5),
                                                    "best_model_path": "x.ckpt"}},
                    "optimizer_states": [adam.state_dict(), adam.state_dict()], "lr_schedulers": [],
                    "state_dict": enc_dec | loss | rest}, path)
    finally:
        for name in mods:
            del sys.modules[name]  # loading must work without it


def test_vqgan_loads_taming_ckpt_without_lightning(tmp_path, capsys):
    m = tiny_model(l2_norm=False, restart_every=0)  # taming: legacy=True, raw codes
    path = tmp_path / "last.ckpt"
    fake_lightning_ckpt(m, path)
    with pytest.raises(Exception, match="pytorch_lightning"):  # the plain weights-only load refuses it
        torch.load(path, weights_only=True)
    assert "pytorch_lightning" not in sys.modules
    m2 = vqgan.VQGAN.from_checkpoint(path)
    assert "loss.* dropped" in capsys.readouterr().out
    assert "pytorch_lightning" not in sys.modules
    assert m2.config.legacy and m2.config.n_embed == TINY.n_embed and m2.config.ch_mult == TINY.ch_mult
    x = images(2)
    assert torch.equal(m.encode(x), m2.encode(x))
    assert torch.equal(m.decode(m.encode(x)), m2.decode(m2.encode(x)))
    # bare {"state_dict": ...} (taming's extract_submodel.py) and our own fp16 checkpoint load as well
    torch.save({"state_dict": m.state_dict()}, tmp_path / "bare.ckpt")
    assert torch.equal(vqgan.VQGAN.from_checkpoint(tmp_path / "bare.ckpt").encode(x), m.encode(x))
    torch.save(m.checkpoint(step=7, half=True), tmp_path / "ours.pt")
    m3 = vqgan.VQGAN.from_checkpoint(tmp_path / "ours.pt")
    assert m3.config == m.config and m3.encoder.conv_in.weight.dtype == torch.float32


def test_vqgan_f16_16384_layout_inferred_on_meta():
    with torch.device("meta"):
        m = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS["f16-16384"]))
    sd = m.state_dict()
    assert len(sd) == 343
    assert sum(k.startswith("encoder.") for k in sd) == 144 and sum(k.startswith("decoder.") for k in sd) == 194
    assert sum(p.numel() for p in m.parameters()) == 76_073_859
    for key, shape in [("encoder.down.2.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
                       ("encoder.down.0.downsample.conv.weight", (128, 128, 3, 3)),
                       ("decoder.up.1.block.0.norm1.weight", (256,)),
                       ("decoder.up.4.attn.2.proj_out.weight", (512, 512, 1, 1)),
                       ("decoder.up.4.upsample.conv.bias", (512,)), ("encoder.conv_out.weight", (256, 512, 3, 3)),
                       ("decoder.conv_out.weight", (3, 128, 3, 3)), ("quantize.embedding.weight", (16384, 256))]:
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.3.attn.0.q.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert vqgan.config_from_state_dict(sd) == vqgan.Config(**vqgan.PRESETS["f16-16384"])
    sd1024 = dict(sd, **{"quantize.embedding.weight": torch.empty(1024, 256, device="meta")})
    assert vqgan.config_from_state_dict(sd1024).n_embed == 1024


def test_vqgan_strict_load_names_keys(tmp_path):
    m = tiny_model()
    ck = m.checkpoint()
    del ck["model"]["decoder.conv_out.bias"]
    ck["model"]["decoder.extra.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r'(?s)Missing key.*"decoder.conv_out.bias".*Unexpected key.*"decoder.extra'):
        vqgan.VQGAN.from_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(data.UserError, match=r"bad.pt does not fit the VQGAN it describes: 1 missing \(decoder.conv_out"
                                             r".bias\); 1 unexpected \(decoder.extra.weight\) — is it complete\?$"):
        data.load_model(vqgan.VQGAN.from_checkpoint, tmp_path / "bad.pt", "vqgan")


@pytest.fixture(scope="module")
def hfai_files(tmp_path_factory):
    """Files in HFAiLab's exact layouts at small sizes (their topology: f16 levels, 2 res blocks, attention at 16x16;
    a 2 x 128 GPT over 256 tokens), loaded by ours and compared with their modules: scripts/check_hfai_layout.py,
    which also runs at the real sizes."""
    folder = tmp_path_factory.mktemp("hfai")
    figures = hfai.compare(folder, ch=32, z=32, codes=64, n_layer=2, C=128, vocab=64, res=32)
    hfai.clip_file(folder / "clip_vit_b32.pt", embed_dim=512, image_resolution=32, vision_layers=1, vision_width=64,
                   vision_patch_size=16, transformer_width=64, transformer_layers=1)
    return folder, figures


def test_vqgan_reads_hfai_release_layout(hfai_files, capsys):
    folder, r = hfai_files
    assert r["indices_equal"] == r["indices"] == 8 and r["decode_max_abs"] < 1e-4 < r["decode_range"]
    ck = torch.load(folder / "vqgan_coco.pt", weights_only=True)
    assert set(ck) == {"model", "epoch"} and len(ck["model"]) == 337  # the release's count, 22 of them discriminator.*
    m = vqgan.VQGAN.from_checkpoint(ck)  # a loaded dict works as well as a path
    assert "HFAiLab CLIP-GEN checkpoint, epoch 0, 343 tensors (22 discriminator.* dropped)" in capsys.readouterr().out
    assert m.config.norm_eps == 1e-5 and m.encoder.mid.attn_1.norm.eps == 1e-5 and m.config.grid == 16
    # every mapped tensor is the file's, and the single-head in_proj rows are q, k, v in that order
    attn = ck["model"]["encoder.mid.1.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        assert torch.equal(getattr(m.encoder.mid.attn_1, name).weight[:, :, 0, 0], attn[32 * 4 * i:32 * 4 * (i + 1)])
    assert torch.equal(m.decoder.up[4].attn[2].proj_out.weight[:, :, 0, 0],
                       ck["model"]["decoder.up.5.attn.out_proj.weight"])
    assert torch.equal(m.quant_conv.weight, ck["model"]["encoder.final.3.weight"])
    # an unknown key is named by the strict load, not dropped
    ck["model"]["encoder.final.9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "encoder.final.9.weight"'):
        vqgan.VQGAN.from_checkpoint(ck)


def test_vqgan_refuses_truncated_and_wrong_kind_of_file(hfai_files, tmp_path):
    folder, _ = hfai_files
    (tmp_path / "cut.pt").write_bytes((folder / "vqgan_coco.pt").read_bytes()[:100_000])
    with pytest.raises(data.UserError, match="cut.pt is truncated or corrupt"):
        data.load_model(vqgan.VQGAN.from_checkpoint, tmp_path / "cut.pt", "vqgan")
    with pytest.raises(data.UserError, match=r"gpt_coco.pt is a GPT \(HFAiLab's release layout, no null condition\), "
                                             r"not a VQGAN checkpoint — pass it as --gpt"):
        data.load_model(vqgan.VQGAN.from_checkpoint, folder / "gpt_coco.pt", "vqgan")


def vqgan_train_args(out, *extra):
    # the tiny preset: 64 shapes images at 32 px, GAN from step 2, dead-code restarts every 2 steps
    return train_vqgan.get_parser().parse_args(["--preset", "tiny", "--out", str(out), "--threads", "1",
                                                *map(str, extra)])


def test_train_vqgan_resume_is_exact(tmp_path):
    # D, its optimizer, the adaptive weight, the codebook usage and the restart RNG all resume; a checkpoint at step 3
    train_vqgan.main(vqgan_train_args(tmp_path / "a"))
    train_vqgan.main(vqgan_train_args(tmp_path / "b", "--stop-after", 4))  # a time-limited job, or a kill after 4
    train_vqgan.main(vqgan_train_args(tmp_path / "b", "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "disc"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["usage"], b["usage"])
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert sorted(a) == ["args", "config", "disc", "disc_optimizer", "model", "optimizer", "rng", "scaler", "step",
                         "usage"]


def test_train_vqgan_loss_falls(tmp_path):
    args = vqgan_train_args(tmp_path, "--max-steps", 25, "--n-images", 8, "--eval-interval", 0, "--disc-start", 10**9)
    torch.manual_seed(args.seed)
    fresh = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS["tiny"]))
    seen = data.get_dataset("shapes", "train", 32, train=False, n=8)
    before = train_vqgan.evaluate(fresh, seen, 8, "cpu")[0]["l1"]
    after = train_vqgan.evaluate(train_vqgan.main(args)["model"], seen, 8, "cpu")[0]["l1"]
    assert after < 0.8 * before, (before, after)
    export = torch.load(tmp_path / "vqgan.pt", weights_only=True)  # the fp16 model-only file, of the same step
    assert export["step"] == 25 and export["model"]["decoder.conv_out.weight"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.glob("rec_*.png")) == ["rec_0000025.png"]


def test_train_vqgan_corrupt_images_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 36), (40 * i, 100, 200)).save(folder / f"ok{i}.png")
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    good = (folder / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        train_vqgan.main(vqgan_train_args(tmp_path / "out", "--data", folder, "--n-images", 8, "--max-steps", 2))
    assert "rank 0: epoch 0: skipped 2 unreadable images" in capsys.readouterr().out


def test_train_vqgan_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    base = ["--preset", "tiny", "--out", tmp_path / "out"]
    assert trainer_error(capsys, train_vqgan, *base, "--data", "imagenet") == (
        f"train_vqgan.py: error: --data imagenet: no folder {tmp_path / 'nowhere' / 'train'} — set IMAGENET_DIR to a "
        f"folder holding train/ and val/ class folders (ILSVRC2012, val sorted into classes), or pass --data FOLDER")
    # the paper's preset (LPIPS on): the missing data is named before any weights are looked for or downloaded
    assert trainer_error(capsys, train_vqgan, "--out", tmp_path / "out2", "--data", "imagenet", "--threads", 1) == (
        f"train_vqgan.py: error: --data imagenet: no folder {tmp_path / 'nowhere' / 'train'} — set IMAGENET_DIR to a "
        f"folder holding train/ and val/ class folders (ILSVRC2012, val sorted into classes), or pass --data FOLDER")
    assert trainer_error(capsys, train_vqgan, *base, "--data", tmp_path / "missing") == (
        f"train_vqgan.py: error: --data {tmp_path / 'missing'}: no such folder — pass 'shapes', 'imagenet' or a "
        f"folder of images")
    assert trainer_error(capsys, train_vqgan, *base, "--data", tmp_path / "empty").startswith(
        f"train_vqgan.py: error: no images under {tmp_path / 'empty'} (looked recursively for .bmp, ")
    assert trainer_error(capsys, train_vqgan, *base, "--lr", "-1") == (
        "train_vqgan.py: error: argument --lr: -1 is out of range: it must be > 0 — see train_vqgan.py --help")
    assert trainer_error(capsys, train_vqgan, *base, "--device", "tpu") == (
        "train_vqgan.py: error: --device tpu: unknown device — use cpu, cuda, cuda:N or mps")
    assert trainer_error(capsys, train_vqgan, *base, "--lpips", tmp_path) == (
        "train_vqgan.py: error: --lpips is unused with --perceptual-weight 0 (the shapes preset's) — pass "
        "--perceptual-weight 1 too, or --preset imagenet")
    assert trainer_error(capsys, train_vqgan, *base, "--init", tmp_path / "x.pt", "--resume") == (
        "train_vqgan.py: error: --init starts a new run from weights, --resume continues one — pass one of them")


def test_train_vqgan_never_overwrites_a_run(tmp_path, capsys):
    gone = check_run_protection(capsys, train_vqgan, tmp_path / "run", "--preset", "tiny", "--max-steps", 2,
                                "--eval-interval", 1, "--threads", 1)
    assert gone == {"rec_0000003.png", "rec_0000004.png"}  # no grid of the discarded run stays beside the new one


def test_train_vqgan_kill_during_checkpoint_writes(tmp_path, capsys):
    """kill -9 at random moments of a run that writes ckpt.pt, vqgan.pt and a grid at every step: the last checkpoint
    always loads, the export is of its step or the one before, and the next start resumes from it, temp files gone."""
    out, rng, last, seen = tmp_path / "run", random.Random(0), 0, None
    fork = multiprocessing.get_context("fork")  # a forked trainer skips the seconds of a fresh interpreter's imports
    for attempt in range(3):
        args = vqgan_train_args(out, "--max-steps", 100_000, "--eval-interval", 1, "--log-interval", 1000,
                                *(["--resume"] if attempt else []))
        p = fork.Process(target=train_vqgan.main, args=(args,))
        p.start()
        t0 = time.time()
        while not (out / "ckpt.pt").exists() or (out / "ckpt.pt").stat().st_ino == seen:  # renamed into place: new inode
            assert p.is_alive() and time.time() - t0 < 60  # until this start has written a checkpoint
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        p.kill()  # SIGKILL
        p.join()
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["step"] > last and vqgan.VQGAN.from_checkpoint(out / "vqgan.pt", verbose=False) is not None
        assert torch.load(out / "vqgan.pt", weights_only=True)["step"] in (ckpt["step"] - 1, ckpt["step"])
        last, seen = ckpt["step"], (out / "ckpt.pt").stat().st_ino
    capsys.readouterr()
    # --max-steps past the tiny preset's 6: a kill at step 6 or later must still leave a step to resume
    train_vqgan.main(vqgan_train_args(out, "--resume", "--max-steps", 100_000, "--stop-after", 1,
                                      "--eval-interval", 1))
    assert f"resumed {out / 'ckpt.pt'} at step {last}\n" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == last + 1 and not list(out.glob(".*"))


def test_train_vqgan_lpips_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(train_vqgan, "VGG_URL", (tmp_path / "nowhere" / "vgg16-397923af.pth").as_uri())
    err = trainer_error(capsys, train_vqgan, "--preset", "tiny", "--out", tmp_path / "out", "--perceptual-weight", 1)
    assert err == (
        f"train_vqgan.py: error: cannot download {train_vqgan.VGG_URL} (<urlopen error [Errno 2] No such file or "
        f"directory: '{tmp_path / 'nowhere' / 'vgg16-397923af.pth'}'>) — without a network, fetch it elsewhere and "
        f"put it at {tmp_path / 'cache' / 'vgg16-397923af.pth'}")
    assert not (tmp_path / "cache" / "vgg16-397923af.pth").exists()


def test_train_vqgan_ddp_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train_vqgan.py"), "--preset", "tiny", "--batch-size", "2", "--n-images", "32", "--max-steps",
           "3", "--disc-start", "1", "--log-interval", "1", "--out", str(tmp_path), "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "batch 2x2" in r.stdout and "eval step 3" in r.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # both ranks' RNG states, for an exact resume


def lpips_files(folder):
    """torchvision's VGG16 file and LPIPS' vgg.pth, with random values under the published keys."""
    torch.manual_seed(0)
    names = train_vqgan.LPIPS().state_dict()
    feats = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": torch.randn_like(v) * 0.05
             for k, v in names.items() if k.startswith("net.")}
    feats["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision's file, unused
    torch.save(feats, folder / "vgg16-397923af.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])},
               folder / "vgg.pth")


def test_train_vqgan_lpips_loads_published_layouts(tmp_path):
    """the folder layout (VGG16 + vgg.pth), and taming's loss.perceptual_loss.* inside a .ckpt."""
    lpips_files(tmp_path)
    lp = train_vqgan.LPIPS().load(tmp_path).eval()
    x, y = images(2), images(2, seed=1)
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(lp(x, x), torch.zeros(2))
    sd = {f"loss.perceptual_loss.{'scaling_layer.' if k in ('shift', 'scale') else ''}{k}": v
          for k, v in lp.state_dict().items()}
    # as pytorch-lightning 1.0.8 saves it: the ModelCheckpoint class itself pickled as a key, lightning not installed
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    sys.modules.update({n: types.ModuleType(n) for n in names})
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    try:
        torch.save({"callbacks": {ModelCheckpoint: {}}, "state_dict": sd}, tmp_path / "taming.ckpt")
    finally:
        for n in names:
            del sys.modules[n]
    assert torch.equal(train_vqgan.LPIPS().load(tmp_path / "taming.ckpt").eval()(x, y), d)


def test_train_vqgan_lpips_file_with_a_missing_tensor_names_it(tmp_path):
    lpips_files(tmp_path)
    lin = torch.load(tmp_path / "vgg.pth", weights_only=True)
    del lin["lin3.model.1.weight"]
    torch.save(lin, tmp_path / "vgg.pth")
    with pytest.raises(data.UserError) as e:
        train_vqgan.LPIPS().load(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'vgg.pth'} does not fit the LPIPS it describes: 1 missing "
                            f"(lin3.model.1.weight) — is it complete?")
    with pytest.raises(data.UserError) as e:
        train_vqgan.LPIPS().load(tmp_path / "nowhere")
    assert str(e.value) == (f"--lpips {tmp_path / 'nowhere'}: no such file or folder — pass a taming .ckpt, or a "
                            f"folder holding vgg16-397923af.pth and vgg.pth")
    vgg = torch.load(tmp_path / "vgg16-397923af.pth", weights_only=True)
    vgg["features.99.weight"] = vgg.pop("features.28.bias")[None]
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    with pytest.raises(data.UserError) as e:
        train_vqgan.LPIPS().load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'vgg16-397923af.pth'} does not fit")


# =============================================================================
# gpt

def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.make_config("tiny", **kw)).eval()
    with torch.no_grad():  # a trained-looking null token, so that conditional and unconditional differ
        model.null_cond.normal_()
    return model


@pytest.mark.parametrize("cond_tokens", [1, 3])  # HFAiLab's single prefix token; the shapes preset's several
def test_gpt_causality_and_prefix_shapes(cond_tokens):
    model = tiny_gpt(cond_tokens=cond_tokens)
    x, c = torch.randint(0, 16, (2, 15)), torch.randn(2, 8)
    logits, loss = model(x, c, targets=torch.randint(0, 16, (2, 16)))
    assert logits.shape == (2, 16, 16) and loss.ndim == 0  # [cond, t_0..t_14] predicts t_0..t_15
    for j in (0, 7, 14):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 16
        changed = model(y, c)[0]
        # logits at i see t_0..t_{i-1}: changing t_j leaves 0..j untouched and moves j+1.. (proves the test can fail)
        assert torch.equal(changed[:, :j + 1], logits[:, :j + 1])
        assert not torch.allclose(changed[:, j + 1:], logits[:, j + 1:])
    # the condition reaches every position; the norm of the embedding does not matter (normalised inside)
    assert not torch.allclose(model(x, -c)[0][:, 0], logits[:, 0])
    assert torch.allclose(model(x, 3 * c)[0], logits, atol=1e-6)


@pytest.mark.parametrize("cond_tokens", [1, 3])
def test_gpt_null_condition_matches_dropped_rows(cond_tokens):
    model = tiny_gpt(cond_tokens=cond_tokens)
    x, c = torch.randint(0, 16, (3, 15)), torch.randn(3, 8)
    drop = torch.tensor([True, False, True])
    mixed = model(x, c, drop=drop)[0]
    assert torch.allclose(mixed[drop], model(x[drop], None)[0], atol=1e-6)
    assert torch.allclose(mixed[~drop], model(x[~drop], c[~drop])[0], atol=1e-6)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=5, top_p=0.9), dict(cfg_scale=3.0, temperature=0.8),
                                dict(prefix=True, top_k=8), dict(cond_tokens=3, cfg_scale=2.0, prefix=True)])
def test_gpt_kv_cache_equals_full_recomputation(kw):
    kw = dict(kw)  # ours to change: the prefix flag becomes tokens below
    model = tiny_gpt(cond_tokens=kw.pop("cond_tokens", 1))
    c = torch.randn(4, 8)
    if kw.get("prefix"):
        kw["prefix"] = torch.randint(0, 16, (4, 5))
    a = model.generate(c, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(c, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert a.shape == (4, 16) and torch.equal(a, b)
    if kw.get("prefix") is not None:
        assert torch.equal(a[:, :5], kw["prefix"])


def test_gpt_guidance_matches_manual_formula_and_scale_one_is_conditional():
    model = tiny_gpt()
    c = torch.randn(3, 8)
    for s in (1.0, 3.0):
        toks = model.generate(c, cfg_scale=s, temperature=0)
        manual = torch.zeros(3, 0, dtype=torch.long)
        for _ in range(16):  # greedy with explicit conditional / unconditional forwards, one branch at a time
            lc, lu = model(manual, c)[0][:, -1], model(manual, None)[0][:, -1]
            guided = lu + s * (lc - lu)
            if s != 1.0:  # only tokens within CFG_PLAUSIBILITY nats of the conditional branch's best
                lp = lc.log_softmax(-1)
                guided[lp < lp.max(-1, keepdim=True).values - gpt.CFG_PLAUSIBILITY] = float("-inf")
            manual = torch.cat([manual, guided.argmax(-1, keepdim=True)], 1)
        assert torch.equal(toks, manual)
    # scale 1 is plain conditional sampling, draw for draw; a large scale changes the samples
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.generate(c, cfg_scale=1.0, generator=g()), model.generate(c, generator=g()))
    assert not torch.equal(model.generate(c, cfg_scale=8.0, generator=g()), model.generate(c, generator=g()))


def test_gpt_guidance_never_lifts_an_implausible_token():
    lc, lu = torch.tensor([[5.0, 4.0, -5.0]]), torch.tensor([[5.0, 4.5, -20.0]])
    assert (lu + 3 * (lc - lu)).argmax() == 2  # plain guidance: 3 * 15 nats lift the token both branches rule out
    out = gpt.guide(lc, lu, 3.0)
    assert out.argmax() == 0 and out[0, 2] == float("-inf") and out[0, 1] == lu[0, 1] + 3 * (lc[0, 1] - lu[0, 1])


def test_gpt_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(gpt.sample_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(gpt.sample_logits(logits, top_p=0.5, generator=g).tolist()) == {0}  # p(0) = 0.71 >= 0.5
    assert gpt.sample_logits(logits[:2], temperature=0).tolist() == [0, 0]


def test_gpt_checkpoint_roundtrip_and_mfu_helpers(tmp_path):
    model = tiny_gpt()
    torch.save(model.checkpoint(step=3), tmp_path / "g.pt")
    loaded = gpt.GPT.from_checkpoint(tmp_path / "g.pt")
    x, c = torch.randint(0, 16, (2, 15)), torch.randn(2, 8)
    assert torch.equal(loaded(x, c)[0], model(x, c)[0]) and not loaded.training
    assert gpt.peak_flops("cpu") is None and gpt.estimate_mfu(1e6, 1e3, "cpu") is None
    cfg = model.config  # 6N + 12 L C T, N without the lookup tables
    n = model.num_params() - 16 * 32 - 16 * 32 - 32
    assert model.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.head.weight) in decayed and id(model.tok_emb.weight) not in decayed
    assert id(model.null_cond) not in decayed and id(model.ln_f.weight) not in decayed


def test_gpt_reads_hfai_release_layout(hfai_files, capsys):
    folder, r = hfai_files
    assert r["logits_max_abs"] < 1e-4 < r["logits_range"] and r["greedy_equal"] == r["greedy"] == 512
    ck = torch.load(folder / "gpt_coco.pt", weights_only=True)
    assert len(ck["model"]) == 8 + 2 * 13 and ck["model"]["blocks.0.mask"].dtype == torch.bool
    m = gpt.GPT.from_checkpoint(folder / "gpt_coco.pt")
    assert "causal-mask buffers dropped, no null condition" in capsys.readouterr().out
    c = m.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.block_size, c.cond_dim) == (2, 128, 2, 64, 256, 512)
    assert c.head_bias and not c.null_cond and torch.equal(m.head.bias, ck["model"]["head.bias"])
    assert torch.equal(m.pos_emb.weight, ck["model"]["pos_emb"][0]) and not hasattr(m, "null_cond")
    # no trained null condition: guidance and unconditional sampling are refused with one sentence
    e = torch.randn(2, 512)
    for call in (lambda: m.generate(e, cfg_scale=3.0), lambda: m(torch.zeros(1, 0, dtype=torch.long), None)):
        with pytest.raises(ValueError, match="^this GPT has no trained null condition .*classifier-free guidance is "
                                             "not available$"):
            call()
    assert m.generate(e, cfg_scale=1.0, top_k=5).shape == (2, 256)
    # our own GPTs keep their null token and no head bias
    assert gpt.Config().null_cond and not gpt.Config().head_bias


def test_gpt_refuses_wrong_kind_of_file(hfai_files, tmp_path):
    folder, _ = hfai_files
    with pytest.raises(data.UserError, match=r"vqgan_coco.pt is a VQGAN \(HFAiLab's release layout\), not a GPT "
                                             r"checkpoint — pass it as --vqgan"):
        data.load_model(gpt.GPT.from_checkpoint, folder / "vqgan_coco.pt", "gpt")
    (tmp_path / "cut.pt").write_bytes((folder / "gpt_coco.pt").read_bytes()[:50_000])
    with pytest.raises(data.UserError, match="cut.pt is truncated or corrupt"):
        data.load_model(gpt.GPT.from_checkpoint, tmp_path / "cut.pt", "gpt")


# -----------------------------------------------------------------------------
# train_gpt.py on a tiny VQGAN and a tiny CLIP (random weights: the plumbing is under test, not the quality)

def make_frozen(path, seed=0):
    torch.manual_seed(seed)
    v = vq.VQGAN(vq.Config(**vq.PRESETS["tiny"]))
    torch.save({"model": v.state_dict(), "config": asdict(v.config), "step": 0}, path / f"vq{seed}.pt")
    c = clip.CLIP(clip.Config(embed_dim=8, image_resolution=32, vision_layers=[1, 1, 1, 1], vision_width=8,
                              vision_patch_size=0, transformer_width=32, transformer_layers=1))
    torch.save({"model": c.state_dict(), "config": asdict(c.config), "step": 0}, path / f"clip{seed}.pt")
    return str(path / f"vq{seed}.pt"), str(path / f"clip{seed}.pt")


def gpt_args(*argv):
    return train_gpt.get_parser().parse_args(["--preset", "tiny", "--threads", "1", *map(str, argv)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    vq_path, clip_path = make_frozen(d)
    meta = train_gpt.main(gpt_args("--n-images", 48, "--vqgan", vq_path, "--clip", clip_path, "--data-dir",
                                   d / "data", "--flip", "--prepare-only"))["meta"]
    return d, vq_path, clip_path, meta


def test_train_gpt_prepare_writes_files_and_refuses_a_mismatch(prepared):
    d, vq_path, clip_path, meta = prepared
    tok, emb = np.load(d / "data" / "tokens.npy"), np.load(d / "data" / "clip_emb.npy")
    assert tok.dtype == np.uint16 and tok.shape == (96, 64) and tok.max() < 64  # 48 images + flips, 8x8 grid
    assert emb.dtype == np.float16 and emb.shape == (96, 8)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    assert meta["codebook_size"] == 64 and meta["grid"] == [8, 8] and meta["flip"] and meta["rows"] == 96
    base = ["--n-images", 48, "--clip", clip_path, "--data-dir", d / "data", "--prepare-only"]
    assert train_gpt.main(gpt_args(*base, "--vqgan", vq_path, "--flip"))["meta"] == meta  # reused
    other_vq, _ = make_frozen(d, seed=1)
    with pytest.raises(data.UserError, match=f"^{d / 'data'} holds tokens made differently \\(vqgan_sha256: files "
                                             f"have '{meta['vqgan_sha256']}', this run wants '[0-9a-f]{{64}}'\\) — "
                                             f"pass another --data-dir, or delete that folder to encode again$"):
        train_gpt.main(gpt_args(*base, "--vqgan", other_vq, "--flip"))
    with pytest.raises(data.UserError, match="flip: files have True, this run wants False"):
        train_gpt.main(gpt_args(*base, "--vqgan", vq_path))
    with pytest.raises(data.UserError, match="n_images: files have 48, this run wants 40"):
        train_gpt.main(gpt_args(*base, "--vqgan", vq_path, "--flip", "--n-images", 40))


def gpt_train_args(d, out, *extra):
    return gpt_args("--data-dir", d / "data", "--out", out, "--eval-interval", 0, "--log-interval", 1, *extra)


def test_train_gpt_held_out_pairs_are_left_out_and_recorded(prepared):
    d, vq_path, clip_path, meta = prepared
    held = train_gpt.main(gpt_args("--n-images", 48, "--vqgan", vq_path, "--clip", clip_path, "--data-dir",
                                   d / "held", "--exclude-held-out", "--prepare-only"))["meta"]
    assert meta["held_out_excluded"] == [] and held["held_out_excluded"] == [f"{c} {s}" for c, s in data.HELD_OUT]
    assert json.loads((d / "held" / "meta.json").read_text())["held_out_excluded"] == held["held_out_excluded"]
    assert train_gpt.get_parser().parse_args(["--preset", "shapes"]).exclude_held_out  # the shapes preset's choice


def test_train_gpt_resume_is_exact(prepared):
    d = prepared[0]
    common = ["--max-steps", 8, "--dropout", 0.1, "--emb-noise", 0.5, "--eval-iters", 1, "--eval-interval", 3]
    straight = train_gpt.main(gpt_train_args(d, d / "straight", *common))
    train_gpt.main(gpt_train_args(d, d / "split", *common, "--stop-after", 4))
    assert torch.load(d / "split" / "ckpt.pt", weights_only=True)["step"] == 4
    resumed = train_gpt.main(gpt_train_args(d, d / "split", *common, "--resume"))
    assert resumed["log"] == straight["log"][4:] and resumed["evals"] == straight["evals"][-2:]  # steps 6 and 8
    a = torch.load(d / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(d / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["head.weight"], gpt.GPT(gpt.Config(**a["config"])).state_dict()["head.weight"])
    assert sorted(a) == ["args", "config", "data_meta", "model", "optimizer", "rng", "scaler", "step"]


def test_train_gpt_toy_run_validation_loss_falls_and_exports(prepared):
    d = prepared[0]
    res = train_gpt.main(gpt_train_args(d, d / "toy", "--max-steps", 60, "--eval-interval", 30, "--eval-iters", 2,
                                        "--val-frac", 0.2, "--lr", 1e-2))
    (s0, first), (s1, last) = res["evals"]
    assert (s0, s1) == (30, 60) and last["val"] < min(first["val"], 0.8 * math.log(64)), res["evals"]
    export = torch.load(d / "toy" / "gpt.pt", weights_only=True)  # what sample.py reads
    assert sorted(export) == ["config", "data_meta", "model", "step"] and export["step"] == 60
    assert export["data_meta"] == prepared[3] and export["model"]["head.weight"].dtype == torch.float16
    model = gpt.GPT.from_checkpoint(d / "toy" / "gpt.pt")
    assert model.generate(torch.randn(2, 8), top_k=10).shape == (2, 64)
    assert sorted(p.name for p in (d / "toy").glob("samples_*.png")) == ["samples_0000030.png", "samples_0000060.png"]


def test_train_gpt_lambda_emb_gradients_reach_only_the_gpt(prepared):
    d, vq_path, clip_path, _ = prepared
    vqgan_model = train_gpt.load_frozen("vqgan", vq_path, "cpu")
    clip_model = train_gpt.load_frozen("clip", clip_path, "cpu")
    model = gpt.GPT(gpt.make_config("tiny", vocab_size=64, block_size=64)).train()
    x, e = torch.randint(0, 64, (2, 64)), torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    logits, _ = model(x[:, :-1], e, x)
    loss = train_gpt.emb_reconstruction_loss(logits, e, vqgan_model, clip_model)
    loss.backward()
    assert 0 <= loss.item() <= 2
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vqgan_model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in clip_model.parameters())
    assert not vqgan_model.training and not clip_model.training
    # and the training loop runs with it
    res = train_gpt.main(gpt_train_args(d, d / "lam", "--max-steps", 2, "--lambda-emb", 0.2, "--emb-rows", 1,
                                        "--eval-iters", 1))
    assert [sorted(mean) for _, mean in res["log"]] == [["emb", "loss"]] * 2


def test_train_gpt_never_overwrites_a_run(prepared, capsys):
    d = prepared[0]
    check_run_protection(capsys, train_gpt, d / "protected", "--preset", "tiny", "--data-dir", d / "data",
                         "--max-steps", 2, "--eval-iters", 1, "--threads", 1)
    # a resumed run must read the token files it was trained on
    (d / "other").mkdir()
    for name in ("tokens.npy", "clip_emb.npy"):
        (d / "other" / name).write_bytes((d / "data" / name).read_bytes())
    meta = json.loads((d / "data" / "meta.json").read_text())
    (d / "other" / "meta.json").write_text(json.dumps({**meta, "clip_sha256": "0" * 64}))
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--data-dir", d / "other", "--out", d / "protected",
                         "--resume") == (f"train_gpt.py: error: {d / 'protected' / 'ckpt.pt'} was trained on other "
                                         f"token files than {d / 'other'} — pass the --data-dir of that run")


def test_train_gpt_divergence_is_one_line(prepared, capsys):
    d = prepared[0]
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--data-dir", d / "data", "--out", d / "nan",
                         "--lr", 1e30, "--threads", 1) == (
        "train_gpt.py: error: non-finite loss at step 1 — lower --lr; no checkpoint written")


def test_train_gpt_missing_inputs_are_one_line(prepared, tmp_path, capsys):
    d, vq_path, clip_path, _ = prepared
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--out", tmp_path / "a") == (
        f"train_gpt.py: error: no prepared token files in {tmp_path / 'a' / 'data'} — pass --vqgan CKPT (and --clip) "
        f"to encode the dataset, or the --data-dir that holds them")
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--out", tmp_path / "b", "--vqgan", tmp_path / "no.pt",
                     "--clip", clip_path) == (f"train_gpt.py: error: {tmp_path / 'no.pt'}: no such file — pass the "
                                              f"vqgan checkpoint file")
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--out", tmp_path / "c", "--vqgan", clip_path) == (
        f"train_gpt.py: error: {clip_path} is a CLIP model (a clipgen checkpoint), not a VQGAN checkpoint — pass it "
        f"as --clip")
    assert trainer_error(capsys, train_gpt, "--preset", "tiny", "--out", tmp_path / "d", "--vqgan", vq_path, "--clip",
                     clip_path, "--data", tmp_path / "none") == (
        f"train_gpt.py: error: --data {tmp_path / 'none'}: no such folder — pass 'shapes', 'imagenet' or a folder "
        f"of images")
    for flag, value, message in [("--emb-noise", "inf", "inf is out of range: it must be >= 0"),
                                 ("--cond-drop", "1.5", "1.5 is out of range: it must be >= 0 and <= 1"),
                                 ("--batch-size", "0", "0 is out of range: it must be >= 1"),
                                 ("--seed", "99999999999999999999", "99999999999999999999 is too large: integers here "
                                                                    "are at most 2**63 - 1"),
                                 ("--max-steps", "1e3", "'1e3' is not an integer")]:
        assert trainer_error(capsys, train_gpt, flag, value) == (
            f"train_gpt.py: error: argument {flag}: {message} — see train_gpt.py --help")


# =============================================================================
# sample

def tiny_checkpoints(folder, cond_dim=8, vocab=64, tokens=64, seed=0):
    """A random ViT CLIP (8-d joint space), the 'tiny' VQGAN (32 px, 8x8 grid, 64 codes) and a GPT that fits them."""
    torch.manual_seed(seed)
    c = clip.CLIP(clip.Config(embed_dim=cond_dim, image_resolution=32, vision_layers=1, vision_width=16,
                              vision_patch_size=8, transformer_width=16, transformer_layers=1))
    v = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS["tiny"]))
    g = gpt.GPT(gpt.make_config("tiny", vocab_size=vocab, block_size=tokens, cond_dim=cond_dim))
    paths = {k: str(Path(folder) / f"{k}.pt") for k in ("clip", "vqgan", "gpt")}
    torch.save({"model": c.state_dict(), "config": asdict(c.config), "step": 0}, paths["clip"])
    torch.save(v.checkpoint(), paths["vqgan"])
    torch.save(g.checkpoint(step=0), paths["gpt"])
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def args_for(ckpts, out, *prompts, **overrides):
    a = sample.get_parser().parse_args(list(prompts) + ["--out", str(out), "--device", "cpu"])
    for k, v in {**ckpts, **overrides}.items():
        setattr(a, k, v)
    return a


def run_cli(argv, capsys):
    """sample.py's command line in-process: (exit status, stdout, stderr)."""
    try:
        data.cli(sample.main, sample.get_parser(), argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_n_images_per_prompt_deterministically_in_a_new_folder_per_run(ckpts, tmp_path):
    a = args_for(ckpts, tmp_path / "a", "a red circle", "a blue square", n=3, candidates=5, seed=7, batch_size=4)
    paths, scores = sample.main(a)
    assert len(paths) == 6 and all(p.is_file() for p in paths) and paths[0].parent == tmp_path / "a" / "000"
    assert (tmp_path / "a" / "000" / "grid.png").is_file()
    assert scores.shape == (2, 3) and torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    paths2, scores2 = sample.main(a)  # the same --out again: a new sub-folder, the first run untouched
    assert paths2[0].parent == tmp_path / "a" / "001" and sorted(os.listdir(tmp_path / "a")) == ["000", "001"]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in paths2] and torch.equal(scores, scores2)
    paths3, _ = sample.main(args_for(ckpts, tmp_path / "c", "a red circle", "a blue square",
                                     n=3, candidates=5, seed=8, batch_size=4))
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in paths3]


def test_sample_reranking_keeps_the_highest_scoring_candidates(ckpts):
    models = sample.load_models(**ckpts)
    cond = sample.text_embeddings(models, ["a red circle", "a green star"])
    # all 6 candidates, unranked order is irrelevant: the kept 2 must be the top 2 of the 6 scores
    every, every_scores = sample.generate(models, cond, n=6, candidates=6, seed=3, batch_size=4)
    kept, kept_scores = sample.generate(models, cond, n=2, candidates=6, seed=3, batch_size=4)
    assert kept.shape == (2, 2, 32, 32, 3) and kept.dtype == torch.uint8
    assert torch.allclose(kept_scores, every_scores.topk(2, dim=1).values)
    assert torch.equal(kept, every[:, :2])
    # the score is the CLIP cosine of the kept image, CLIP-normalised, with the prompt
    x = kept[0, 0].permute(2, 0, 1).float().div(127.5).sub(1)[None]
    e = models.clip.encode_image(clip.preprocess_tensor(x, 32))
    assert torch.allclose(torch.nn.functional.normalize(e, dim=-1) @ cond[0], kept_scores[0, 0], atol=2e-2)
    floats, _ = sample.generate(models, cond[:1], n=1, candidates=2, seed=3, as_float=True)
    assert floats.shape == (1, 1, 3, 32, 32) and 0 <= floats.min() and floats.max() <= 1


def test_sample_image_variations_beside_prompts(ckpts, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    a = args_for(ckpts, tmp_path / "o", "a red circle", "a blue square", n=1, candidates=2,
                 image=[str(tmp_path / "red.png")])
    paths, scores = sample.main(a)
    assert len(paths) == 3 and scores.shape == (3, 1) and paths[2].name == "002-variations-of-red-png-0.png"


@pytest.mark.parametrize("flag", ["--cfg", "--temperature", "--top-k", "--top-p", "--n", "--candidates", "--seed",
                                  "--batch-size"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e999", "99999999999999999999"])
def test_sample_numeric_flags_are_checked_by_name_before_loading(flag, value, capsys):
    if flag == "--temperature" and value == "99999999999999999999":
        return  # a finite temperature, however large, is a valid (uniform) one
    with pytest.raises(SystemExit) as e:
        sample.get_parser().parse_args(["a red circle", flag, value, "--gpt", "/nowhere/gpt.pt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"sample.py: error: argument {flag}: "), err
    assert "Traceback" not in err and (value in err or "1e999" == value)


@pytest.mark.parametrize("flag, value", [("--temperature", "0"), ("--top-p", "0"), ("--top-p", "1.5"), ("--n", "0"),
                                         ("--top-k", "0"), ("--candidates", "0"), ("--batch-size", "0")])
def test_sample_zero_and_out_of_range_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        sample.get_parser().parse_args(["a red circle", flag, value])
    assert f"argument {flag}: {value} is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(prompt=[" "]), "nothing to draw — give a prompt"),
    (dict(prompt=[]), "nothing to draw — give a prompt"),
    (dict(image=["does/not/exist.png"]), r"cannot read --image \(FileNotFoundError.*does/not/exist.png"),
    (dict(device="tpu"), "--device tpu: unknown device — use cpu, cuda, cuda:N or mps"),
    (dict(device="cuda"), "--device cuda: CUDA is not available here" if not torch.cuda.is_available() else
     "--device cuda: "),
])
def test_sample_bad_input_is_refused(ckpts, tmp_path, overrides, message):
    a = args_for(ckpts, tmp_path, "a red circle", **{"n": 1, "candidates": 1, **overrides})
    with pytest.raises(data.UserError, match=message):
        sample.main(a)


def test_sample_unusable_out_and_unreadable_image_fail_before_sampling(ckpts, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(data.UserError, match=r"cannot read --image \(UnidentifiedImageError: .*bad.png.*\) — pass an"):
        sample.main(args_for(ckpts, tmp_path, image=[str(tmp_path / "bad.png")]))
    (tmp_path / "file").write_text("not a folder")
    missing = dict(gpt=str(tmp_path / "nope.pt"))  # a model load would fail later: the --out check comes first
    for out in ("file", "file/sub"):
        with pytest.raises(data.UserError, match=f"--out .*{out} is a file or inside one — pass a folder"):
            sample.main(args_for({**ckpts, **missing}, tmp_path / out, "a red circle"))


def test_sample_long_prompt_is_truncated_with_a_warning(ckpts, tmp_path):
    with pytest.warns(UserWarning, match="truncated"):
        paths, _ = sample.main(args_for(ckpts, tmp_path, "a red circle " * 40, n=1, candidates=1))
    assert len(paths) == 1


def test_sample_bad_checkpoint_files_give_one_line(ckpts, tmp_path, capsys):
    (tmp_path / "cut.pt").write_bytes(Path(ckpts["gpt"]).read_bytes()[:2000])
    (tmp_path / "random.pt").write_bytes(os.urandom(4000))
    torch.save({"model": types.SimpleNamespace}, tmp_path / "code.pt")  # a pickled class: code, not tensors
    cases = [(dict(gpt=str(tmp_path / "nope.pt")), "nope.pt: no such file"),
             (dict(gpt=str(tmp_path / "cut.pt")), "cut.pt is truncated or corrupt"),
             (dict(gpt=str(tmp_path / "random.pt")), "random.pt is not a PyTorch checkpoint"),
             (dict(gpt=str(tmp_path / "code.pt")), "code.pt holds pickled Python code"),
             (dict(gpt=ckpts["vqgan"]), "vqgan.pt is a VQGAN (a clipgen checkpoint), not a GPT checkpoint — pass it "
                                        "as --vqgan"),
             (dict(vqgan=ckpts["gpt"]), "gpt.pt is a GPT (a clipgen checkpoint), not a VQGAN checkpoint"),
             (dict(clip=ckpts["gpt"]), "gpt.pt is a GPT (a clipgen checkpoint), not a CLIP checkpoint")]
    for kw, message in cases:
        paths = {**ckpts, **kw}
        code, _, err = run_cli(["a red circle", "--out", str(tmp_path / "o"), "--clip", paths["clip"], "--vqgan",
                                paths["vqgan"], "--gpt", paths["gpt"]], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "weights_only=False" not in err, err


@pytest.mark.parametrize("kw, message", [(dict(vocab=32), "codes"), (dict(tokens=16), "grid"),
                                         (dict(cond_dim=16), "-d conditions")])
def test_sample_mismatched_checkpoints_are_refused(ckpts, tmp_path, kw, message):
    other = tiny_checkpoints(tmp_path, **kw)
    with pytest.raises(data.UserError, match=message):
        sample.load_models(ckpts["clip"], ckpts["vqgan"], other["gpt"])


def test_sample_gpt_trained_with_another_vqgan_file_is_refused(ckpts, tmp_path, capsys):
    # same sizes, different weights: only the sha256 that train_gpt.py records in data_meta can tell
    other = tiny_checkpoints(tmp_path, seed=1)
    for name, vq_file in (("ok", ckpts["vqgan"]), ("bad", other["vqgan"])):
        ck = torch.load(ckpts["gpt"], weights_only=True)
        ck["data_meta"] = {"vqgan": vq_file, "vqgan_sha256": data.file_sha256(vq_file),
                           "clip": ckpts["clip"], "clip_sha256": data.file_sha256(ckpts["clip"])}
        torch.save(ck, tmp_path / f"gpt_{name}.pt")
    capsys.readouterr()
    sample.load_models(ckpts["clip"], ckpts["vqgan"], str(tmp_path / "gpt_ok.pt"))
    assert "note:" not in capsys.readouterr().out  # a GPT with a provenance record gets no note
    with pytest.raises(data.UserError, match="training data was made with vqgan"):
        sample.load_models(ckpts["clip"], ckpts["vqgan"], str(tmp_path / "gpt_bad.pt"))
    sample.load_models(**ckpts)
    assert "records no CLIP or VQGAN file it was trained with" in capsys.readouterr().out


def test_sample_shapes_models_note_prompts_outside_their_world(ckpts, tmp_path, capsys):
    ck = torch.load(ckpts["gpt"], weights_only=True)
    ck["data_meta"] = {"dataset": "shapes"}
    torch.save(ck, tmp_path / "gpt_shapes.pt")
    for prompt, note in [("oil painting of a dog", True), ("an orange star on a large white background", False)]:
        sample.main(args_for(ckpts, tmp_path / "o", prompt, n=1, candidates=1, gpt=str(tmp_path / "gpt_shapes.pt")))
        out = capsys.readouterr().out
        assert ("know only coloured shapes, not dog, of, oil, painting; for real images: python sample.py \"oil "
                "painting of a dog\" --weights hfai-coco" in out) == note, out


def test_sample_runs_hfai_release_files_with_their_demo_settings(hfai_files, tmp_path, capsys):
    folder, _ = hfai_files
    files = [f"--{k}={folder / n}" for k, n in sample.HFAI_FILES.items()]
    code, out, err = run_cli(["a photo of a dog", "--n", "1", "--candidates", "2", "--out", str(tmp_path)] + files,
                             capsys)
    assert code == 0, err
    assert "records no CLIP or VQGAN file it was trained with" in out  # no provenance record: a one-line note
    assert "(best 1 of 2 by CLIP, top-k 500, top-p 0.95)" in out  # HFAiLab's demo.py settings by default
    png = Image.open(tmp_path / "000" / "000-a-photo-of-a-dog-0.png")
    assert png.size == (256, 256) and (tmp_path / "000" / "grid.png").is_file()
    code, _, err = run_cli(["a photo of a dog", "--cfg", "3", "--out", str(tmp_path)] + files, capsys)
    assert code == 2 and err == ("sample.py: error: --cfg 3.0: this GPT has no trained null condition (HFAiLab's "
                                 "COCO GPT was trained without condition dropout), so classifier-free guidance is not "
                                 "available — use --cfg 1\n")


def test_sample_fetches_the_release_once_and_checks_it_after(hfai_files, tmp_path, monkeypatch, capsys):
    folder, _ = hfai_files
    monkeypatch.setenv("CLIPGEN_HFAI_URL", folder.as_uri())  # a file:// URL stands in for GitHub's release page
    cache = tmp_path / "cache"
    paths = sample.fetch_release(cache)
    assert paths == {k: str(cache / n) for k, n in sample.HFAI_FILES.items()}
    sums = json.loads((cache / "sha256.json").read_text())
    assert sums == {n: data.file_sha256(folder / n) for n in sample.HFAI_FILES.values()}
    assert sorted(os.listdir(cache)) == sorted([*sample.HFAI_FILES.values(), "sha256.json"])  # no temp files left
    monkeypatch.setenv("CLIPGEN_HFAI_URL", (tmp_path / "offline").as_uri())  # no source now: the cache serves
    assert sample.fetch_release(cache) == paths
    with open(cache / "vqgan_coco.pt", "r+b") as f:  # a changed file is refused, not used
        f.seek(1000)
        f.write(b"\0" * 8)
    with pytest.raises(data.UserError, match="vqgan_coco.pt changed since it was first fetched .* — delete it"):
        sample.fetch_release(cache)
    (cache / "vqgan_coco.pt").unlink()
    with pytest.raises(data.UserError, match="cannot download .*vqgan_coco.pt .* put it at .*cache/vqgan_coco.pt, "
                                             "beside clip_vit_b32.pt and gpt_coco.pt$"):
        sample.fetch_release(cache)  # offline: where to put the file by hand
    # the whole command: --weights hfai-coco fetches into the cache folder
    monkeypatch.setenv("CLIPGEN_HFAI_URL", folder.as_uri())
    monkeypatch.setattr(data, "CACHE", tmp_path / "c2")
    code, out, err = run_cli(["a photo of a dog", "--weights", "hfai-coco", "--n", "1", "--candidates", "1", "--out",
                              str(tmp_path / "o")], capsys)
    assert code == 0 and (tmp_path / "c2" / "hfai-coco" / "sha256.json").is_file(), err


@pytest.mark.skipif(not all(Path(p).is_file() for p in sample.SHIPPED.values()),
                    reason="checkpoints/shapes/*.pt not built yet: run scripts/train_shapes.sh")
def test_sample_shipped_checkpoints_make_images_deterministically(tmp_path):
    a = sample.get_parser().parse_args(["a red circle on a blue background", "--n", "2", "--candidates", "4",
                                        "--device", "cpu", "--out", str(tmp_path)])
    paths, scores = sample.main(a)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    paths2, scores2 = sample.main(a)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in paths2] and torch.equal(scores, scores2)


# =============================================================================
# evaluate

# pytorch-fid's weight file, written down independently of evaluate.py (reference/metrics.md, section 4):
# conv name -> [out, in, kh, kw]; each conv also has bn.weight/bias/running_mean/running_var of [out].
def fid_layout():
    convs = [("Conv2d_1a_3x3", [32, 3, 3, 3]), ("Conv2d_2a_3x3", [32, 32, 3, 3]), ("Conv2d_2b_3x3", [64, 32, 3, 3]),
             ("Conv2d_3b_1x1", [80, 64, 1, 1]), ("Conv2d_4a_3x3", [192, 80, 3, 3])]
    for m, cin, pf in (("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64)):
        convs += [(f"Mixed_{m}.{n}", s) for n, s in [("branch1x1", [64, cin, 1, 1]), ("branch5x5_1", [48, cin, 1, 1]),
                  ("branch5x5_2", [64, 48, 5, 5]), ("branch3x3dbl_1", [64, cin, 1, 1]),
                  ("branch3x3dbl_2", [96, 64, 3, 3]), ("branch3x3dbl_3", [96, 96, 3, 3]), ("branch_pool", [pf, cin, 1, 1])]]
    convs += [(f"Mixed_6a.{n}", s) for n, s in [("branch3x3", [384, 288, 3, 3]), ("branch3x3dbl_1", [64, 288, 1, 1]),
              ("branch3x3dbl_2", [96, 64, 3, 3]), ("branch3x3dbl_3", [96, 96, 3, 3])]]
    for m, c in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
        convs += [(f"Mixed_{m}.{n}", s) for n, s in [
            ("branch1x1", [192, 768, 1, 1]), ("branch7x7_1", [c, 768, 1, 1]), ("branch7x7_2", [c, c, 1, 7]),
            ("branch7x7_3", [192, c, 7, 1]), ("branch7x7dbl_1", [c, 768, 1, 1]), ("branch7x7dbl_2", [c, c, 7, 1]),
            ("branch7x7dbl_3", [c, c, 1, 7]), ("branch7x7dbl_4", [c, c, 7, 1]), ("branch7x7dbl_5", [192, c, 1, 7]),
            ("branch_pool", [192, 768, 1, 1])]]
    convs += [(f"Mixed_7a.{n}", s) for n, s in [
        ("branch3x3_1", [192, 768, 1, 1]), ("branch3x3_2", [320, 192, 3, 3]), ("branch7x7x3_1", [192, 768, 1, 1]),
        ("branch7x7x3_2", [192, 192, 1, 7]), ("branch7x7x3_3", [192, 192, 7, 1]), ("branch7x7x3_4", [192, 192, 3, 3])]]
    for m, cin in (("7b", 1280), ("7c", 2048)):
        convs += [(f"Mixed_{m}.{n}", s) for n, s in [
            ("branch1x1", [320, cin, 1, 1]), ("branch3x3_1", [384, cin, 1, 1]), ("branch3x3_2a", [384, 384, 1, 3]),
            ("branch3x3_2b", [384, 384, 3, 1]), ("branch3x3dbl_1", [448, cin, 1, 1]),
            ("branch3x3dbl_2", [384, 448, 3, 3]), ("branch3x3dbl_3a", [384, 384, 1, 3]),
            ("branch3x3dbl_3b", [384, 384, 3, 1]), ("branch_pool", [192, cin, 1, 1])]]
    layout = {}
    for name, shape in convs:
        layout[f"{name}.conv.weight"] = shape
        for k in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{k}"] = [shape[0]]
    layout["fc.weight"], layout["fc.bias"] = [1008, 2048], [1008]
    return layout


def random_fid_weights(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in fid_layout().items():
        if k.endswith("conv.weight"):  # He-scaled so activations stay O(1) through 94 convs with identity BN
            v = torch.randn(shape, generator=g) * (2 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            v = torch.ones(shape)
        else:
            v = 0.01 * torch.randn(shape, generator=g)
        sd[k] = v
    torch.save(sd, path)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    return path, random_fid_weights(path)


def test_evaluate_inception_layout_is_pytorch_fids_and_loads_strictly(weights):
    path, sd = weights
    assert len(sd) == 472 and sum(v.numel() for v in sd.values()) == 23_885_392  # the published file's counts
    model = evaluate.load_inception(path)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k
    x = inception.fid_input(torch.rand(1, 3, 64, 48))  # any size: resized to 299 as pytorch-fid does
    with torch.no_grad():
        pool, logits, small = model(x), model.logits(x), model(x, dims=64)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and small.shape == (1, 64)
    assert torch.isfinite(pool).all()
    torch.testing.assert_close(logits, pool @ sd["fc.weight"].T)  # bias-free logits, as torch-fidelity's IS
    with torch.no_grad():  # pytorch-fid's 64-d features: the mean of the first block's output (after its max pool)
        first = F.max_pool2d(model.Conv2d_2b_3x3(model.Conv2d_2a_3x3(model.Conv2d_1a_3x3(x))), 3, stride=2)
    torch.testing.assert_close(small, first.mean((2, 3)))


def test_evaluate_wrong_weight_files_are_refused(weights, tmp_path):
    _, sd = weights
    bad = dict(sd)
    del bad["Mixed_7c.branch_pool.conv.weight"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(data.UserError, match=r"bad.pth .*1 missing \(Mixed_7c\.branch_pool\.conv\.weight\).*"
                                             r"1 unexpected \(AuxLogits\.fc\.weight\)"):
        evaluate.load_inception(tmp_path / "bad.pth")
    torch.save(dict(sd, **{"fc.weight": torch.zeros(1000, 2048)}), tmp_path / "shape.pth")
    with pytest.raises(data.UserError, match=r"shape.pth .*1 of another shape \(fc.weight\)"):
        evaluate.load_inception(tmp_path / "shape.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "shape.pth").read_bytes()[:5000])
    with pytest.raises(data.UserError, match="cut.pth is truncated or corrupt"):
        evaluate.load_inception(tmp_path / "cut.pth")
    with pytest.raises(data.UserError, match="missing.pth: no such file"):
        evaluate.load_inception(tmp_path / "missing.pth")


def test_evaluate_frechet_distance_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    a, b, m1, m2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5), rng.normal(size=5), rng.normal(size=5)
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # diagonal covariances: closed form
    assert evaluate.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(exact, rel=1e-10)
    u, v, mu2 = np.zeros(8), np.zeros(8), np.zeros(8)
    u[0], v[1], mu2[2] = 6, 5, 31 ** 0.5  # orthogonal rank-1 covariances: a singular product, eps path; exact 92
    fd = evaluate.frechet_distance(np.zeros(8), np.outer(u, u), mu2, np.outer(v, v))
    assert np.isfinite(fd) and fd == pytest.approx(92, rel=1e-5)
    with pytest.raises(ValueError, match="Imaginary component"):
        evaluate.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(data.UserError, match=r"differ in size \(3 vs 2\) — use the same --dims"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_evaluate_inception_score_extremes():
    assert evaluate.inception_score(np.zeros((101, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    onehot = 100.0 * np.eye(7)[np.arange(700) % 7]  # balanced classes, confident predictions
    assert evaluate.inception_score(onehot, splits=1)[0] == pytest.approx(7.0, rel=1e-9)
    mean, std = evaluate.inception_score(onehot, splits=10, shuffle=False)  # every split holds all 7 classes
    assert mean == pytest.approx(7.0, rel=1e-9) and std < 1e-9


def test_evaluate_blur_zero_is_identity_and_inputs_at_299(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    plain, blurred = evaluate.InceptionFolder(tmp_path, blur=0)[0], evaluate.InceptionFolder(tmp_path, blur=1)[0]
    assert torch.equal(plain["image"], 2 * (x / 255) - 1)  # no blur, and both resizes are the identity at 299
    assert torch.equal(evaluate.InceptionFolder(tmp_path, tool="is")[0]["image"], (x - 128) / 128)
    assert not torch.equal(blurred["image"], plain["image"])
    y = inception.fidelity_input(torch.arange(8.0).view(1, 1, 2, 4).expand(1, 3, 2, 4))  # TF1: source = dst * in/out
    assert y[0, 0, 0, 1].item() == pytest.approx((4 / 299 - 128) / 128) and y[0, 0, -1, -1].item() == (7 - 128) / 128


def cli_error(module, argv, capsys):
    """module's command line, in-process, with input it must refuse -> its one stderr line (exit status 2 checked)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.cli(module.main, module.get_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()  # lines before the last: what the script printed on the way
    assert e.value.code == 2 and "Traceback" not in err and not any(": error: " in line for line in err[:-1]), err
    return err[-1]


def test_evaluate_stats_skips_corrupt_images_and_refuses_to_overwrite(weights, tmp_path, capsys):
    path, _ = weights
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        data.render(data.shape_attributes(0, i), 32).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    argv = ["stats", str(folder), "--out", str(tmp_path / "s.npz"), "--inception", str(path), "--blur", "0", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate.main(evaluate.get_parser().parse_args(argv))
    assert out["n"] == 3 and any("broken.png" in str(w.message) for w in caught)
    assert "skipped 1 unreadable image(s) of 4" in capsys.readouterr().out
    with np.load(tmp_path / "s.npz") as f:  # pytorch-fid's keys, float64, and ours for FID-2
        assert sorted(f.keys()) == ["mu", "mu_blur2", "n", "sigma", "sigma_blur2"] and f["n"] == 3
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["sigma"].dtype == np.float64
        assert not np.array_equal(f["mu"], f["mu_blur2"])
    refused = cli_error(evaluate, argv, capsys)
    assert refused == f"evaluate.py: error: --out {tmp_path / 's.npz'} exists — remove it or choose another --out"


def shapes_images(n=240, seed=5):
    ds = data.Shapes(n, resolution=64, seed=seed)
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, items


def test_evaluate_colour_judge_is_exact_on_rendered_images():
    x, items = shapes_images()
    color, bg = evaluate.palette_analysis(x)
    assert color.tolist() == [it["color"] for it in items] and bg.tolist() == [it["bg"] for it in items]
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, H, W, 3) uint8, as sample.generate returns
    acc = evaluate.shapes_accuracy(u8, [it["color"] for it in items], [it["shape"] for it in items])
    assert acc["color_acc"] == 1.0 and acc["shape_acc"] == 1.0 and acc["n"] == len(items)
    wrong = evaluate.shapes_accuracy(u8, [(it["color"] + 1) % 8 for it in items], [it["shape"] for it in items])
    assert wrong["color_acc"] == 0.0 and wrong["both_acc"] == 0.0


def test_evaluate_shape_judge_names_every_shape_and_size_clean_blurred_and_moved():
    """Each shape at both ends of each size's radius range, off centre, on shaded colours, at 64 and 32 px: judged
    right clean and blurred + noisy (as a reconstruction is); asked for another shape and size, judged wrong."""
    ends = [(s, z, r) for s in range(len(data.SHAPES)) for z, name in enumerate(data.SIZES) for r in data.RADIUS[name]]
    attrs = [dict(color=i % 8, bg=(i + 3) % 8, shape=s, size=z, r=r, cx=0.5 + 0.04 * (i % 3 - 1), cy=0.47,
                  shade=[[12, -12, 5], [-8, 12, 0]]) for i, (s, z, r) in enumerate(ends)]
    asked = [[a[k] for a in attrs] for k in ("color", "shape", "size", "bg")]
    g, blur = torch.Generator().manual_seed(0), (torch.tensor([1.0, 2, 1])[:, None] * torch.tensor([1.0, 2, 1]) / 16)
    for res in (64, 32):
        clean = torch.from_numpy(np.stack([np.asarray(data.render(a, res)) for a in attrs]))  # (24, res, res, 3)
        x = F.pad(clean.permute(0, 3, 1, 2).float(), (1, 1, 1, 1), mode="replicate")  # (24, 3, res + 2, res + 2)
        x = F.conv2d(x, blur.expand(3, 1, 3, 3), groups=3)  # a [1 2 1] Gaussian blur: (24, 3, res, res)
        x = x + torch.randint(-10, 11, x.shape, generator=g)  # noise of up to 10 levels
        degraded = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        for u8 in (clean, degraded):
            acc = evaluate.shapes_accuracy(u8, *asked)
            assert acc["shape_acc"] == 1.0 and acc["size_acc"] == 1.0 and acc["all_acc"] == 1.0, res
        wrong = evaluate.shapes_accuracy(clean, asked[0], [(s + 1) % 6 for s in asked[1]], [1 - z for z in asked[2]])
        assert wrong["shape_acc"] == 0.0 and wrong["size_acc"] == 0.0
    blank = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)  # no shape: no colour, and never all right
    assert evaluate.shapes_accuracy(blank, [0, 1], [0, 1])["both_acc"] == 0.0


def test_evaluate_clip_score_formula_and_ranking_on_the_shapes_clip():
    model, preprocess = clip.load(sample.SHIPPED["clip"], device="cpu")
    _, items = shapes_images(48, seed=11)
    pil = [data.render(data.shape_attributes(11, i), 64) for i in range(48)]
    right = [data.prompt(it["color"], it["shape"]) for it in items]
    wrong = [data.prompt((it["color"] + 3) % 8, it["shape"]) for it in items]
    good, bad = evaluate.clip_score(model, preprocess, pil, right), evaluate.clip_score(model, preprocess, pil, wrong)
    assert good.mean() > bad.mean() + 5 and (good > bad).mean() > 0.9
    with torch.no_grad():  # the formula, by hand: 100 * max(cos, 0) of the two towers' embeddings
        e_img = model.encode_image(torch.stack([preprocess(im) for im in pil[:4]]))
        e_txt = model.encode_text(clip.tokenize(wrong[:4], model.context_length))
    cos = F.cosine_similarity(e_img, e_txt, dim=-1)
    np.testing.assert_allclose(bad[:4], (100 * cos.clamp(min=0)).numpy(), rtol=1e-5, atol=1e-4)


def test_evaluate_shapes_command_on_the_shipped_checkpoints(capsys):
    out = evaluate.main(evaluate.get_parser().parse_args(["shapes", "--n", "1", "--json"]))
    assert out["n"] == 48  # the 48 colour x shape prompts, one image each
    # chance is 1/8 for colour and 1/6 for shape; the shipped generator, raw, drew ~0.5 of each (docs/results.md)
    assert out["color_acc"] > 0.3 and out["shape_acc"] > 0.3
    assert out["both_acc"] <= min(out["color_acc"], out["shape_acc"])
    printed = capsys.readouterr().out
    assert "settings: " in printed and json.loads(printed.splitlines()[-1])["settings"]["temperature"] == 1.0


def test_evaluate_full_prompts_judge_size_and_background():
    full, short = data.shapes_prompts(full=True), data.shapes_prompts()
    assert len(full) == len(short) == 48 and short[0]["text"] == "a red circle" and short[0]["size"] is None
    assert all(p["text"] == data.caption(dict(p, drop_size=0, drop_bg=0)) and p["bg"] != p["color"] for p in full)
    x, items = shapes_images(96, seed=9)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    asked = [[it[k] for it in items] for k in ("color", "shape", "size", "bg")]
    acc = evaluate.shapes_accuracy(u8, *asked)
    assert acc["bg_acc"] == 1.0 and acc["size_acc"] == 1.0 and acc["all_acc"] == acc["ok"].double().mean().item()
    assert acc["all_acc"] <= min(acc["both_acc"], acc["size_acc"])
    wrong = evaluate.shapes_accuracy(u8, *asked[:2], bgs=[(b + 1) % 8 for b in asked[3]])
    assert wrong["bg_acc"] == 0.0 and wrong["all_acc"] == 0.0 and "size_acc" not in wrong


def test_evaluate_copies_and_duplicates_are_within_one_level():
    x = torch.randint(10, 240, (5, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    near, far = x.clone(), x.clone()
    near[:, 3] += 1  # one level off in one byte: still a copy
    far[:, 7] += 2  # two levels off: a new image
    assert evaluate.near_match(near, x).all() and not evaluate.near_match(far, x).any()
    assert evaluate.count_distinct(torch.cat([x, near])) == 5 and evaluate.count_distinct(torch.cat([x, far])) == 10


def test_evaluate_training_reconstructions_are_the_gpts_images_in_samples_layout():
    models = sample.load_models()
    rec = evaluate.training_reconstructions(models._replace(meta=dict(models.meta, n_images=6,
                                                                      held_out_excluded=["red star"])))
    ds = data.Shapes(6, resolution=32, exclude_held_out=True)
    orig = ((torch.stack([ds[i]["image"] for i in range(6)]) + 1) * 127.5).round().permute(0, 2, 3, 1).flatten(1)
    diff = (rec.float()[:, None] - orig[None]).abs().mean(-1)  # (6, 6) mean byte difference, reconstruction x image
    assert rec.dtype == torch.uint8 and rec.shape == (6, 32 * 32 * 3)
    assert torch.equal(diff.argmin(1), torch.arange(6)) and diff.diagonal().max() < 20
    with pytest.raises(data.UserError, match="--copies"):
        evaluate.training_reconstructions(models._replace(meta={"dataset": "data/coco"}))


def test_evaluate_shapes_command_reports_held_out_pairs_apart():
    out = evaluate.main(evaluate.get_parser().parse_args(["shapes", "--n", "1", "--prompts", "full", "--json"]))
    for group in ("", "seen_", "held_out_"):
        assert all(0 <= out[f"{group}{k}_acc"] <= 1 for k in ("color", "shape", "size", "bg", "both", "all"))
    # 6 held-out pairs of 48: the overall rate is the mix of the two groups
    assert out["color_acc"] == pytest.approx((42 * out["seen_color_acc"] + 6 * out["held_out_color_acc"]) / 48)
    assert out["duplicates"] == 0 and out["distinct_per_prompt"] == 1.0  # one image per prompt


def test_evaluate_coco_command_end_to_end_and_resumes(weights, tmp_path, capsys):
    ref = tmp_path / "ref"  # real images: 4 rendered shapes; statistics at pytorch-fid's 64-d features (fast sqrtm)
    ref.mkdir()
    for i in range(4):
        data.render(data.shape_attributes(3, i), 32).save(ref / f"{i}.png")
    common = ["--inception", str(weights[0]), "--dims", "64", "--blur", "0", "1"]
    evaluate.main(evaluate.get_parser().parse_args(["stats", str(ref), "--out", str(tmp_path / "ref.npz")] + common))
    (tmp_path / "caps.txt").write_text("a red circle\na blue square\n\na green star\n")
    argv = ["coco", "--captions", tmp_path / "caps.txt", "--ref-stats", tmp_path / "ref.npz", "--out", tmp_path / "o",
            "--splits", "1", "--score-clip", sample.SHIPPED["clip"], "--json"] + common
    (tmp_path / "junk.pt").write_bytes(b"junk")  # a generator that fails to load leaves --out usable for the next try
    assert "junk.pt is not a PyTorch checkpoint" in cli_error(evaluate, argv + ["--gpt", tmp_path / "junk.pt"], capsys)
    first = evaluate.main(evaluate.get_parser().parse_args([str(a) for a in argv]))
    assert sorted(first) == ["clip_score", "fid0", "fid1", "is", "is_std", "n"] and first["n"] == 3
    assert first["fid0"] > 0 and first["fid1"] > 0 and first["is"] >= 1 and 0 < first["clip_score"] <= 100
    pngs = sorted((tmp_path / "o" / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    assert '"count": 30000' in capsys.readouterr().out  # the settings are printed with the numbers
    stamps = [p.stat().st_mtime_ns for p in pngs]
    again = evaluate.main(evaluate.get_parser().parse_args([str(a) for a in argv]))  # resumes: nothing to generate
    assert again == first and [p.stat().st_mtime_ns for p in pngs] == stamps
    refused = cli_error(evaluate, argv + ["--seed", "1"], capsys)
    assert "holds another run (its images were made from other captions or generation flags" in refused


@pytest.mark.parametrize("argv, message", [
    (["fid", "{tmp}/nowhere", "{tmp}/ref.npz"], "no images under {tmp}/nowhere (looked recursively for"),
    (["fid", "{tmp}/imgs", "{tmp}/ref.npz", "--blur", "0", "3"], "{tmp}/ref.npz has no statistics for blur [3]"),
    (["fid", "{tmp}/imgs", "{tmp}/ref.npz", "--dims", "2048"], "the two statistics differ in size (2048 vs 64)"),
    (["coco", "--captions", "{tmp}/empty.txt", "--ref-stats", "{tmp}/ref.npz"], "--captions {tmp}/empty.txt holds no"),
    (["fid", "{tmp}/imgs", "{tmp}/missing.npz"], "cannot read {tmp}/missing.npz (FileNotFoundError: "),
    (["fid", "{tmp}/imgs", "{tmp}/junk.npz"], "cannot read {tmp}/junk.npz (ValueError: "),
    (["is", "{tmp}/imgs"], "--splits 10: {tmp}/imgs has only 2 images — lower --splits"),
    (["is", "{tmp}/empty"], "no images under {tmp}/empty"),
    (["is", "{tmp}/imgs", "--batch-size", "0"], "argument --batch-size: 0 is out of range: it must be >= 1"),
    (["shapes", "--seed", "99999999999999999999"], "argument --seed: 99999999999999999999 is too large"),
    (["shapes", "--temperature", "inf"], "argument --temperature: inf is out of range: it must be > 0"),
    (["shapes", "--top-p", "nan"], "argument --top-p: nan is out of range"),
    (["shapes", "--device", "tpu"], "--device tpu: unknown device — use cpu, cuda, cuda:N or mps"),
    (["shapes", "--gpt", "{tmp}/junk.npz"], "{tmp}/junk.npz is not a PyTorch checkpoint"),
    (["coco", "--captions", "{tmp}/none.txt", "--ref-stats", "{tmp}/ref.npz"], "--captions {tmp}/none.txt: no such"),
    (["coco", "--captions", "{tmp}/ref.npz.json", "--ref-stats", "{tmp}/ref.npz"],
     "--captions {tmp}/ref.npz.json is not COCO's captions json (KeyError('annotations'))"),
    (["is", "{tmp}/imgs", "--inception", "{tmp}/junk.npz"], "{tmp}/junk.npz is not a PyTorch checkpoint"),
])
def test_evaluate_bad_input_is_one_line(weights, tmp_path, capsys, argv, message):
    for name in ("imgs", "empty"):
        (tmp_path / name).mkdir()
    for i in range(2):
        data.render(data.shape_attributes(0, i), 32).save(tmp_path / "imgs" / f"{i}.png")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    (tmp_path / "ref.npz.json").write_text('{"images": []}')  # COCO's instances file, not its captions
    (tmp_path / "empty.txt").write_text("\n")
    if "--inception" not in argv and argv[0] != "shapes":
        argv = argv + ["--inception", str(weights[0])]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = cli_error(evaluate, argv + ["--dims", "64"] * (argv[0] == "fid" and "--dims" not in argv), capsys)
    assert err.startswith("evaluate.py") and ": error: " in err and message.replace("{tmp}", str(tmp_path)) in err, err


# =============================================================================
# bench

def test_bench_quick_gpt_stages_figures_and_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    # one thread: on a shared 2-core machine tiny ops are far faster without OpenMP hand-offs
    args = bench.get_parser().parse_args(["gpt-train", "gpt-sample", "--device", "cpu", "--quick", "--threads", "1",
                                          "--json", str(out_file)])
    result = bench.main(args)
    printed = capsys.readouterr().out
    saved = json.loads(out_file.read_text())
    assert saved == json.loads(json.dumps(result))  # the file holds exactly what main returned
    rows = saved["figures"]
    assert {r["stage"] for r in rows} == {"gpt-train", "gpt-sample"}
    speed = [r for r in rows if r["unit"] in ("tok/s", "x")]
    assert len(speed) >= 4 and all(r["median"] > 0 and r["min"] <= r["median"] <= r["max"] for r in speed)
    mem = [r for r in rows if r["unit"] == "MiB"]
    assert len(mem) == 2 and all(r["median"] > 0 for r in mem)
    mfu = next(r for r in rows if r["what"] == "MFU")
    assert mfu["median"] is None and "n/a" in mfu["note"]  # no CPU peak: MFU is n/a, never a made-up number
    assert all(r["note"].startswith("tokens identical: True") for r in rows if r["what"] == "KV-cache speed-up")
    for r in speed:  # one aligned table line per figure
        assert any(line.startswith(r["stage"]) and r["unit"] in line for line in printed.splitlines())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["threads"] == 1


def test_bench_json_to_stdout_and_the_fid_stage(capsys):
    result = bench.main(bench.get_parser().parse_args(["vqgan", "fid", "--device", "cpu", "--quick", "--threads", "1",
                                                       "--json"]))
    parsed = json.loads(capsys.readouterr().out)  # only JSON on stdout, no table
    assert [r["what"] for r in parsed["figures"]] == ["encode", "decode", "peak memory (RSS)", "Inception pool3",
                                                      "peak memory (RSS)"]
    assert all(r["median"] > 0 for r in result["figures"]) and parsed["meta"]["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["gpt", "--quick"], "bench.py: error: unknown stage(s) gpt — choose from clip, vqgan, gpt-train, gpt-sample, fid"),
    (["--reps", "0"], "bench.py: error: argument --reps: 0 is out of range: it must be >= 1 — see bench.py --help"),
    (["--threads", "-1"], "bench.py: error: argument --threads: -1 is out of range: it must be >= 0 — see bench.py "
                          "--help"),
    (["--device", "tpu"], "bench.py: error: --device tpu: unknown device — use cpu, cuda, cuda:N or mps"),
])
def test_bench_bad_input_is_one_line(capsys, argv, message):
    assert cli_error(bench, argv, capsys) == message
