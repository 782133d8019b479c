"""The GPT: a decoder-only transformer with a Qwen3-like layout (docs/DESIGN.md §11): untied head,
pre-norm blocks (RMSNorm with weight), SwiGLU MLP, QK-norm, rotate-half RoPE, causal SDPA, no biases.
Parameter names follow Hugging Face's Qwen3, so an export to transformers is a plain state dict copy.

The model does not know about directions: a backward model is the same network trained on
oriented data.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.muon import Muon


@dataclass
class GPTConfig:
    vocab_size: int = 65536
    sequence_len: int = 2048
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    intermediate_size: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)


def config_for_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128):
    """The one size dial: width = 64 * depth, heads of 128 dims, SwiGLU hidden ~ 8/3 width."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    n_embd = depth * aspect_ratio
    n_head = max(1, n_embd // head_dim)
    while n_embd % n_head:
        n_head -= 1
    intermediate = int(round(8 * n_embd / 3 / 64)) * 64 or 64
    return GPTConfig(vocab_size=vocab_size, sequence_len=sequence_len, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, intermediate_size=intermediate)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.n_embd
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, cos, sin, kv_cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        is_causal = True
        if kv_cache is not None:
            # The cache appends this call's keys/values and returns everything seen so far.
            k, v = kv_cache.update(layer_idx, k, v)
            is_causal = T > 1 and k.size(2) == T
            if T > 1 and k.size(2) > T:
                raise NotImplementedError("multi-token prefill on a non-empty cache is not supported")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of the Hugging Face layout: embeddings, blocks, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets, ignore_index=-1) over rows of x, `chunk_rows` at a time,
    without keeping the (rows, vocab) logits: each chunk's gradients are computed in the forward
    pass, as the loss is a scalar (docs/DESIGN.md §11, "The chunked loss")."""

    @staticmethod
    def forward(ctx, x, weight, targets, reduction, chunk_rows):
        device_type = x.device.type
        # the matmul dtype the surrounding autocast would use (bf16 on GPU), else the weight's
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            count = valid.sum()
            # mean over the non-ignored targets (nan when there are none, as F.cross_entropy)
            scale = 1.0 / count.float() if reduction == "mean" else torch.ones((), device=x.device)
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            dx_parts, dw = [], None
            for start in range(0, x.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                xc, yc, vc = x[rows].to(dtype), targets[rows], valid[rows]
                logp = torch.log_softmax(F.linear(xc, w).float(), dim=-1)
                safe_y = torch.where(vc, yc, 0).unsqueeze(1)
                total = total + torch.where(vc, -logp.gather(1, safe_y).squeeze(1), 0.0).sum()
                if not (want_dx or want_dw):
                    continue
                # d loss / d logits = (softmax - onehot(target)) * scale on rows with a target, else 0;
                # built in place in logp's buffer (nothing else reads it).
                g = logp.exp_()
                g.scatter_add_(1, safe_y, torch.full(safe_y.shape, -1.0, dtype=g.dtype, device=g.device))
                g = g.mul_((vc * scale).unsqueeze(1)).to(dtype)
                if want_dx:
                    dx_parts.append(g @ w)
                if want_dw:
                    part = (g.t() @ xc).float()
                    dw = part if dw is None else dw + part
            loss = total / count.float() if reduction == "mean" else total
        dx = torch.cat(dx_parts).to(x.dtype) if want_dx else None
        dw = dw.to(weight.dtype) if want_dw else None
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return (dx * grad_loss if dx is not None else None, dw * grad_loss if dw is not None else None,
                None, None, None)


class GPT(nn.Module):
    # Rows of the batch whose logits are held at once by the training loss (None: as many as
    # keep one chunk's fp32 logits near 1 GB: 8 chunks at B=32, T=2048, V=32768; fewer chunks
    # mean fewer fp32 additions of the head gradient). `chunked_loss = False` selects the plain path.
    chunked_loss = True
    loss_chunk_rows = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived, not learned: non-persistent, rebuilt by init_weights().
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @classmethod
    def build(cls, config, device):
        """Construct on the meta device, materialise on `device`, initialise."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_rotary(self):
        hd, device = self.config.head_dim, self.lm_head.weight.device
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(self.config.sequence_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout
        self.rope_cos, self.rope_sin = emb.cos()[None, None], emb.sin()[None, None]

    @torch.no_grad()
    def init_weights(self):
        d = self.config.n_embd
        std = d ** -0.5
        nn.init.normal_(self.model.embed_tokens.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-uniform initial predictions
        for block in self.model.layers:
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.uniform_(lin.weight, -math.sqrt(3) * std, math.sqrt(3) * std)
            # Output projections start at zero: each block begins as the identity on the residual.
            nn.init.zeros_(attn.o_proj.weight)
            nn.init.zeros_(mlp.down_proj.weight)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_rotary()

    # ---- bookkeeping -----------------------------------------------------------------------
    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 x (non-embedding params) + attention's 12 * L * d * T."""
        n_matmul = self.num_params() - self.model.embed_tokens.weight.numel()
        n_matmul -= sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))
        c = self.config
        return 6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def setup_optimizers(self, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.02,
                         weight_decay=0.0, adam_betas=(0.8, 0.95), matrix_lr_scaling="original"):
        """Muon for the 2-D matrices inside blocks, AdamW for embeddings, head and norm weights. AdamW
        rates are scaled by 1/sqrt(width/768), so one setting works across depths (Muon's update is
        scale-free); `matrix_lr_scaling` is Muon's `adjust_lr_fn` (docs/LR_SWEEP.md)."""
        matrix_params = [p for block in self.model.layers for p in block.parameters() if p.ndim == 2]
        norm_params = [p for m in self.modules() if isinstance(m, RMSNorm) for p in m.parameters()]
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.model.embed_tokens.weight], lr=embedding_lr * scale),
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=norm_params, lr=scalar_lr),
        ]
        n_total = len(matrix_params) + 2 + len(norm_params)
        assert n_total == len(list(self.parameters())), "every parameter must belong to one optimizer"
        # fused AdamW: one kernel for all its parameters on CUDA (not available for every CPU dtype)
        adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0,
                                  fused=self.lm_head.weight.is_cuda)
        # our Muon: same update as torch.optim.Muon, same-shape matrices batched (nanochat/muon.py)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                    adjust_lr_fn=matrix_lr_scaling)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # ---- forward ---------------------------------------------------------------------------
    def _rope(self, start, T):
        """The rotary tables of positions start .. start+T-1, in the weights' dtype."""
        if start + T > self.rope_cos.size(2):
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's sequence_len "
                             f"{self.config.sequence_len}")
        dtype = self.lm_head.weight.dtype
        return self.rope_cos[:, :, start:start + T].to(dtype), self.rope_sin[:, :, start:start + T].to(dtype)

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None):
        T = idx.size(1)
        cos, sin = self._rope(kv_cache.position if kv_cache is not None else 0, T)
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, kv_cache, i)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None:
            return self.lm_head(x).float()
        return self.loss(x, targets, loss_reduction)

    def loss(self, x, targets, loss_reduction="mean"):
        """Cross-entropy of the head on the final hidden states x (B, T, d), targets -1 ignored:
        "mean" and "sum" through LinearCrossEntropy, "none" (evaluation) the plain path."""
        B, T, d = x.shape
        head = self.lm_head.weight
        if self.chunked_loss and loss_reduction in ("mean", "sum"):
            rows = self.loss_chunk_rows or max(1, 2 ** 28 // head.size(0))
            return LinearCrossEntropy.apply(x.reshape(B * T, d), head, targets.reshape(-1), loss_reduction, rows)
        logits = self.lm_head(x).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def residual_stats(self, idx):
        """Per-layer mean / rms / max|x| of the residual stream for one batch (for research logs)."""
        cos, sin = self._rope(0, idx.size(1))
        x = self.model.embed_tokens(idx)
        stats = {}
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin)
            xf = x.float()
            stats[f"layer{i}"] = (xf.mean().item(), xf.pow(2).mean().sqrt().item(), xf.abs().max().item())
        return stats
