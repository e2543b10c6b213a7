#!/usr/bin/env python3
"""
Inference latency of the PyTorch peer vs context length (issue #6, SPEC section 6.5): batch 1, bf16,
random weights of a preset (default 125m), for full attention, SWA and TTT-E2E:

  prefill_ms   reading a context of T tokens and building the decode state:
                 full: one causal SDPA pass per layer, K/V written into a preallocated cache;
                 swa:  one sliding-window pass per layer (flex_attention, or SDPA band mask), the last k
                       positions kept in a ring buffer;
                 e2e:  prefix blocks over the whole context (SWA), then the suffix mini-batch by mini-batch:
                       forward with the current fast weights, loss, first-order inner gradient, clip, SGD
                       update (every complete mini-batch; T must be a multiple of b);
               full and swa compute the logits of the last position only; e2e computes every position's
               logits (its inner loss needs them).
  decode_ms_per_token   greedy decoding of --decode-tokens tokens after the prefill (token ids stay on the
               GPU; one synchronize at the end), KV cache (full) or window ring buffers (swa, e2e); e2e
               takes an inner step every b decoded tokens (only inside the timed tokens if there are >= b).
  update_ms    (e2e) one decode-time inner step on a full mini-batch of b tokens, timed on its own;
  decode_ms_per_token_amortized = decode_ms_per_token + update_ms / b  (e2e).

  python3 bench/peer/latency.py --preset 125m --variants full,swa,e2e \
      --contexts 1024,2048,4096,8192,16384,32768,65536,131072 --decode-tokens 128
  python3 bench/peer/latency.py --smoke    # tiny config (CPU without CUDA) + cache-correctness checks

Output: one JSON object on the last line of stdout (everything else on stderr). A context that runs out
of memory is recorded with its error, and larger contexts of that variant are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402
from common import DTYPES, emit, error_text, facts, log, median, new_model_on, pick_device, set_precision, sync  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description='prefill and decode latency vs context length')
    p.add_argument('--preset', default='125m', choices=list(M.PRESETS))
    p.add_argument('--variants', default='full,swa,e2e')
    p.add_argument('--contexts', default='1024,2048,4096,8192,16384,32768,65536,131072')
    p.add_argument('--decode-tokens', type=int, default=128)
    p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32', 'fp64'])
    p.add_argument('--repeats', type=int, default=2, help='timed prefills per context (after one warm-up)')
    p.add_argument('--window', type=int, default=None)
    p.add_argument('--mini-batch', type=int, default=None)
    p.add_argument('--no-flex', action='store_true')
    p.add_argument('--smoke', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, 'OutOfMemoryError', None)
    return (oom is not None and isinstance(e, oom)) or 'out of memory' in str(e).lower()


# ---------------------------------------------------------------------------------------------------
# Decode state
# ---------------------------------------------------------------------------------------------------

class FullCache:
    """Every position: [1, H, capacity, Dh] buffers, positions 0..length-1 filled."""

    def __init__(self, shape, dtype, device):
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def fill(self, k, v, T):
        self.k[:, :, :T].copy_(k)
        self.v[:, :, :T].copy_(v)

    def step(self, q, k, v, p, pos_t, window):
        self.k[:, :, p:p + 1].copy_(k)
        self.v[:, :, p:p + 1].copy_(v)
        return M.sdpa(q, self.k[:, :, :p + 1], self.v[:, :, :p + 1], no_cudnn=True)


class RingCache:
    """The last `size` positions in slots pos % size, with each slot's position (-1 = empty)."""

    def __init__(self, shape, dtype, device):
        self.size = shape[2]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((self.size,), -1, dtype=torch.long, device=device)

    def fill(self, k, v, T):
        """k, v [1, H, n, Dh] of positions T-n..T-1 (n may exceed the size: the tail is kept)."""
        n = min(k.shape[2], self.size)
        positions = torch.arange(T - n, T, device=k.device)
        slots = positions % self.size
        self.k.index_copy_(2, slots, k[:, :, k.shape[2] - n:])
        self.v.index_copy_(2, slots, v[:, :, v.shape[2] - n:])
        self.pos.index_copy_(0, slots, positions)

    def step(self, q, k, v, p, pos_t, window):
        slot = p % self.size
        self.k[:, :, slot:slot + 1].copy_(k)
        self.v[:, :, slot:slot + 1].copy_(v)
        self.pos[slot:slot + 1].copy_(pos_t)
        mask = M.band_mask(pos_t, self.pos, window)  # [1, size]
        return M.sdpa(q, self.k, self.v, mask=mask, no_cudnn=True)


