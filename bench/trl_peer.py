"""TRL's PPOTrainer as the peer of bench/bench_ppo.py --trl: the same weights, prompts and shapes, timed per
phase in the same process, one iteration per call so that its iterations interleave with ours.

TRL and transformers are not dependencies of this project. Make a side environment for them (docs/PERFORMANCE.md,
"Performance"): `make trl-env`, then `.trl-env/bin/python bench/bench_ppo.py --trl`.

How the phases are read. TRL 1.12's `trl.experimental.ppo.PPOTrainer.train()` calls module-level functions
of `ppo_trainer` for each step of an iteration; we wrap them with timers (a CUDA synchronize around each
on a GPU, where TRL's own loop syncs at every `.item()` anyway):
    generate   batch_generation          (HF generate with output_scores: it keeps (B, T_r, V) logits)
    score      get_reward                (the reward model, and the value model's rollout forward)
    reference  forward under no_grad     (the reference policy's full (B, T, V) logits)
    forward    forward with grad         (the update's policy + value forward, shared wrapper)
    backward   accelerator.backward
    optimiser  optimizer.step
    other      the rest of train(): log-softmax of the rollout logits, GAE, the losses, logging
One iteration = one `train()` call with total_episodes = batch size, so `num_total_batches` = 1.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("generate", "score", "reference", "forward", "backward", "optimiser", "other")


def _tokenizer():
    """A two-token fast tokenizer: TRL only uses it to pad the prompt ids (left) and for its eos id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


class TRLPeer:
    """TRL's PPOTrainer on the checkpoint directory `model_dir` (HF format), the prompts (token-id lists,
    pad id 0 never among them), `batch_size` rollouts of exactly `new_tokens` tokens, 1 epoch x 1 minibatch
    x 1 micro-batch: the shapes of bench_ppo's default. With bf16 (bench_ppo's --precision resolved to bf16):
    TRL's mixed precision and its frozen models in bf16."""

    def __init__(self, model_dir: Path, prompts: list[list[int]], batch_size: int, new_tokens: int,
                 device: torch.device, lr: float = 2e-6, bf16: bool = False):
        import datasets
        import transformers
        from transformers import AutoModelForSequenceClassification, LlamaForCausalLM
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as mod

        self.mod, self.cuda = mod, device.type == "cuda"
        frozen = torch.bfloat16 if bf16 else torch.float32
        transformers.logging.set_verbosity_error()

        def causal(dtype):
            m = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
            m.generation_config.eos_token_id = None       # every response runs to new_tokens, as ours
            m.generation_config.pad_token_id = 0
            return m

        def scorer(dtype):
            m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
            m.config.pad_token_id = 0
            return m.to(device)

        self.out = tempfile.TemporaryDirectory(prefix="trl-peer-")
        config = PPOConfig(
            output_dir=self.out.name, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, local_rollout_forward_batch_size=batch_size,
            response_length=new_tokens, total_episodes=batch_size, stop_token=None, missing_eos_penalty=None,
            learning_rate=lr, num_sample_generations=0, save_strategy="no", report_to=[], logging_steps=1,
            use_cpu=not self.cuda, bf16=bf16, seed=0, disable_tqdm=True)
        data = datasets.Dataset.from_dict({"input_ids": prompts[:batch_size]})
        self.trainer = PPOTrainer(args=config, processing_class=_tokenizer(), model=causal(torch.float32),
                                  ref_model=causal(frozen), reward_model=scorer(frozen), train_dataset=data,
                                  value_model=scorer(torch.float32))
        self.trainer.log = lambda *a, **k: None                # no metric printing inside the timed region
        self.times: dict[str, float] = {}
        self._wrap()

    # --- phase timers ----------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def _phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def _timed(self, fn, name):
        def wrapper(*a, **k):
            phase = name(*a, **k) if callable(name) else name
            with self._phase(phase):
                return fn(*a, **k)
        return wrapper

    def _wrap(self) -> None:
        mod, tr = self.mod, self.trainer

        def batch_generation(model, queries, bs, pad_id, gen_config):
            gen_config.min_new_tokens = gen_config.max_new_tokens   # no early stop: exactly new_tokens tokens
            return self._orig_batch_generation(model, queries, bs, pad_id, gen_config)

        self._orig_batch_generation = mod.batch_generation
        mod.batch_generation = self._timed(batch_generation, "generate")
        mod.get_reward = self._timed(mod.get_reward, "score")
        mod.forward = self._timed(mod.forward, lambda *a, **k: "forward" if torch.is_grad_enabled() else "reference")
        tr.accelerator.backward = self._timed(tr.accelerator.backward, "backward")
        tr.optimizer.step = self._timed(tr.optimizer.step, "optimiser")

    def iteration(self) -> dict[str, float]:
        """One PPO iteration (one train() call): seconds per phase, "other" = the rest of the call."""
        self.times = {}
        with self._phase("iteration"):
            self.trainer.train()
        t = self.times
        t["other"] = t.pop("iteration") - sum(t.get(p, 0.0) for p in PHASES if p != "other")
        return t

    def close(self) -> None:
        self.out.cleanup()
