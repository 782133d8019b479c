"""Tests for nanochat.gpt: shapes, loss masking, causality, build, optimizers, generation, names."""

import pytest
import torch

from nanochat.muon import Muon
from nanochat.gpt import GPT, GPTConfig, config_for_depth

V, T = 96, 32



def tiny(depth=1, vocab=V, seq=T, seed=0):
    torch.manual_seed(seed)
    model = GPT.build(config_for_depth(depth, vocab, seq), "cpu")
    # init_weights zeros the output projections; perturb them so every block takes part in
    # the forward pass (causality and masking tests would be vacuous through identity blocks).
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.normal_(std=0.05)
            block.mlp.down_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.05)
    return model


def batch(B=2, seq=T, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_config_for_depth_width_is_64_per_layer():
    for depth in (1, 2, 3, 4, 12):
        c = config_for_depth(depth, 1000, 128)
        assert c.n_embd == 64 * depth
        assert c.n_layer == depth
        assert c.n_embd % c.n_head == 0 and c.n_kv_head == c.n_head
        assert c.intermediate_size > 0 and c.intermediate_size % 64 == 0
        assert (c.vocab_size, c.sequence_len) == (1000, 128)
    assert config_for_depth(12, 1000, 128).head_dim == 128
    with pytest.raises(ValueError):
        config_for_depth(0, 1000, 128)


def test_logits_and_loss_shapes():
    model = tiny()
    x, y = batch(B=3)
    logits = model(x)
    assert logits.shape == (3, T, V) and logits.dtype == torch.float32
    loss = model(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (3, T)
    assert torch.allclose(per_token.mean(), loss, atol=1e-6)


def test_initial_loss_is_near_uniform():
    model = GPT.build(config_for_depth(1, V, T), "cpu")  # real init: near-zero head
    x, y = batch()
    assert abs(model(x, y).item() - torch.log(torch.tensor(float(V))).item()) < 0.05


def test_ignored_targets_contribute_nothing():
    model = tiny()
    x, y = batch(B=2)
    per_token = model(x, y, loss_reduction="none")
    masked = y.clone()
    masked[0, :5] = -1
    masked[1, 10:12] = -1
    keep = masked != -1
    loss = model(x, masked)
    assert torch.allclose(loss, per_token[keep].mean(), atol=1e-6)
    assert not torch.allclose(loss, per_token.mean(), atol=1e-6)
    none_masked = model(x, masked, loss_reduction="none")
    assert (none_masked[~keep] == 0).all()
    assert torch.allclose(none_masked[keep], per_token[keep], atol=1e-6)


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny(depth=2)
    x, _ = batch(B=1)
    base = model(x)
    changed = x.clone()
    changed[0, 20:] = (changed[0, 20:] + 7) % V
    out = model(changed)
    assert torch.allclose(base[0, :20], out[0, :20], atol=1e-5)
    assert not torch.allclose(base[0, 20:], out[0, 20:], atol=1e-3)


def test_too_long_sequence_is_rejected():
    model = tiny()
    with pytest.raises(ValueError):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_build_on_meta_leaves_no_meta_tensors():
    model = GPT.build(config_for_depth(2, V, T), "cpu")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta, name
        assert t.device.type == "cpu"
        assert torch.isfinite(t).all(), name
    assert model.rope_cos.shape[2] == T
    for block in model.model.layers:  # blocks start as the identity on the residual
        assert (block.self_attn.o_proj.weight == 0).all() and (block.mlp.down_proj.weight == 0).all()


def test_estimate_flops_positive_and_grows_with_depth():
    flops = [GPT.build(config_for_depth(d, V, T), "cpu").estimate_flops() for d in (1, 2, 3)]
    assert flops[0] > 0
    assert flops[0] < flops[1] < flops[2]


def test_setup_optimizers_covers_each_parameter_once():
    model = tiny(depth=2)
    adamw, muon = model.setup_optimizers()
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    block_matrices = {id(p) for b in model.model.layers for p in b.parameters() if p.ndim == 2}
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params} == block_matrices
    assert all(p.ndim == 2 for p in muon_params)
    assert id(model.model.embed_tokens.weight) not in {id(p) for p in muon_params}
    assert id(model.lm_head.weight) not in {id(p) for p in muon_params}
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(1, V, T), "cpu")
    optimizers = model.setup_optimizers()
    x, y = batch(B=4)
    losses = []
    for _ in range(8):
        loss = model(x, y)
        losses.append(loss.item())
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.5, losses


