"""The CUDA paths: skipped with the reason where no GPU is visible (run them on a GPU machine with
`python -m pytest -q tests/test_cuda.py`)."""
import pytest
import torch

import decoding
import model as M
import train
from test_generate import fast_tiny, stub_text_encoder
from test_model import inputs, tiny, training_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def on_cuda(text_encoder):
    return lambda texts, device: tuple(t.to(device) for t in text_encoder(texts, device))


def test_recurrent_decoding_equals_full_forward_on_cuda():
    net = tiny(kernel="softmax", pattern="delay").eval().cuda()
    tokens, text, mask = (t.cuda() for t in inputs(t=330))
    with torch.no_grad():
        full = net(tokens, text, mask)
        state = net.init_state(2, "cuda")
        worst = (net.prefill(tokens[..., :17], text, mask, state) - full[:, :, 16]).abs().max()
        for t in range(17, 330):
            worst = max(worst, (net.step(tokens[..., t], state) - full[:, :, t]).abs().max())
    assert worst <= 1e-3


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_cuda_graph_decoding_samples_what_eager_samples(pattern):
    net = fast_tiny(pattern, "cuda")
    kwargs = dict(steps=60, device="cuda", seed=4, top_k=50, cfg=2.0)
    eager = decoding.sample(net, on_cuda(stub_text_encoder), ["a", "b"], mode="eager", **kwargs)
    graph = decoding.sample(net, on_cuda(stub_text_encoder), ["a", "b"], mode="graph", **kwargs)
    refeed = decoding.sample(net, on_cuda(stub_text_encoder), ["a", "b"], refeed=True, **kwargs)
    assert torch.equal(eager, graph) and torch.equal(eager, refeed)


def test_compiled_and_captured_sampling_equals_eager_on_cuda():
    """decode=compile on a GPU: the step and the sampler compiled together and captured as one graph."""
    net = fast_tiny("delay", "cuda")
    kwargs = dict(steps=60, device="cuda", seed=4, top_k=50, top_p=0.9, cfg=2.0)
    eager = decoding.sample(net, on_cuda(stub_text_encoder), ["a", "b"], mode="eager", **kwargs)
    compiled = decoding.sample(net, on_cuda(stub_text_encoder), ["a", "b"], mode="compile", **kwargs)
    assert torch.equal(eager, compiled)


def test_bf16_autocast_training_step_on_cuda():
    net = tiny(dropout=0.1).cuda()
    tokens, text, mask = (t.cuda() for t in inputs(t=128))
    targets = torch.randint(0, 1024, (2, 4, 128), device="cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = net.loss(tokens, targets, text, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()


def test_compiled_bf16_training_step_equals_eager_on_cuda():
    """deploy.py --compile on a GPU: the reversible branches compiled by inductor, under bf16 autocast, with
    dropout (its masks drawn as eager draws them, so the backward's recomputation replays them)."""
    eager, compiled = tiny(dropout=0.1).cuda(), tiny(dropout=0.1).cuda()
    run = train.compile_for_training(compiled)
    batch = (*(t.cuda() for t in inputs(t=128)), torch.randint(0, 1024, (2, 4, 128), device="cuda"))
    want, got = [training_gradients(net, call, batch, "cuda", True) for net, call in ((eager, eager), (compiled, run))]
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(want, got, 0) > 0.999


def test_compiled_and_captured_decoding_matches_eager_on_cuda():
    """decode=compile on a GPU: the compiled step, captured as a CUDA graph, gives eager's logits."""
    net = fast_tiny("parallel", "cuda")
    text, mask = on_cuda(stub_text_encoder)(["a", "b"], "cuda")
    tokens = torch.randint(0, 1024, (2, 4, 40), device="cuda")
    logits = {}
    with torch.no_grad():
        for mode in ("eager", "compile"):
            decoder = decoding.Decoder(net, 2, "cuda", mode)
            steps = [decoder.prefill(tokens[..., :8], text, mask).clone()]
            steps += [decoder.step(tokens[..., t]).clone() for t in range(8, 40)]
            logits[mode] = torch.stack(steps)
    assert decoder.mode == "compile" and "step" in decoder.replays
    assert (logits["eager"] - logits["compile"]).abs().max() < 1e-3
