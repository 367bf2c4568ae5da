"""
The stage-2 transformer of CLIP-GEN (Wang et al. 2022, arXiv 2203.00386): a GPT that models
p(image tokens | CLIP embedding), trained on CLIP *image* embeddings and prompted with CLIP *text* embeddings.

Architecture in the spirit of karpathy/nanoGPT `model.py` (pre-LN blocks, fused QKV, SDPA attention, learned
absolute positions), with the conditioning of HFAiLab/clip-gen: one Linear projects the L2-normalised CLIP embedding
to K prefix tokens, the sequence is [c_1 .. c_K, t_0 .. t_{T-2}] and its last T outputs predict t_0 .. t_{T-1}.
HFAiLab's GPT has K = 1; the shapes preset K = 4, as unCLIP's decoder turns its CLIP embedding into four tokens of
context (Ramesh et al. 2022, section 2.1). Untied head. A learned null condition replaces the prefix when the condition
is dropped in training: classifier-free guidance at sampling time (Crowson's "super-conditioning").
Reads our checkpoints ({"model", "config", "step", ...}) and HFAiLab's gpt_coco.pt (key map near the end).
"""

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 16384  # codebook size of the VQGAN the tokens come from (set from meta.json)
    block_size: int = 256    # tokens per image, h*w (16x16 for f16 at 256 px); positions = K prefix + T-1 tokens
    cond_dim: int = 512      # CLIP joint-space size (512 for ViT-B/32)
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.0     # HFAiLab trains with 0.1; we default to 0 and let presets/flags set it
    bias: bool = True        # GPT-2 layout; False is ~6% faster (nanoGPT commit e808a671)
    head_bias: bool = False  # nanoGPT's head has none; HFAiLab's (a default nn.Linear) has one
    null_cond: bool = True   # a learned "no condition" prefix (classifier-free guidance); HFAiLab's GPT has none
    cond_tokens: int = 1     # K, the prefix tokens the CLIP embedding is projected to (HFAiLab: 1)


# Named sizes. Paper: GPT2-medium for MS-COCO, GPT2-XL for ImageNet (clipgen.md section 3; HF's gpt2-xl: 48/1600/25)
PRESETS = {
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, dropout=0.1),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, dropout=0.1),
    # shapes world: 8x8 = 64 tokens from a small codebook, 128-d CLIP; sized to train for thousands of steps on a CPU
    "shapes": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=64, cond_dim=128, cond_tokens=4),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=16, block_size=16, cond_dim=8),
}


