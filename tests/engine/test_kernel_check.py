"""Kernels that check themselves where they run (stage1/engine/kernel_check.py): a wrong or broken fast kernel is
replaced by its reference, loudly, under kernels="auto", and is an error under an explicit choice; verdicts are
cached per device and build; a CUDA graph that fails to capture or to match leaves decode eager."""

from __future__ import annotations

import logging

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine import kernel_check
from stage1.engine.backends import select_kernels
from stage1.engine.native import native_available

PROMPTS = [[5, 17, 99, 3, 42, 8], [61, 2, 2, 90]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def greedy_tokens(llm):
    return [out.outputs[0].token_ids for out in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                              use_tqdm=False)]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Verdicts in a cache of the test's own: every start checks again."""
    monkeypatch.setenv("STAGE1_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def zero_rms_norm():
    """stage1::rms_norm's CPU kernel registered over with one that returns zeros, as a miscompiled or mis-dispatched
    kernel behaves; the real one is back once the test ends."""
    library = torch.library.Library("stage1", "IMPL")
    library.impl("rms_norm", lambda x, weight, eps: torch.zeros_like(x), "CPU")
    yield
    library._destroy()
    assert torch.ops.stage1.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6).all()  # the real kernel is back


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built here (its build is optional)")
def test_a_wrong_native_op_is_replaced_under_auto_and_an_error_under_native(tiny_model_dir, fresh_cache,
                                                                            zero_rms_norm, caplog):
    x = torch.randn(3, 128)
    assert not torch.ops.stage1.rms_norm(x, torch.ones(128), 1e-6).any()  # the wrong op is the one dispatched
    with caplog.at_level(logging.WARNING, logger="stage1"):
        llm = LLM(tiny_model_dir, dtype="float32", kernels="auto", max_model_len=64)
    assert "stage1::rms_norm does not match its PyTorch reference" in caplog.text
    assert llm.engine_info["kernels"] == "native"
    assert llm.engine_info["kernels_replaced"] == ["stage1::rms_norm"]
    tokens = greedy_tokens(llm)
    del llm
    assert tokens == greedy_tokens(LLM(tiny_model_dir, dtype="float32", kernels="torch", max_model_len=64))
    with pytest.raises(kernel_check.KernelCheckError, match=r"kernels='native': stage1::rms_norm does not match"):
        LLM(tiny_model_dir, dtype="float32", kernels="native", max_model_len=64)


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built here (its build is optional)")
def test_the_right_native_ops_pass_and_the_verdict_is_cached(tiny_model_dir, fresh_cache, monkeypatch):
    llm = LLM(tiny_model_dir, dtype="float32", kernels="native", max_model_len=64)
    assert llm.engine_info["kernels_replaced"] == []
    del llm
    cached = list((fresh_cache / "kernel-checks").glob("*.json"))
    assert len(cached) == 1 and '"ok": true' in cached[0].read_text()

    def not_again(*args):
        raise AssertionError("the checks ran again on a device and build with a cached verdict")

    monkeypatch.setattr(kernel_check, "_run_checks", not_again)
    again = LLM(tiny_model_dir, dtype="float32", kernels="native", max_model_len=64)
    assert again.engine_info["kernels_replaced"] == []


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built here (its build is optional)")
def test_a_cached_failure_is_replaced_again_without_running(fresh_cache, zero_rms_norm, monkeypatch, caplog):
    device = torch.device("cpu")
    kernels, dtype = select_kernels("native", device).for_dtype(torch.float32, device)
    assert kernel_check.verify(kernels, device, dtype, explicit=False).replaced == ("stage1::rms_norm",)
    monkeypatch.setattr(kernel_check, "_run_checks", lambda *args: pytest.fail("ran the checks again"))
    with caplog.at_level(logging.WARNING, logger="stage1"):
        again = kernel_check.verify(kernels, device, dtype, explicit=False)
    assert again.replaced == ("stage1::rms_norm",) and "stage1::rms_norm" in caplog.text
    assert again.elementwise.rms_norm is not kernels.elementwise.rms_norm  # the reference now


def test_every_check_catches_a_kernel_that_returns_zeros():
    """Each check compares with its reference: a kernel returning zeros (or the reference's argmax) fails it."""
    device, dtype = torch.device("cpu"), torch.float32
    from stage1.engine.attention import ReferenceAttentionBackend

    class ZeroDecode(ReferenceAttentionBackend):
        name = "broken"

        def decode(self, q, cache, ctx, scale):
            return torch.zeros_like(q)

    labels = {"rotary_write_kv": "rw", "prefill": "pf", "decode": "dec"}
    assert [v.kernel for v in kernel_check.check_attention(ZeroDecode(), labels, device, dtype)] == ["dec"]
    assert all(v.ok for v in kernel_check.check_attention(ReferenceAttentionBackend(), labels, device, dtype))
    greedy = lambda logits, batch: logits.argmax(dim=-1)  # noqa: E731 - ignores the sampling parameters
    assert not kernel_check.check_sampler(greedy, "argmax", device).ok
    linear = kernel_check.check_linear(lambda x, w, b: torch.zeros(x.shape[0], w.shape[0]), None,
                                       torch.nn.functional.linear, "zeros", torch.float32, device, dtype)
    assert not linear.ok and "max abs error" in linear.detail


def test_a_decode_graph_that_fails_to_capture_or_to_match_leaves_decode_eager(checkpoint, monkeypatch, caplog,
                                                                               decode_graphs_on_cpu):
    """The graphs' own path on the CPU (decode_graphs_on_cpu), told that it can capture: a capture that raises,
    then one whose replay computes nothing. Either way a warning, decode eager from then on, the eager tokens."""
    path = checkpoint("gqa2-d128-untied")
    expected = greedy_tokens(LLM(path, dtype="float32", kernels="torch", max_model_len=64, enforce_eager=True))

    class NothingGraph:
        def replay(self):
            pass

    def raises(size):
        raise RuntimeError("operation not permitted when stream is capturing")

    for capture, message in ((raises, "operation not permitted"), (lambda size: (NothingGraph(), torch.zeros(
            size, 128)), "its replay does not match the eager step")):
        llm = LLM(path, dtype="float32", kernels="torch", max_model_len=64)
        graphs = llm.core.runner.graphs
        graphs.capture = True
        monkeypatch.setattr(graphs, "_record", capture)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stage1"):
            assert greedy_tokens(llm) == expected
        assert message in caplog.text and "decode steps run eagerly" in caplog.text
        assert not graphs.capture and graphs.captured == []
