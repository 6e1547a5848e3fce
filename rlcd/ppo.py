"""PPO against a trained preference model: the last stage of RLCD (`train.py ppo`).

    python train.py ppo --pm runs/harmless/pm-rlcd --prompts harmless --out runs/harmless/ppo
    python train.py ppo --pm runs/harmless/pm-rlcd --out runs/harmless/ppo --resume   # continue it
    python train.py ppo --pm runs/harmless/pm-rlcd --out runs/prof --profile           # phase table + trace
    python train.py ppo --preset paper ...        # RLCD's published settings (512 rollouts, 2 x 2 epochs)
    python generate.py --model runs/harmless/ppo --prompt "How do I pick a lock?"

RLCD (arXiv 2307.12950, Sec. 4 and the official code, AlpacaFarm's PPO trainer) aligns the base model
itself (no SFT stage) with PPO against the preference model: a per-token KL penalty to the frozen
initial policy, GAE, a value network initialised from the preference model. One iteration, written
out in `iteration()` below with the numbered steps of lm-human-preference-details:
  1. rollout      sample B responses (the generation engine), keeping the sampling log-probs
  2. score        the preference model's reward at each response's last token, normalised; a fixed
                  score for a response cut off without the stop token
  3. reference    log-probs under the frozen reference, values from the value network
  4. KL reward    r_t = -beta KL_t on every response token, plus the score on the last one
  5. GAE          optional reward whitening (scale only), GAE over response tokens, advantage whitening
  6. PPO epochs   clipped policy and value losses over shuffled minibatches, gradient accumulation
The math lives in rlcd/ppo_core.py as small pure functions that the tests check.

Old log-probs and values. With one epoch of one minibatch in one micro-batch (the default here), the
update's forward runs at exactly the rollout's weights, so it supplies the old log-probs and values and
steps 4-5 run between that forward and its backward: no value forward at rollout (ratio exactly 1).
Otherwise the values come from a forward at rollout, and the old log-probs from the sampling pass when
they are exact (top_k = 0, top_p = 1: the full tempered distribution that was sampled), else from a
policy forward (free with the shared value head, whose forward is the policy's).

Hot path: no host synchronisation inside an iteration except the generation engine's stop check; every
diagnostic stays a tensor until one `.tolist()` per iteration. Log-probs come from the fused entry
point kernels.token_logprobs, which never builds (B, T, V) logits. Phases (PHASES: the steps above, with
step 6 split into forward, backward and optimiser) are timed by rlcd/profiling.py's PhaseTimer, with CUDA
events on a GPU (no sync) and perf_counter on a CPU (where ops run synchronously), and logged as t_<phase>
seconds; --profile (profiling.run_profile) runs a few iterations under the PyTorch profiler instead.

Value network (--value-model): "separate" (the paper: a second trunk with a scalar head, initialised
from the preference model, trained jointly by the same optimiser) or "shared" (a zero-initialised
scalar head on the policy's own trunk, as lm-human-preferences; one trunk forward and backward less).

Run (see rlcd/runs.py): `main` plugs one iteration (train_iteration: the iteration, its one host sync,
the NaN guard, the KL controller's update) into runs.run_loop, the loop of every training stage, as its
step; Args subclasses runs.RunArgs. Run directory: OUT/args.json, OUT/metrics.jsonl (one record per
iteration, "step" is the iteration; sample responses every --sample-every), OUT/policy/ (a Hugging
Face-format policy that generate.py loads, plus value.safetensors or value_head.safetensors,
trainer_state.pt and run.json with the KL controller), replaced atomically every --save-every iterations.

Under torchrun (docs/SCALING.md): --batch-size stays the global number of rollouts; rank r samples and
trains on its share of the iteration's prompts (batch[r::N]), --micro-batch is per rank, and each rank
shuffles its own rows into its part of every minibatch. Whitening, explained variance, the loss
denominators and the KL controller's measured KL are taken over the global batch (ppo_core's
global_batch), the losses are scaled by N against FSDP's gradient averaging, and the logged metrics are
global. The policy, value network (and, with --fsdp, the frozen reference and preference model) are
made data-parallel by runs.parallelize; generation runs on `sampler`, a plain copy of the policy whose
weights are refreshed from the (sharded) policy once per rollout, so decoding never waits on a
collective and keeps its packed or compiled fast paths.

Shapes: B rollouts, T = T_p + T_r columns (left-padded prompt, then the right-padded response),
T_p prompt columns, T_r response columns, D model width, V vocabulary.

Length: PPO as one reads it, in one file of ~700 lines: the settings with every flag documented, the presets,
the iteration as one numbered function (~170 lines, kept whole so that the loop is visible in one place),
the models it needs and the run around it. What can stand apart does: the math in ppo_core.py, the timing
and --profile in profiling.py, the loop in runs.py, checkpoints and resume in checkpoints.py.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels import token_logprobs
from models import CheckpointError, Tokenizer, Transformer, load_model
from models.generation import Generation, SamplingParams, generate
from rlcd import distributed, runs
from rlcd.checkpoints import checkpointing, read_run_meta
from rlcd.cli import argv_of, parse_args
from rlcd.judge import is_refusal
from rlcd.ppo_core import (KL_ESTIMATORS, KLController, apply_missing_stop, batch_mean, explained_variance, gae,
                           kl_per_token, masked_mean, masked_whiten, policy_loss, shape_rewards, value_loss)
from rlcd.reward import (RewardModel, TextReward, end_marker, fp32_head, load_reward_model, load_rule,
                         pm_text_score, rule_score, score_tokens)
from rlcd.precision import freeze_for
from rlcd.profiling import PhaseTimer, run_profile

# Phases of an iteration, timed by PhaseTimer: the numbered steps of `iteration`, its update (step 6) as
# forward (the policy and value forward and the losses), backward, and optimiser (gradient clip, AdamW,
# schedule). "advantages" (steps 4-5) is timed wherever it runs: before the update, or, when the old
# log-probs and values come from the update's forward (the default), between that forward and the loss.
PHASES = ("generate", "score", "reference", "values", "advantages", "forward", "backward", "optimiser")
VALUE_MODELS = ("separate", "shared")


@dataclass(kw_only=True)
class Args(runs.RunArgs):
    """Align a policy against a preference model with PPO (train.py ppo)."""
    # The run, the optimiser and the device: runs.RunArgs (--out, --resume, --stop-after, --batch-size,
    # --lr, --warmup, --grad-clip, --train-layers, --save-every, --seed, --device, ...), with PPO's own
    # defaults below. A "step" there is an iteration here; --batch-size is prompts = rollouts per
    # iteration (paper: 512), optimiser steps are its minibatches.
    pm: str | None = None             # preference model: run directory of train.py pm (or its reward/); another family's is scored from text
    reward: str | None = None         # instead of --pm: a rule, MODULE:FUNCTION or FILE.py:FUNCTION, f(request, response) -> float
    policy: str = "smollm2-135m-instruct"  # initial policy and frozen reference: model name, checkpoint or run dir
    prompts: str = "harmless"         # task name (harmless, helpful, outlines) or prompt file, several joined by "+"; their train split
    preset: str = "default"           # default (measured on a 2-core CPU), paper (RLCD), nplus (N+ details); flags given win
    iterations: int = 60              # PPO iterations (rollout + update) in the schedule (paper: 40-80)
    # 1. rollout
    max_new_tokens: int = 64          # response length cap (paper: 300)
    temperature: float = 1.0          # sampling temperature; log-probs are taken at the same one (paper: 1)
    top_p: float = 1.0                # nucleus sampling (1 = off; anything else costs a policy forward per iteration)
    top_k: int = 0                    # top-k sampling (0 = off; same cost)
    max_prompt_tokens: int = 192      # prompts over this many tokens are dropped (paper: 192; as simulate's)
    # 2. score
    normalize_reward: bool = True     # (r - mean) / std with the PM's statistics on base-policy samples
    no_stop_score: float | None = None  # score of a response without the stop token (none = the PM's own; paper, N+: -1)
    # 4. KL reward
    kl_coef: float = 0.02             # beta, per token (paper: fixed 0.002-0.004; N+: 0.05)
    kl_target: float | None = None    # adaptive beta: target KL per sequence in nats (none = fixed beta)
    kl_horizon: int = 10000           # adaptive beta: horizon in rollouts (Ziegler et al.)
    kl_estimator: str = "k1"          # k1 = log pi - log pi_ref, or k3 = (r - 1) - log r
    kl_clamp: bool = True             # clamp k1 at 0 (official RLCD code)
    # 5. whitening and GAE
    whiten_rewards: bool = False      # scale the per-token rewards to unit variance (paper: yes; N+: no): with a normalised score on one token of T, it multiplies returns ~sqrt(T)-fold away from the value head's scale
    whiten_advantages: bool = True    # advantages to mean 0, std 1 over the batch
    gamma: float = 1.0                # GAE discount (paper: 1)
    lam: float = 1.0                  # GAE lambda (paper: 1; N+: 0.95)
    # 6. PPO epochs
    ppo_epochs: int = 2               # passes over each batch of rollouts (paper: 2; N+: 4)
    minibatches: int = 2              # optimiser steps per epoch (paper: 2)
    micro_batch: int = 8              # rollouts per forward/backward (gradient accumulation within a minibatch)
    clip: float = 0.2                 # policy ratio clip (paper: 0.2)
    value_clip: float = 0.2           # value clip around the rollout's values (paper: 0.2)
    vf_coef: float = 0.1              # value-loss coefficient (paper: 0.1)
    ent_coef: float = 0.0             # entropy bonus coefficient (0 = off; the logged entropy is then -mean log pi(x))
    lr: float = 1e-5                  # peak learning rate (paper: 1e-5 at 512 rollouts)
    warmup: float = 0.05              # warm-up: a fraction of the optimiser steps if < 1, else a step count
    value_model: str = "separate"     # separate (a trunk initialised from the PM, the paper) or shared (head on the policy)
    value_lr: float | None = 1e-4     # the value network's (or head's) peak learning rate (none: --lr); its gradient is clipped apart
    # run
    save_every: int = 10              # checkpoint every N iterations (and at the stop; 0 = at the stop only)
    sample_every: int = 10            # log a few sample responses every N iterations (0 = never)
    n_samples: int = 2                # responses shown per sample log
    profile: bool = False             # run a few iterations under the PyTorch profiler: phase table + Chrome trace, then exit

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}"),
            (self.value_model in VALUE_MODELS, f"--value-model must be one of {VALUE_MODELS}"),
            (self.kl_estimator in KL_ESTIMATORS, f"--kl-estimator must be one of {KL_ESTIMATORS}"),
            (self.temperature > 0, "--temperature must be > 0 (PPO needs a sampling distribution)"),
            (self.batch_size % self.minibatches == 0, "--minibatches must divide --batch-size"),
            ((self.pm is None) != (self.reward is None), "give exactly one of --pm and --reward"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SystemExit(f"train.py ppo: {msg}")


# Presets: flags prepended to the command line, so flags given explicitly win. "default" (Args' defaults)
# is the recipe measured on a 2-core CPU (docs/PPO.md): 16 rollouts of 64 tokens, 2 epochs x 2 minibatches
# with the value network at 10x the policy's rate (at 1 x 1 and the policy's rate its explained variance
# stayed below 0 over 40 iterations; at 2 x 2 and 1e-4 it reached 0.35-0.75 in the last quarter), policy
# lr 1e-5 (2e-6, the paper's rate scaled by sqrt(16/512), barely moved the policy; at 3e-5 it drifted into
# gibberish within 10 iterations), beta 0.02, cut-off responses scored as the PM scores them (with the
# paper's -1, ~91% of 64-token rollouts scored exactly -1) and a checkpoint every 10 iterations (one costs
# ~10 s beside a ~24 s iteration).
PRESETS: dict[str, dict] = {
    "default": {},
    # RLCD (arXiv 2307.12950, App. / official code): 512 rollouts, 2 epochs x 2 minibatches, responses up
    # to 300 tokens, lr 1e-5, beta 0.004, -1 without a stop, whitened rewards; everything else (clamped k1,
    # gamma = lambda = 1, clips 0.2, vf_coef 0.1, separate value net from the PM) is already the default; the
    # value network at the policy's rate.
    "paper": dict(batch_size=512, ppo_epochs=2, minibatches=2, micro_batch=8, max_new_tokens=300, iterations=60,
                  lr=1e-5, value_lr="none", kl_coef=0.004, no_stop_score=-1.0, whiten_rewards=True),
    # The N+ implementation details of RLHF with PPO (Huang et al. 2024) / TRL's PPO: beta 0.05 on
    # unclamped k1, no reward whitening, lambda 0.95, 4 epochs x 1 minibatch, -1 without a stop, one
    # learning rate for policy and value.
    "nplus": dict(kl_coef=0.05, kl_clamp=False, whiten_rewards=False, gamma=1.0, lam=0.95, ppo_epochs=4,
                  minibatches=1, value_lr="none", no_stop_score=-1.0),
}


def apply_preset(argv: list[str]) -> list[str]:
    """argv with the flags of its --preset (if any) put in front, so that explicit flags override them."""
    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), name)
    return argv_of(PRESETS.get(name or "default", {})) + argv


# --- the value network ---------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """A scalar head on the policy's own trunk (--value-model shared). Zero-initialised, as
    lm-human-preferences initialises its value head, so the first values are 0. fp32 even under
    autocast, like the preference model's head."""

    def __init__(self, dim: int, device: torch.device):
        super().__init__()
        self.proj = nn.Linear(dim, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        return fp32_head(h, self.proj)                                                 # (..., D) -> (...)


def response_columns(x: Tensor, T_p: int) -> Tensor:
    """(B, T, ...) -> (B, T_r, ...): the columns that predict the response tokens. Column T_p - 1 + t
    holds the state s_t before response token t (the last prompt token for t = 0); the last column,
    after the last response token, predicts nothing."""
    return x[:, T_p - 1:-1]


def response_hidden(trunk: Transformer, seq: Tensor, start: Tensor, T_p: int) -> Tensor:
    """(B, T_r, D) final hidden states at the columns that predict the response tokens."""
    return response_columns(trunk(seq, start=start, return_hidden=True), T_p)


@dataclass
class PPORun:
    """The state of a PPO run: the models and the optimiser state one iteration works on (built by
    `build`, used by `iteration`)."""
    args: Args
    policy: Transformer
    ref: Transformer                      # the frozen initial policy
    pm: RewardModel | TextReward          # the frozen preference model (token ids), or a reward read from text
    value_net: RewardModel | None         # --value-model separate: a trainable copy of the PM
    value_head: ValueHead | None          # --value-model shared: a head on the policy's trunk
    prompts: list[list[int]]              # encoded train prompts (<= max_prompt_tokens tokens)
    stop_ids: list[int]
    pad_id: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: KLController
    device: torch.device
    end_id: int | None = None             # the PM's end marker (a stop token), appended to cut-off responses
    sampler: Transformer | None = None    # under torchrun: the plain copy of the policy that generates

    def rollout_policy(self) -> Transformer:
        """The model that samples the rollouts: the policy itself in one process; under torchrun its
        plain copy, first given the policy's current weights (gathered whole once per rollout)."""
        if self.sampler is None:
            return self.policy
        distributed.refresh_copy(self.sampler, self.policy)
        return self.sampler.eval()

    @property
    def params(self) -> list[nn.Parameter]:
        return self.policy_params + self.value_params

    @property
    def policy_params(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    @property
    def value_params(self) -> list[nn.Parameter]:
        """The value network's (separate) or the value head's (shared) own parameters."""
        return [p for p in (self.value_net or self.value_head).parameters() if p.requires_grad]

    def values_and_logprobs(self, seq: Tensor, start: Tensor, T_p: int, tokens: Tensor, mask: Tensor,
                            ) -> tuple[Tensor, Tensor | None, Tensor]:
        """The current policy's log-probs of the response tokens, their entropies (only with an entropy
        bonus: on a CPU they cost two more passes over the (b T_r, V) logits, forward and recompute) and
        the value network's V(s_t), each (b, T_r) fp32: one policy forward (plus one value trunk if separate)."""
        h = response_hidden(self.policy, seq, start, T_p)                                     # (b, T_r, D)
        out = token_logprobs(h, self.policy.output_weight, tokens, self.args.temperature, mask,
                             return_entropy=self.args.ent_coef > 0)                            # (b, T_r) each
        logp, ent = out if self.args.ent_coef > 0 else (out, None)
        if self.value_head is not None:
            values = self.value_head(h)                                                        # (b, T_r)
        else:
            values = response_columns(self.value_net.values(seq, start), T_p)                  # (b, T_r)
        return logp, ent, values


# --- one iteration ------------------------------------------------------------------------------------------
def iteration(ppo: PPORun, it: int, timer: PhaseTimer) -> tuple[dict[str, Tensor], Generation, Tensor]:
    """Iteration `it` (0-based): a batch of rollouts and the PPO epochs on it. Returns the diagnostics as
    0-d tensors (not synchronised), the rollouts and their scores. Sampling and shuffling draw from a
    generator seeded by (seed, it) (and the rank under torchrun), so an iteration is a function of the
    weights, the optimiser state and `it`: what makes --resume exact."""
    a, dev = ppo.args, ppo.device
    policy, ref, pm = ppo.policy, ppo.ref, ppo.pm
    amp = runs.autocast(a, dev)
    world = distributed.world_size()
    # One stream per rank (under torchrun the ranks' rows get independent noise; one process: as ever).
    g = torch.Generator(dev).manual_seed((a.seed * 1_000_003 + it) * world + distributed.rank())
    beta = ppo.kl_ctl.value
    B = a.batch_size // world                   # this rank's rollouts (all of them in one process)
    # Old log-probs and values from the update's own forward (see the module docstring): possible when
    # nothing is updated before that forward, i.e. one epoch of one minibatch in one micro-batch.
    old_from_update = a.ppo_epochs == 1 and a.minibatches == 1 and a.micro_batch >= B

    # The sampling pass's log-probs serve as the old ones only with a separate value network whose values
    # come from a forward at rollout, when the sampled distribution is the full tempered one (below), and
    # in fp32: the incremental decode rounds differently from a full forward, ~1e-6 nat in fp32 but up to
    # ~3e-2 in bf16, which would make the first ratio and the KL to the reference visibly not 1 and 0.
    reuse_sampling_logp = (not old_from_update and ppo.value_head is None and a.top_k == 0
                           and a.top_p == 1.0 and not runs.precision_of(a, dev).bf16)

    # 1. Rollout: B prompts of this iteration (a pure function of seed and it; this rank's share of them
    #    under torchrun), sampled in lock-step.
    with timer("generate"), amp:
        policy.eval()
        batch = distributed.shard(runs.batch_indices(len(ppo.prompts), a.batch_size, it, a.seed))
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p)
        gen = generate(ppo.rollout_policy(), [ppo.prompts[i] for i in batch], params, ppo.stop_ids, ppo.pad_id,
                       generator=g, logprobs=reuse_sampling_logp)
        seq, start, T_p = gen.sequences, gen.start, gen.prompt_len         # (B, T), (B,), T_p
        tokens, mask = gen.tokens, gen.response_mask                       # (B, T_r) ids, (B, T_r) bool

    with torch.no_grad():
        # 2. Score: the PM reads prompt + response + stop token (its training input, rlcd/reward.py) at the
        #    last column; a response cut off at max_new_tokens then gets no_stop_score instead.
        with timer("score"), amp:
            if isinstance(pm, TextReward):
                # Another family's PM or a rule: the responses decoded and scored as text.
                pm_score = pm(batch, tokens, gen.lengths, gen.finished).to(dev)                # (B,)
            else:
                seq_pm, last = seq, T_p + gen.lengths - 1                                  # (B,) column
                if ppo.end_id is not None:
                    # The PM reads the input it was trained and normalised on (rlcd.reward.encode_input
                    # always ends with its end marker): a cut-off response gets the marker appended in one
                    # extra column, and a finished one has its stop token, whichever of the policy's it
                    # was (Qwen has two), replaced by the marker.
                    last = last + (~gen.finished).long()                                      # (B,)
                    seq_pm = F.pad(seq, (0, 1), value=ppo.pad_id).scatter(1, last[:, None], ppo.end_id)  # (B, T+1)
                pm_score = score_tokens(pm, seq_pm, start, last, normalize=a.normalize_reward)  # (B,)
            score = apply_missing_stop(pm_score.float(), gen.finished, a.no_stop_score)    # (B,)

        # 3. Reference log-probs (frozen initial policy), old log-probs and values.
        with timer("reference"), amp:
            h_ref = response_hidden(ref, seq, start, T_p)                                           # (B, T_r, D)
            ref_logp = token_logprobs(h_ref, ref.output_weight, tokens, a.temperature, mask)        # (B, T_r)
            del h_ref
        with timer("values"), amp:
            if old_from_update:
                old_logp = old_values = None        # from the update's forward at the same weights (step 6)
            elif ppo.value_head is not None:
                # Shared trunk: the forward that gives the values gives the old log-probs as well.
                old_logp, _, old_values = ppo.values_and_logprobs(seq, start, T_p, tokens, mask)
            else:
                old_values = response_columns(ppo.value_net.values(seq, start), T_p)                # (B, T_r)
                if reuse_sampling_logp:
                    # The sampling pass's log-probs are of the full tempered distribution, which is the
                    # sampling distribution here: reuse them and save a policy forward. They come from
                    # the incremental decode, which differs from a full forward by float rounding
                    # (~1e-6 in fp32), so the first PPO step's ratio is 1 to that precision.
                    old_logp = gen.logprobs                                                         # (B, T_r)
                else:
                    # top-k / top-p sampling: the sampled distribution is the filtered one, so PPO's
                    # ratio is taken against the full tempered policy, recomputed here.
                    h = response_hidden(policy, seq, start, T_p)
                    old_logp = token_logprobs(h, policy.output_weight, tokens, a.temperature, mask)

        if not old_from_update:
            # 4. Per-token KL reward and 5. GAE (see `advantages`).
            with timer("advantages"):
                adv, returns, kl = advantages(a, score, old_logp, ref_logp, old_values.float(), mask, beta)

    # 6. PPO epochs: shuffled minibatches, each one optimiser step accumulated over micro-batches. Timed
    #    as forward (forward and loss), backward, and optimiser (clip, AdamW, schedule).
    stats = {k: torch.zeros((), device=dev) for k in
             ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac", "grad_norm",
              "value_grad_norm")}
    n_steps = a.ppo_epochs * a.minibatches
    mb_size = B // a.minibatches
    lr = 0.0                # the learning rate the iteration's optimiser steps used, their mean
    policy.train()
    for _ in range(a.ppo_epochs):
        perm = torch.arange(B, device=dev) if old_from_update else \
            torch.randperm(B, generator=g, device=dev)                                       # (B,)
        for mb in perm.split(mb_size):
            # Response tokens of the minibatch (every rank's part of it): the loss mean's denominator.
            n_tok = distributed.all_reduce_sum(mask[mb].sum())
            micros = mb.split(a.micro_batch)
            for j, mi in enumerate(micros):
                distributed.sync_gradients(j == len(micros) - 1)        # all-reduce in the last backward
                m = mask[mi]                                                                 # (b, T_r)
                with timer("forward"), amp:
                    logp, ent, values = ppo.values_and_logprobs(seq[mi], start[mi], T_p, tokens[mi], m)
                if old_from_update:
                    # One epoch of one minibatch in one micro-batch (the default): nothing has been
                    # updated since the rollout, so this forward is the old policy and value network.
                    # Taking the old log-probs and values from it, then steps 4 and 5, saves the
                    # rollout's value forward (a whole trunk) and makes the ratio exactly 1.
                    with timer("advantages"):
                        old_logp, old_values = logp.detach(), values.detach().float()        # (B, T_r) each
                        adv, returns, kl = advantages(a, score, old_logp, ref_logp, old_values, mask, beta)
                with timer("forward"), amp:
                    pg, clipfrac, approx_kl = policy_loss(logp, old_logp[mi], adv[mi], m, a.clip, n_tok)
                    vf, vf_clipfrac = value_loss(values, old_values[mi], returns[mi], m, a.value_clip, n_tok)
                    loss = pg + a.vf_coef * vf
                    if ent is not None:
                        ent_mean = masked_mean(ent, m, n_tok)
                        loss = loss - a.ent_coef * ent_mean
                        stats["entropy"] += ent_mean.detach() / n_steps
                    for k, v in (("policy_loss", pg), ("value_loss", vf),
                                 ("approx_kl", approx_kl), ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac)):
                        stats[k] += v.detach().float() / n_steps
                with timer("backward"):
                    (loss * world if world > 1 else loss).backward()       # x N: FSDP averages the ranks' gradients
            with timer("optimiser"):
                # The policy's and the value network's gradients are clipped apart, so that the value
                # loss's larger gradient does not shrink the policy's step. clip_grad_norm_ with
                # max_norm=inf only measures; it returns a tensor (no sync). Over sharded gradients it is
                # a DTensor: the global norm once made whole.
                for key, params in (("grad_norm", ppo.policy_params), ("value_grad_norm", ppo.value_params)):
                    norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip or float("inf"))
                    stats[key] += distributed.full_tensor(norm).float() / n_steps
                lr += ppo.scheduler.get_last_lr()[0] / n_steps      # read before scheduler.step(); a float: no sync
                ppo.optimizer.step()
                ppo.scheduler.step()
                ppo.optimizer.zero_grad(set_to_none=True)

    # The diagnostics of the global batch (each a local computation at world size 1): the update's sums
    # (already divided by the global token counts) added over the ranks, the rest global_batch statistics.
    if world > 1:
        keys = [k for k in stats if k not in ("grad_norm", "value_grad_norm")]
        stats |= dict(zip(keys, distributed.all_reduce_sum(torch.stack([stats[k] for k in keys])).unbind()))
    lengths = gen.lengths.float()
    log_ratio = torch.where(mask, old_logp - ref_logp, 0.0)                                  # (B, T_r)
    if a.ent_coef == 0:
        # No entropy bonus, so no exact entropies: log the Monte Carlo estimate H = E_{x~pi}[-log pi(x)]
        # over the sampled tokens (unbiased, and free).
        stats["entropy"] = -masked_mean(old_logp, mask, global_batch=True)
    stats |= {
        "score": batch_mean(score, global_batch=True),
        "pm_score": batch_mean(pm_score.float(), global_batch=True),
        "kl": batch_mean(log_ratio.sum(1), global_batch=True),   # KL(pi || pi_ref) per sequence, k1 unclamped
        # what the reward paid for it
        "kl_penalty": batch_mean(beta * torch.where(mask, kl, 0.0).sum(1), global_batch=True),
        "explained_variance": explained_variance(old_values, returns, mask, global_batch=True),
        "value_mean": masked_mean(old_values, mask, global_batch=True),
        "return_mean": masked_mean(returns, mask, global_batch=True),
        "response_length": batch_mean(lengths, global_batch=True),
        "finished": batch_mean(gen.finished.float(), global_batch=True),
        "tokens": distributed.all_reduce_sum(lengths.sum()), "lr": torch.tensor(lr, device=dev),
    }
    return stats, gen, score


