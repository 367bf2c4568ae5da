"""CLIP (Radford et al., 2021): an image and a text tower mapping into one joint space. CLIP-GEN conditions its
generator on the image embedding in training and swaps in the text embedding at inference. Here: the towers
(VisionTransformer; ModifiedResNet, also our shapes CLIP's), CLIP, load() for OpenAI's archives (downloaded, SHA256-
checked), plain state dicts (HFAiLab's clip_vit_b32.pt) and our checkpoints, every size inferred from tensor shapes;
OpenAI's preprocessing in PIL + torch; its BPE tokenizer at the end. Names follow openai/CLIP: loading is a copy."""
import argparse
import gzip
import hashlib
import html
import http.client
import math
import os
import pickle
import urllib.request
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# URL = .../<sha256 of the file>/<file>; order as OpenAI's available_models()
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# OpenAI's BPE merges (from openai/CLIP, MIT licence), shipped in this repository
VOCAB = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # per channel, [0, 1] pixels
ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # integers in OpenAI's archives, not weights


@dataclass
class Config:
    embed_dim: int = 512             # joint image-text space: text_projection.shape[1]
    image_resolution: int = 224      # ViT: patch * grid; ResNet: 32 * attention-pool grid
    vision_layers: int | list = 12   # an int: ViT depth; a list of 4 ints: ResNet bottlenecks per stage
    vision_width: int = 768          # ViT width; ResNet stem width (the pooled feature is 32x that)
    vision_patch_size: int = 32      # ViT only (0 for a ResNet tower)
    context_length: int = 77         # text positions, including start and end tokens
    vocab_size: int = 49408          # 256 bytes x 2 + 48894 merges + start + end
    transformer_width: int = 512
    transformer_layers: int = 12
    # heads are never stored in a state dict: OpenAI uses head dim 64 everywhere (at least one head here)

# named sizes (inferred from OpenAI's archives; listed for reference)
#   ViT-B/32  Config(512, 224, 12, 768, 32, 77, 49408, 512, 12)
#   ViT-L/14  Config(768, 224, 24, 1024, 14, 77, 49408, 768, 12)
#   RN50      Config(1024, 224, [3, 4, 6, 3], 64, 0, 77, 49408, 512, 12)


