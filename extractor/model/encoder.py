"""Qwen2-Audio's audio tower in plain PyTorch, over packed variable-length windows.

The Hugging Face encoder only accepts 3000 mel frames (30 s) per window and spends most of its
FLOPs on padding for short clips. Here every window is computed at its own length: the batch's
windows are packed into one token sequence (T, D) with no padding between them, attention is
restricted to each window's own tokens, and the pooled outputs equal the canonical 30 s
computation with the padding mask (shared/QWEN2_AUDIO.md, "Computing only what is needed").

Shapes: B windows, T packed tokens (each window's own length), N output frames, D = d_model,
H heads of hd = D / H.

Module names mirror `Qwen2AudioEncoder`, so the checkpoint's `audio_tower.*` tensors load with
`strict=True` and the adapter's `layers.N.self_attn.{q,k,v}_proj` merge onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..constants import CONV_STRIDE, POOL_STRIDE
from . import kernels
from .config import EncoderConfig

# The GPU path calls aten._flash_attention_forward with cumulative sequence lengths and `scale`, the
# op under torch.nn.attention.varlen.varlen_attn, which exists from this torch on: pyproject.toml's
# torch range and the Dockerfile's torch start here (tests/test_packaging.py).
VARLEN_ATTN_SINCE = (2, 11)


@dataclass
class PackedSeqs:
    """Where each window's tokens sit in the packed (T, D) sequence (all on the model's device).

    `cu_seqlens` is [0, len0, len0+len1, ...] (int32, as varlen attention wants); `lengths` and
    `max_len` are host-side copies, so reading them costs no device sync. `dense`: every window
    has the same length and the caller wants them attended as one dense batch (see attend).
    """

    cu_seqlens: torch.Tensor
    lengths: list[int]
    max_len: int
    dense: bool = False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """Block-diagonal attention over packed windows: (T, H, hd) → (T, H, hd). q carries 1/sqrt(hd).

    On CUDA in bf16/fp16: a batch of full 30 s windows only (podcasts, --no-padding-mask) is one
    dense cuDNN attention call, 1.4× FlashAttention-2 on an H100 at 1500 tokens (bench/
    attention_probe.py); anything else is one variable-length FlashAttention call, no padding
    FLOPs. Elsewhere (CPU, or float32, which neither takes) one dense SDPA call per window: exact,
    and those paths are about correctness, not speed.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if seqs.dense:
            B, S, (T, H, hd) = len(seqs.lengths), seqs.max_len, q.shape
            qd, kd, vd = (t.view(B, S, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd) views
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qd, kd, vd, scale=1.0).transpose(1, 2).reshape(T, H, hd)
        cu = seqs.cu_seqlens
        # The aten op itself, not torch.nn.attention.varlen.varlen_attn: that wrapper is a custom
        # op whose first call took 6.7 s on an H100 (the op's own: 6 ms), all of it start-up.
        out, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, seqs.max_len, seqs.max_len, 0.0, False, False, scale=1.0)
        return out
    out = torch.empty_like(q)
    start = 0
    for n in seqs.lengths:
        w = slice(start, start + n)
        # (1, H, n, hd) for SDPA
        o = F.scaled_dot_product_attention(q[w].transpose(0, 1)[None], k[w].transpose(0, 1)[None], v[w].transpose(0, 1)[None], scale=1.0)
        out[w] = o[0].transpose(0, 1)
        start += n
    return out


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)
        # Filled by fuse_qkv(): one GEMM instead of three, the query scaling folded in.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        # HF scales q *after* its bias: (xW + b)·s == x(sW) + sb. For head_dim 64, s = 1/8 is a
        # power of two, so the folded weights are bit-exact.
        s = self.head_dim**-0.5
        d = self.q_proj.weight.shape[0]
        w = torch.cat([self.q_proj.weight * s, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias * s, torch.zeros(d, dtype=w.dtype, device=w.device), self.v_proj.bias])
        self.qkv_weight, self.qkv_bias = w.contiguous(), b.contiguous()
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        T, D = x.shape
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # 3 × (T, H, hd)
        return self.out_proj(attend(q, k, v, seqs).reshape(T, D))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fused_gelu = False

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:  # (T, D) → (T, D)
        x = x + self.self_attn(self.self_attn_layer_norm(x), seqs)
        x = x + self.mlp(self.final_layer_norm(x))
        if x.dtype == torch.float16:
            # HF clamps here in fp16 so that an overflow does not turn into inf/NaN downstream.
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x

    def mlp(self, h: torch.Tensor) -> torch.Tensor:  # (T, D) normalised → (T, D)
        if self.fused_gelu:
            # GELU in the cuBLASLt epilogue of the fc1 GEMM: the (T, 4D) activation is written once
            # instead of written, read and written again (9% of GPU time on an H200, measured). The
            # epilogue's GELU is the tanh form, within bf16 rounding of the exact one; so this runs
            # for bf16/fp16 on CUDA only (recorded in the recipe as gelu="tanh-epilogue"), and
            # float32 keeps HF's exact erf GELU. It is what torch.compile itself emits here.
            h = torch._addmm_activation(self.fc1.bias, h, self.fc1.weight.t(), use_gelu=True)  # (T, 4D)
        else:
            h = F.gelu(self.fc1(h))
        return self.fc2(h)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=CONV_STRIDE, padding=1)
        # Given its weight, Embedding skips its random init: that init on the meta device (where
        # load_model builds this) imports torch._dynamo, ~1 s at start-up.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d, _weight=torch.empty(cfg.max_source_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        # No weights; forward() pools by index instead, so pairs never straddle two windows.
        self.avg_pooler = nn.AvgPool1d(POOL_STRIDE, stride=POOL_STRIDE)

    @property
    def fused_gelu(self) -> bool:
        return self.layers[0].fused_gelu

    def prepare_for_inference(self) -> None:
        """After loading (and merging LoRA) on the final device and dtype."""
        w = self.layers[0].fc1.weight
        fused = w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
            layer.fused_gelu = fused
        self.eval().requires_grad_(False)

    def compile_kernels(self, *, wait: bool = False) -> None:
        """Start compiling the fused add + LayerNorm (model/kernels.py) for this device and dtype,
        on a thread unless `wait`; forward() takes it once it is ready. Nothing where it can't serve."""
        w = self.layers[0].fc1.weight
        kernels.prepare(w.device, w.dtype, self.cfg.d_model, wait=wait)

    @property
    def fused_add_layer_norm(self) -> bool:
        """Whether forward() now runs the fused add + LayerNorm."""
        w = self.layers[0].fc1.weight
        return kernels.ready(w.device, w.dtype, self.cfg.d_model)

    def embed_tokens(self, mel: torch.Tensor, token_index: torch.Tensor, position_index: torch.Tensor) -> torch.Tensor:
        """Convolutions over a padded mel batch, then gather each window's valid tokens.

        mel: (B, n_mels, F), every window's frames past what its tokens need zeroed.
        token_index: (T,) flat indices into the (B · F/2) conv2 outputs, in packed order.
        position_index: (T,) each token's position inside its window.
        """
        B, n_mels, _ = mel.shape
        assert n_mels == self.cfg.num_mel_bins, f"expected {self.cfg.num_mel_bins} mel bins, got {n_mels}"
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))  # (B, D, F/2)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])  # (B · F/2, D)
        # Qwen2AudioEncoder.forward never applies embed_scale (config.scale_embedding): nor do we.
        x = x.index_select(0, token_index)  # (T, D)
        return x + self.embed_positions.weight.index_select(0, position_index)

    def forward(self, tokens: torch.Tensor, seqs: PackedSeqs, pool_index: torch.Tensor) -> torch.Tensor:
        """(T, D) packed tokens → (N, D) output frames of all windows, in packed order.

        pool_index: (N,) the packed index of the first token of each output frame's pair:
        avg_pooler averages tokens (i, i+1) and never crosses a window boundary.
        """
        T, D = tokens.shape
        assert D == self.cfg.d_model and seqs.cu_seqlens.shape[0] == len(seqs.lengths) + 1, (tokens.shape, len(seqs.lengths))
        if self.fused_add_layer_norm:
            x = self._layers_fused(tokens, seqs)
        else:
            x = tokens
            for layer in self.layers:
                x = layer(x, seqs)
        x = (x.index_select(0, pool_index) + x.index_select(0, pool_index + 1)) * 0.5  # (N, D)
        return self.layer_norm(x)

    def _layers_fused(self, tokens: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """The layers as forward() runs them, with each residual add and the LayerNorm after it in
        one kernel: x is the residual stream (a new tensor, then updated in place), h its
        normalised copy that the next GEMM reads. (T, D) → (T, D)."""
        layers = self.layers
        with torch.cuda.device(tokens.device):
            ln = layers[0].self_attn_layer_norm
            h = F.layer_norm(tokens, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            x = torch.empty_like(tokens)
            src = tokens  # the first add reads the caller's tokens and writes x; the rest update x in place
            for i, layer in enumerate(layers):
                ln = layer.final_layer_norm
                h = kernels.add_layer_norm(src, layer.self_attn(h, seqs), ln.weight, ln.bias, ln.eps, out_sum=x)
                src = x
                y = layer.mlp(h)
                if i + 1 < len(layers):
                    ln = layers[i + 1].self_attn_layer_norm
                    h = kernels.add_layer_norm(x, y, ln.weight, ln.bias, ln.eps, out_sum=x)
                else:
                    x += y
        return x
