"""model.py: exact causal FAVOR+, recurrent decoding, reversible layers, text masking."""
import copy
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import decoding
import model as M
import train
from model import ModelConfig, MusicTransformer

TINY = ModelConfig(dim=64, depth=2, heads=4, dim_head=16, nb_features=32, local_window=7, text_dim=24,
                   dropout=0.0, chunk_size=16, max_len=400)


def tiny(**overrides):
    torch.manual_seed(0)
    net = MusicTransformer(replace(TINY, **overrides))
    with torch.no_grad():          # ReZero gates start near 0; open them so every branch matters
        for p in net.parameters():
            if p.dim() == 0:
                p.fill_(0.5)
    return net


def inputs(b=2, t=61, vocab=1024, text_len=5, text_dim=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab + 1, (b, 4, t), generator=g)
    text = torch.randn(b, text_len, text_dim, generator=g)
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[-1, text_len // 2:] = False
    return tokens, text, mask


def quadratic(qf, kf, v, causal=True):
    scores = qf.double() @ kf.double().transpose(-1, -2)
    if causal:
        scores = scores.tril()
    return (scores @ v.double()) / scores.sum(-1, keepdim=True)


# -----------------------------------------------------------------------------
# the attention functions

def test_causal_linear_attention_equals_float64_quadratic():
    g = torch.Generator().manual_seed(0)
    qf, kf = torch.rand(2, 3, 300, 32, generator=g), torch.rand(2, 3, 300, 32, generator=g)
    v = torch.randn(2, 3, 300, 16, generator=g)
    for chunk in (1, 7, 64, 300, 512):
        out = M.causal_linear_attention(qf, kf, v, chunk=chunk)
        assert (out.double() - quadratic(qf, kf, v)).abs().max() < 1e-5


def test_softmax_kernel_is_stable_and_exact_without_eps():
    """Large logits: the running-max stabiliser keeps every feature finite, and the result equals the
    float64 product of the unstabilised features (no eps anywhere to bias the normaliser)."""
    g = torch.Generator().manual_seed(0)
    q, k = 4 * torch.randn(1, 2, 200, 16, generator=g), 4 * torch.randn(1, 2, 200, 16, generator=g)
    k[:, :, 150:] *= 3                                     # a later burst of large keys
    v = torch.randn(1, 2, 200, 16, generator=g)
    proj = M.favor_projection(64, 16, seed=0)
    qf, _ = M.favor_features(q, proj, "softmax", is_query=True)
    kf, m = M.favor_features(k, proj, "softmax", is_query=False)
    assert torch.isfinite(qf).all() and torch.isfinite(kf).all()
    out = M.causal_linear_attention(qf, kf, v, m, chunk=32)

    def raw(x):  # exp(w·x' - |x'|²/2), unstabilised, float64
        x = x.double() * 16 ** -0.25
        return torch.exp(x @ proj.double().t() - 0.5 * x.pow(2).sum(-1, keepdim=True))
    ref = quadratic(raw(q), raw(k), v)
    assert (out.double() - ref).abs().max() < 1e-4


def test_matches_performer_pytorch_on_identical_features():
    from performer_pytorch.performer_pytorch import causal_linear_attention_noncuda, linear_attention
    g = torch.Generator().manual_seed(0)
    qf, kf = torch.rand(2, 4, 256, 32, generator=g) + 1e-3, torch.rand(2, 4, 256, 32, generator=g) + 1e-3
    v = torch.randn(2, 4, 256, 16, generator=g)
    ours = M.causal_linear_attention(qf, kf, v, chunk=64)
    assert torch.allclose(ours, causal_linear_attention_noncuda(qf, kf, v), atol=1e-5, rtol=1e-4)
    assert torch.allclose(M.linear_attention(qf, kf, v), linear_attention(qf, kf, v), atol=1e-5, rtol=1e-4)


def test_performer_softmax_kernel_leaks_the_future_ours_does_not():
    """performer-pytorch's key stabiliser is a maximum over the whole sequence; ours is a running one."""
    from performer_pytorch.performer_pytorch import causal_linear_attention_noncuda, softmax_kernel
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=g) for _ in range(3))
    proj = M.favor_projection(32, 16, seed=0)
    k2 = k.clone()
    k2[:, :, 40:] *= 5                                     # change only the future of position 39

    def theirs(keys):
        qf = softmax_kernel(q, projection_matrix=proj, is_query=True)
        return causal_linear_attention_noncuda(qf, softmax_kernel(keys, projection_matrix=proj, is_query=False), v)

    def ours(keys):
        kf, m = M.favor_features(keys, proj, "softmax", is_query=False)
        return M.causal_linear_attention(M.favor_features(q, proj, "softmax", is_query=True)[0], kf, v, m)
    assert not torch.equal(theirs(k)[:, :, :40], theirs(k2)[:, :, :40])
    assert torch.equal(ours(k)[:, :, :40], ours(k2)[:, :, :40])


