"""
PyTorch peer of our TypeScript model (src/model/config.ts, transformer.ts, ttt-e2e.ts,
mixers/attention.ts, src/nn/layers.ts), for benchmarks only (issue #6).

What it mirrors, piece by piece:
  * tied token embedding E [V, D]; logits = RMSNorm(h) @ E^T; mean next-token cross-entropy;
  * nLayers blocks:  x += Post(Attn(Pre(x)));  [x += Post'(MLP'(Pre'(x))) with fast weights];
    x += Post(MLP(Pre(x)))  -- "sandwich" RMSNorm (eps 1e-6, no biases), pre/post switchable;
  * attention: Wq, Wk, Wv, Wo [D, D] applied as x @ W (weights stored [in, out] like ours),
    QK-norm (RMSNorm over head_dim, before RoPE), RoPE on interleaved pairs (x[2i], x[2i+1]) rotated by
    pos * theta^(-2i/Dh) (theta 500000), scale 1/sqrt(Dh); causal full, or sliding window k: a query at
    p sees keys at p-k+1 .. p;
  * SwiGLU MLP: W2 (silu(W1 x) * W3 x), W1/W3 [D, F], W2 [F, D];
  * init: N(0, 0.02) truncated at 2 sigma, norm gains 1;
  * e2e: the last suffix_len = round(L/4) blocks carry a prime MLP (own pre/post norms) between
    attention and the safe MLP; its weights W are the fast weights. The inner loop (ttt-e2e.ts
    innerLoop/miniBatchStep): prefix blocks once over the whole sequence (SWA), then per mini-batch of b
    tokens: suffix blocks with W_{i-1} and the window KV cache of the previous k-1 positions, loss_i =
    mean NLL of the mini-batch (per sequence), g = grad of sum-over-sequences loss w.r.t. W, clipped to
    global norm 1 per sequence, W_i = W_{i-1} - lr * g; outer loss = mean_i loss_i, differentiated through
    every inner step (second order); the mini-batch step is checkpointed (recomputed in backward).

Only 'full', 'swa' and 'e2e' are implemented.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, asdict
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Config (copied from src/model/config.ts PRESETS)
# ---------------------------------------------------------------------------------------------------

PRESETS = {
    'tiny': dict(n_layers=2, d_model=64, n_heads=4, ffn=128, ffn_e2e=104, window=32, mini_batch=16, vocab_size=256),
    'mini': dict(n_layers=4, d_model=128, n_heads=4, ffn=384, ffn_e2e=320, window=64, mini_batch=32, vocab_size=256),
    'small': dict(n_layers=12, d_model=512, n_heads=8, ffn=1408, ffn_e2e=1152, window=1024, mini_batch=256, vocab_size=50257),
    '125m': dict(n_layers=12, d_model=768, n_heads=12, ffn=2048, ffn_e2e=1664, window=8192, mini_batch=1024, vocab_size=128256),
    '350m': dict(n_layers=24, d_model=1024, n_heads=16, ffn=2736, ffn_e2e=2240, window=8192, mini_batch=1024, vocab_size=128256),
    '760m': dict(n_layers=24, d_model=1536, n_heads=16, ffn=4096, ffn_e2e=3328, window=8192, mini_batch=1024, vocab_size=128256),
    '1b': dict(n_layers=24, d_model=2048, n_heads=32, ffn=5504, ffn_e2e=4480, window=8192, mini_batch=1024, vocab_size=128256),
}

VARIANTS = ('full', 'swa', 'e2e')


@dataclass
class Config:
    name: str
    variant: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    window: int
    mini_batch: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    pre_norm: bool = True
    post_norm: bool = True
    qk_norm: bool = True
    init_std: float = 0.02
    suffix_len: int = 0
    inner_lr: float = 1.0
    inner_clip: float = 1.0
    first_order: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def suffix_start(self) -> int:
        return self.n_layers - self.suffix_len

    def as_dict(self) -> dict:
        return asdict(self)


def make_config(preset: str, variant: str, **overrides) -> Config:
    """Like preset() in config.ts: e2e takes the ffnE2E width; suffix_len = max(1, round(L/4)) for e2e."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}' (this peer implements {', '.join(VARIANTS)})")
    p = PRESETS[preset]
    ttt = variant == 'e2e'
    kw = dict(name=preset, variant=variant, vocab_size=p['vocab_size'], d_model=p['d_model'], n_layers=p['n_layers'],
              n_heads=p['n_heads'], ffn_dim=p['ffn_e2e'] if ttt else p['ffn'], window=p['window'], mini_batch=p['mini_batch'])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if 'suffix_len' not in overrides or overrides['suffix_len'] is None:
        # Math.round in JS rounds .5 up; Python's round() would round half to even.
        kw['suffix_len'] = max(1, int(math.floor(kw['n_layers'] / 4 + 0.5))) if ttt else 0
    c = Config(**kw)
    if c.d_model % c.n_heads or c.head_dim % 2:
        raise ValueError(f'bad heads: d_model {c.d_model}, heads {c.n_heads}')
    if ttt and c.window < c.mini_batch:
        raise ValueError(f'window {c.window} must be >= mini_batch {c.mini_batch} for TTT-E2E')
    if c.suffix_len > c.n_layers:
        raise ValueError('suffix_len exceeds n_layers')
    return c


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------