def advantages(a: Args, score: Tensor, old_logp: Tensor, ref_logp: Tensor, old_values: Tensor, mask: Tensor,
               beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 4 and 5 on a batch of rollouts: (advantages, returns, the per-token KL paid), each (B, T_r)."""
    # 4. Per-token KL reward: r_t = -beta KL_t, plus the score on the last real token.
    kl = kl_per_token(old_logp, ref_logp, a.kl_estimator, a.kl_clamp)                     # (B, T_r)
    rewards = shape_rewards(score, kl, mask, beta)                                        # (B, T_r)
    # 5. Whitening (scale only, official code) and GAE over response tokens; padding masked. Whitening
    #    statistics are those of the global batch (all_reduces under torchrun: every rank calls this).
    if a.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, global_batch=True)
    adv, returns = gae(rewards, old_values, mask, a.gamma, a.lam)                         # (B, T_r) each
    if a.whiten_advantages:
        adv = masked_whiten(adv, mask, global_batch=True)
    return adv, returns, kl


# --- setup ---------------------------------------------------------------------------------------------------
def encode_prompts(records: list[dict], tok: Tokenizer, max_len: int) -> tuple[list[list[int]], list[str], int]:
    """Chat-format prompt ids (the neutral prompt p of rlcd.tasks.format_prompt, as the PM's pairs), the
    ids of the records kept, and how many were dropped for being over max_len tokens."""
    from rlcd.tasks import format_prompt

    ids, keys = [], []
    for r in records:
        e = tok.encode(format_prompt(r["messages"], "chat", tok))
        if len(e) <= max_len:
            ids.append(e)
            keys.append(r["id"])
    return ids, keys, len(records) - len(ids)


@torch.no_grad()
def rescale_head(head: nn.Linear, mean: float, std: float) -> None:
    """A scalar head h -> w.h + b made to give (w.h + b - mean) / std: the preference model's reward in the
    normalised scale, as a value network's first estimate of the returns built from it."""
    std = max(std, 1e-8)
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)


def check_pm_format(pm_meta: dict | None) -> None:
    """A PM must have been trained on chat-format pairs, the format PPO renders its prompts in
    (encode_prompts; a PM's run.json records its pairs' formats)."""
    formats = (pm_meta or {}).get("formats")
    if formats is not None and "chat" not in formats:
        raise CheckpointError(f"the preference model was trained on {', '.join(formats)}-format pairs, but PPO "
                              f"renders its prompts as chat; train it on chat pairs (train.py simulate --format chat)")


def check_pm_matches(pm_tok: Tokenizer, tok: Tokenizer, pm_meta: dict | None = None) -> int:
    """A PM that reads the policy's token ids directly: the vocabularies must be the same; it must have been
    trained on chat pairs (check_pm_format); and its chat end marker must be a single token the policy
    stops on."""
    check_pm_format(pm_meta)
    if pm_tok.tok.get_vocab() != tok.tok.get_vocab():
        raise CheckpointError("the preference model's tokenizer differs from the policy's; PPO scores the "
                              "policy's token ids directly, so both must share one vocabulary")
    marker = pm_tok.encode(end_marker(pm_tok, "chat"), add_bos=False)
    if len(marker) != 1 or marker[0] not in tok.stop_ids:
        raise CheckpointError(f"the PM's chat end marker {end_marker(pm_tok, 'chat')!r} is not a stop token of "
                              f"the policy ({tok.stop_ids}); PPO scores prompt + response + stop token")
    return marker[0]


def build(args: Args, prompts: list[list[int]], policy: Transformer, ref: Transformer, pm: RewardModel,
          value_net: RewardModel | None, stop_ids: list[int], pad_id: int, device: torch.device,
          end_id: int | None = None) -> PPORun:
    """Freeze the reference and the PM, add the shared value head if asked, make the optimiser (one
    AdamW over policy and value, as the official code's actor-critic) and its schedule. Under torchrun,
    also the policy's plain copy for generation, and every model made data-parallel in place before the
    optimiser: the trained ones always, the frozen reference and PM only with --fsdp (without it each rank
    keeps their whole weights, which need no communication)."""
    for m in (ref, pm):
        if isinstance(m, nn.Module):                      # a TextReward's model is frozen where it is made
            m.eval().requires_grad_(False)
    value_head = ValueHead(policy.args.dim, device) if args.value_model == "shared" else None
    runs.freeze_lower_layers(policy, args.train_layers)
    if value_net is not None:
        runs.freeze_lower_layers(value_net.trunk, args.train_layers)
        value_net.trunk.gradient_checkpointing = args.grad_checkpointing
    policy.gradient_checkpointing = args.grad_checkpointing
    sampler = None
    if distributed.active():
        # FSDP with mixed precision computes in bf16: so does the copy, at half the memory.
        bf16 = args.fsdp and device.type == "cuda" and runs.precision_of(args, device).bf16
        sampler = copy.deepcopy(policy).requires_grad_(False).to(torch.bfloat16 if bf16 else policy.dtype)
        runs.parallelize(args, policy, policy, device)
        if value_net is not None:
            runs.parallelize(args, value_net, value_net.trunk, device, methods=("values",))
        else:
            distributed.parallelize(value_head, fsdp=args.fsdp)
        if args.fsdp:
            runs.parallelize(args, ref, ref, device)
            if isinstance(pm, RewardModel):
                runs.parallelize(args, pm, pm.trunk, device)
    named = list(policy.named_parameters()) + [(f"value:{n}", p)
                                               for n, p in (value_net or value_head).named_parameters()]
    total = args.iterations * args.ppo_epochs * args.minibatches
    optimizer, scheduler = runs.make_trainer(named, args, device, total,
                                             {"value:": args.value_lr} if args.value_lr else None)
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    return PPORun(args, policy, ref, pm, value_net, value_head, prompts, stop_ids, pad_id, optimizer, scheduler,
                  kl_ctl, device, end_id, sampler)


def _line(it: int, total: int, r: dict) -> str:
    phases = " ".join(f"{p[:3]} {r['t_' + p]:.1f}" for p in PHASES)
    return (f"iter {it}/{total} | score {r['score']:+.3f} | kl {r['kl']:.3f} | beta {r['beta']:.4g} | "
            f"pg {r['policy_loss']:+.4f} | vf {r['value_loss']:.4f} | ent {r['entropy']:.3f} | "
            f"akl {r['approx_kl']:.2e} | clip {r['clipfrac']:.3f} | ev {r['explained_variance']:+.2f} | "
            f"len {r['response_length']:.1f} | end {r['finished']:.2f} | ref {r['refusals']:.2f} | {r['tokens_per_s']:.0f} tok/s | "
            f"{r['iter_s']:.1f}s ({phases})")


# --- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = apply_preset(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(Args, argv, prog="train.py ppo", description=Args.__doc__)
    prog = distributed.tag("train.py ppo")          # names the rank under torchrun
    device = runs.device_of(args)
    try:
        precision = runs.precision_of(args, device)
        if args.batch_size % (distributed.world_size() * args.minibatches):
            # every rank takes an equal share of each minibatch (the same number of collectives)
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the world size "
                             f"{distributed.world_size()} x --minibatches {args.minibatches}")
        resume_from = None if args.profile else runs.prepare_run(
            args, "ppo", may_change=frozenset({"sample_every", "n_samples"}))
        from rlcd.prompts import load_prompts
        records = load_prompts(args.prompts, split="train")
        rule = load_rule(args.reward) if args.reward else None          # a bad rule fails before any loading
        policy, tok = load_model(resume_from or args.policy, device=device, dtype=torch.float32,
                                 attn_impl=args.attn_impl)
        # The reference and the preference model compute as the policy does (rlcd.precision.freeze_for):
        # in bf16 the reference at iteration 0 is the policy bit for bit.
        ref = freeze_for(load_model(args.policy, device=device, dtype=torch.float32, attn_impl=args.attn_impl)[0],
                         precision)
        pm = pm_tok = None
        end_id = None
        if args.pm:
            pm, pm_tok, pm_meta = load_reward_model(args.pm, device, torch.float32)
            freeze_for(pm, precision).trunk.set_attn_impl(args.attn_impl)
            if args.normalize_reward and pm.norm_mean is None:
                raise ValueError(f"{args.pm} has no reward statistics (trained with --norm-samples 0); pass "
                                 f"--no-normalize-reward")
            same_vocab = pm_tok.tok.get_vocab() == tok.tok.get_vocab()
            end_id = check_pm_matches(pm_tok, tok, pm_meta) if same_vocab else check_pm_format(pm_meta)
        value_net = None
        if args.value_model == "separate":
            if pm is not None and end_id is not None:
                # The value network starts as the preference model (paper), trained from there, its head
                # rescaled to the normalised reward PPO pays: V = (r - mean) / std.
                value_net, _, _ = load_reward_model(args.pm, device, torch.float32)
                if args.normalize_reward:
                    rescale_head(value_net.head, value_net.norm_mean, value_net.norm_std)
            else:
                # A reward read from text: the value network starts from the policy, with a zero head.
                value_net = RewardModel(load_model(args.policy, device=device, dtype=torch.float32)[0])
                nn.init.zeros_(value_net.head.weight)
            value_net.trunk.set_attn_impl(args.attn_impl)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    prompts, keys, n_long = encode_prompts(records, tok, args.max_prompt_tokens)
    if rule is not None or end_id is None:
        conversations = {r["id"]: r["messages"] for r in records}
        conversations = [conversations[k] for k in keys]
        score = (rule_score(rule) if rule is not None
                 else pm_text_score(pm, pm_tok, args.normalize_reward, args.micro_batch))
        pm = TextReward(score, tok, conversations, args.reward or args.pm)
    if len(prompts) < args.batch_size:
        print(f"{prog}: {len(prompts)} prompts of <= {args.max_prompt_tokens} tokens, fewer than "
              f"--batch-size {args.batch_size}", file=sys.stderr)
        return 2
    if max(map(len, prompts)) + args.max_new_tokens > policy.args.max_seq_len:
        print(f"{prog}: prompts plus --max-new-tokens exceed the context of {policy.args.max_seq_len}",
              file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    ppo = build(args, prompts, policy, ref, pm, value_net, tok.stop_ids, tok.pad_id, device, end_id)
    # Checkpoints hold the policy, the value network and (run.json) the KL controller; resume restores them.
    value = {"value": ppo.value_net} if ppo.value_net is not None else {"value_head": ppo.value_head}
    start_it, save_checkpoint, meta = checkpointing(
        args, "ppo", policy, tok, ppo.optimizer, ppo.scheduler, args.iterations, keys, resume_from, value,
        pm=args.pm, policy=args.policy, n_prompts=len(prompts))
    if resume_from is not None:
        ppo.kl_ctl.load_state_dict(read_run_meta(resume_from)["kl_ctl"])
    distributed.print0(f"ppo: {len(prompts)} prompts ({n_long} over {args.max_prompt_tokens} tokens dropped), "
                       f"{args.batch_size} rollouts x {args.max_new_tokens} tokens per iteration, {args.value_model} "
                       f"value network, {meta['n_trainable'] / 1e6:.1f}M trainable parameters, precision "
                       f"{precision.describe()}; iterations {start_it}..{args.iterations}", file=sys.stderr)
    out = Path(args.out)
    if args.profile:
        return run_profile(lambda it, timer: train_iteration(ppo, it, timer)[0], device, out, PHASES, "PPO iteration",
                           f"{args.value_model} value network, {args.batch_size} x {args.max_new_tokens} tokens, "
                           f"{device}" + (f", {distributed.world_size()} ranks" if distributed.active() else ""))

    timer = PhaseTimer(device)
    last: dict = {}                       # the latest iteration's rollouts and scores, for the sample log

    def step(it: int) -> dict:
        rec, last["gen"], last["score"] = train_iteration(ppo, it, timer)
        times = timer.read()
        return rec | {"refusals": refusal_rate(last["gen"], tok)} | {f"t_{p}": times.get(p, 0.0) for p in PHASES}

    def after(rec: dict) -> None:
        if not distributed.is_main():                   # rank 0 prints; its own rollouts are the samples
            return
        print(_line(rec["step"], args.iterations, rec), flush=True)
        if args.sample_every and rec["step"] % args.sample_every == 0:
            samples = sample_records(last["gen"], last["score"], tok, args.n_samples)
            runs.log_jsonl(out / runs.METRICS, {"step": rec["step"], "samples": samples})
            for s in samples:
                print(f"  [{s['score']:+.2f}] {s['prompt'][-80:]!r} -> {s['response'][:200]!r}", flush=True)

    def save(it: int) -> None:
        meta["kl_ctl"] = ppo.kl_ctl.state_dict()          # run.json: the controller as of this iteration
        save_checkpoint(it)

    try:
        runs.run_loop(args, step, start_it, args.iterations, save, out / runs.METRICS, "ppo", progress=False,
                      time_key="iter_s", after=after)
    except FloatingPointError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 3
    return 0


def refusal_rate(gen: Generation, tok: Tokenizer) -> float:
    """The fraction of an iteration's rollouts (every rank's) that decline (rlcd.judge.is_refusal on the
    decoded response): a judge-free view, per iteration, of what PPO changes in the harmless task (and of
    over-refusal in the others). Read after the iteration's one host sync, so it adds no wait."""
    n = sum(is_refusal(tok.decode(t[:k])) for t, k in zip(gen.tokens.tolist(), gen.lengths.tolist()))
    counts = distributed.all_reduce_sum(torch.tensor([float(n), float(len(gen.lengths))], device=gen.tokens.device))
    return counts[0].item() / counts[1].item()


def sample_records(gen: Generation, score: Tensor, tok: Tokenizer, n: int) -> list[dict]:
    """The first n rollouts as text: prompt (padding removed), response (stop token removed), score."""
    seq, start, lengths = gen.sequences[:n].tolist(), gen.start[:n].tolist(), gen.lengths[:n].tolist()
    out = []
    for b in range(min(n, len(seq))):
        resp = seq[b][gen.prompt_len:gen.prompt_len + lengths[b]]
        out.append({"prompt": tok.decode(seq[b][start[b]:gen.prompt_len]), "response": tok.decode(resp),
                    "finished": bool(gen.finished[b]), "score": float(score[b])})
    return out


def train_iteration(run: PPORun, it: int, timer: PhaseTimer) -> tuple[dict, Generation, Tensor]:
    """One PPO iteration with everything training does around it, for `train.py ppo`, --profile and
    bench/bench_ppo.py alike: the iteration, its one host sync (every diagnostic at once), the NaN guard
    (FloatingPointError before anything is logged or saved) and the KL controller's update. Returns the
    metrics record (beta as used by this iteration), the rollouts and their scores."""
    stats, gen, score = iteration(run, it, timer)
    keys, vals = zip(*stats.items())
    rec = {"step": it + 1, "beta": run.kl_ctl.value, **dict(zip(keys, torch.stack(list(vals)).tolist()))}
    guarded = ("score", "pm_score", "kl", "policy_loss", "value_loss", "entropy", "grad_norm", "value_grad_norm")
    runs.check_finite(it + 1, "iteration", **{k: rec[k] for k in guarded})
    run.kl_ctl.update(rec["kl"], run.args.batch_size)
    return rec, gen, score
