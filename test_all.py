"""clipgen test suite: CPU, tiny configs, a few minutes on 2 cores. Run: python -m pytest -q test_all.py"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT.parent / "shared" / "assets"  # the CLIP BPE vocabulary and a test image, beside the checkout
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def test_shapes_world_is_deterministic_and_labelled():
    a, b = data.Shapes(8, resolution=64)[5], data.Shapes(8, resolution=64)[5]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["image"].shape == (3, 64, 64) and -1 <= a["image"].min() and a["image"].max() <= 1
    assert data.COLOR_NAMES[a["color"]] in a["caption"] and data.SHAPES[a["shape"]] in a["caption"]
    assert len(data.COLORS) >= 8 and len(data.SHAPES) >= 6
    # the validation split is another world
    assert not torch.equal(data.get_dataset("shapes", "val", 64)[5]["image"], a["image"])


def test_shapes_pixels_are_exactly_the_palette():
    ds = data.Shapes(20, resolution=48)
    for i in range(20):
        item = ds[i]
        pix = ((item["image"] + 1) * 127.5).round().to(torch.uint8).reshape(3, -1).T
        colours = {tuple(c) for c in pix.tolist()}
        assert colours == {data.COLORS[data.COLOR_NAMES[item["color"]]], data.COLORS[data.COLOR_NAMES[item["bg"]]]}


def test_shapes_render_at_any_resolution():
    a = data.shape_attributes(0, 3)
    assert data.render(a, 32).size == (32, 32) and data.render(a, 256).size == (256, 256)


def test_captions_cover_short_prompts_and_articles():
    caps = {data.caption(data.shape_attributes(0, i)) for i in range(2000)}
    assert "a red circle" in caps and "an orange square" in caps
    assert any(c.startswith("a large") and c.endswith("background") for c in caps)
    assert data.prompt(data.COLOR_NAMES.index("orange"), 0) == "an orange circle"


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    _write_images(tmp_path / "a", 3)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"not an image at all")
    good = tmp_path / "a" / "0.png"
    (tmp_path / "a" / "truncated.png").write_bytes(good.read_bytes()[:60])
    ds = data.get_dataset(str(tmp_path), resolution=16, train=False)
    assert len(ds) == 5
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(data.make_loader(ds, batch_size=5, train=False))
    assert batches[0]["image"].shape == (3, 3, 16, 16) and batches[0]["skipped"] == 2


def test_imagenet_layout_splits_and_labels(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            _write_images(tmp_path / split / cls, 2, size=(50, 20))
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    ds = data.get_dataset("imagenet", "val", resolution=16, train=True)
    assert len(ds) == 4 and sorted(ds[i]["label"] for i in range(4)) == [0, 0, 1, 1]
    assert ds[0]["image"].shape == (3, 16, 16)


def test_missing_or_empty_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.get_dataset("imagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found under"):
        data.get_dataset(str(tmp_path / "empty"))


def test_centre_crop_is_centred_and_train_crop_random():
    img = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(1, 60).repeat(20, 0)[..., None].repeat(3, 2))
    centre = np.asarray(data.resize_crop(img, 20, train=False))
    assert centre[0, 0, 0] == 20 and centre[0, -1, 0] == 39
    crops = {np.asarray(data.resize_crop(img, 20, train=True))[0, 0, 0] for _ in range(30)}
    assert len(crops) > 3


def test_atomic_save_and_rng_state_round_trip(tmp_path):
    import random
    path = tmp_path / "ck.pt"
    data.save_atomic({"rng": data.rng_state(), "x": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    state = torch.load(path, weights_only=True)["rng"]
    expected = (random.random(), np.random.rand(), torch.rand(1))
    data.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


# =============================================================================
