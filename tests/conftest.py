import os

import torch

# The Triton kernels run in the interpreter on CPU tensors. TRITON_INTERPRET is read when @triton.jit
# decorates, i.e. when a kernel module is first imported, so it is set here before any test imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's reference is fp32: --precision auto resolves as on a CPU without native bf16 (rlcd.precision),
# here and in the commands the tests start; the bf16 tests ask for bf16 by name.
os.environ["RLCD_CPU_BF16"] = "0"

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


# --- margins report (make test-portable) -----------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--margins", metavar="FILE", default=None,
                     help="record, for every torch.testing.assert_close call site, the largest fraction of "
                          "its tolerance that was used, and write the table to FILE (see tests/numerics.py)")


def pytest_configure(config):
    path = config.getoption("--margins", default=None)
    if path:
        import numerics

        numerics.record_margins(path)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (fetched and converted once into $RLCD_HOME)."""
    from models import load_model

    return load_model("smollm2-135m-instruct")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + 3 specials) and a ChatML template."""
    from tokenizers.pre_tokenizers import ByteLevel

    from models.from_gguf import build_bpe_tokenizer
    from models.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(ByteLevel.alphabet())
    tokens = specials + alphabet
    tok = build_bpe_tokenizer(tokens, [3] * 3 + [1] * len(alphabet), [], "smollm")
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": CHATML}
    return Tokenizer(tok, config)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_model(seed: int = 0, dtype=torch.float32, **overrides):
    from models.llama import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny", **overrides)).to(dtype)
    # Default nn.Embedding init is N(0, 1); shrink it so that tied logits stay in a sane range.
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.2)
    return model.eval()
