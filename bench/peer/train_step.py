#!/usr/bin/env python3
"""
Training-step throughput of the PyTorch peer (issue #6): forward + backward of the training objective
(plain LM loss for full / swa; the TTT-E2E outer loss, second order through the inner steps, for e2e),
optionally with an AdamW step, timed with torch.cuda.synchronize; median ms, tokens/s, model FLOPs per
token, TFLOP/s and MFU against a measured GEMM peak.

  python3 bench/peer/train_step.py --preset small --variant swa --seq 2048 --batch 1 --dtype bf16 \
      --mode eager --steps 10 --warmup 3
  python3 bench/peer/train_step.py --measure-peak
  python3 bench/peer/train_step.py --smoke          # tiny config (CPU without CUDA) + correctness checks

Output: one JSON object on the last line of stdout; everything else goes to stderr. Failures (OOM,
torch.compile refusing the second-order e2e step, ...) are reported as {"error": "..."} in that object.

Model FLOPs per token (no recomputation counted; D d_model, F MLP width, L layers, V vocabulary,
Ls = suffix (prime-MLP) blocks, Lp = L - Ls, keys = mean over positions p of min(p + 1, k) (k = T for
full attention): the band actually attended, not the kernel's block-rounded work):
    N_block = 4 D^2 + 3 D F            matmul weights of one block (Wq, Wk, Wv, Wo, W1, W2, W3)
    N_head  = V D                      tied output projection (counted: it is a real matmul; the embedding
                                       lookup is not); norms, RoPE, softmax, loss: not counted
    A       = 4 D keys                 attention forward per layer and token (q k^T and p v)
  full / swa:
    flops = 6 (L N_block + N_head) + 3 L A
          = 6 N_params_non_embedding(matmul) + 6 N_head + attention fwd+bwd
  e2e:
    prefix  = 6 Lp N_block + 3 Lp A
    fwd     = 2 (Ls (N_block + N_prime) + N_head) + Ls A,            N_prime = 3 D F
    inner   = 2 (Ls (N_block + N_prime) + N_head) + 2 Ls N_prime + 2 Ls A
              (the inner gradient: input-gradients of every suffix matmul, weight-gradients of the prime
               MLPs only, attention backward ~2x its forward)
    flops   = prefix + 3 (fwd + inner)
              (the outer step is forward + backward of a graph that holds the suffix forward and the inner
               gradient: ~3x its cost); the "inner-loop extra" over a plain model is 3 (fwd + inner) - 3 fwd.
  MFU = flops * tokens/s / peak, peak = best measured torch.matmul 8192^3 rate in the run's precision
  (bf16; fp32 with TF32 off, like our CUDA backend's CUBLAS_DEFAULT_MATH).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import model as M  # noqa: E402
from common import (DTYPES, emit, error_text, facts, gemm_tflops, log, median, new_model_on, peak_for,  # noqa: E402
                    pick_device, set_precision, sync)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='small', choices=list(M.PRESETS))
    p.add_argument('--variant', default='swa', choices=list(M.VARIANTS))
    p.add_argument('--seq', type=int, default=2048)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32', 'fp64'])
    p.add_argument('--mode', default='eager', choices=['eager', 'compile'])
    p.add_argument('--compile-mode', default=None, help='torch.compile mode (default: its default)')
    p.add_argument('--e2e-compile-scope', default='prefix', choices=['prefix', 'all'],
                   help="e2e under --mode compile: 'prefix' compiles embedding + prefix blocks (the suffix's "
                        "second-order inner loop stays eager: AOTAutograd has no double backward); 'all' tries "
                        "torch.compile on the whole outer loss")
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--adamw', action='store_true', help='include an AdamW step (+ global-norm clip 1.0) in each timed step')
    p.add_argument('--ckpt', default='manual', choices=['manual', 'torch', 'none'],
                   help='e2e per-mini-batch checkpointing: our autograd.Function (default), '
                        'torch.utils.checkpoint(use_reentrant=False), or none (all graphs kept)')
    p.add_argument('--skip-last-update', action='store_true',
                   help='e2e: no inner update after the last mini-batch (ours computes it and throws it away)')
    p.add_argument('--no-flex', action='store_true', help='SWA through SDPA with a band mask instead of flex_attention')
    p.add_argument('--ilr-scale', type=float, default=1.0, help='inner-lr multiplier (ilr warm-up); 1 = base lr 1.0')
    p.add_argument('--window', type=int, default=None, help='override the preset window k')
    p.add_argument('--mini-batch', type=int, default=None, help='override the preset mini-batch b')
    p.add_argument('--peak-tflops', type=float, default=None, help='peak for MFU (default: measured now)')
    p.add_argument('--peak-n', type=int, default=8192)
    p.add_argument('--measure-peak', action='store_true', help='only measure GEMM peaks (bf16, fp32 TF32-off, tf32)')
    p.add_argument('--smoke', action='store_true', help='tiny config, CPU if no CUDA, all variants, plus correctness checks')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def build(args, device, dtype):
    c = M.make_config(args.preset, args.variant, window=args.window, mini_batch=args.mini_batch)
    torch.manual_seed(args.seed)
    m = new_model_on(device, lambda: M.Model(c, max_positions=args.seq))
    return c, m.cast_(dtype)


def bench_one(args, device) -> dict:
    dtype = DTYPES[args.dtype]
    set_precision(args.dtype)
    res = dict(preset=args.preset, variant=args.variant, seq=args.seq, batch=args.batch, dtype=args.dtype, mode=args.mode,
               **facts(device))
    c, m = build(args, device, dtype)
    res['config'] = c.as_dict()
    res['params'] = m.param_counts()
    res['precision'] = f'pure {args.dtype}: parameters, activations and fast weights in {args.dtype}; norms, softmax, loss reduce in fp32'
    flex_on, flex_reason = M.init_flex(device, dtype, enable=not args.no_flex)
    res['flex_available'] = flex_on
    if flex_reason:
        res['flex_reason'] = flex_reason
    M.ATTN_PATH.clear()
    if c.variant != 'full':
        M.prepare_swa(args.seq, c.window, device)

    g = torch.Generator(device='cpu').manual_seed(args.seed + 1)
    tokens = torch.randint(0, c.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inp, tgt = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    kw = dict(ilr_scale=args.ilr_scale, ckpt=args.ckpt, update_last=not args.skip_last_update)
    if c.variant == 'e2e':
        res['ckpt'] = args.ckpt
        if args.mode == 'compile' and args.e2e_compile_scope == 'prefix':
            cp = torch.compile(lambda t: M.prefix_forward(m, t), mode=args.compile_mode)
            kw['prefix_fn'] = lambda _m, t: cp(t)
            res['compile_scope'] = 'embedding + prefix blocks (suffix inner loop eager)'
        loss_fn = lambda a, b: M.e2e_outer_loss(m, a, b, **kw)  # noqa: E731
        if args.mode == 'compile' and args.e2e_compile_scope == 'all':
            loss_fn = torch.compile(loss_fn, mode=args.compile_mode)
            res['compile_scope'] = 'whole outer loss'
    else:
        loss_fn = lambda a, b: M.lm_loss(m, a, b)  # noqa: E731
        if args.mode == 'compile':
            loss_fn = torch.compile(loss_fn, mode=args.compile_mode)
            res['compile_scope'] = 'whole loss'

    params = list(m.parameters())
    opt = None
    if args.adamw:
        try:
            opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == 'cuda')
        except (TypeError, RuntimeError):
            opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        res['adamw'] = True

    def step():
        for p in params:
            p.grad = None
        loss = loss_fn(inp, tgt)
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return loss

    times = []
    t_first = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            t_first = dt
        if i >= args.warmup:
            times.append(dt)
        log(f'step {i}: {dt * 1e3:.2f} ms, loss {loss.item():.4f}')
    ms = median(times) * 1e3
    ntok = args.batch * args.seq
    fl = M.flops_per_token(c, args.seq)
    tps = ntok / (ms / 1e3)
    tflops = fl['total'] * tps / 1e12
    peak = args.peak_tflops if args.peak_tflops else peak_for(device, args.dtype, args.peak_n)
    res.update(ms_median=ms, ms_min=min(times) * 1e3, ms_all=[t * 1e3 for t in times], first_step_s=t_first,
               tokens_per_s=tps, flops_per_token=fl['total'], flops_breakdown=fl, tflops=tflops, peak_tflops=peak,
               mfu=tflops / peak, loss=loss.item(),
               attention_path=M.describe_attention(c, args.seq),
               attention_path_observed=dict(M.ATTN_PATH) or None,
               peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == 'cuda' else None)
    return res


# ---------------------------------------------------------------------------------------------------
# --smoke: correctness checks on a tiny config (fp64 on CPU) and a short run of each variant
# ---------------------------------------------------------------------------------------------------

def smoke_checks(device) -> dict:
    out = {}
    torch.manual_seed(0)
    c = M.make_config('tiny', 'e2e', window=24, mini_batch=8, vocab_size=50)
    m = M.Model(c, 256).cast_(torch.float64)
    B, T = 2, 40
    tok = torch.randint(0, 50, (B, T))
    tgt = torch.randint(0, 50, (B, T))
    saved = M._FLEX.get('enabled')
    M._FLEX['enabled'] = False  # the CPU/fp64 checks run the SDPA / math paths
    try:
        # 1. With lr 0 the mini-batch loop with window caches equals one SWA forward of the whole sequence.
        c.inner_lr = 0.0
        a = M.e2e_outer_loss(m, tok, tgt, ckpt='none').item()
        b = M.lm_loss(m, tok, tgt).item()
        out['lr0_inner_loop_equals_lm_loss'] = dict(diff=abs(a - b), ok=abs(a - b) < 1e-10)
        c.inner_lr = 1.0

        # 2. Checkpointed outer gradients equal the un-checkpointed ones.
        def grads(ckpt):
            m.zero_grad(set_to_none=True)
            L = M.e2e_outer_loss(m, tok, tgt, ckpt=ckpt)
            L.backward()
            return L.item(), [p.grad.clone() for p in m.parameters()]

        L0, g0 = grads('none')
        for ck in ('manual', 'torch'):
            try:
                L1, g1 = grads(ck)
                d = max((x - y).abs().max().item() for x, y in zip(g0, g1))
                out[f'ckpt_{ck}_equals_none'] = dict(max_abs_grad_diff=d, ok=d < 1e-10 and abs(L0 - L1) < 1e-12)
            except Exception as e:  # noqa: BLE001
                # informational for 'torch' (old versions refuse autograd.grad inside non-reentrant checkpoint)
                out[f'ckpt_{ck}_equals_none'] = dict(ok=False if ck == 'manual' else None, error=f'{type(e).__name__}: {str(e)[:300]}')

        # 3. Second-order outer gradient against central finite differences along a random direction.
        gen = torch.Generator().manual_seed(1)
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in m.parameters()]
        analytic = sum((g * d).sum().item() for g, d in zip(g0, dirs))
        eps = 1e-6
        with torch.no_grad():
            for p, d in zip(m.parameters(), dirs):
                p.add_(eps * d)
            lp = M.e2e_outer_loss(m, tok, tgt).item()
            for p, d in zip(m.parameters(), dirs):
                p.sub_(2 * eps * d)
            lm_ = M.e2e_outer_loss(m, tok, tgt).item()
            for p, d in zip(m.parameters(), dirs):
                p.add_(eps * d)
        fd = (lp - lm_) / (2 * eps)
        c.first_order = True
        _, g_fo = grads('none')
        c.first_order = False
        first_order = sum((g * d).sum().item() for g, d in zip(g_fo, dirs))
        rel = abs(fd - analytic) / max(1e-12, abs(fd))
        out['second_order_vs_finite_difference'] = dict(analytic=analytic, finite_difference=fd, rel_err=rel,
                                                        first_order_would_give=first_order, ok=rel < 1e-5)

        # 4. Sliding-window attention: chunked SDPA band mask == math reference.
        q, k, v = (torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64) for _ in range(3))
        pos = torch.arange(300)
        ref = M.math_attention(q, k, v, M.band_mask(pos, pos, 50))
        got = M.swa_attention_seq(q, k, v, 50, chunk=128)
        out['swa_chunked_band_equals_math'] = dict(diff=(ref - got).abs().max().item(), ok=(ref - got).abs().max().item() < 1e-10)
    finally:
        M._FLEX['enabled'] = saved

    # 5. flex_attention SWA == SDPA band mask on the GPU (bf16 model loss).
    if device.type == 'cuda':
        try:
            on, reason = M.init_flex(device, torch.bfloat16)
            if on:
                torch.manual_seed(0)
                c2 = M.make_config('mini', 'swa')
                m2 = M.Model(c2, 512).to(device).cast_(torch.float32)
                t2 = torch.randint(0, c2.vocab_size, (2, 513), device=device)
                with torch.no_grad():
                    a = M.lm_loss(m2, t2[:, :-1], t2[:, 1:]).item()
                    M._FLEX['enabled'] = False
                    b = M.lm_loss(m2, t2[:, :-1], t2[:, 1:]).item()
                    M._FLEX['enabled'] = True
                out['flex_equals_sdpa_band_fp32'] = dict(diff=abs(a - b), ok=abs(a - b) < 1e-4)
            else:
                out['flex_equals_sdpa_band_fp32'] = dict(ok=None, skipped=reason)
        except Exception as e:  # noqa: BLE001
            out['flex_equals_sdpa_band_fp32'] = dict(ok=False, error=f'{type(e).__name__}: {str(e)[:300]}')
    return out


def smoke(args, device) -> dict:
    res = dict(smoke=True, **facts(device))
    try:
        res['checks'] = smoke_checks(device)
    except Exception as e:  # noqa: BLE001
        res['checks'] = dict(error=error_text(e))
    runs = []
    for variant in M.VARIANTS:
        a = parse(['--preset', 'tiny', '--variant', variant, '--seq', '128', '--batch', '2', '--steps', '2', '--warmup', '1',
                   '--dtype', args.dtype if device.type == 'cuda' else 'fp32', '--mode', args.mode, '--peak-n', '1024'])
        try:
            r = bench_one(a, device)
            runs.append({k: r[k] for k in ('variant', 'mode', 'dtype', 'ms_median', 'tokens_per_s', 'mfu', 'loss', 'attention_path')})
        except Exception as e:  # noqa: BLE001
            runs.append(dict(variant=variant, error=error_text(e)))
    res['runs'] = runs
    checks = res['checks']
    res['ok'] = all(v.get('ok') is not False for v in checks.values() if isinstance(v, dict)) and 'error' not in checks \
        and all('error' not in r for r in runs)
    return res


def measure_peak(args, device) -> dict:
    res = dict(measure_peak=True, **facts(device))
    n = args.peak_n if device.type == 'cuda' else 512
    res['bf16'] = gemm_tflops(device, torch.bfloat16, n)
    res['fp32_tf32_off'] = gemm_tflops(device, torch.float32, n, iters=3, reps=3, tf32=False)
    if device.type == 'cuda':
        res['fp32_tf32_on'] = gemm_tflops(device, torch.float32, n, tf32=True)
    res['peak_tflops'] = dict(bf16=res['bf16']['best_tflops'], fp32=res['fp32_tf32_off']['best_tflops'])
    return res


def main(argv=None) -> int:
    args = parse(argv)
    res = dict(preset=args.preset, variant=args.variant, seq=args.seq, batch=args.batch, dtype=args.dtype, mode=args.mode)
    try:
        device = pick_device(args.smoke)
        if args.smoke:
            res = smoke(args, device)
        elif args.measure_peak:
            res = measure_peak(args, device)
        else:
            res = bench_one(args, device)
    except Exception as e:  # noqa: BLE001
        res['error'] = error_text(e)
        try:
            if torch.cuda.is_available():
                res['peak_memory_gb'] = torch.cuda.max_memory_allocated() / 1e9
                res.update({k: v for k, v in facts(torch.device('cuda')).items() if k not in res})
        except Exception:  # noqa: BLE001
            pass
    emit(res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