class State:
    pass


def new_state(m: M.Model, T: int, extra: int, device, dtype) -> State:
    c = m.c
    st = State()
    H, Dh = c.n_heads, c.head_dim
    st.caches = []
    for l in range(c.n_layers):
        if c.variant == 'full':
            st.caches.append(FullCache((1, H, T + extra, Dh), dtype, device))
        elif c.variant == 'swa' or l < c.suffix_start:
            st.caches.append(RingCache((1, H, c.window, Dh), dtype, device))
        else:
            # suffix of e2e: room for the window before a mini-batch and the mini-batch itself
            st.caches.append(RingCache((1, H, c.window + c.mini_batch, Dh), dtype, device))
    st.pos = 0
    st.pos_t = torch.zeros(1, dtype=torch.long, device=device)
    if c.variant == 'e2e':
        b = c.mini_batch
        st.pending_x = torch.zeros(1, b, c.d_model, dtype=dtype, device=device)
        st.pending_tok = torch.zeros(1, b, dtype=torch.long, device=device)
        st.n_pending = 0
        st.chunk_start = 0
        st.fast = None
    return st


def prefill(m: M.Model, tokens: torch.Tensor, T: int, extra: int, device, dtype) -> State:
    """Reads tokens[:, :T] (tokens has T + 1 entries: the last is the target of position T-1)."""
    c = m.c
    st = new_state(m, T, extra, device, dtype)

    def on_kv(l, k, v):
        st.caches[l].fill(k, v, T)

    x = F.embedding(tokens[:, :T], m.embed)
    if c.variant != 'e2e':
        h = M.run_blocks_seq(m, x, 0, c.n_layers, None, on_kv)
        st.last_logits = M.logits_of(m, h[:, -1:])
    else:
        if T % c.mini_batch:
            raise ValueError(f'e2e prefill: context {T} is not a multiple of the mini-batch {c.mini_batch}')
        xp = M.run_blocks_seq(m, x, 0, c.suffix_start, None, on_kv)
        losses, fast, caches, _ = M.e2e_inner_loop(m, tokens[:, :T], tokens[:, 1:T + 1], prefix_fn=lambda _m, _t: xp,
                                                   ckpt='none', impl='sdpa')
        st.fast = fast
        for j, l in enumerate(range(c.suffix_start, c.n_layers)):
            st.caches[l].fill(caches[2 * j], caches[2 * j + 1], T)
        st.chunk_start = T
        st.last_prefix_x = xp[:, T - c.mini_batch:T]  # for timing a decode-time update (update_ms)
        st.loss = torch.stack(losses).mean()
    st.pos = T
    st.pos_t.fill_(T)
    return st


def learn(m: M.Model, st: State, next_tok: torch.Tensor, c0: int, x_chunk, tok_chunk, commit: bool = True):
    """One inner step on the completed mini-batch [c0, c0 + b): recomputes the suffix on it from the
    window before c0 (ring entries at positions >= c0 are masked out and recomputed), first-order grad."""
    c = m.c
    s = c.suffix_start
    targets = torch.cat([tok_chunk[:, 1:], next_tok], dim=1)
    caches, cache_pos = [], None
    for l in range(s, c.n_layers):
        r = st.caches[l]
        caches += [r.k, r.v]
        cache_pos = torch.where(r.pos >= c0, torch.full_like(r.pos, -1), r.pos)
    with torch.enable_grad():
        fd = [w.detach().requires_grad_(True) for w in st.fast]
        _, new_fast, _, _ = M.mini_batch_step(m, fd, caches, x_chunk, targets, c0, c.inner_lr, True, create_graph=False,
                                              impl='sdpa', cache_pos=cache_pos)
    new_fast = [w.detach() for w in new_fast]
    if commit:
        st.fast = new_fast
    return new_fast