# --- blocks, smallest first -----------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 models stay stable (as OpenAI's)."""
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    # OpenAI's sigmoid approximation of GELU; the weights were trained with it, so erf-GELU would break parity
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight = [W_q; W_k; W_v]) computed with SDPA, batch first."""
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.in_proj_weight = heads, nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias, self.out_proj = nn.Parameter(torch.zeros(3 * width)), nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)       # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # causal = OpenAI's triu(-inf) mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, causal):
        super().__init__()
        self.causal, self.attn, self.ln_1 = causal, MultiheadAttention(width, heads), LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.causal)  # pre-LN
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre, self.transformer = LayerNorm(width), Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))  # [in, out]: applied as x @ proj

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)             # (B, 3, R, R) -> (B, W, g, g) -> (B, g*g, W), raster
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + g*g, W)
        x = self.transformer(self.ln_pre(x + self.positional_embedding.to(x.dtype)))  # ln_pre before the blocks
        return self.ln_post(x[:, 0, :]) @ self.proj              # class token only -> (B, output_dim)


class Bottleneck(nn.Module):
    """OpenAI's anti-aliased bottleneck: strided convs are replaced by an avgpool after the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        # key names "downsample.-1" (the pool, no weights), "downsample.0", "downsample.1" as OpenAI's
        self.downsample = None if stride == 1 and inplanes == planes * 4 else nn.Sequential(OrderedDict([
            ("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
            ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = self.avgpool(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))
        return F.relu(self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """One query (the mean of the grid) attends over [mean, grid] with a learned position embedding."""
    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)                         # (B, C, h, w) -> (B, h*w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+hw, C)
        B, T, C = x.shape  # the query is the mean token only: (B, h, 1, d); keys and values (B, h, T, d)
        q, k, v = (proj(t).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for proj, t in ((self.q_proj, x[:, :1]), (self.k_proj, x), (self.v_proj, x)))
        y = F.scaled_dot_product_attention(q, k, v)                           # (B, h, 1, d)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))                   # (B, output_dim)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet tower: 3-conv stem + avgpool, 4 stages of bottlenecks, attention pooling."""
    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        stages, inplanes = [], width
        for i, n in enumerate(layers):  # widths w, 2w, 4w, 8w (x4 out); every stage but the first halves the grid
            stages.append(nn.Sequential(*[Bottleneck(inplanes if j == 0 else width * 2 ** i * 4, width * 2 ** i,
                                                     2 if i > 0 and j == 0 else 1) for j in range(n)]))
            inplanes = width * 2 ** i * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)  # total stride 32

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # (B, 3, R, R) -> (B, w/2, R/2, R/2)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))        # (B, w, R/4, R/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32w, R/32, R/32)
        return self.attnpool(x)                                  # (B, output_dim)


# --- the model ------------------------------------------------------------------------------------------------------
class CLIP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c = self.config = config
        self.embed_dim, self.context_length, self.vocab_size = c.embed_dim, c.context_length, c.vocab_size
        if isinstance(c.vision_layers, (list, tuple)):
            self.visual = ModifiedResNet(list(c.vision_layers), c.embed_dim, max(1, c.vision_width * 32 // 64),
                                         c.image_resolution, c.vision_width)
        else:
            self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                            c.vision_layers, max(1, c.vision_width // 64), c.embed_dim)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, max(1, c.transformer_width // 64),
                                       causal=True)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))  # [in, out]
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learnable temperature, log(1/tau)
        self.initialize_parameters()

    def initialize_parameters(self):
        # OpenAI's init (matters only for training from scratch, i.e. train_clip.py)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for block in [*self.visual.layer1, *self.visual.layer2, *self.visual.layer3, *self.visual.layer4]:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as zero: identity blocks
        t = self.transformer
        proj_std = t.width ** -0.5 * (2 * t.layers) ** -0.5
        for b in t.resblocks:
            for w, std in ((b.attn.in_proj_weight, t.width ** -0.5), (b.attn.out_proj.weight, proj_std),
                           (b.mlp.c_fc.weight, (2 * t.width) ** -0.5), (b.mlp.c_proj.weight, proj_std)):
                nn.init.normal_(w, std=std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        """image (B, 3, R, R) CLIP-normalised -> (B, embed_dim), not L2-normalised."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text):
        """text (B, L) token ids from tokenize() -> (B, embed_dim), not L2-normalised."""
        eot = text.argmax(dim=-1)  # end token 49407 is the largest id; the first one wins on ties
        n = int(eot.max()) + 1  # attention is causal: the end token never sees the padding after it, so drop it
        if n > self.context_length:
            raise ValueError(f"text of {n} tokens is longer than the model's context of {self.context_length}")
        x = self.token_embedding(text[:, :n]).to(self.dtype) + self.positional_embedding[:n].to(self.dtype)
        x = self.ln_final(self.transformer(x))                            # (B, n, W)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # pool at EOT -> (B, D)

    def forward(self, image, text):
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)): scaled cosine similarities."""
        img, txt = F.normalize(self.encode_image(image), dim=1), F.normalize(self.encode_text(text), dim=1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


# --- loading: names, archives, state dicts, our checkpoints ---------------------------------------------------------
def config_from_state_dict(sd):
    """Every hyper-parameter from tensor shapes (OpenAI's build_model rules); sd values only need .shape."""
    if "visual.proj" in sd:  # ViT tower
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_width=sd["visual.conv1.weight"].shape[0], vision_patch_size=patch,
                      vision_layers=sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd),
                      image_resolution=patch * grid)
    else:  # ModifiedResNet tower
        layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=0,
                      vision_layers=layers, image_resolution=32 * grid)
    return Config(embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
                  vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=sd["ln_final.weight"].shape[0],
                  transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
                  **vision)


