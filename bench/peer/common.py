"""Shared helpers of the peer benchmarks: logging to stderr, the JSON-on-the-last-line output, devices,
GEMM peak measurement."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Callable, List, Optional

import torch


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


def emit(obj: dict) -> None:
    """The result: one JSON object, alone on the last line of stdout."""
    sys.stderr.flush()
    sys.stdout.write(json.dumps(_clean(obj)) + '\n')
    sys.stdout.flush()


def error_text(e: BaseException) -> str:
    log(traceback.format_exc())
    return f'{type(e).__name__}: {str(e)[:1500]}'


def pick_device(smoke: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device('cuda')
    if smoke:
        return torch.device('cpu')
    raise RuntimeError('CUDA is not available (use --smoke for a tiny CPU run)')


DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32, 'fp64': torch.float64}


def set_precision(dtype_name: str) -> None:
    """fp32 means true fp32 (our CUDA backend sets CUBLAS_DEFAULT_MATH: no TF32)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            torch.set_float32_matmul_precision('highest')
        except Exception:
            pass


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def facts(device: torch.device) -> dict:
    return dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if device.type == 'cuda' else f'cpu ({platform.processor() or platform.machine()})',
                cuda=getattr(torch.version, 'cuda', None), python=platform.python_version(), host=platform.node())


def median(xs: List[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 10, reps: int = 5,
                tf32: bool = False) -> dict:
    """torch.matmul of two n x n matrices: 2 n^3 flops; best and median of `reps` batches of `iters`."""
    prev = torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else None
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        sync(device)
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            sync(device)
            rates.append(2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12)
        del a, b, c
        return dict(n=n, best_tflops=max(rates), median_tflops=median(rates))
    finally:
        if device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = prev


def peak_for(device: torch.device, dtype_name: str, n: int) -> float:
    """The peak an MFU is taken against: the best measured GEMM rate in that precision (fp32: TF32 off)."""
    if dtype_name == 'bf16':
        return gemm_tflops(device, torch.bfloat16, n)['best_tflops']
    return gemm_tflops(device, torch.float32 if dtype_name == 'fp32' else torch.float64, n, iters=3, reps=3)['best_tflops']


def new_model_on(device: torch.device, build: Callable):
    """Builds parameters directly on the device when the torch version allows it."""
    try:
        with torch.device(device):
            return build()
    except (AttributeError, TypeError):
        return build().to(device)


def env_flag(name: str) -> Optional[str]:
    return os.environ.get(name)
