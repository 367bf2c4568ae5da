"""
Speed of every CLIP-GEN stage, measured the same way everywhere: warm-up calls, then timed repetitions, reported as
the median and the min-max spread of the per-repetition throughput, plus the peak memory of each stage.

  clip        CLIP ViT-B/32 encode_image (224 px) and encode_text (77 tokens), random weights, batch 1 and 32
  vqgan       VQGAN f16-16384 encode and decode at 256 px (images/s)
  gpt-train   one training step of the gpt2-medium GPT at sequence 256 (tokens/s and MFU, nanoGPT's definition)
  gpt-sample  256-token sampling with and without the KV cache at several batch sizes (tokens/s, images/min)
  fid         FID Inception-v3 pool features at 299 px, random weights (images/s)

On CUDA the models run under bf16 autocast (TF32 matmuls elsewhere), timings are bracketed by
torch.cuda.synchronize() and memory is torch.cuda.max_memory_allocated(). On CPU everything is fp32 and memory is the
peak RSS (resource.getrusage, reset per stage through /proc/self/clear_refs where Linux allows it). CPU runs use
smaller batches and, for sampling, a narrower GPT: every such row says "(cpu-reduced)" and the reason is printed.

  python bench.py                        # every stage, on CUDA when there is one
  python bench.py gpt-sample --device cpu --json out/bench.json
Figures measured with it, and their commands: docs/speed.md.
"""
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import clip
import data
import gpt
import inception
import vqgan

STAGES = ("clip", "vqgan", "gpt-train", "gpt-sample", "fid")

# Sizes per setting. "cuda": the paper's models at GPU batches. "cpu": the same models where one call takes seconds,
# smaller batches, and sampling at the shapes preset's width/depth with 256 tokens (a gpt2-medium sample of 256
# tokens without the cache is ~22 TFLOP: minutes on 2 cores), plus gpt2-medium for a few tokens. Chosen so that the
# whole default CPU run takes ~3 minutes on an idle 2-core machine. "quick": tiny models, for tests.
SIZES = {
    "cuda": dict(warmup=2, reps=5, clip_batches=(1, 32), vqgan_batch=16, train_batch=32,
                 sample=[("gpt2-medium", 256, (1, 16, 64, 256), (1, 16))], fid_batch=50),
    "cpu": dict(warmup=1, reps=3, clip_batches=(1, 32), vqgan_batch=1, train_batch=1,
                sample=[("shapes", 256, (1, 8, 32), (1, 8)), ("gpt2-medium", 16, (1,), (1,))], fid_batch=8),
    "quick": dict(warmup=1, reps=2, clip_batches=(1, 2), vqgan_batch=1, train_batch=2,
                  sample=[("tiny", 16, (1, 2), (1,))], fid_batch=1),
}
REDUCED = {  # why a CPU row differs from the GPU one; printed once per stage
    "vqgan": "CPU: batch 1 (GPU: 16)",
    "gpt-train": "CPU: batch 1 x 256 tokens (GPU: 32 x 256); MFU n/a (no bf16 peak for a CPU)",
    "gpt-sample": "CPU: shapes width/depth (4 x 128) with block_size 256, and gpt2-medium for 16 tokens only",
    "fid": "CPU: batch 8 (GPU: 50)",
}


def get_parser():
    p = data.ArgumentParser(prog="bench.py", description="Speed figures of every CLIP-GEN stage.")
    p.add_argument("stages", nargs="*", default=list(STAGES), help=f"any of {', '.join(STAGES)}")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if there is one)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the figures as JSON to FILE (no FILE: print JSON instead of the table)")
    p.add_argument("--quick", action="store_true", help="tiny models and 2 repetitions (for tests)")
    p.add_argument("--reps", type=data.num(int, 1), help="timed repetitions (default: 3 on CPU, 5 on CUDA, 2 --quick)")
    p.add_argument("--threads", type=data.num(int, 0), default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the GPT for the gpt-train stage")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the conv nets")
    return p


