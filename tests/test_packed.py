"""Decoding layouts of the weights (models/packed.py), MKL-packed and transposed: same products as F.linear,
used only where they apply."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from numerics import NET_TOL

from models import packed as pk
from models.generation import SamplingParams, generate

pytestmark = pytest.mark.skipif(not pk.AVAILABLE, reason="this torch build has no MKL")


@pytest.fixture(autouse=True)
def packing_on(monkeypatch):
    """The MKL layout is tested on every processor, also where it does not pay (pk.PAYS False: the AMD EPYC);
    the transposed one-row layout only where a test turns it on."""
    monkeypatch.setattr(pk, "PAYS", True)
    monkeypatch.setattr(pk, "TRANSPOSE_GEMV", False)


def test_packed_product_matches_linear_and_only_for_its_row_count():
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    p = pk.repack(None, w, rows=8)
    assert p is not None and pk.repack(p, w, rows=8) is p            # still fresh: kept
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(pk.linear(x, w, p), F.linear(x, w), **NET_TOL)
        x3 = torch.randn(3, 40)                                        # another row count: plain GEMM
        assert torch.equal(pk.linear(x3, w, p), F.linear(x3, w))
    # With autograd on, the packed op (which has no backward) stands aside.
    y = pk.linear(x, w.requires_grad_(), p)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x, w))


def test_weight_changed_in_place_retires_its_pack():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    p = pk.repack(None, w, rows=4)
    with torch.no_grad():
        w.mul_(-2.0)                                                    # as an optimizer step would
        x = torch.randn(4, 32)
        assert not p.fresh(w, 4)
        assert torch.equal(pk.linear(x, w, p), F.linear(x, w))        # the new weight, not the pack's
    assert pk.repack(p, w, rows=4) is not p


def test_weights_made_under_inference_mode_still_pack():
    with torch.inference_mode():
        w = torch.randn(64, 32)
    p = pk.repack(None, w, rows=4)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(pk.linear(x, w, p), F.linear(x, w), **NET_TOL)
    assert pk.repack(p, w, rows=4) is p


def test_no_pack_where_it_does_not_pay():
    w = torch.randn(64, 32)
    assert pk.repack(None, w, rows=1) is None                           # a single row: GEMV is as fast
    assert pk.repack(None, w.double(), rows=8) is None                  # fp32 only


@pytest.mark.parametrize("tied", [True, False])
def test_generation_with_packed_weights_matches_plain(monkeypatch, tied):
    model = make_tiny_model(tie_embeddings=tied)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15]]
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    model.setup_cache(len(prompts), 16)                                 # what generate does first
    assert model.layers[0].attention.wqkv.packed is not None and model.head_packed is not None
    assert tied or model.output.packed is None                          # the untied head: packed once
    model.clear_cache()
    assert model.layers[0].feed_forward.w2.packed is None and model.head_packed is None
    packed = generate(model, prompts, params, [], 0, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pk, "PAYS", False)
    plain = generate(model, prompts, params, [], 0, torch.Generator().manual_seed(0))
    assert torch.equal(packed.tokens, plain.tokens)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, **NET_TOL)


def test_no_pack_outlives_a_training_step(monkeypatch):
    """The fused AdamW writes weights without bumping their version counter, so a pack kept from one
    generation call to the next would serve the old weights: generation after a step must match
    plain products on the new weights."""
    model = make_tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    generate(model, prompts, params, [], 0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    w = model.layers[0].feed_forward.w13.weight
    version = w._version
    model.train()
    model(torch.tensor(prompts)).logsumexp(-1).sum().backward()
    opt.step()
    model.eval()
    assert w._version == version                      # the premise: no version bump
    after = generate(model, prompts, params, [], 0).tokens
    monkeypatch.setattr(pk, "PAYS", False)
    assert torch.equal(after, generate(model, prompts, params, [], 0).tokens)


def test_transposed_layout_at_one_row(monkeypatch):
    monkeypatch.setattr(pk, "PAYS", False)                              # as on the AMD EPYC
    monkeypatch.setattr(pk, "TRANSPOSE_GEMV", True)
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    p = pk.repack(None, w, rows=1)
    assert p is not None and p.kind == "transposed" and pk.repack(p, w, rows=1) is p
    assert pk.repack(None, w, rows=2) is None                           # slower than F.linear at 4-16 rows
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(pk.linear(x, w, p), F.linear(x, w), **NET_TOL)
        torch.testing.assert_close(pk.linear(x, w, p, b), F.linear(x, w, b), **NET_TOL)
        w.mul_(-2.0)                                                    # an in-place update retires it
        assert torch.equal(pk.linear(x, w, p), F.linear(x, w))


@pytest.mark.parametrize("tied", [True, False])
def test_generation_at_batch_one_with_transposed_weights_matches_plain(monkeypatch, tied):
    monkeypatch.setattr(pk, "PAYS", False)
    monkeypatch.setattr(pk, "TRANSPOSE_GEMV", True)
    model = make_tiny_model(tie_embeddings=tied)
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    model.setup_cache(1, 16)
    assert model.layers[0].attention.wqkv.packed.kind == "transposed" and model.head_packed is not None
    model.clear_cache()
    packed = generate(model, [[5, 6, 7, 8, 9]], params, [], 0, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pk, "TRANSPOSE_GEMV", False)
    plain = generate(model, [[5, 6, 7, 8, 9]], params, [], 0, torch.Generator().manual_seed(0))
    assert torch.equal(packed.tokens, plain.tokens)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, **NET_TOL)


def test_no_pack_under_cpu_autocast(monkeypatch):
    monkeypatch.setattr(pk, "TRANSPOSE_GEMV", True)
    w = torch.randn(64, 32)
    p = pk.repack(None, w, rows=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pk.repack(None, w, rows=4) is None and pk.repack(None, w, rows=1) is None
        with torch.no_grad():
            assert pk.linear(torch.randn(4, 32), w, p).dtype == torch.bfloat16   # F.linear under autocast