def make_config(preset, **overrides):
    """Config from a preset name, with data-dependent fields (vocab_size, block_size, cond_dim) overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


class KVCache:
    """Static per-layer key/value buffers, (B, n_head, seq_len, head_dim), allocated on the first write."""

    def __init__(self, size):
        self.size, self.k, self.v = size, None, None

    def update(self, k, v, pos):
        # k, v (B, H, L, hd) for positions pos .. pos+L-1 -> all keys/values so far (B, H, pos+L, hd)
        if self.k is None:
            B, H, _, hd = k.shape
            self.k, self.v = k.new_zeros(B, H, self.size, hd), v.new_zeros(B, H, self.size, hd)
        L = k.shape[2]
        self.k[:, :, pos:pos + L], self.v[:, :, pos:pos + L] = k, v
        return self.k[:, :, :pos + L], self.v[:, :, :pos + L]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, cache=None, pos=0):
        B, L, C = x.shape
        # (B, L, 3C) -> 3 x (B, H, L, hd)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            # decoding reads the keys of every earlier position; a multi-token write is only the prefill at pos 0
            assert L == 1 or pos == 0, "KV cache: several new tokens are only supported at position 0"
            k, v = cache.update(k, v, pos)
        # one new query attends to all cached keys (no mask: nanoGPT PR #694); otherwise a plain causal mask
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, L, C)  # (B, H, L, hd) -> (B, L, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()  # nn.GELU over a hand-written tanh form: "1.27x faster" (nanoGPT PR #274)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)  # pre-LN residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        K, C = cfg.cond_tokens, cfg.n_embd
        self.cond_proj = nn.Linear(cfg.cond_dim, K * C, bias=cfg.bias)  # CLIP embedding -> K prefix tokens
        if cfg.null_cond:
            self.null_cond = nn.Parameter(torch.zeros(K * C))          # the "no condition" prefix
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.seq_len = cfg.block_size + K - 1                         # positions: the prefix, then T-1 tokens
        self.pos_emb = nn.Embedding(self.seq_len, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.head_bias)  # untied
        self.apply(self._init_weights)
        if cfg.null_cond:
            nn.init.normal_(self.null_cond, std=0.02)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _prefix(self, cond, drop, B):
        """(B, cond_dim) CLIP embeddings (any norm) -> (B, K, C) prefix tokens; drop (B,) bool picks the null ones."""
        if (cond is None or drop is not None) and not self.config.null_cond:
            raise ValueError(NO_NULL)
        K = self.config.cond_tokens
        if cond is None:
            return self.null_cond.view(1, K, -1).expand(B, K, -1)
        x = self.cond_proj(F.normalize(cond.float(), dim=-1).to(self.cond_proj.weight.dtype)).view(B, K, -1)
        if drop is not None:
            x = torch.where(drop.view(B, 1, 1), self.null_cond.view(1, K, -1).to(x.dtype), x)
        return x

    def hidden(self, idx, cond, drop=None, caches=None, pos=0):
        """Final-norm hidden states (B, L, C). At pos 0 the sequence is [cond, idx] (L = K+t), later just idx."""
        B, t = idx.shape
        x = self.tok_emb(idx)                                               # (B, t, C)
        if pos == 0:
            x = torch.cat([self._prefix(cond, drop, B).to(x.dtype), x], 1)  # (B, K, C) + (B, t, C) -> (B, K+t, C)
        L = x.shape[1]
        if pos + L > self.seq_len:
            raise ValueError(f"sequence of {pos + L} positions exceeds seq_len {self.seq_len} (K + block_size - 1)")
        x = self.drop(x + self.pos_emb.weight[pos:pos + L])                # (B, L, C) + (L, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return self.ln_f(x)

    def forward(self, idx, cond, targets=None, drop=None):
        """idx (B, t) tokens t_0 .. t_{t-1} (t < block_size); cond (B, cond_dim) CLIP embedding (normalised here) or
        None for the null condition; targets (B, t+1), normally t_0 .. t_t; drop (B,) bool: rows that get the null
        condition. -> logits (B, t+1, vocab), position i predicting t_i, and the mean cross-entropy (or None).
        Training on whole images: `gpt(tokens[:, :-1], cond, targets=tokens)` (sequence [cond, t_0..t_{T-2}])."""
        logits = self.head(self.hidden(idx, cond, drop)[:, self.config.cond_tokens - 1:])  # (B, t+1, V): from c_K on
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, cond, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None, generator=None,
                 prefix=None, use_cache=True, batch_size=None):
        """cond (B, cond_dim) CLIP embeddings (image or text; None: unconditional, then batch_size=B) -> (B, block_size)
        tokens in raster order. cfg_scale: classifier-free guidance (guide), 1 = off. temperature 0 = greedy; top_k
        keeps the k best tokens, then top_p the smallest set of mass >= p. generator: for reproducible samples.
        prefix (B, P): fixed first tokens (completion). use_cache=False recomputes every step."""
        T, dev = self.config.block_size, self.head.weight.device
        B = cond.shape[0] if cond is not None else batch_size
        if B is None:
            raise ValueError("generate: pass cond (B, cond_dim) or, for unconditional samples, batch_size")
        guided = cfg_scale != 1.0  # needs the null condition: _prefix refuses a GPT without one
        if guided and cond is None:
            raise ValueError("generate: cfg_scale != 1 needs a condition to guide towards")
        # classifier-free guidance runs both branches in one batch: rows [:B] conditional, [B:] the null prefix
        c, drop = (torch.cat([cond, cond]), torch.arange(2 * B, device=dev) >= B) if guided else (cond, None)
        prefix = torch.zeros(B, 0, dtype=torch.long, device=dev) if prefix is None else prefix.to(dev, torch.long)
        P = prefix.shape[1]
        if prefix.shape[0] != B or P > T:
            raise ValueError(f"prefix must be (B={B}, P<={T}) tokens, got {tuple(prefix.shape)}")
        tokens = F.pad(prefix, (0, T - P))                                   # (B, P) -> (B, T): the rest is sampled
        rep = (lambda t: t.repeat(2, 1)) if guided else (lambda t: t)       # both branches see the same tokens
        caches = [KVCache(self.seq_len) for _ in self.blocks] if use_cache else None
        for i in range(P, T):
            if not use_cache:
                h = self.hidden(rep(tokens[:, :i]), c, drop)[:, -1]                   # full recomputation
            elif i == P:
                h = self.hidden(rep(tokens[:, :i]), c, drop, caches, 0)[:, -1]        # prefill [cond, prefix]
            else:  # t_{i-1} at sequence position K-1+i (positions 0..K-1 hold the condition)
                h = self.hidden(rep(tokens[:, i - 1:i]), c, drop, caches, i + self.config.cond_tokens - 1)[:, -1]
            logits = self.head(h).float()                                          # (B or 2B, V)
            if guided:
                logits = guide(logits[:B], logits[B:], cfg_scale)                  # (2B, V) -> (B, V)
            tokens[:, i] = sample_logits(logits, temperature, top_k, top_p, generator)
        return tokens

    def flops_per_token(self):
        """Training FLOPs per token: 6N + 12 * n_layer * n_embd * T (PaLM appendix B, as in nanoGPT's estimate_mfu).
        N leaves out the lookup tables (token/position embeddings, null token), which cost no matmul FLOPs;
        the untied head is a matmul and stays in."""
        n = sum(p.numel() for k, p in self.named_parameters() if not k.startswith(("tok_emb", "pos_emb", "null_cond")))
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * self.config.block_size

    def configure_optimizers(self, weight_decay, lr, betas, device_type):
        """AdamW; decay only Linear weights (no decay on biases, norms, embeddings, null token), fused on CUDA."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **(dict(fused=True) if fused else {}))

    @classmethod
    def from_checkpoint(cls, path_or_dict, device="cpu", verbose=True):
        """An eval GPT from a path or a loaded dict: ours {"model", "config", ...} or HFAiLab's gpt_coco.pt."""
        name, ckpt = ("checkpoint dict", path_or_dict) if isinstance(path_or_dict, dict) else (
            path_or_dict, torch.load(path_or_dict, map_location="cpu", weights_only=True, mmap=True))
        sd = ckpt.get("model") if isinstance(ckpt, dict) else None
        if isinstance(sd, dict) and "config" in ckpt:
            model, sd = cls(Config(**ckpt["config"])), clean_state_dict(sd)
        elif isinstance(sd, dict) and "pos_emb" in sd:
            model, sd = cls(config_from_hfai(sd)), from_hfai(sd)
            if verbose:
                print(f"loaded {name}: HFAiLab CLIP-GEN GPT, epoch {ckpt.get('epoch', '?')}, {model.config.n_layer} "
                      f"layers x {model.config.n_embd} ({model.config.n_head} heads of 64), head bias kept, "
                      f"causal-mask buffers dropped, no null condition (guidance off)")
        else:
            raise ValueError(f"{name} is not a GPT checkpoint (ours: 'model' + 'config'; HFAiLab's: 'model' with "
                             f"'pos_emb'); it holds {sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else ckpt}")
        model.load_state_dict(sd)  # strict: torch names every missing and unexpected key
        return model.to(device).eval()

    def checkpoint(self, **extra):
        return {"model": self.state_dict(), "config": asdict(self.config), **extra}


def clean_state_dict(sd):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}