class Bench:
    """Holds the device settings and collects one dict per figure."""

    def __init__(self, args):
        self.dev = args.device
        self.cuda = self.dev.type == "cuda"
        self.sz = dict(SIZES["quick" if args.quick else self.dev.type])
        if args.reps:
            self.sz["reps"] = args.reps
        self.reduced = not self.cuda and not args.quick  # label CPU rows whose sizes differ from the GPU ones
        self.dtype = "bf16-amp" if self.cuda else "fp32"
        self.args, self.rows = args, []
        self.wall_times, self.cpu_times = [], []  # of the last b.time() call, stored with each figure in the JSON

    def amp(self):
        # inference: bf16 autocast on CUDA, fp32 on CPU (as sample.py); training rows: data.mixed_precision
        return torch.autocast("cuda", torch.bfloat16) if self.cuda else nullcontext()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def time(self, fn, warmup=None, reps=None):
        """Seconds of each timed call of fn() after `warmup` untimed ones."""
        for _ in range(self.sz["warmup"] if warmup is None else warmup):
            fn()
        times, self.cpu_times = [], []
        self.wall_times = times
        for _ in range(self.sz["reps"] if reps is None else reps):
            self.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            # process CPU seconds (all threads): on a shared machine, cpu/wall < threads shows time lost to others
            self.cpu_times.append(time.process_time() - c0)
        return times

    def add(self, stage, what, size, batch, values, unit, reduced=False, note="", timed=True, dtype=None):
        """One figure: values are per-repetition throughputs (or one derived number, timed=False); None = n/a."""
        vals = [v for v in values if v is not None]
        row = dict(stage=stage, what=what, size=size + (" (cpu-reduced)" if reduced and self.reduced else ""),
                   dtype=dtype or self.dtype, batch=batch, median=statistics.median(vals) if vals else None,
                   min=min(vals) if vals else None, max=max(vals) if vals else None, unit=unit, reps=len(vals),
                   note=note, wall_s=self.wall_times if timed else [], cpu_s=self.cpu_times if timed else [])
        self.rows.append(row)
        if self.args.json != "-":
            print(format_row(row), flush=True)
        return row

    def reset_memory(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            return True
        try:  # glibc keeps freed heap mapped: give it back first, or the last stage's models count as this one's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # Linux: "5" resets the peak RSS (VmHWM) that getrusage's ru_maxrss reports
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def add_memory(self, stage, was_reset):
        if self.cuda:
            mib, what = torch.cuda.max_memory_allocated(self.dev) / 2**20, "peak memory (max allocated)"
        else:
            mib, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak memory (RSS)"  # KiB on Linux
            what += "" if was_reset else " process, cumulative"
        self.add(stage, what, "", "", [mib], "MiB", timed=False)

    def conv_format(self, model, x):
        if self.args.channels_last:
            return model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        return model, x


def bench_clip(b):
    cfg = clip.Config() if not b.args.quick else clip.Config(embed_dim=32, image_resolution=32, vision_layers=2,
        vision_width=64, vision_patch_size=16, context_length=16, vocab_size=64, transformer_width=64,
        transformer_layers=2)
    size = "ViT-B/32" if not b.args.quick else "tiny ViT"
    model = clip.CLIP(cfg).to(b.dev).eval()
    for B in b.sz["clip_batches"]:
        x = torch.randn(B, 3, cfg.image_resolution, cfg.image_resolution, device=b.dev)
        # worst-case text: the end token (the largest id) in the last slot, so all context_length positions run
        text = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), device=b.dev)
        text[:, -1] = cfg.vocab_size - 1
        with torch.no_grad(), b.amp():
            t_img = b.time(lambda: model.encode_image(x))
            b.add("clip", "encode_image", f"{size} {cfg.image_resolution}px", B, [B / t for t in t_img], "img/s")
            t_txt = b.time(lambda: model.encode_text(text))
            b.add("clip", "encode_text", f"{size} {cfg.context_length} tok", B, [B / t for t in t_txt], "text/s")