def test_state_dict_uses_hf_qwen3_names():
    model = tiny(depth=2)
    keys = set(model.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        expected |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    assert keys == expected  # rotary tables are not persisted
    c = model.config
    assert model.state_dict()["model.layers.0.self_attn.q_proj.weight"].shape == (c.n_head * c.head_dim, c.n_embd)
    assert model.state_dict()["model.layers.0.self_attn.q_norm.weight"].shape == (c.head_dim,)


def test_config_to_dict_round_trip():
    c = config_for_depth(2, V, T)
    assert GPTConfig(**c.to_dict()) == c


# ---- the training loss without whole-batch logits (LinearCrossEntropy) -----------------------

def loss_and_grads(model, x, y, reduction="mean", chunked=True, rows=None, grad_scale=0.37):
    model.chunked_loss, model.loss_chunk_rows = chunked, rows
    model.zero_grad(set_to_none=True)
    loss = model(x, y, loss_reduction=reduction)
    (loss * grad_scale).backward()  # a non-unit scale, as with gradient accumulation
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [None, 7])  # one chunk; chunks that do not divide B*T
def test_chunked_loss_equals_plain_cross_entropy_with_gradients(reduction, rows):
    model = tiny(depth=2)
    x, y = batch(B=3)
    y = y.clone()
    y[0, :5] = -1
    y[2, 30:] = -1
    plain_loss, plain_grads = loss_and_grads(model, x, y, reduction, chunked=False)
    loss, grads = loss_and_grads(model, x, y, reduction, rows=rows)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0)
    for name, g in plain_grads.items():
        assert grads[name].dtype == g.dtype
        assert (grads[name] - g).abs().max() <= 1e-6 * g.abs().max(), name
    assert plain_grads["lm_head.weight"].abs().max() > 0  # the comparison is not vacuous


def test_chunked_loss_keeps_no_logit_sized_tensor_for_backward():
    # What autograd saves for backward: the plain path keeps (B*T, V) logits; the chunked loss
    # keeps only gradients of x (B*T, d) and of the head (V, d).
    vocab = 2048
    model = tiny(depth=1, vocab=vocab)
    x, y = batch(B=8, vocab=vocab)
    n_logits = 8 * T * vocab

    def largest_saved(chunked):
        model.chunked_loss, model.loss_chunk_rows = chunked, 16
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, y).backward()
        return max(sizes)

    assert largest_saved(False) >= n_logits
    assert largest_saved(True) <= n_logits // 4  # here the head's gradient, V x d, is the largest


def test_chunked_loss_without_gradients_and_with_a_frozen_head():
    model = tiny()
    x, y = batch(B=2)
    with torch.no_grad():
        no_grad_loss = model(x, y)
    loss, grads = loss_and_grads(model, x, y)
    assert torch.equal(no_grad_loss, loss)
    model.lm_head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(x, y).mul(0.37).backward()
    assert model.lm_head.weight.grad is None
    assert torch.allclose(model.model.embed_tokens.weight.grad, grads["model.embed_tokens.weight"], rtol=0, atol=1e-7)


def test_chunked_loss_with_every_target_ignored_is_nan_like_cross_entropy():
    model = tiny()
    x, _ = batch(B=1)
    y = torch.full_like(x, -1)
    model.chunked_loss = False
    plain = model(x, y)
    model.chunked_loss = True
    assert torch.isnan(plain) and torch.isnan(model(x, y))


def test_training_attention_is_causal_sdpa_without_a_mask(monkeypatch):
    # One fused kernel call per layer with is_causal=True and no explicit mask: the form for which
    # CUDA picks its flash / memory-efficient kernels.
    import nanochat.gpt as gpt
    calls = []
    real = gpt.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((args, kwargs))
        return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", spy)
    model = tiny(depth=2)
    x, y = batch()
    model(x, y).backward()
    assert len(calls) == 2
    for args, kwargs in calls:
        assert args == () and kwargs.get("is_causal") is True and kwargs.get("attn_mask") is None