# HFAiLab's released COCO GPT (gpt_coco.pt; docs/real_images.md): pre-LN nn.TransformerEncoderLayer
# blocks (fused [q; k; v] in_proj, exact GELU, LayerNorm eps 1e-5), i.e. our Block under torch's names
HFAI_KEYS = {"tok_emb.weight": "tok_emb.weight", "cond_proj.weight": "cond_proj.weight",
             "cond_proj.bias": "cond_proj.bias", "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
             "head.weight": "head.weight", "head.bias": "head.bias"}
HFAI_BLOCK = {"encoder.self_attn.in_proj_weight": "attn.c_attn.weight",  # (3C, C) [q; k; v], heads contiguous
              "encoder.self_attn.in_proj_bias": "attn.c_attn.bias",
              **{f"encoder.{theirs}.{p}": f"{ours}.{p}" for p in ("weight", "bias") for theirs, ours in
                 [("self_attn.out_proj", "attn.c_proj"), ("linear1", "mlp.c_fc"), ("linear2", "mlp.c_proj"),
                  ("norm1", "ln_1"), ("norm2", "ln_2")]}}
HFAI_DROPPED = "mask"  # blocks.i.mask: their causal mask as a bool buffer; ours is SDPA's is_causal
NO_NULL = ("this GPT has no trained null condition (HFAiLab's COCO GPT was trained without condition dropout), "
           "so classifier-free guidance is not available")


