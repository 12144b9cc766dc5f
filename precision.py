"""The precision a script computes in (--amp, --tf32): autocast, grad scaler, TF32, the name of what ran.

TF32 rounds the inputs of fp32 convolutions and matmuls to a 10-bit mantissa on Ampere and newer GPUs
(cuDNN's convolutions by default). Under bf16/fp16 the only fp32 convolution is the stem, kept in fp32
for inputs with a large offset (resnet.py), so TF32 is off; under --amp off, --tf32 decides. autocast()
sets it for the whole process at every script's start, before the model is built: a switch inside
forward would break torch.compile's graph, and a run in the same process (study.py) must not inherit it.
"""
import contextlib

import torch

# torch >= 2.9 calls the setting fp32_precision ("tf32" or "ieee"), older versions allow_tf32; newer
# versions refuse a mix of the two, so only one is used
NEW_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(conv, matmul):
    """allow (True) or forbid (False) TF32 in fp32 convolutions (cuDNN) and fp32 matmuls, process-wide"""
    if NEW_API:
        torch.backends.cudnn.conv.fp32_precision = "tf32" if conv else "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def tf32_state():
    """-> {"convolutions": bool, "matmuls": bool}: where TF32 is allowed now (config.json records it)"""
    if NEW_API:
        conv, matmul = (p.fp32_precision == "tf32" for p in (torch.backends.cudnn.conv, torch.backends.cuda.matmul))
    else:
        conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return {"convolutions": conv, "matmuls": matmul}


def autocast(device, amp, tf32="auto"):
    """--amp and --tf32 -> (context factory, GradScaler, amp name), and TF32 set for the process. amp auto:
    bf16 on a GPU that has it, fp16 on other GPUs, off on CPU (the scaler: fp16 only); tf32 auto: PyTorch's
    defaults (TF32 in convolutions, not in matmuls)."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp != "off" and tf32 == "on":
        print(f"notice: --tf32 on is ignored under --amp {amp}: the stem, its one fp32 convolution, runs in "
              f"IEEE fp32")
    set_tf32(amp == "off" and tf32 != "off", amp == "off" and tf32 == "on")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    if dtype is None:
        return contextlib.nullcontext, scaler, amp
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, amp


def name(device, amp):
    """what ran (metrics.json's "precision"): bf16, fp16, tf32 (allowed, on an Ampere or newer GPU) or fp32"""
    if amp != "off":
        return amp
    has_tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return "tf32" if has_tf32 and any(tf32_state().values()) else "fp32"
