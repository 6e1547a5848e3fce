"""Triton kernels for the hot paths, each beside its plain-PyTorch reference.

  attention(q, k, v, start=None, sm_scale=None)        causal FlashAttention-2 with GQA and left padding
  token_logprobs(h, weight, targets, temperature=1.0,  fused output head + log-softmax + gather (+ entropy)
                 mask=None, return_entropy=False)
  attention_ref, logprob_ref                           the references the tests compare against
  use_triton(t)                                        the dispatch rule (env var RLCD_KERNELS, see dispatch.py)
"""
from .attention import attention, attention_ref
from .dispatch import HAS_TRITON, use_triton
from .logprob import logprob_ref, token_logprobs

__all__ = ["attention", "attention_ref", "token_logprobs", "logprob_ref", "use_triton", "HAS_TRITON"]