def from_hfai(sd):
    """HFAiLab's `model` state dict -> ours; an unknown key passes through, so the strict load names it."""
    out = {}
    for key, v in sd.items():
        parts = key.split(".", 2)  # blocks.<i>.<their name>
        if key == "pos_emb":
            out["pos_emb.weight"] = v[0]  # a Parameter (1, T, C) added at the input = our Embedding's (T, C) table
        elif key in HFAI_KEYS:
            out[HFAI_KEYS[key]] = v
        elif parts[0] == "blocks" and len(parts) == 3:
            if parts[2] != HFAI_DROPPED:
                out[f"blocks.{parts[1]}.{HFAI_BLOCK[parts[2]]}" if parts[2] in HFAI_BLOCK else key] = v
        else:
            out[key] = v
    return out


def config_from_hfai(sd):
    """Their sizes from tensor shapes; heads are not stored: 64 wide in every GPT-2 size, so n_head = n_embd // 64."""
    vocab, C = sd["tok_emb.weight"].shape
    return Config(vocab_size=vocab, block_size=sd["pos_emb"].shape[1], cond_dim=sd["cond_proj.weight"].shape[1],
                  n_layer=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), n_head=C // 64,
                  n_embd=C, bias=True, head_bias="head.bias" in sd, null_cond=False)


# Guidance keeps the tokens within this many nats of the conditional branch's best (contrastive decoding's plausibility
# constraint, Li et al. 2022, arXiv 2210.15097): plain s (c - u) lifts tokens both branches rule out (docs/shapes.md)
CFG_PLAUSIBILITY = 2.0


def guide(lc, lu, scale):
    """Classifier-free guidance: (B, V) conditional and unconditional logits -> lu + s (lc - lu), implausible masked."""
    lp = lc.log_softmax(-1)
    return (lu + scale * (lc - lu)).masked_fill(lp < lp.max(-1, keepdim=True).values - CFG_PLAUSIBILITY, float("-inf"))


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) float logits -> (B,) sampled indices. temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the best token always stays)
        remove = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# Dense bf16 tensor-core peaks (no 2:4 sparsity): nanoGPT model.py (A100), clipgen.md section 11.2 (H100/H200 SXM,
# H100 PCIe), nanochat #60 (4090, 3090). Matched by substring of torch.cuda.get_device_name, first match wins.
PEAK_FLOPS = [("A100", 312e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("4090", 165.2e12), ("3090", 71e12)]


def peak_flops(device):
    """Peak bf16 FLOP/s of a torch device, or None when unknown (CPU, MPS, unlisted GPUs): callers print n/a."""
    if torch.device(device).type != "cuda":
        return None
    return next((peak for key, peak in PEAK_FLOPS if key in torch.cuda.get_device_name(device)), None)


def estimate_mfu(flops_per_token, tokens_per_s, device):
    """Model FLOPs utilisation of one process (per device, not x world size), or None on unknown devices."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_token * tokens_per_s / peak