def read_state_dict(path):
    """The weights of an OpenAI TorchScript archive, a plain state dict or our checkpoint; fp32, extras dropped."""
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):  # TorchScript: its code is never run
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:  # a broken or unsafe file raises torch's own error (data.load_model tells it in one line)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd["model"] if isinstance(sd, dict) and "model" in sd and "config" in sd else sd  # ours (train_clip.py)
    if not isinstance(sd, dict) or "text_projection" not in sd:
        raise ValueError(f"{path} is not a CLIP state dict, TorchScript archive or checkpoint")
    # the archives are partly fp16 (OpenAI's convert_weights); we always compute in fp32 unless asked otherwise
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in ARCHIVE_EXTRAS}


def build_model(sd):
    """A CLIP with the shapes of sd and its weights (strict: missing/unexpected keys are an error)."""
    with torch.device("meta"):  # no time spent on a random init that is overwritten anyway
        model = CLIP(config_from_state_dict(sd))
    for k in model.state_dict():  # BatchNorm's step counter is bookkeeping, not a weight: absent in some exports
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.tensor(0)
    model.load_state_dict(sd, strict=True, assign=True)  # torch names every missing and unexpected key
    return model.eval()


def load(name_or_path, device=None, dtype=None, download_root=None):
    """An OpenAI model name, or a path to an archive / state dict / our checkpoint -> (model, preprocess: PIL image
    -> (3, R, R) float32). The model runs in fp32 on CPU; dtype (float16, bfloat16) is honoured on GPUs only."""
    if name_or_path not in _MODELS and not os.path.isfile(name_or_path):
        raise ValueError(f"unknown CLIP model {name_or_path!r} — use one of {available_models()} or a path to a file")
    path = download(_MODELS[name_or_path], download_root or default_root()) if name_or_path in _MODELS else name_or_path
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (dtype or torch.float32) if device.type != "cpu" else torch.float32  # half precision on CPU: slow/absent
    model = build_model(read_state_dict(path)).to(device=device, dtype=dtype)
    print(f"clip: loaded {name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.visual.input_resolution}px, embed {model.embed_dim}) on {device} in {dtype}")
    return model, partial(preprocess, resolution=model.visual.input_resolution)


def available_models():
    return list(_MODELS)


def default_root():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clip")


def download(url, root, sha256=None):
    """url -> root/<its basename>, checked against sha256 (default: the one in OpenAI's URLs); a file with the right
    hash is reused, a download renamed into place only when its hash is right (a partial file never is)."""
    os.makedirs(root, exist_ok=True)
    target, sha256 = os.path.join(root, os.path.basename(url)), sha256 or url.split("/")[-2]
    if os.path.isfile(target) and file_sha256(target) == sha256:
        return target
    tmp = f"{target}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as out, tqdm(
                total=int(src.headers.get("Content-Length") or 0) or None, unit="iB", unit_scale=True,
                unit_divisor=1024, desc=os.path.basename(url)) as bar:
            while chunk := src.read(1 << 20):
                bar.update(out.write(chunk))
        if (got := file_sha256(tmp)) != sha256:
            raise RuntimeError(f"downloaded {url} but its SHA256 is {got}, expected {sha256} (interrupted or altered)"
                               f" — run again")
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as e:
        raise RuntimeError(f"cannot download {url} ({e}) — without a network, fetch it elsewhere and put it at "
                           f"{target}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def file_sha256(path):
    """SHA256 hex digest of a file, read in 1 MB chunks (the scripts use data.file_sha256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- preprocessing --------------------------------------------------------------------------------------------------
def preprocess(img, resolution=224):
    """PIL image -> (3, R, R) float32; pixel-identical to OpenAI's torchvision Compose([Resize(R, BICUBIC),
    CenterCrop(R), convert("RGB"), ToTensor(), Normalize(MEAN, STD)])."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resolution:
        new_long = int(resolution * long / short)  # truncation, in this order, as torchvision
        img = img.resize((resolution, new_long) if w <= h else (new_long, resolution), Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))  # round half to even
    img = img.crop((left, top, left + resolution, top + resolution))
    # RGB conversion after the resize: RGBA/LA are resized premultiplied, P and 1 by nearest, in PIL's own mode
    x = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    x = x.view(resolution, resolution, 3).permute(2, 0, 1).float().div(255)  # (3, R, R), divided as ToTensor
    return x.sub(torch.tensor(MEAN).view(3, 1, 1)).div(torch.tensor(STD).view(3, 1, 1))