def _normal(shape, std) -> nn.Parameter:
    t = torch.empty(*shape)
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)
    return nn.Parameter(t)


def _ones(n) -> nn.Parameter:
    return nn.Parameter(torch.ones(n))


class Block(nn.Module):
    def __init__(self, c: Config, has_prime: bool):
        super().__init__()
        D, Fd, s = c.d_model, c.ffn_dim, c.init_std
        self.wq, self.wk, self.wv, self.wo = (_normal((D, D), s) for _ in range(4))
        self.q_norm, self.k_norm = _ones(c.head_dim), _ones(c.head_dim)
        self.seq_norm, self.seq_post_norm = _ones(D), _ones(D)
        self.mlp_norm, self.mlp_post_norm = _ones(D), _ones(D)
        self.w1, self.w2, self.w3 = _normal((D, Fd), s), _normal((Fd, D), s), _normal((D, Fd), s)
        self.has_prime = has_prime
        if has_prime:
            self.prime_norm, self.prime_post_norm = _ones(D), _ones(D)


class Model(nn.Module):
    """Parameters of every variant. `fast` holds W_0: [w1, w2, w3] for each suffix block, flattened."""

    def __init__(self, c: Config, max_positions: int = 8192):
        super().__init__()
        self.c = c
        self.embed = _normal((c.vocab_size, c.d_model), c.init_std)
        self.blocks = nn.ModuleList([Block(c, l >= c.suffix_start and c.suffix_len > 0) for l in range(c.n_layers)])
        self.final_norm = _ones(c.d_model)
        fast = []
        for _ in range(c.suffix_len):
            fast += [_normal((c.d_model, c.ffn_dim), c.init_std), _normal((c.ffn_dim, c.d_model), c.init_std),
                     _normal((c.d_model, c.ffn_dim), c.init_std)]
        self.fast = nn.ParameterList(fast)
        self.max_positions = 0
        self.rope_dtype = torch.float32
        self.register_buffer('rope_cos', torch.zeros(0), persistent=False)
        self.register_buffer('rope_sin', torch.zeros(0), persistent=False)
        self.ensure_positions(max_positions)

    def ensure_positions(self, n: int) -> None:
        """RoPE tables cos/sin [n, 1, Dh/2] in the parameters' dtype, angles computed in fp64 (ours: Float64
        on the host, then the tensor's dtype)."""
        if n <= self.max_positions:
            return
        Dh = self.c.head_dim
        dev = self.embed.device
        i = torch.arange(Dh // 2, dtype=torch.float64, device=dev)
        inv = self.c.rope_theta ** (-2.0 * i / Dh)
        ang = torch.arange(n, dtype=torch.float64, device=dev)[:, None] * inv[None, :]
        self.rope_cos = torch.cos(ang).to(self.rope_dtype)[:, None, :].contiguous()
        self.rope_sin = torch.sin(ang).to(self.rope_dtype)[:, None, :].contiguous()
        self.max_positions = n

    def cast_(self, dtype: torch.dtype) -> 'Model':
        """Parameters (and RoPE tables) to dtype: pure low precision, as our engine does with bf16 params."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        self.rope_dtype = dtype
        n, self.max_positions = self.max_positions, 0
        self.ensure_positions(n)
        return self

    def param_counts(self) -> dict:
        c = self.c
        D, Fd, L = c.d_model, c.ffn_dim, c.n_layers
        matmul_layer = 4 * D * D + 3 * D * Fd
        return dict(
            total=sum(p.numel() for p in self.parameters()),
            embedding=c.vocab_size * D,
            non_embedding=sum(p.numel() for p in self.parameters()) - c.vocab_size * D,
            matmul_non_embedding=L * matmul_layer + c.suffix_len * 3 * D * Fd,
            prime=c.suffix_len * 3 * D * Fd,
        )


# ---------------------------------------------------------------------------------------------------
# Layers (src/nn/layers.ts)
# ---------------------------------------------------------------------------------------------------

def _up(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats to fp32 for reductions; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w in x's dtype, like ours (torch's mean accumulates bf16 in fp32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """W2 (silu(W1 x) * W3 x); weights [in, out] or batched [B, in, out] (fast weights, one copy per sequence)."""
    return torch.matmul(F.silu(torch.matmul(x, w1)) * torch.matmul(x, w3), w2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dh]; pairs (x[2i], x[2i+1]) rotated: (e cos - o sin, e sin + o cos); cos/sin [T, 1, Dh/2]
    in x's dtype (ours builds them in the tensor's dtype too)."""
    xf = x.unflatten(-1, (-1, 2))
    e, o = xf[..., 0], xf[..., 1]
    return torch.stack((e * cos - o * sin, e * sin + o * cos), dim=-1).flatten(-2)


def _pre(c: Config, x, w):
    return rms_norm(x, w, c.norm_eps) if c.pre_norm else x


def _post(c: Config, x, w):
    return rms_norm(x, w, c.norm_eps) if c.post_norm else x


def logits_of(m: Model, h: torch.Tensor) -> torch.Tensor:
    return torch.matmul(rms_norm(h, m.final_norm, m.c.norm_eps), m.embed.t())


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T] (logsumexp - picked), computed in fp32."""
    B, T, V = logits.shape
    return F.cross_entropy(_up(logits).reshape(B * T, V), targets.reshape(B * T), reduction='none').view(B, T)


# ---------------------------------------------------------------------------------------------------
# Attention kernels. ATTN_PATH records which path ran (reported by the benchmarks).
# ---------------------------------------------------------------------------------------------------

ATTN_PATH: dict = {}
_FLEX: dict = {'enabled': None, 'reason': None}
_BLOCK_MASKS: dict = {}
HAS_SDPA = hasattr(F, 'scaled_dot_product_attention')


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:
        try:
            return bool(torch._dynamo.is_compiling())
        except Exception:
            return False


def _record(kind: str, path: str) -> None:
    if not _is_compiling():
        ATTN_PATH[kind] = path


def init_flex(device: torch.device, dtype: torch.dtype, enable: bool = True) -> Tuple[bool, Optional[str]]:
    """Tries flex_attention (imported here, compiled) on a small sliding-window problem, forward and
    backward, against the SDPA band mask; on any failure SWA falls back to SDPA with a band mask."""
    _FLEX['enabled'] = False
    if not enable:
        _FLEX['reason'] = 'disabled by flag'
        return False, _FLEX['reason']
    if device.type != 'cuda':
        _FLEX['reason'] = 'not on CUDA'
        return False, _FLEX['reason']
    try:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask  # noqa: F401
        _FLEX['flex'] = flex_attention
        _FLEX['flex_compiled'] = torch.compile(flex_attention, dynamic=False)
        _FLEX['create_block_mask'] = create_block_mask
        _FLEX['enabled'] = True
        g = torch.Generator(device='cpu').manual_seed(0)
        q, k, v = (torch.randn(1, 2, 512, 64, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        out = swa_attention_seq(q, k, v, 100)
        out.float().sum().backward()
        _FLEX['enabled'] = False
        ref = swa_attention_seq(q.detach(), k.detach(), v.detach(), 100)
        err = (out.detach().float() - ref.float()).abs().max().item()
        if not err < (5e-2 if dtype == torch.bfloat16 else 1e-3):
            raise RuntimeError(f'flex_attention disagrees with the SDPA band mask (max abs err {err})')
        _FLEX['enabled'] = True
        _FLEX['reason'] = None
    except Exception as e:  # noqa: BLE001
        _FLEX['enabled'] = False
        _FLEX['reason'] = f'{type(e).__name__}: {str(e)[:300]}'
    ATTN_PATH.pop('swa', None)
    return bool(_FLEX['enabled']), _FLEX['reason']


def _block_mask(T: int, window: int, device):
    key = (T, window)  # one device per run
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        cbm = _FLEX['create_block_mask']

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        try:
            bm = cbm(sliding, None, None, T, T, device=device, _compile=True)
        except TypeError:
            bm = cbm(sliding, None, None, T, T, device=device)
        _BLOCK_MASKS[key] = bm
    return bm


def prepare_swa(T: int, window: int, device) -> None:
    """Builds the block mask outside any compiled region (call before torch.compile'd code runs)."""
    if _FLEX.get('enabled'):
        _block_mask(T, window, device)


def band_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """[Tq, Tk] bool: key visible iff valid (kpos >= 0), causal, and within the window (qp - kp < k)."""
    d = qpos[:, None] - kpos[None, :]
    m = (d >= 0) & (kpos[None, :] >= 0)
    if window is not None:
        m = m & (d < window)
    return m


def math_attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v from plain differentiable ops (twice differentiable)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float('-inf'))
    p = torch.softmax(_up(s), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def _no_cudnn():
    """SDPA without the cuDNN backend: it builds a plan per new shape (milliseconds of CPU per call), which
    is ruinous for decoding (a new key length every token) and for masked mini-batch attention."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext()


def sdpa(q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = False, no_cudnn: bool = False) -> torch.Tensor:
    if HAS_SDPA:
        if no_cudnn:
            with _no_cudnn():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if causal:
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)
        mask = band_mask(pos, pos, None)
    return math_attention(q, k, v, mask)


def full_attention_seq(q, k, v) -> torch.Tensor:
    _record('full', 'sdpa_is_causal' if HAS_SDPA else 'math_causal')
    return sdpa(q, k, v, causal=True)


def swa_attention_seq(q, k, v, window: int, chunk: int = 4096) -> torch.Tensor:
    """Causal sliding-window attention over a whole sequence (q, k, v [B, H, T, Dh], positions 0..T-1).
    flex_attention with a sliding-window block mask when available; else SDPA with an explicit boolean
    band mask, in query chunks of `chunk` (one chunk when T <= chunk) so that the mask stays small."""
    T = q.shape[-2]
    if window >= T:
        _record('swa', 'sdpa_is_causal(window>=T)' if HAS_SDPA else 'math_causal')
        return sdpa(q, k, v, causal=True)
    if _FLEX.get('enabled'):
        bm = _block_mask(T, window, q.device)
        if _is_compiling():
            return _FLEX['flex'](q, k, v, block_mask=bm)
        _record('swa', 'flex_attention(sliding block mask, compiled kernel)')
        return _FLEX['flex_compiled'](q, k, v, block_mask=bm)
    _record('swa', ('sdpa' if HAS_SDPA else 'math') + '_band_mask' + (f'_chunked{chunk}' if T > chunk else ''))
    outs = []
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        klo = max(0, lo - window + 1)
        qpos = torch.arange(lo, hi, device=q.device)
        kpos = torch.arange(klo, hi, device=q.device)
        outs.append(sdpa(q[:, :, lo:hi], k[:, :, klo:hi], v[:, :, klo:hi], mask=band_mask(qpos, kpos, window)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def describe_attention(c: Config, T: int) -> str:
    """Which attention paths a training step of this config takes (also valid under torch.compile)."""
    if c.variant == 'full':
        return 'full: sdpa_is_causal' if HAS_SDPA else 'full: math_causal'
    if c.window >= T:
        seq = 'sdpa_is_causal (window >= T)'
    elif _FLEX.get('enabled'):
        seq = 'flex_attention (sliding-window block mask)'
    else:
        seq = ('sdpa' if HAS_SDPA else 'math') + '_band_mask'
    if c.variant == 'swa':
        return f'swa: {seq}'
    return f'prefix swa: {seq}; suffix mini-batches: math attention with explicit band mask over [cache; mini-batch] (twice differentiable)'


def masked_attention(q, k, v, qpos, kpos, window: Optional[int], impl: str) -> torch.Tensor:
    """Attention of queries at qpos over keys at kpos (-1 = empty slot). impl 'math' (twice
    differentiable: the e2e suffix in training) or 'sdpa' (first-order: inference)."""
    mask = band_mask(qpos, kpos, window)
    if impl == 'sdpa' and HAS_SDPA:
        _record('cached', 'sdpa_bool_mask(no cuDNN)')
        return sdpa(q, k, v, mask=mask, no_cudnn=True)
    _record('cached', 'math_masked(twice differentiable)')
    return math_attention(q, k, v, mask)


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------

def qkv(m: Model, blk: Block, h: torch.Tensor, start: int):
    """h [B, T, D] (already pre-normed) -> q, k, v [B, H, T, Dh] with QK-norm and RoPE at start..start+T-1."""
    c = m.c
    B, T, _ = h.shape
    H, Dh = c.n_heads, c.head_dim
    q = torch.matmul(h, blk.wq).view(B, T, H, Dh)
    k = torch.matmul(h, blk.wk).view(B, T, H, Dh)
    v = torch.matmul(h, blk.wv).view(B, T, H, Dh)
    if c.qk_norm:
        q = rms_norm(q, blk.q_norm, c.norm_eps)
        k = rms_norm(k, blk.k_norm, c.norm_eps)
    cos, sin = m.rope_cos[start:start + T], m.rope_sin[start:start + T]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, T, Dh = o.shape
    return o.transpose(1, 2).reshape(B, T, H * Dh)


def mlp_tail(m: Model, l: int, x: torch.Tensor, fast: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
    """After attention: [prime MLP with fast weights] then the safe MLP, each in sandwich norms."""
    c, blk = m.c, m.blocks[l]
    if fast is not None:
        x = x + _post(c, swiglu(_pre(c, x, blk.prime_norm), *fast), blk.prime_post_norm)
    return x + _post(c, swiglu(_pre(c, x, blk.mlp_norm), blk.w1, blk.w2, blk.w3), blk.mlp_post_norm)


def attention_kind(c: Config) -> str:
    return 'full' if c.variant == 'full' else 'swa'


def run_blocks_seq(m: Model, x: torch.Tensor, lo: int, hi: int, fast: Optional[Sequence[torch.Tensor]] = None,
                   on_kv: Optional[Callable] = None) -> torch.Tensor:
    """Blocks [lo, hi) over a whole sequence at positions 0..T-1 (no cache). fast: flat [w1,w2,w3]*suffix
    (unbatched W_0 or batched). on_kv(layer, k, v) receives each layer's keys/values (inference caches)."""
    c = m.c
    s = c.suffix_start
    for l in range(lo, hi):
        blk = m.blocks[l]
        q, k, v = qkv(m, blk, _pre(c, x, blk.seq_norm), 0)
        if on_kv is not None:
            on_kv(l, k, v)
        o = full_attention_seq(q, k, v) if attention_kind(c) == 'full' else swa_attention_seq(q, k, v, c.window)
        x = x + _post(c, torch.matmul(merge_heads(o), blk.wo), blk.seq_post_norm)
        f = fast[3 * (l - s):3 * (l - s) + 3] if (fast is not None and blk.has_prime) else None
        x = mlp_tail(m, l, x, f)
    return x


def lm_loss(m: Model, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain next-token loss (full / swa; e2e with the fast weights frozen at W_0), as lmLoss in ttt-e2e.ts."""
    m.ensure_positions(tokens.shape[1])
    x = F.embedding(tokens, m.embed)
    fast = list(m.fast) if m.c.suffix_len > 0 else None
    h = run_blocks_seq(m, x, 0, m.c.n_layers, fast)
    return token_nll(logits_of(m, h), targets).mean()


def prefix_forward(m: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding and the prefix blocks (no prime MLP) over the whole sequence, SWA."""
    return run_blocks_seq(m, F.embedding(tokens, m.embed), 0, m.c.suffix_start)


# ---------------------------------------------------------------------------------------------------
# TTT-E2E inner loop (src/model/ttt-e2e.ts)
# ---------------------------------------------------------------------------------------------------

def suffix_forward(m: Model, fast: Sequence[torch.Tensor], caches: Sequence[torch.Tensor], x: torch.Tensor,
                   start: int, impl: str = 'math', cache_pos: Optional[torch.Tensor] = None):
    """Suffix blocks on one mini-batch x [B, t, D] at positions start..start+t-1 with fast weights
    (flat, [B, in, out]) and window caches (flat [k0, v0, k1, v1, ...] of the previous min(start, k-1)
    positions, or empty). Returns the output and the new caches (trimmed to the last k-1 positions).
    cache_pos: positions of the cache entries (-1 = empty) when they are not the consecutive positions
    just before `start` (latency.py's ring buffers); the new caches are then not meaningful."""
    c = m.c
    s = c.suffix_start
    t = x.shape[1]
    qpos = torch.arange(start, start + t, device=x.device)
    new_caches = []
    for j, l in enumerate(range(s, c.n_layers)):
        blk = m.blocks[l]
        q, k, v = qkv(m, blk, _pre(c, x, blk.seq_norm), start)
        if caches:
            k = torch.cat([caches[2 * j], k], dim=2)
            v = torch.cat([caches[2 * j + 1], v], dim=2)
        if cache_pos is None:
            kpos = torch.arange(start + t - k.shape[2], start + t, device=x.device)
        else:
            kpos = torch.cat([cache_pos, qpos]) if caches else qpos
        o = masked_attention(q, k, v, qpos, kpos, c.window, impl)
        x = x + _post(c, torch.matmul(merge_heads(o), blk.wo), blk.seq_post_norm)
        x = mlp_tail(m, l, x, fast[3 * j:3 * j + 3])
        keep = c.window - 1
        new_caches += [k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]] if k.shape[2] > keep else [k, v]
    return x, new_caches


def clip_per_sequence(g: Sequence[torch.Tensor], clip: float) -> List[torch.Tensor]:
    """Each sequence's gradient (over all fast weights) scaled to global norm <= clip."""
    if clip <= 0:
        return list(g)
    sq = None
    for t in g:
        s = _up(t).pow(2).sum(dim=(1, 2))
        sq = s if sq is None else sq + s
    norm = torch.sqrt(sq)
    scale = (clip / torch.clamp(norm, min=clip)).view(-1, 1, 1)
    return [t * scale.to(t.dtype) for t in g]


def mini_batch_step(m: Model, fast, caches, x, targets, start: int, lr: float, update: bool, create_graph: bool,
                    impl: str = 'math', cache_pos: Optional[torch.Tensor] = None):
    """miniBatchStep of ttt-e2e.ts: loss_i with W_{i-1}; W_i = W_{i-1} - lr * clip(grad). Returns
    (loss_i = mean over the batch of per-sequence mean NLL, new fast weights, new caches, nll [B, t])."""
    h, new_caches = suffix_forward(m, fast, caches, x, start, impl, cache_pos)
    nll = token_nll(logits_of(m, h), targets)
    per_seq = nll.mean(dim=1)
    if not update or lr == 0:
        return per_seq.mean(), list(fast), new_caches, nll
    g = torch.autograd.grad(per_seq.sum(), list(fast), create_graph=create_graph)
    g = clip_per_sequence(g, m.c.inner_clip)
    if m.c.first_order:
        g = [t.detach() for t in g]
    new_fast = [w - lr * gi for w, gi in zip(fast, g)]
    return per_seq.mean(), new_fast, new_caches, nll


class _MiniBatchCheckpoint(torch.autograd.Function):
    """Checkpointed mini-batch step (what `checkpoint(...)` does in ttt-e2e.ts innerLoop): the forward
    computes values only (inner gradient first-order, graph dropped); the backward recomputes the step
    with create_graph=True and back-propagates through it, including through the inner gradient
    (second order). Memory: the saved inputs of each mini-batch (W, caches, x) plus one mini-batch's
    graph at a time. Gradients of module parameters used inside are accumulated into their .grad
    (like reentrant checkpointing): use loss.backward(), not torch.autograd.grad, on the outer loss."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        m, nf, nc = spec['model'], spec['n_fast'], spec['n_cache']
        fast, caches, x, targets = tensors[:nf], tensors[nf:nf + nc], tensors[nf + nc], tensors[nf + nc + 1]
        with torch.enable_grad():
            fast_d = [t.detach().requires_grad_(True) for t in fast]
            loss, new_fast, new_caches, _ = mini_batch_step(
                m, fast_d, [t.detach() for t in caches], x.detach(), targets, spec['start'], spec['lr'],
                spec['update'], create_graph=False, impl=spec['impl'])
        return tuple([loss.detach()] + [t.detach() for t in new_fast] + [t.detach() for t in new_caches])

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        m, nf, nc = spec['model'], spec['n_fast'], spec['n_cache']
        tensors = ctx.saved_tensors
        fast, caches, x, targets = tensors[:nf], tensors[nf:nf + nc], tensors[nf + nc], tensors[nf + nc + 1]
        g_loss, g_fast, g_caches = grads[0], grads[1:1 + nf], grads[1 + nf:]
        # The last mini-batch's new W is unused: no need to rebuild its inner-gradient graph.
        need_update = spec['update'] and any(g is not None for g in g_fast)
        with torch.enable_grad():
            fast_d = [t.detach().requires_grad_(True) for t in fast]
            caches_d = [t.detach().requires_grad_(True) for t in caches]
            x_d = x.detach().requires_grad_(True)
            loss, new_fast, new_caches, _ = mini_batch_step(
                m, fast_d, caches_d, x_d, targets, spec['start'], spec['lr'], need_update, create_graph=True,
                impl=spec['impl'])
            outs, gouts = [], []
            for o, g in zip([loss] + list(new_fast) + list(new_caches), (g_loss,) + tuple(g_fast) + tuple(g_caches)):
                if g is not None and o.requires_grad:
                    outs.append(o)
                    gouts.append(g)
            if outs:
                torch.autograd.backward(outs, gouts)
        return (None,) + tuple(t.grad for t in fast_d) + tuple(t.grad for t in caches_d) + (x_d.grad, None)


def e2e_inner_loop(m: Model, tokens: torch.Tensor, targets: torch.Tensor, ilr_scale: float = 1.0,
                   ckpt: str = 'manual', update: bool = True, update_last: bool = True, impl: str = 'math',
                   prefix_fn: Optional[Callable] = None, return_nll: bool = False):
    """innerLoop of ttt-e2e.ts. ckpt: 'manual' (_MiniBatchCheckpoint), 'torch'
    (torch.utils.checkpoint, use_reentrant=False), 'none' (keep every mini-batch's graph).
    Returns (list of loss_i, final fast weights, final suffix caches, per-token nll [B, T] if return_nll and
    the step is not checkpointed)."""
    c = m.c
    B, T = tokens.shape
    m.ensure_positions(T)
    b = c.mini_batch
    x_all = (prefix_fn or prefix_forward)(m, tokens)
    lr = c.inner_lr * ilr_scale
    fast = [w.unsqueeze(0).expand(B, *w.shape) for w in m.fast]
    caches: List[torch.Tensor] = []
    losses, nlls = [], []
    n = (T + b - 1) // b
    grad_on = torch.is_grad_enabled()
    for i in range(n):
        lo, hi = i * b, min(T, (i + 1) * b)
        x, y = x_all[:, lo:hi], targets[:, lo:hi]
        upd = update and (update_last or i < n - 1)
        if ckpt == 'manual' and grad_on:
            spec = dict(model=m, n_fast=len(fast), n_cache=len(caches), start=lo, lr=lr, update=upd, impl=impl)
            out = _MiniBatchCheckpoint.apply(spec, *fast, *caches, x, y)
            loss, fast, caches = out[0], list(out[1:1 + len(fast)]), list(out[1 + len(fast):])
        elif ckpt == 'torch' and grad_on:
            from torch.utils.checkpoint import checkpoint
            nf, nc = len(fast), len(caches)

            def step(*ts, _lo=lo, _upd=upd, _nf=nf, _nc=nc):
                r = mini_batch_step(m, list(ts[:_nf]), list(ts[_nf:_nf + _nc]), ts[_nf + _nc], ts[_nf + _nc + 1], _lo, lr,
                                    _upd, create_graph=torch.is_grad_enabled(), impl=impl)
                return tuple([r[0]] + list(r[1]) + list(r[2]))

            out = checkpoint(step, *fast, *caches, x, y, use_reentrant=False)
            loss, fast, caches = out[0], list(out[1:1 + nf]), list(out[1 + nf:])
        else:
            if grad_on:
                loss, fast, caches, nll = mini_batch_step(m, fast, caches, x, y, lo, lr, upd, create_graph=True, impl=impl)
            else:
                # Inference: first-order inner gradient, no graph kept between mini-batches.
                with torch.enable_grad():
                    fd = [t.detach().requires_grad_(True) for t in fast]
                    loss, fast, caches, nll = mini_batch_step(m, fd, caches, x, y, lo, lr, upd, create_graph=False, impl=impl)
                loss, fast, caches, nll = loss.detach(), [t.detach() for t in fast], [t.detach() for t in caches], nll.detach()
            if return_nll:
                nlls.append(nll)
        losses.append(loss)
    return losses, fast, caches, (torch.cat(nlls, dim=1) if nlls else None)


def e2e_outer_loss(m: Model, tokens, targets, ilr_scale: float = 1.0, ckpt: str = 'manual', update_last: bool = True,
                   prefix_fn: Optional[Callable] = None) -> torch.Tensor:
    """Mean of the mini-batch losses (e2eOuterLoss): differentiate it for the outer step."""
    losses, _, _, _ = e2e_inner_loop(m, tokens, targets, ilr_scale, ckpt=ckpt, update_last=update_last, prefix_fn=prefix_fn)
    return torch.stack(losses).mean()


def outer_loss(m: Model, tokens, targets, **kw) -> torch.Tensor:
    """Training objective of a variant (outerLoss in ttt-e2e.ts)."""
    return e2e_outer_loss(m, tokens, targets, **kw) if m.c.variant == 'e2e' else lm_loss(m, tokens, targets)


# ---------------------------------------------------------------------------------------------------
# FLOPs (see train_step.py for the formula's statement)
# ---------------------------------------------------------------------------------------------------

def mean_keys(T: int, window: Optional[int]) -> float:
    """Mean number of keys a query attends to over positions 0..T-1: mean_p min(p+1, window)."""
    if window is None or window >= T:
        return (T + 1) / 2
    k = window
    # positions 0..k-1 see p+1 keys; positions k..T-1 see k keys
    return (k * (k + 1) / 2 + (T - k) * k) / T


def flops_per_token(c: Config, T: int) -> dict:
    D, Fd, L, V = c.d_model, c.ffn_dim, c.n_layers, c.vocab_size
    keys = mean_keys(T, None if c.variant == 'full' else c.window)
    layer_mm = 4 * D * D + 3 * D * Fd  # matmul weights of one block (attention + safe MLP)
    head = V * D  # tied output projection (a real matmul; the embedding gather costs nothing)
    attn_fwd = 4 * D * keys  # q k^T and p v, per layer, per token
    if c.variant != 'e2e':
        dense = 6 * (L * layer_mm + head)
        attn = 3 * L * attn_fwd
        return dict(total=dense + attn, dense=dense, attention=attn, inner_extra=0.0, mean_keys=keys)
    Ls, Lp = c.suffix_len, c.n_layers - c.suffix_len
    prime = 3 * D * Fd
    prefix = 6 * Lp * layer_mm + 3 * Lp * attn_fwd
    fwd = 2 * (Ls * (layer_mm + prime) + head) + Ls * attn_fwd           # suffix + head forward
    inner = 2 * (Ls * (layer_mm + prime) + head) + 2 * Ls * prime + 2 * Ls * attn_fwd  # dX of every matmul, dW of prime, attention bwd
    suffix = 3 * (fwd + inner)                                             # outer fwd+bwd of (forward + inner gradient)
    plain_suffix = 3 * fwd
    return dict(total=prefix + suffix, dense=6 * (L * layer_mm + Ls * prime + head), attention=3 * L * attn_fwd,
                inner_extra=suffix - plain_suffix, mean_keys=keys)
