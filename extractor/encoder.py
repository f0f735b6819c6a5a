"""Qwen2-Audio's audio tower in plain PyTorch, over packed variable-length windows.

The Hugging Face encoder only accepts 3000 mel frames (30 s) per window and spends most of its
FLOPs on padding for short clips. Here every window is computed at its own length: the batch's
windows are packed into one token sequence `[T, D]` (no padding between them), attention is
restricted to each window's own tokens, and the pooled outputs equal the canonical 30 s
computation with the padding mask (shared/QWEN2_AUDIO.md, "Computing only what is needed").

Module names mirror `Qwen2AudioEncoder` so that the checkpoint's `audio_tower.*` tensors load with
`strict=True` and PEFT finds `layers.N.self_attn.{q,k,v}_proj` for merging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import EncoderConfig
from .constants import CONV_STRIDE, POOL_STRIDE


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)
        # Filled by fuse_qkv(): one GEMM instead of three, query scaling folded in.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        # HF scales q *after* its bias: (xW + b) * s == x(sW) + sb. For head_dim 64, s = 1/8 is a
        # power of two, so the folded weights are bit-exact.
        s = self.head_dim**-0.5
        d = self.q_proj.weight.shape[0]
        w = torch.cat([self.q_proj.weight * s, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias * s, torch.zeros(d, dtype=w.dtype, device=w.device), self.v_proj.bias])
        self.qkv_weight, self.qkv_bias = w.contiguous(), b.contiguous()
        del self.q_proj, self.k_proj, self.v_proj


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)



def _layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def _fc1_gelu(y, w, b, fused: bool):
    if fused:
        # GELU in the cuBLASLt epilogue of the fc1 GEMM: the (T, 4D) activation is written once
        # instead of written, read and written again (9% of GPU time on an H200, measured). The
        # epilogue's GELU is the tanh form, within bf16 rounding of the exact one; so this is
        # used for bf16/fp16 on CUDA only, and float32 keeps HF's exact erf GELU.
        # torch._addmm_activation is what torch.compile itself emits for this pattern.
        return torch._addmm_activation(b, y, w.t(), use_gelu=True)
    return F.gelu(F.linear(y, w, b))


def _mlp_block(x, o, out_w, out_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, fused_gelu=False):
    """Everything from attention's output to the layer's output: out_proj and residual, then the
    pre-norm MLP and residual."""
    x = x + F.linear(o, out_w, out_b)
    h = _fc1_gelu(_layer_norm(x, ln_w, ln_b), fc1_w, fc1_b, fused_gelu)
    x = x + F.linear(h, fc2_w, fc2_b)
    if x.dtype == torch.float16:
        # HF clamps here in fp16 so that an overflow does not turn into inf/NaN downstream.
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


@dataclass
class PackedSeqs:
    """Where each window's tokens sit in the packed `[T, D]` sequence (all on the model's device).

    `cu_seqlens` is `[0, len0, len0+len1, ...]` (int32, as varlen attention wants); `lengths` and
    `max_len` are host-side copies so that no device sync is needed to read them.
    """

    cu_seqlens: torch.Tensor
    lengths: list[int]
    max_len: int


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """Block-diagonal attention over packed windows; q already carries the 1/sqrt(hd) scale.

    On CUDA in bf16/fp16 this is one variable-length attention call (no padding FLOPs). Elsewhere
    (CPU, or float32, which FlashAttention does not take) each window is one dense SDPA call:
    exact, and those paths are about correctness, not speed.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _flash_varlen(q, k, v, seqs)
    out = torch.empty_like(q)
    start = 0
    for n in seqs.lengths:
        sl = slice(start, start + n)
        # (1, H, n, hd) for SDPA
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], scale=1.0
        )
        out[sl] = o[0].transpose(0, 1)
        start += n
    return out


def _flash_varlen(q, k, v, seqs: PackedSeqs) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = seqs.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, seqs.max_len, seqs.max_len, scale=1.0)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=CONV_STRIDE, padding=1)
        # Given its weight, Embedding skips its random init: that init on the meta device (where
        # load_model builds this) imports torch._dynamo, ~1 s, and waits on peft's import of it.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d, _weight=torch.empty(cfg.max_source_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        # No weights; forward() pools by index instead so pairs never straddle two windows.
        self.avg_pooler = nn.AvgPool1d(POOL_STRIDE, stride=POOL_STRIDE)
        self.fused_gelu = False

    def prepare_for_inference(self) -> None:
        """After loading (and merging LoRA) on the final device and dtype."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
        self.eval().requires_grad_(False)
        w = self.layers[0].fc1.weight
        self.fused_gelu = w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)

    def embed_tokens(self, mel: torch.Tensor, token_index: torch.Tensor, position_index: torch.Tensor) -> torch.Tensor:
        """Convolutions over a padded mel batch, then gather each window's valid tokens.

        mel: (B, n_mels, F) with every window's frames past what its tokens need zeroed.
        token_index: (T,) flat indices into the (B * F/2) conv2 outputs, in packed order.
        position_index: (T,) each token's position inside its window.
        """
        B, n_mels, F_ = mel.shape
        assert n_mels == self.cfg.num_mel_bins, f"expected {self.cfg.num_mel_bins} mel bins, got {n_mels}"
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))  # (B, D, F/2)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])  # (B * F/2, D)
        # Qwen2AudioEncoder.forward never applies embed_scale (config.scale_embedding): nor do we.
        x = x.index_select(0, token_index)
        return x + self.embed_positions.weight.index_select(0, position_index)

    def forward(self, tokens: torch.Tensor, seqs: PackedSeqs, pool_index: torch.Tensor) -> torch.Tensor:
        """tokens: (T, D) packed → (N_out, D) output frames of all windows, in packed order.

        pool_index: (N_out,) the packed index of the first token of each output frame's pair;
        avg_pooler averages tokens (i, i+1) and never crosses a window boundary.
        """
        x = tokens
        T, D = x.shape
        for layer in self.layers:
            a, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
            h = _layer_norm(x, ln1.weight, ln1.bias)
            q, k, v = F.linear(h, a.qkv_weight, a.qkv_bias).view(T, 3, a.num_heads, a.head_dim).unbind(1)  # (T, H, hd)
            o = attend(q, k, v, seqs).reshape(T, D)
            x = _mlp_block(
                x, o, a.out_proj.weight, a.out_proj.bias, ln2.weight, ln2.bias,
                layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias, self.fused_gelu,
            )
        x = (x.index_select(0, pool_index) + x.index_select(0, pool_index + 1)) * 0.5
        return self.layer_norm(x)
