"""Tests of clip.py and train_clip.py (CPU, tiny sizes, no network)."""
import hashlib
import io
import os
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "clip.py").is_file())
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"

import clip  # noqa: E402

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


def test_tokenize_matches_reference_ids():
    texts = list(REFERENCE_IDS)
    tokens = clip.tokenize(texts)
    assert tokens.shape == (len(texts), 77) and tokens.dtype == torch.long
    for row, text in zip(tokens, texts):
        ids = REFERENCE_IDS[text]
        assert row[:len(ids)].tolist() == ids, text
        assert not row[len(ids):].any(), text  # padded with 0


def test_tokenize_edge_cases():
    assert clip.tokenize("a cat").shape == (1, 77)
    explicit = str(ASSETS / "bpe_simple_vocab_16e6.txt.gz")
    assert torch.equal(clip.tokenize("a photo of a cat.", bpe_path=explicit), clip.tokenize("a photo of a cat."))
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        clip.tokenize("a", bpe_path="/nowhere.txt.gz")
    assert torch.equal(clip.tokenize(["A PHOTO OF A CAT"]), clip.tokenize(["a photo of a cat"]))
    assert torch.equal(clip.tokenize(["\t\n  \r\n"]), clip.tokenize([""]))
    assert clip.tokenize("1234567890")[0, 1:11].tolist() == clip.tokenize(list("1234567890"))[:, 1].tolist()
    tok = clip.get_tokenizer()
    assert tok.decode(tok.encode("a photo of a cat.")) == "a photo of a cat . "


def test_tokenize_length_limits():
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


def test_preprocess_clip_png_matches_reference():
    from PIL import Image
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


def test_preprocess_tensor_matches_pil_path():
    from PIL import Image
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
def test_shape_inference_published_sizes(name):
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


def test_torchscript_archive_round_trip(tmp_path):
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


def test_load_state_dict_and_checkpoint(tmp_path):
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


def test_strict_load_names_keys(tmp_path):
    sd = tiny_vit().state_dict()
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"visual\.ln_post\.bias.*visual\.extra\.weight"):
        clip.build_model(sd)
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-X/99'.*ViT-B/32"):
        clip.load("ViT-X/99")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        clip.load(str(tmp_path / "junk.pt"))


def test_text_pooling_at_first_end_token():
    model = tiny_vit()
    t = clip.tokenize(["a cat", "a cat <|endoftext|> and more words"])
    with torch.no_grad():
        e = model.encode_text(t)
    assert torch.allclose(e[0], e[1], atol=1e-6)  # causal: nothing after the first end token matters

# ---------------------------------------------------------------------------- download


def test_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
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


def test_download_hash_mismatch_redownloads(tmp_path):
    payload = b"the right bytes" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    root = tmp_path / "cache"
    root.mkdir()
    (root / "src.bin").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="SHA256 does not match"):
        path = clip.download(src.as_uri(), str(root), sha256=sha)
    assert Path(path).read_bytes() == payload and sorted(os.listdir(root)) == ["src.bin"]
    with pytest.raises(RuntimeError, match="SHA256"):  # served bytes themselves wrong: error, nothing kept
        clip.download(src.as_uri(), str(tmp_path / "other"), sha256="0" * 64)
    assert os.listdir(tmp_path / "other") == []


def test_default_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert clip.default_root() == str(tmp_path / "clip")


def test_cli_bad_inputs(tmp_path):
    import argparse
    args = argparse.Namespace(model="ViT-B/32", image=str(tmp_path / "missing.jpg"), text=["a"], device="cpu",
                              download_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        clip.main(args)
    (tmp_path / "bad.jpg").write_bytes(b"no image")
    args.image = str(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="cannot read image"):
        clip.main(args)

# ---------------------------------------------------------------------------- train_clip


def test_train_clip_lowers_loss_and_loads(tmp_path):
    import train_clip
    args = train_clip.get_args(["--preset", "tiny", "--out-dir", str(tmp_path), "--export", str(tmp_path / "clip.pt"),
                                "--max-steps", "12", "--eval-n", "48", "--threads", "1"])
    out = train_clip.main(args)
    losses = out["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    model, _ = clip.load(str(tmp_path / "clip.pt"), device="cpu")
    assert model.visual.input_resolution == 32 and model.embed_dim == 32
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    trained = clip.build_model(dict(ckpt["model"]))
    image, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():  # the exported fp16 file is the trained model up to fp16 rounding
        assert torch.allclose(model.encode_image(image), trained.encode_image(image), atol=2e-2)
        assert torch.allclose(model.encode_text(tokens), trained.encode_text(tokens), atol=2e-2)


def test_train_clip_resume_is_exact(tmp_path):
    import train_clip
    common = ["--preset", "tiny", "--eval-n", "8", "--threads", "1", "--ckpt-interval", "0", "--batch-size", "16"]
    full = train_clip.main(train_clip.get_args(common + ["--out-dir", str(tmp_path / "a"), "--max-steps", "4"]))
    train_clip.main(train_clip.get_args(common + ["--out-dir", str(tmp_path / "b"), "--max-steps", "4",
                                                  "--stop-after", "2"]))
    resumed = train_clip.main(train_clip.get_args(common + ["--out-dir", str(tmp_path / "b"), "--max-steps", "4",
                                                            "--resume"]))
    assert resumed["losses"] == full["losses"][2:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