def decode_step(m: M.Model, st: State, tok: torch.Tensor) -> torch.Tensor:
    """Reads token `tok` [1, 1] at position st.pos; returns logits [1, 1, V]."""
    c = m.c
    if c.variant == 'e2e' and st.n_pending == c.mini_batch:
        learn(m, st, tok, st.chunk_start, st.pending_x, st.pending_tok)
        st.chunk_start = st.pos
        st.n_pending = 0
    p = st.pos
    x = F.embedding(tok, m.embed)
    s = c.suffix_start
    for l in range(c.n_layers):
        blk = m.blocks[l]
        if c.variant == 'e2e' and l == s:
            st.pending_x[:, st.n_pending:st.n_pending + 1].copy_(x)
            st.pending_tok[:, st.n_pending:st.n_pending + 1].copy_(tok)
        q, k, v = M.qkv(m, blk, M._pre(c, x, blk.seq_norm), p)
        o = st.caches[l].step(q, k, v, p, st.pos_t, None if c.variant == 'full' else c.window)
        x = x + M._post(c, torch.matmul(M.merge_heads(o), blk.wo), blk.seq_post_norm)
        f = st.fast[3 * (l - s):3 * (l - s) + 3] if (c.variant == 'e2e' and l >= s) else None
        x = M.mlp_tail(m, l, x, f)
    if c.variant == 'e2e':
        st.n_pending += 1
    st.pos += 1
    st.pos_t += 1
    return M.logits_of(m, x)


def time_decode(m, st, first_tok, n: int, device, warm: int = 4) -> float:
    tok = first_tok
    for _ in range(warm):
        tok = decode_step(m, st, tok).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = decode_step(m, st, tok).argmax(-1)
    sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def time_update(m, st, tokens, T, device, reps: int = 3) -> float:
    """A decode-time inner step on the last mini-batch of the context (result discarded)."""
    b = m.c.mini_batch
    args = (tokens[:, T:T + 1], T - b, st.last_prefix_x, tokens[:, T - b:T])
    learn(m, st, *args, commit=False)
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        learn(m, st, *args, commit=False)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return median(ts) * 1e3


def run(args, device) -> dict:
    dtype = DTYPES[args.dtype]
    set_precision(args.dtype)
    contexts = [int(x) for x in args.contexts.split(',') if x]
    variants = [v for v in args.variants.split(',') if v]
    res = dict(preset=args.preset, dtype=args.dtype, batch=1, decode_tokens=args.decode_tokens, contexts=contexts, **facts(device))
    flex_on, reason = M.init_flex(device, dtype, enable=not args.no_flex)
    res['flex_available'] = flex_on
    if reason:
        res['flex_reason'] = reason
    rows = []
    extra = args.decode_tokens + 8
    for variant in variants:
        c = M.make_config(args.preset, variant, window=args.window, mini_batch=args.mini_batch)
        torch.manual_seed(args.seed)
        m = new_model_on(device, lambda: M.Model(c, max_positions=max(contexts) + extra + 1)).cast_(dtype)
        for p in m.parameters():
            p.requires_grad_(False)
        M.ATTN_PATH.clear()
        skip = None
        for T in contexts:
            row = dict(variant=variant, context=T)
            if skip:
                row['error'] = f'skipped after {skip}'
                rows.append(row)
                continue
            try:
                g = torch.Generator(device='cpu').manual_seed(args.seed + T)
                tokens = torch.randint(0, c.vocab_size, (1, T + 1), generator=g).to(device)
                if variant != 'full':
                    M.prepare_swa(T, c.window, device)
                ctx = torch.no_grad() if variant == 'e2e' else torch.inference_mode()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                with ctx:
                    prefill(m, tokens, T, extra, device, dtype)  # warm-up (compiles flex kernels for this length)
                    ts = []
                    st = None
                    for _ in range(max(1, args.repeats)):
                        st = None
                        sync(device)
                        t0 = time.perf_counter()
                        st = prefill(m, tokens, T, extra, device, dtype)
                        sync(device)
                        ts.append(time.perf_counter() - t0)
                    row['prefill_ms'] = median(ts) * 1e3
                    row['prefill_ms_all'] = [t * 1e3 for t in ts]
                    row['prefill_tokens_per_s'] = T / median(ts)
                    if variant == 'e2e':
                        row['update_ms'] = time_update(m, st, tokens, T, device)
                        row['prefill_loss'] = st.loss.item()
                    row['decode_ms_per_token'] = time_decode(m, st, tokens[:, T:T + 1], args.decode_tokens, device)
                    if variant == 'e2e':
                        row['decode_ms_per_token_amortized'] = row['decode_ms_per_token'] + row['update_ms'] / c.mini_batch
                if device.type == 'cuda':
                    row['peak_memory_gb'] = torch.cuda.max_memory_allocated() / 1e9
                log(f'{variant} T={T}: ' + ', '.join(f'{k} {v:.3f}' for k, v in row.items() if isinstance(v, float)))
            except Exception as e:  # noqa: BLE001
                row['error'] = error_text(e)
                if _is_oom(e):
                    row['oom'] = True
                    skip = f'OOM at {T}'
                st = None
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            rows.append(row)
        res.setdefault('attention_path', {})[variant] = dict(M.ATTN_PATH)
        del m
    res['results'] = rows
    return res