def preprocess_tensor(x, resolution):
    """x (B, 3, H, W) in [-1, 1] -> (B, 3, R, R) CLIP-normalised; bicubic antialiased resize of the shorter side
    and a centre crop, like preprocess() but differentiable and batched."""
    B, C, H, W = x.shape
    x = (x + 1) / 2  # [-1, 1] -> [0, 1]
    if min(H, W) != resolution:
        size = (resolution, int(resolution * W / H)) if H <= W else (int(resolution * H / W), resolution)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    H, W = x.shape[-2:]
    top, left = int(round((H - resolution) / 2.0)), int(round((W - resolution) / 2.0))
    x = x[..., top:top + resolution, left:left + resolution]
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


# --- OpenAI's byte-level BPE tokenizer (clip/simple_tokenizer.py), self-contained -----------------------------------
@lru_cache()
def bytes_to_unicode():
    """byte -> printable unicode char: printable Latin-1 bytes map to themselves, the other 68 to chr(256+n)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in keep]
    return dict(zip(keep + rest, map(chr, keep + [256 + n for n in range(len(rest))])))


class SimpleTokenizer:
    # pre-tokens: the special tokens, English contractions, letter runs, single digits, other-symbol runs
    PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")

    def __init__(self, bpe_path=None):
        with gzip.open(bpe_path or VOCAB) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48,894 merges after the header
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [c + "</w>" for c in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49,408 ids
        self.bpe_ranks, self.pat = {m: i for i, m in enumerate(merges)}, regex.compile(self.PATTERN, regex.IGNORECASE)
        self.cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """byte-mapped pre-token -> tuple of symbols; the last symbol carries the end-of-word mark </w>."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            # merge the adjacent pair ranked first in the merges file, at every non-overlapping place, left to right
            pair = min(zip(word, word[1:]), key=lambda p: self.bpe_ranks.get(p, math.inf))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                two = i < len(word) - 1 and (word[i], word[i + 1]) == pair
                merged.append(word[i] + word[i + 1] if two else word[i])
                i += 2 if two else 1
            word = tuple(merged)
        self.cache[token] = word
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # twice: "&amp;lt;" -> "<"
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(token))
        return ids


get_tokenizer = lru_cache()(SimpleTokenizer)  # get_tokenizer(bpe_path=None): one tokenizer per file, built once


def tokenize(texts, context_length=77, truncate=False, bpe_path=None):
    """str or list of N str -> LongTensor (N, context_length): [start] + BPE ids + [end], right-padded with 0."""
    texts, tok = [texts] if isinstance(texts, str) else texts, get_tokenizer(bpe_path)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {text[:80]!r}{'...' if len(text) > 80 else ''} is {len(ids)} tokens long, "
                                 f"over the context length {context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot]  # the end token stays last: encode_text pools there
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# --- zero-shot command line: python clip.py --image x.jpg --text "a cat" "a dog" ------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="clip.py", description="CLIP zero-shot: which text fits the image best")
    p.add_argument("--model", default="ViT-B/32", help=f"one of {available_models()} or a checkpoint file")
    p.add_argument("--image", required=True)
    p.add_argument("--text", nargs="+", required=True, help="candidate captions")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    args = p.parse_args(argv)
    try:
        (image := Image.open(args.image)).load()
    except OSError as e:  # missing, unreadable, not an image
        p.exit(2, f"clip.py: error: cannot read --image {args.image} ({e}) — pass an image file\n")
    try:
        model, pre = load(args.model, device=args.device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # torch's (unsafe) advice never shown
        why = "not plain tensors" if isinstance(e, pickle.UnpicklingError) else str(e).splitlines()[0].split(". ")[0]
        p.exit(2, "clip.py: error: " + (why if " — " in why else f"cannot load --model {args.model} ({why}) — pass "
                                        f"one of {available_models()} or a CLIP checkpoint file") + "\n")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, _ = model(pre(image).unsqueeze(0).to(device), tokenize(args.text).to(device))
    for prob, text in zip(probs := logits.float().softmax(dim=-1)[0].tolist(), args.text):
        print(f"{prob:.4f}  {text}")
    return probs


if __name__ == "__main__":
    main()