def test_favor_softmax_approaches_exact_attention_as_features_grow():
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(4, 2, 64, 16, generator=g) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    errors = []
    for nb in (8, 64, 512):
        err = 0
        for seed in range(3):
            proj = M.favor_projection(nb, 16, seed)
            kf, m = M.favor_features(k, proj, "softmax", is_query=False)
            out = M.causal_linear_attention(M.favor_features(q, proj, "softmax", is_query=True)[0], kf, v, m)
            err += (out.double() - exact).abs().mean().item()
        errors.append(err)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.3 * errors[0]


def test_local_attention_is_a_sliding_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g) for _ in range(3))
    for window in (1, 7, 16, 80):
        i, j = torch.arange(50)[:, None], torch.arange(50)[None]
        band = (j <= i) & (j > i - window)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
        assert torch.allclose(M.local_attention(q, k, v, window), ref, atol=1e-6)


# -----------------------------------------------------------------------------
# the model

@pytest.mark.parametrize("kernel,attention,pattern", list(itertools.product(
    ["generalized", "softmax"], ["favor", "softmax"], ["parallel", "delay"])))
def test_strict_causality(kernel, attention, pattern):
    net = tiny(kernel=kernel, attention=attention, pattern=pattern).eval()
    tokens, text, mask = inputs()
    changed = tokens.clone()
    changed[..., 40:] = torch.randint(0, 1025, changed[..., 40:].shape)
    with torch.no_grad():
        assert torch.equal(net(tokens, text, mask)[:, :, :40], net(changed, text, mask)[:, :, :40])


@pytest.mark.parametrize("kernel,attention,pattern,cross,positions,global_text", [
    ("generalized", "favor", "parallel", "favor", "absolute", False), ("softmax", "favor", "delay", "favor", "absolute", True),
    ("generalized", "favor", "delay", "softmax", "relative", True), ("generalized", "softmax", "parallel", "favor", "absolute", True),
    ("softmax", "favor", "parallel", "favor", "relative", False)])
def test_recurrent_decoding_equals_full_forward(kernel, attention, pattern, cross, positions, global_text):
    """Prefill + 313 steps with a local window of 7 (the ring wraps ~45 times), token shift on: every
    step's logits equal the full forward's, and no state tensor changes shape or is reallocated."""
    net = tiny(kernel=kernel, attention=attention, pattern=pattern, cross_attention=cross, positions=positions,
               global_text=global_text).eval()
    tokens, text, mask = inputs(t=330)
    with torch.no_grad():
        full = net(tokens, text, mask)
        state = net.init_state(2, "cpu")
        before = [(t.data_ptr(), t.shape) for t in decoding._state_tensors(state)]
        logits = net.prefill(tokens[..., :17], text, mask, state)
        after_prefill = [(t.data_ptr(), t.shape) for t in decoding._state_tensors(state)]
        worst = (logits - full[:, :, 16]).abs().max()
        for t in range(17, 330):
            worst = max(worst, (net.step(tokens[..., t], state) - full[:, :, t]).abs().max())
    assert worst <= 1e-4
    assert [(t.data_ptr(), t.shape) for t in decoding._state_tensors(state)] == after_prefill
    assert set(before) <= set(after_prefill)          # prefill fills the state in place, adding only the text's keys/values


