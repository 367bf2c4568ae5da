"""Tests for sample.py: tiny random CLIP / VQGAN / GPT checkpoints in tmp_path, plus the shipped shapes ones."""
import sys
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "clip.py").exists())
sys.path.insert(0, str(ROOT))
import clip  # noqa: E402
import gpt  # noqa: E402
import sample  # noqa: E402
import vqgan  # noqa: E402


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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these models are tiny: one thread is several times faster than two on a busy 2-core machine (thread spin)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def args_for(ckpts, out, *prompts, **overrides):
    a = sample.get_parser().parse_args(list(prompts) + ["--out", str(out), "--device", "cpu"])
    for k, v in {**ckpts, **overrides}.items():
        setattr(a, k, v)
    return a


def test_main_writes_n_images_per_prompt_and_is_deterministic(ckpts, tmp_path):
    a = args_for(ckpts, tmp_path / "a", "a red circle", "a blue square", n=3, candidates=5, seed=7, batch_size=4)
    paths, scores = sample.main(a)
    assert len(paths) == 6 and all(p.is_file() for p in paths) and (tmp_path / "a" / "grid.png").is_file()
    assert scores.shape == (2, 3) and torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    paths2, scores2 = sample.main(args_for(ckpts, tmp_path / "b", "a red circle", "a blue square",
                                           n=3, candidates=5, seed=7, batch_size=4))
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in paths2]
    assert torch.equal(scores, scores2)
    paths3, _ = sample.main(args_for(ckpts, tmp_path / "c", "a red circle", "a blue square",
                                     n=3, candidates=5, seed=8, batch_size=4))
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in paths3]


def test_reranking_keeps_the_highest_scoring_candidates(ckpts):
    models = sample.load_models(**ckpts)
    cond = sample.text_embeddings(models, ["a red circle", "a green star"])
    # all 6 candidates, unranked order is irrelevant: the kept 2 must be the top 2 of the 6 scores
    every, every_scores = sample.generate(models, cond, n=6, candidates=6, seed=3, batch_size=4)
    kept, kept_scores = sample.generate(models, cond, n=2, candidates=6, seed=3, batch_size=4)
    assert kept.shape == (2, 2, 32, 32, 3) and kept.dtype == torch.uint8
    assert torch.allclose(kept_scores, every_scores.topk(2, dim=1).values)
    assert torch.equal(kept, every[:, :2])
    # the score is the CLIP cosine of the kept image with the prompt
    x = kept[0, 0].permute(2, 0, 1).float().div(127.5).sub(1)[None]
    e = models.clip.encode_image(clip.preprocess_tensor(x, 32))
    assert torch.allclose(torch.nn.functional.normalize(e, dim=-1) @ cond[0], kept_scores[0, 0], atol=2e-2)
    floats, _ = sample.generate(models, cond[:1], n=1, candidates=2, seed=3, as_float=True)
    assert floats.shape == (1, 1, 3, 32, 32) and 0 <= floats.min() and floats.max() <= 1


def test_image_variations_and_prompt_file(ckpts, tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    a = args_for(ckpts, tmp_path / "o", n=1, candidates=2, image=[str(tmp_path / "red.png")],
                 prompts=str(tmp_path / "prompts.txt"))
    paths, scores = sample.main(a)
    assert len(paths) == 3 and scores.shape == (3, 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(prompt=[" "]), "empty prompt"),
    (dict(prompt=[]), "nothing to draw"),
    (dict(top_p=0.0), "top-p"), (dict(top_p=1.5), "top-p"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(n=0), "--n"), (dict(n=4, candidates=2), "candidates"),
    (dict(cfg=-1.0), "cfg"), (dict(top_k=0), "top-k"), (dict(batch_size=0), "batch-size"),
    (dict(image=["does/not/exist.png"]), "cannot read --image"),
])
def test_bad_input_is_refused(ckpts, tmp_path, overrides, message):
    a = args_for(ckpts, tmp_path, "a red circle", **{"n": 1, "candidates": 1, **overrides})
    with pytest.raises(ValueError, match=message):
        sample.main(a)


def test_unreadable_image_file_is_refused(ckpts, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read --image"):
        sample.main(args_for(ckpts, tmp_path, image=[str(tmp_path / "bad.png")]))


def test_missing_prompts_file_is_refused(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="--prompts"):
        sample.main(args_for(ckpts, tmp_path, prompts=str(tmp_path / "none.txt")))


def test_long_prompt_is_truncated_with_a_warning(ckpts, tmp_path):
    with pytest.warns(UserWarning, match="truncated"):
        paths, _ = sample.main(args_for(ckpts, tmp_path, "a red circle " * 40, n=1, candidates=1))
    assert len(paths) == 1


def test_missing_checkpoint_names_its_maker(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_gpt.py"):
        sample.load_models(ckpts["clip"], ckpts["vqgan"], str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="train_vqgan.py"):
        sample.load_models(ckpts["clip"], str(tmp_path / "nope.pt"), ckpts["gpt"])
    with pytest.raises(FileNotFoundError, match="train_clip.py"):
        sample.load_models(str(tmp_path / "nope.pt"), ckpts["vqgan"], ckpts["gpt"])
    if not all((ROOT / p).is_file() for p in sample.SHIPPED.values()):
        with pytest.raises(FileNotFoundError, match="scripts/train_shapes.sh"):
            sample.load_models()


@pytest.mark.parametrize("kw, message", [(dict(vocab=32), "codebook"), (dict(tokens=16), "grid"),
                                         (dict(cond_dim=16), "-d conditions")])
def test_mismatched_checkpoints_are_refused(ckpts, tmp_path, kw, message):
    other = tiny_checkpoints(tmp_path, **kw)
    with pytest.raises(ValueError, match=message):
        sample.load_models(ckpts["clip"], ckpts["vqgan"], other["gpt"])


def test_gpt_trained_with_another_vqgan_file_is_refused(ckpts, tmp_path):
    # same sizes, different weights: only the sha256 that train_gpt.py records in data_meta can tell
    other = tiny_checkpoints(tmp_path, seed=1)
    for name, vq_file in (("ok", ckpts["vqgan"]), ("bad", other["vqgan"])):
        ck = torch.load(ckpts["gpt"], weights_only=True)
        ck["data_meta"] = {"vqgan": vq_file, "vqgan_sha256": sample.fingerprint(vq_file),
                           "clip": ckpts["clip"], "clip_sha256": sample.fingerprint(ckpts["clip"])}
        torch.save(ck, tmp_path / f"gpt_{name}.pt")
    sample.load_models(ckpts["clip"], ckpts["vqgan"], str(tmp_path / "gpt_ok.pt"))
    with pytest.raises(ValueError, match="tokens were made with vqgan"):
        sample.load_models(ckpts["clip"], ckpts["vqgan"], str(tmp_path / "gpt_bad.pt"))


@pytest.mark.skipif(not all((ROOT / p).is_file() for p in sample.SHIPPED.values()),
                    reason="checkpoints/shapes/*.pt not built yet: run scripts/train_shapes.sh")
def test_shipped_checkpoints_make_images_deterministically(tmp_path):
    a = sample.get_parser().parse_args(["a red circle on a blue background", "--n", "2", "--candidates", "4",
                                        "--device", "cpu", "--out", str(tmp_path / "a")])
    paths, scores = sample.main(a)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    a.out = str(tmp_path / "b")
    paths2, scores2 = sample.main(a)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in paths2] and torch.equal(scores, scores2)