# ---------------------------------------------------------------------------------------------------
# --smoke: cache correctness on a tiny fp64 model, then a tiny latency run
# ---------------------------------------------------------------------------------------------------

def smoke_checks(device) -> dict:
    out = {}
    saved = M._FLEX.get('enabled')
    M._FLEX['enabled'] = False
    try:
        for variant in M.VARIANTS:
            torch.manual_seed(0)
            c = M.make_config('tiny', variant, window=24, mini_batch=8, vocab_size=50)
            m = M.Model(c, 256).cast_(torch.float64)
            for p in m.parameters():
                p.requires_grad_(False)
            T, n = 32, 20  # decode n teacher-forced tokens after a prefill of T (crosses 2 e2e mini-batches)
            tokens = torch.randint(0, 50, (1, T + n + 1))
            with torch.no_grad():
                st = prefill(m, tokens, T, n + 8, torch.device('cpu'), torch.float64)
                dec = []
                for i in range(n):
                    lg = decode_step(m, st, tokens[:, T + i:T + i + 1])
                    dec.append(-torch.log_softmax(lg[0, 0], -1)[tokens[0, T + i + 1]].item())
                # reference: the whole sequence at once
                if variant == 'e2e':
                    _, _, _, nll = M.e2e_inner_loop(m, tokens[:, :-1], tokens[:, 1:], ckpt='none', return_nll=True)
                    ref = nll[0, T:T + n].tolist()
                else:
                    x = F.embedding(tokens[:, :-1], m.embed)
                    nll = M.token_nll(M.logits_of(m, M.run_blocks_seq(m, x, 0, c.n_layers)), tokens[:, 1:])
                    ref = nll[0, T:T + n].tolist()
                if variant != 'e2e':
                    pl = -torch.log_softmax(st_last(m, tokens, T), -1)[tokens[0, T]].item()
                    out[f'{variant}_prefill_last_logits'] = dict(diff=abs(pl - nll[0, T - 1].item()), ok=abs(pl - nll[0, T - 1].item()) < 1e-9)
            d = max(abs(a - b) for a, b in zip(dec, ref))
            out[f'{variant}_decode_equals_full_sequence'] = dict(max_nll_diff=d, ok=d < 1e-9)
    finally:
        M._FLEX['enabled'] = saved
    return out


def st_last(m, tokens, T):
    with torch.no_grad():
        st = prefill(m, tokens, T, 4, torch.device('cpu'), torch.float64)
    return st.last_logits[0, 0]


def main(argv=None) -> int:
    args = parse(argv)
    res = dict(preset=args.preset)
    try:
        device = pick_device(args.smoke)
        if args.smoke:
            checks = {}
            try:
                checks = smoke_checks(device)
            except Exception as e:  # noqa: BLE001
                checks = dict(error=error_text(e))
            a = parse(['--preset', 'tiny', '--contexts', '64,128', '--decode-tokens', '40',
                       '--dtype', args.dtype if device.type == 'cuda' else 'fp32'])
            res = run(a, device)
            res['smoke'] = True
            res['checks'] = checks
            res['ok'] = 'error' not in checks and all(v.get('ok') for v in checks.values()) \
                and all('error' not in r for r in res['results'])
        else:
            res = run(args, device)
    except Exception as e:  # noqa: BLE001
        res['error'] = error_text(e)
    emit(res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