def test_the_decoding_copy_folds_its_gates_and_computes_the_same():
    net = tiny().eval()
    tokens, text, mask = inputs(t=40)
    with torch.no_grad():
        expected = net(tokens, text, mask)
        fast = decoding.for_decoding(net, "cpu", torch.float32)
        assert all(b.f.gate is None and b.g.gate is None for b in fast.blocks)
        assert (fast(tokens, text, mask) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_products_equal_f_linear(dtype):
    """Under torch.compile on a CPU, model.Linear computes a few rows as one multiply-and-sum per row over
    its stored input: the same as F.linear, also for inputs that are views at an offset or come from an
    operation inductor could have recomputed inside the product."""
    torch.manual_seed(0)
    lin = decoding.RowLinear(48, 24).to(dtype).eval()
    both = lambda big: (lin(F.gelu(big[:, 1])), lin(big[:, 2]))
    compiled = torch.compile(both, fullgraph=True, dynamic=False)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for rows in (1, 2, 5):
            big = torch.randn(rows, 3, 48).to(dtype)
            expected = (F.linear(F.gelu(big[:, 1]), lin.weight, lin.bias), F.linear(big[:, 2], lin.weight, lin.bias))
            for got, want in zip(compiled(big), expected):
                assert got.dtype == dtype and got.shape == want.shape
                assert (got.float() - want.float()).abs().max() <= tolerance


def test_compiled_decoding_attention_and_features_equal_the_library_calls():
    """Under torch.compile on a CPU, a step's attention over its ring and its FAVOR+ feature map are sums
    that inductor fuses: the same as F.scaled_dot_product_attention and the matrix product."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    mask = torch.zeros(1, 20).masked_fill_(torch.arange(20) > 12, float("-inf"))   # slots not written yet
    projection = torch.randn(32, 16)
    both = lambda q, k, v: (decoding.attend(q, k, v, mask), decoding.favor_features(q, projection, "softmax", is_query=True)[0])
    with torch.no_grad():
        got = torch.compile(both, fullgraph=True, dynamic=False)(q, k, v)
        want = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), both(q, k, v)[1])
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5


def test_reversible_gradients_equal_plain_backprop_with_dropout():
    rev = tiny(dropout=0.1).train()
    plain = tiny(dropout=0.1, reversible=False).train()
    plain.load_state_dict(rev.state_dict())
    tokens, text, mask = inputs(t=40)
    targets = torch.randint(0, 1024, (2, 4, 40))
    for net in (rev, plain):
        torch.manual_seed(123)
        net.loss(tokens, targets, text, mask)[0].backward()
    for (name, a), b in zip(rev.named_parameters(), plain.parameters()):
        assert a.grad is not None, name
        assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-9, name


def training_gradients(net, call, batch, device, autocast):
    """The gradients (flattened) of one training step of net, called through `call` (net, or its compiled
    form), from seed 123 (dropout's masks); under bf16 autocast on `device` if autocast."""
    tokens, text, mask, targets = batch
    net.zero_grad()
    torch.manual_seed(123)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = M.codebook_loss(call(tokens, text, mask), targets)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_compiled_training_compiles_every_branch_and_equals_eager():
    """deploy.py --compile: Dynamo cannot trace the reversible stack whole, so each residual branch is
    compiled whole (a graph break would be an error, not a silent fall back to eager), for the forward pass
    and for the backward's recomputation, which must replay the forward's dropout; in float32 and under
    bf16 autocast. With aot_eager (Dynamo and AOTAutograd, without inductor's C++ builds, which take
    minutes on 2 cores); tests/test_cuda.py runs inductor."""
    from torch._dynamo.utils import counters
    eager, compiled = tiny(dropout=0.1, depth=1).train(), tiny(dropout=0.1, depth=1).train()
    run = train.compile_for_training(compiled, "aot_eager")
    assert all(block.compiled is None for block in copy.deepcopy(compiled).blocks)   # the EMA's copy: eager
    batch = (*inputs(t=40), torch.randint(0, 1024, (2, 4, 40), generator=torch.Generator().manual_seed(0)))
    counters.clear()
    for autocast in (False, True):
        want, got = [training_gradients(net, call, batch, "cpu", autocast) for net, call in ((eager, eager), (compiled, run))]
        assert (want - got).abs().max() <= (1e-2 if autocast else 1e-5) * want.abs().max(), autocast
    assert counters["stats"]["unique_graphs"] >= 16    # 4 kinds of branch × (forward, recomputation) × 2 precisions


@pytest.mark.parametrize("cross,kernel", [("favor", "generalized"), ("favor", "softmax"), ("softmax", "generalized")])
def test_padded_text_tokens_have_no_influence(cross, kernel):
    net = tiny(cross_attention=cross, kernel=kernel).eval()
    tokens, text, mask = inputs(b=1, text_len=4)
    mask[:] = True
    padded = torch.cat([text, 100 * torch.randn(1, 6, 24)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.bool)], 1)
    with torch.no_grad():
        assert torch.allclose(net(tokens, text, mask), net(tokens, padded, padded_mask), atol=1e-5)


def test_layouts_round_trip_and_never_target_the_start_token():
    codes = torch.randint(0, 1024, (3, 4, 20))
    for pattern in ("parallel", "delay"):
        targets = M.to_layout(codes, pattern)
        assert targets.shape[-1] == (23 if pattern == "delay" else 20)
        assert torch.equal(M.from_layout(targets, pattern, 20), codes)
        assert (targets < 1024).all()                        # the start token (1024) is never a target
        inp = M.inputs_from_targets(targets, 1024)
        assert (inp[..., 0] == 1024).all() and (inp >= 0).all() and (inp <= 1024).all()
    delay = M.to_layout(codes, "delay")
    assert delay[0, 3, 2] == M.START and delay[0, 3, 3] == codes[0, 3, 0]
    assert tiny().head.out_features == 4 * 1024             # logits cover codes only: 1024 cannot be sampled


def test_random_features_are_seeded_and_redrawn_identically():
    a, b = tiny(), tiny()
    projections = lambda net: [buf.clone() for name, buf in net.named_buffers() if name.endswith("projection")]
    assert all(torch.equal(x, y) for x, y in zip(projections(a), projections(b)))
    first = projections(a)
    a.redraw_features(3), b.redraw_features(3)
    assert all(torch.equal(x, y) for x, y in zip(projections(a), projections(b)))
    assert not any(torch.equal(x, y) for x, y in zip(projections(a), first))


def test_text_encoder_runs_offline_once_per_text():
    enc = checkpoint.TextEncoder()
    states, mask = enc(["calm piano", "upbeat major arpeggio with drums", "calm piano"])
    assert states.shape[0] == 3 and states.shape[2] == 384 == enc.dim
    assert mask[0].sum() < mask[1].sum() and torch.equal(states[0], states[2])
    assert len(enc.cache) == 2
    empty, empty_mask = enc([""])
    assert empty_mask.sum() == 2                             # [CLS] [SEP]: the unconditional text


def test_unknown_text_encoder_fails_clearly():
    with pytest.raises(SystemExit, match="could not load the text encoder 'no-such/model-xyz'"):
        checkpoint.TextEncoder("no-such/model-xyz")


@pytest.mark.parametrize("reversible", [True, False])
def test_bf16_autocast_training_step_on_cpu(reversible):
    """The CUDA training path (bf16 autocast) exercised on the CPU: the reversible backward rebuilds its
    activations under the same autocast, and the gradients agree with float32's."""
    net = tiny(dropout=0.0, reversible=reversible)
    tokens, text, mask = inputs(t=64)
    targets = torch.randint(0, 1024, (2, 4, 64), generator=torch.Generator().manual_seed(0))
    net.loss(tokens, targets, text, mask)[0].backward()
    reference = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = net.loss(tokens, targets, text, mask)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.isfinite(loss) and torch.isfinite(grads).all()
    assert torch.nn.functional.cosine_similarity(reference, grads, 0) > 0.99