def bench_vqgan(b):
    preset = "tiny" if b.args.quick else "f16-16384"
    cfg = vqgan.Config(**vqgan.PRESETS[preset])
    model = vqgan.VQGAN(cfg).to(b.dev).eval()
    B, R = b.sz["vqgan_batch"], cfg.resolution
    model, x = b.conv_format(model, torch.rand(B, 3, R, R, device=b.dev) * 2 - 1)
    with torch.no_grad(), b.amp():
        idx = model.encode(x)                                         # (B, h, w)
        t_enc = b.time(lambda: model.encode(x))
        b.add("vqgan", "encode", f"{preset} {R}px", B, [B / t for t in t_enc], "img/s", reduced=True)
        t_dec = b.time(lambda: model.decode(idx))
        b.add("vqgan", "decode", f"{preset} {R}px", B, [B / t for t in t_dec], "img/s", reduced=True)


def bench_gpt_train(b):
    preset = "tiny" if b.args.quick else "gpt2-medium"
    cfg = gpt.make_config(preset)
    model = gpt.GPT(cfg).to(b.dev).train()
    flops_per_token = model.flops_per_token()
    # train_gpt.py's optimiser and clipping: AdamW (fused on CUDA), weight decay on Linear weights, clip 1.0
    opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), b.dev.type)
    step_model = torch.compile(model) if b.args.compile else model
    B, T = b.sz["train_batch"], cfg.block_size
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=b.dev)
    cond = torch.randn(B, cfg.cond_dim, device=b.dev)

    amp = data.mixed_precision(b.dev)[0]  # as train_gpt.py: bf16 on CUDA and on CPUs with bf16 instructions
    dtype = "fp32" if isinstance(amp, nullcontext) else {torch.bfloat16: "bf16-amp"}.get(amp.fast_dtype, "fp16-amp")

    def step():
        with amp:
            _, loss = step_model(tokens[:, :-1], cond, targets=tokens)  # sequence [cond, t_0..t_{T-2}] = T positions
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = b.time(step)
    tok_s = [B * T / t for t in times]
    size = f"{preset} T{T}" + (" compiled" if b.args.compile else "")
    b.add("gpt-train", "train step", size, B, tok_s, "tok/s", reduced=True, dtype=dtype)
    mfu = [gpt.estimate_mfu(flops_per_token, r, b.dev) for r in tok_s]
    b.add("gpt-train", "MFU", size, B, [None if m is None else 100 * m for m in mfu], "%", reduced=True, dtype=dtype,
          note="" if mfu[0] is not None else "n/a: no known bf16 peak for this device")


def bench_gpt_sample(b):
    for preset, T, cache_batches, nocache_batches in b.sz["sample"]:
        cfg = gpt.make_config(preset, block_size=T)
        model = gpt.GPT(cfg).to(b.dev).eval()
        size = f"{preset} T{T}" if preset != "shapes" else f"shapes-width T{T}"
        rates, cpu, samples = {}, {}, {}
        for use_cache in (True, False):
            for B in cache_batches if use_cache else nocache_batches:
                cond = torch.randn(B, cfg.cond_dim, generator=torch.Generator().manual_seed(B)).to(b.dev)
                gen = torch.Generator(device=b.dev)

                def run():
                    gen.manual_seed(0)  # every repetition samples the same tokens
                    with b.amp():
                        samples[use_cache, B] = model.generate(cond, generator=gen, use_cache=use_cache)
                # CPU: the cached runs warm the allocator; a no-cache run is slow there: 2 reps, no warm-up.
                # CUDA: each new sequence length picks its kernels on first use (13 s, then 2 s: docs/speed.md): warm up
                times = b.time(run, warmup=None if use_cache else int(b.cuda),
                               reps=None if use_cache else min(2, b.sz["reps"]))
                rates[use_cache, B] = statistics.median(B * T / t for t in times)
                cpu[use_cache, B] = statistics.median(b.cpu_times)
                what = "sample, KV cache" if use_cache else "sample, no cache"
                b.add("gpt-sample", what, size, B, [B * T / t for t in times], "tok/s", reduced=True)
                if T == 256:  # a whole 16x16 image
                    b.add("gpt-sample", what, size, B, [60 * B / t for t in times], "img/min", reduced=True)
                if not use_cache and (True, B) in rates:
                    same = torch.equal(samples[True, B], samples[False, B])
                    b.add("gpt-sample", "KV-cache speed-up", size, B, [rates[True, B] / rates[False, B]], "x",
                          reduced=True, timed=False, note=f"tokens identical: {same}" + (
                              "" if b.cuda else f"; CPU-seconds ratio {cpu[False, B] / cpu[True, B]:.3g}x"))


