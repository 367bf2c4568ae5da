"""Tests of vqgan.py and train_vqgan.py (CPU, tiny configs)."""
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "clip.py").exists() or (p / "vqgan.py").exists())
sys.path.insert(0, str(ROOT))

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_vqgan
import vqgan

TINY = vqgan.Config(**vqgan.PRESETS["tiny"])


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = vqgan.VQGAN(replace(TINY, **kw))
    with torch.no_grad():  # a spread-out codebook, so indices are not all the same
        m.quantize.embedding.weight.normal_()
    return m.eval()


def images(n=2, res=32, seed=0):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_round_trip():
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


def test_straight_through_gradient_reaches_encoder():
    m = tiny_model().train()
    xrec, qloss, _ = m(images())
    (xrec - images()).abs().mean().backward()  # reconstruction loss only: its gradient must cross the quantizer
    g = m.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_beta_placement(legacy):
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


def test_load_taming_ckpt_without_lightning(tmp_path, capsys):
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


def test_f16_16384_layout_inferred_on_meta():
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


def test_strict_load_names_keys(tmp_path):
    m = tiny_model()
    ck = m.checkpoint()
    del ck["model"]["decoder.conv_out.bias"]
    ck["model"]["decoder.extra.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['decoder.conv_out.bias'\].*unexpected keys \['decoder.extra"):
        vqgan.VQGAN.from_checkpoint(tmp_path / "bad.pt")


def train_args(out, *extra):
    return train_vqgan.get_args(["--data", "shapes", "--model", "tiny", "--resolution", "32", "--batch-size", "4",
                                 "--n-train", "64", "--eval-images", "8", "--eval-interval", "1000", "--log-interval",
                                 "2", "--lr", "1e-3", "--out", str(out), "--no-bar", "--threads", "1", *extra])


def test_resume_reproduces_next_steps(tmp_path):
    # GAN on from step 2 and restarts every 2 steps: D, its optimizer, the adaptive weight and the restart RNG resume
    common = ["--max-steps", "6", "--disc-start", "2", "--restart-every", "2"]
    train_vqgan.main(train_args(tmp_path / "a", *common))
    train_vqgan.main(train_args(tmp_path / "b", *common, "--stop-after", "3"))  # "killed" after step 3
    train_vqgan.main(train_args(tmp_path / "b", *common, "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "disc"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["usage"], b["usage"])
    ea, eb = a["opt_ae"]["state"][0]["exp_avg"], b["opt_ae"]["state"][0]["exp_avg"]
    assert torch.equal(ea, eb)


def test_loss_falls(tmp_path):
    args = train_args(tmp_path, "--max-steps", "25", "--n-train", "8")  # fit 8 images: L1 on them must fall
    torch.manual_seed(args.seed)
    fresh = vqgan.VQGAN(vqgan.Config(**vqgan.PRESETS["tiny"]))
    seen = train_vqgan.data.get_dataset("shapes", "train", 32, train=False, n=8)
    before = train_vqgan.evaluate(fresh, seen, 8, "cpu")[0]["l1"]
    after = train_vqgan.evaluate(train_vqgan.main(args), seen, 8, "cpu")[0]["l1"]
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "vqgan.pt").exists() and list(tmp_path.glob("rec_*.png"))


def test_corrupt_images_skipped(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 36), (40 * i, 100, 200)).save(folder / f"ok{i}.png")
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    good = (folder / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    args = train_vqgan.get_args(["--data", str(folder), "--model", "tiny", "--resolution", "32", "--batch-size", "4",
                                 "--max-steps", "2", "--eval-images", "8", "--perceptual-weight", "0", "--lr", "1e-3",
                                 "--out", str(tmp_path / "out"), "--no-bar", "--workers", "0", "--eval-interval", "2",
                                 "--threads", "1"])
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        train_vqgan.main(args)
    assert "skipped 2 unreadable images" in capsys.readouterr().out


def test_missing_lpips_weights_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train_vqgan, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "clip", None)  # no downloader (and no network) available
    with pytest.raises(SystemExit, match="--perceptual-weight 0"):
        train_vqgan.get_lpips(None, "cpu")


def test_ddp_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train_vqgan.py"), "--data", "shapes", "--model", "tiny", "--resolution", "32", "--batch-size",
           "2", "--n-train", "32", "--eval-images", "4", "--max-steps", "3", "--disc-start", "1", "--restart-every",
           "2", "--log-interval", "1", "--eval-interval", "3", "--out", str(tmp_path), "--no-bar", "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "batch 2x2" in r.stdout and "eval step 3" in r.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_lpips_loads_published_layouts(tmp_path):
    """torchvision's VGG16 file + LPIPS' vgg.pth (random values, same keys), and taming's loss.perceptual_loss.*."""
    torch.manual_seed(0)
    names = train_vqgan.LPIPS().state_dict()
    feats = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": torch.randn_like(v) * 0.05
             for k, v in names.items() if k.startswith("net.")}
    feats["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision's file, unused
    torch.save(feats, tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])},
               tmp_path / "vgg.pth")
    lp = train_vqgan.LPIPS().load(tmp_path).eval()
    x, y = images(2), images(2, seed=1)
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(lp(x, x), torch.zeros(2))
    sd = {f"loss.perceptual_loss.{'scaling_layer.' if k in ('shift', 'scale') else ''}{k}": v
          for k, v in lp.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "taming.ckpt")
    assert torch.equal(train_vqgan.LPIPS().load(tmp_path / "taming.ckpt").eval()(x, y), d)
