"""Tests of evaluate.py (CPU, tiny inputs, no network; random weights in pytorch-fid's file layout)."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "clip.py").is_file())
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402

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


def test_layout_is_pytorch_fids_and_loads_strictly(weights):
    path, sd = weights
    assert len(sd) == 472 and sum(v.numel() for v in sd.values()) == 23_885_392  # the published file's counts
    model = evaluate.load_inception(path)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k
    x = torch.rand(1, 3, 64, 48)  # any size: resized to 299 as pytorch-fid does
    with torch.no_grad():
        pool, logits = model(evaluate.fid_input(x))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and torch.isfinite(pool).all()
    torch.testing.assert_close(logits, pool @ sd["fc.weight"].T)  # bias-free logits, as torch-fidelity's IS


def test_wrong_weight_files_are_refused(weights, tmp_path):
    _, sd = weights
    bad = dict(sd)
    del bad["Mixed_7c.branch_pool.conv.weight"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.conv\.weight.*AuxLogits\.fc\.weight"):
        evaluate.load_inception(tmp_path / "bad.pth")
    bad = dict(sd, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        evaluate.load_inception(tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate.load_inception(tmp_path / "missing.pth")


def test_frechet_distance_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    mu, sigma = evaluate.stats(x)
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
    with pytest.raises(ValueError, match="shape"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_inception_score_extremes():
    assert evaluate.inception_score(np.zeros((101, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    onehot = 100.0 * np.eye(7)[np.arange(700) % 7]  # balanced classes, confident predictions
    assert evaluate.inception_score(onehot, splits=1)[0] == pytest.approx(7.0, rel=1e-9)
    mean, std = evaluate.inception_score(onehot, splits=10, shuffle=False)  # every split holds all 7 classes
    assert mean == pytest.approx(7.0, rel=1e-9) and std < 1e-9


def test_blur_zero_is_identity_and_inputs_at_299(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    plain, blurred = evaluate.InceptionFolder(tmp_path, blur=0, fidelity=True)[0], evaluate.InceptionFolder(tmp_path, 1)[0]
    assert torch.equal(plain["image"], 2 * (x / 255) - 1)  # no blur, and both resizes are the identity at 299
    assert torch.equal(plain["fidelity"], (x - 128) / 128)
    assert not torch.equal(blurred["image"], plain["image"])


def test_corrupt_image_skipped_and_counted_stats_and_fid(weights, tmp_path):
    path, _ = weights
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        data.render(data.shape_attributes(0, i), 32).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    common = ["--inception", str(path), "--workers", "0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate.main(evaluate.parse_args(["stats", str(folder), "--out", str(tmp_path / "s.npz")] + common))
    assert out["n"] == 3 and any("broken.png" in str(w.message) for w in caught)
    with np.load(tmp_path / "s.npz") as f:  # pytorch-fid's keys, float64
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["sigma"].dtype == np.float64
    with pytest.raises(FileExistsError):
        evaluate.main(evaluate.parse_args(["stats", str(folder), "--out", str(tmp_path / "s.npz")] + common))


def shapes_images(n=240, seed=5):
    ds = data.Shapes(n, resolution=64, seed=seed)
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]) + 1) / 2, items


def test_colour_judge_is_exact_on_rendered_images():
    x, items = shapes_images()
    color, bg = evaluate.palette_analysis(x)
    assert color.tolist() == [it["color"] for it in items] and bg.tolist() == [it["bg"] for it in items]
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, H, W, 3) uint8, as sample.generate returns
    acc = evaluate.shapes_accuracy(u8, [it["color"] for it in items], [None] * len(items), judge=evaluate.shape_judge())
    assert acc["color_acc"] == 1.0 and acc["n"] == len(items)
    wrong = evaluate.shapes_accuracy(x, [(it["color"] + 1) % 8 for it in items], [None] * len(items),
                                     judge=evaluate.shape_judge())
    assert wrong["color_acc"] == 0.0


def test_shape_judge_is_cached(tmp_path):
    model, ckpt = evaluate.train_shape_judge(tmp_path / "judge.pt", n_train=64, steps=2, n_val=64)
    again, ckpt2 = evaluate.load_shape_judge(tmp_path / "judge.pt")
    x, _ = shapes_images(8)
    with torch.no_grad():
        m = evaluate.foreground_map(x, *evaluate.palette_analysis(x))
        torch.testing.assert_close(model(m), again(m))
    assert ckpt2["val_acc"] == ckpt["val_acc"] and ckpt2["config"]["shapes"] == data.SHAPES


def test_clip_score_formula_with_a_stub_model():
    class Stub(torch.nn.Module):  # image embedding = the image itself; text embedding = [1, 0, 0] or [-1, 0, 0]
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x):
            return x.flatten(1)

        def encode_text(self, tokens):
            return torch.stack([torch.tensor([1.0, 0, 0]) if 2368 in t else torch.tensor([-1.0, 0, 0]) for t in tokens])
    images = [torch.tensor([1.0, 1.0, 0]), torch.tensor([1.0, 0, 0])]
    s = evaluate.clip_score(Stub(), lambda im: im, images, ["a photo of a cat", "a photo of a dog"])
    np.testing.assert_allclose(s, [100 / 2 ** 0.5, 0.0], rtol=1e-6)  # cos 1/sqrt(2); cos -1 clamps to 0


def test_clip_score_ranks_matching_captions_on_the_shapes_clip():
    path = ROOT / "checkpoints" / "shapes" / "clip.pt"
    if not path.is_file():
        pytest.skip(f"{path} is not there yet (made by scripts/train_shapes.sh)")
    import clip
    model, preprocess = clip.load(str(path), device="cpu")
    _, items = shapes_images(48, seed=11)
    pil = [data.render(data.shape_attributes(11, i), 64) for i in range(48)]
    right = [data.prompt(it["color"], it["shape"]) for it in items]
    wrong = [data.prompt((it["color"] + 3) % 8, it["shape"]) for it in items]
    good, bad = evaluate.clip_score(model, preprocess, pil, right), evaluate.clip_score(model, preprocess, pil, wrong)
    assert good.mean() > bad.mean() + 5 and (good > bad).mean() > 0.9


class StubSample:
    """Stands in for sample.py: 'generates' the rendered image of the prompted colour and shape."""

    @staticmethod
    def load_models(**kw):
        return "models"

    @staticmethod
    def text_embeddings(models, prompts):
        return list(prompts)

    @staticmethod
    def generate(models, cond, n=1, seed=0, **kw):
        out = []
        for i, text in enumerate(cond):
            words = text.split()
            color = next((data.COLOR_NAMES.index(w) for w in words if w in data.COLORS), 0)
            shape = next((data.SHAPES.index(w) for w in words if w in data.SHAPES), 0)
            a = dict(data.shape_attributes(seed, i), color=color, shape=shape, bg=(color + 1) % 8)
            out.append([np.asarray(data.render(a, 64))] * n)
        return np.array(out, dtype=np.uint8), np.zeros((len(cond), n))


def test_shapes_command_with_a_stub_generator(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sample", StubSample)
    evaluate.train_shape_judge(tmp_path / "judge.pt", n_train=64, steps=2, n_val=64)
    out = evaluate.main(evaluate.parse_args(["shapes", "--n", "2", "--judge", str(tmp_path / "judge.pt")]))
    assert out["n"] == 96 and out["color_acc"] == 1.0 and 0 <= out["shape_acc"] <= 1
    assert "temperature=1.0" in capsys.readouterr().out


def test_coco_command_with_stubs(weights, tmp_path, monkeypatch, capsys):
    path, _ = weights
    monkeypatch.setitem(sys.modules, "sample", StubSample)
    import clip
    monkeypatch.setattr(clip, "load", lambda name, device=None: (torch.nn.Linear(1, 1), lambda im: torch.ones(3)))
    ref = tmp_path / "ref.npz"  # reference statistics with our FID-1 keys beside pytorch-fid's
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), mu_blur1=np.ones(2048), sigma_blur1=np.eye(2048))
    (tmp_path / "caps.txt").write_text("a red circle\na blue square\n")
    args = evaluate.parse_args(["coco", "--captions", str(tmp_path / "caps.txt"), "--ref-stats", str(ref), "--blur", "0",
                                "1", "--inception", str(path), "--workers", "0", "--out", str(tmp_path / "o"), "--json"])
    monkeypatch.setattr(evaluate, "clip_score", lambda m, p, images, caps: np.full(len(images), 30.0))
    pairs = []  # a 2048x2048 sqrtm costs ~10 s on 2 cores; the distance itself is tested above and cross-checked
    small = lambda x: torch.nn.functional.interpolate(x, size=(96, 96))  # plumbing test: ~10x cheaper Inception
    monkeypatch.setattr(evaluate, "fid_input", lambda x: 2 * small(x) - 1)
    monkeypatch.setattr(evaluate, "fidelity_input", lambda x: (small(x) - 128) / 128)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda m1, s1, m2, s2: pairs.append((m1, s2)) or 1.0)
    out = evaluate.main(args)
    assert sorted(out) == ["clip_score", "fid0", "fid1", "is", "is_std"] and out["clip_score"] == 30.0
    assert len(pairs) == 2 and pairs[0][0].shape == (2048,) and np.array_equal(pairs[1][1], np.eye(2048))
    assert len(list((tmp_path / "o" / "images").glob("*.png"))) == 2
    text = capsys.readouterr().out
    assert "fewer than the 2048" in text and '"candidates": 1' in text and '"count": 2' in text
