"""An independent reference of the official DINOv2 forward pass, and checkpoint writers.

The reference works directly on a state dict with the official facebookresearch key names and
spells out every operation (patch embedding, the official position-embedding rule, attention,
layer scale, MLP/SwiGLU, final norm), so it shares no code with timm or with hrdv2_dask. It is
the oracle for "patch tokens equal the official implementation's at any input size".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def random_official_state_dict(
    *,
    embed_dim: int = 64,
    depth: int = 2,
    grid: int = 37,
    registers: int = 0,
    swiglu: bool = False,
    patch_size: int = 14,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random values with the official key names and shapes (strong, not near-identity, blocks)."""
    g = torch.Generator().manual_seed(seed)
    d = embed_dim

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": rnd(1, 1, d, scale=0.5),
        "pos_embed": rnd(1, 1 + grid * grid, d, scale=0.5),
        "mask_token": rnd(1, d),
        "patch_embed.proj.weight": rnd(d, 3, patch_size, patch_size, scale=1 / patch_size / 3),
        "patch_embed.proj.bias": rnd(d, scale=0.1),
        "norm.weight": 1 + rnd(d, scale=0.1),
        "norm.bias": rnd(d, scale=0.1),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, d, scale=0.5)
    hidden = 4 * d
    swiglu_hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + rnd(d, scale=0.1),
                p + "norm1.bias": rnd(d, scale=0.1),
                p + "attn.qkv.weight": rnd(3 * d, d, scale=d**-0.5),
                p + "attn.qkv.bias": rnd(3 * d, scale=0.1),
                p + "attn.proj.weight": rnd(d, d, scale=d**-0.5),
                p + "attn.proj.bias": rnd(d, scale=0.1),
                p + "ls1.gamma": 0.5 + rnd(d, scale=0.1),
                p + "norm2.weight": 1 + rnd(d, scale=0.1),
                p + "norm2.bias": rnd(d, scale=0.1),
                p + "ls2.gamma": 0.5 + rnd(d, scale=0.1),
            }
        )
        if swiglu:
            sd[p + "mlp.w12.weight"] = rnd(2 * swiglu_hidden, d, scale=d**-0.5)
            sd[p + "mlp.w12.bias"] = rnd(2 * swiglu_hidden, scale=0.1)
            sd[p + "mlp.w3.weight"] = rnd(d, swiglu_hidden, scale=swiglu_hidden**-0.5)
            sd[p + "mlp.w3.bias"] = rnd(d, scale=0.1)
        else:
            sd[p + "mlp.fc1.weight"] = rnd(hidden, d, scale=d**-0.5)
            sd[p + "mlp.fc1.bias"] = rnd(hidden, scale=0.1)
            sd[p + "mlp.fc2.weight"] = rnd(d, hidden, scale=hidden**-0.5)
            sd[p + "mlp.fc2.bias"] = rnd(d, scale=0.1)
    return sd


def _official_pos(pos: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """Official rule: identity on the native square grid, else bicubic with scale (n + 0.1) / M."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    if h0 == m and w0 == m:
        return pos
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:].float()
    grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False
    )
    out = out.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
    return torch.cat([cls_pos, out.to(pos.dtype)], dim=1)


def official_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, *, num_heads: int, stride: int | None = None
) -> torch.Tensor:
    """Final-norm patch tokens ``(B, D, h, w)`` of the official DINOv2 model for input ``x``."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    stride = stride or patch
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    h0, w0 = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    d = t.shape[-1]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    t = t + _official_pos(sd["pos_embed"], h0, w0)
    n_reg = 0
    if "register_tokens" in sd:
        n_reg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = d // num_heads
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, d)
        y = F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + sd[p + "ls1.gamma"] * y
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if p + "mlp.w12.weight" in sd:
            x1, x2 = F.linear(y, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            y = F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + sd[p + "ls2.gamma"] * y
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    patches = t[:, 1 + n_reg :]
    return patches.transpose(1, 2).reshape(b, d, h0, w0)


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys → Hugging Face ``Dinov2Model`` keys (used to check the reverse mapping)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            wq, wk, wv = sd[p + f"attn.qkv.{kind}"].chunk(3)
            out[q + f"attention.attention.query.{kind}"] = wq
            out[q + f"attention.attention.key.{kind}"] = wk
            out[q + f"attention.attention.value.{kind}"] = wv
            out[q + f"attention.output.dense.{kind}"] = sd[p + f"attn.proj.{kind}"]
            out[q + f"norm1.{kind}"] = sd[p + f"norm1.{kind}"]
            out[q + f"norm2.{kind}"] = sd[p + f"norm2.{kind}"]
            out[q + f"mlp.fc1.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            out[q + f"mlp.fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
        out[q + "layer_scale1.lambda1"] = sd[p + "ls1.gamma"]
        out[q + "layer_scale2.lambda1"] = sd[p + "ls2.gamma"]
    return out