def bench_fid(b):
    model = inception.InceptionV3().to(b.dev).eval()  # random weights: the speed does not depend on them
    B = b.sz["fid_batch"]
    model, x = b.conv_format(model, torch.rand(B, 3, 299, 299, device=b.dev) * 2 - 1)
    with torch.no_grad(), b.amp():
        times = b.time(lambda: model(x))
    b.add("fid", "Inception pool3", "Inception-v3 299px", B, [B / t for t in times], "img/s", reduced=True)


def format_row(r):
    def num(v):
        return "n/a" if v is None else f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    spread = "" if r["min"] is None or r["reps"] < 2 else f"{num(r['min'])}-{num(r['max'])}"
    return (f"{r['stage']:<10} {r['what']:<34} {r['size']:<32} {r['dtype']:<8} {str(r['batch']):>5} "
            f"{num(r['median']):>9} {spread:>17} {r['unit']:<7} {r['note']}").rstrip()


def machine(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main(args):
    if bad := [s for s in args.stages if s not in STAGES]:
        raise data.UserError(f"unknown stage(s) {', '.join(bad)} — choose from {', '.join(STAGES)}")
    args.device = data.pick_device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() is called from tests: leave the process as it was


def run(args):
    b = Bench(args)
    if b.cuda:  # TF32 for whatever autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    meta = dict(command="python " + " ".join(map(str, [os.path.basename(sys.argv[0]) or "bench.py"] + sys.argv[1:])),
                machine=machine(b.dev), device=str(b.dev), torch=torch.__version__, threads=torch.get_num_threads(),
                dtype=b.dtype, quick=args.quick, load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    show = args.json != "-"
    if show:
        print(f"# {meta['machine']} | torch {meta['torch']} | {meta['threads']} threads | {b.dtype} | "
              f"load average {meta['load_avg']:.1f} | median and min-max of {b.sz['reps']} timed reps after "
              f"{b.sz['warmup']} warm-up")
        if meta["load_avg"] and meta["load_avg"] > (os.cpu_count() or 1) and not b.cuda:
            print(f"# WARNING: load average {meta['load_avg']:.1f} > {os.cpu_count()} cores: other jobs share the CPU, "
                  f"so these figures are low and noisy; with several torch threads each parallel op waits for "
                  f"descheduled threads (try --threads 1, and compare cpu_s in --json)")
        print(f"{'stage':<10} {'what':<34} {'size':<32} {'dtype':<8} {'batch':>5} {'median':>9} {'min-max':>17} unit")
    t0 = time.perf_counter()
    for stage in STAGES:  # fixed order, whatever order they were asked in
        if stage not in args.stages:
            continue
        if show and b.reduced and stage in REDUCED:
            print(f"# {stage}: sizes reduced for the CPU -- {REDUCED[stage]}")
        torch.manual_seed(0)
        was_reset = b.reset_memory()
        {"clip": bench_clip, "vqgan": bench_vqgan, "gpt-train": bench_gpt_train, "gpt-sample": bench_gpt_sample,
         "fid": bench_fid}[stage](b)
        b.add_memory(stage, was_reset)
    meta["seconds"] = time.perf_counter() - t0
    out = dict(meta=meta, figures=b.rows)
    if show:
        print(f"# total {meta['seconds']:.0f} s")
    if args.json:
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return out


if __name__ == "__main__":
    data.cli(main, get_parser())
