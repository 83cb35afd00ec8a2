"""ReST and iterated RLHF against a gold scorer: does re-labelling fresh on-policy pairs beat a
proxy trained once?

    python rest_loop.py --model llama                  # SmolLM2-135M-Instruct, VADER gold, ~15 min
    python rest_loop.py --model llama --mode oneshot   # baseline: the same gold labels, up front
    python rest_loop.py --resume out/rest_loop/RUN     # continue an interrupted run

The Gao, Schulman & Hilton (2022, arXiv 2210.10760) setup: a fixed *gold* scorer plays the human
(--gold vader: VADER sentiment, or rm:PATH: any reward model), a *proxy* RM learns from its labels
and the policy is optimised against the proxy; the gold score shows when the policy games the proxy.

Each iteration t = 1..T, on its own chunk of prompts:
  Grow     sample K responses per prompt from π_{t-1} (ReST, Gulcehre et al. 2023, arXiv
           2308.08998).
  Label    buy --gold-pairs gold labels: the gold scorer says which of two of those responses is
           better (ties are dropped but still paid for). The proxy RM (a copy of π_0's backbone with
           a fresh head, reward_model_from_lm) takes --rm-epochs Bradley-Terry passes over the new
           pairs, continuing from its previous weights. --mode oneshot buys all T·gold_pairs labels
           from π_0's samples in iteration 1 and never again: the same budget, spent before the
           policy moves.
  Improve  the proxy scores the grow set; Improve step i keeps what beats τ_i, the --quantiles[i]
           quantile of those scores but at least their mean (ReST: τ_1 ≥ the grow set's mean
           reward; rising thresholds, kept sets shrinking, as TRL's ReST sketch), and fine-tunes π
           with --improve bc: NLL on the kept samples (ReST's behaviour cloning), or --improve dpo:
           DPO on each prompt's best-vs-worst pair (RLHFlow's max_min) whose best beats τ_i,
           reference π_{t-1} (the hackathon team's ReST+DPO). Each step's lr is
           --lr · --lr-decay^i: ReST lowers it as the filtered sets shrink.
  Evaluate on held-out prompts (the last --eval-prompts rows of --prompts), sampled at temperature
           1 with the same seed every iteration: mean gold and proxy reward, the proxy's accuracy on
           these fresh gold-labelled pairs, and KL(π_t‖π_0) ≈ mean over samples of
           log π_t(y|x) - log π_0(y|x) (Monte Carlo; unbiased because y ~ π_t). These evaluation
           labels are not part of the --gold-pairs budget (they are reported as eval_pairs).

Outputs in RUN/: metrics.jsonl (one line per iteration, 0 = before training), rest_loop.svg (gold,
proxy, √KL, proxy accuracy), model/ (the policy, HF layout) and proxy_rm/ (save_reward_model:
usable as `qdaif.py --fitness rm:RUN/proxy_rm`). After every iteration RUN/state/ holds the
policy's and the proxy's weights and the RNG (nanorlhf/run.py's save_state), swapped in atomically
(and removed once the run completes); AdamW moments are not carried across iterations and every
seed is derived from (--seed, iteration), so the iteration number is all a resume needs. Not done
here: ReST's union with the original demonstrations (there are none) and validation-based early
stopping.

Scale: with --lora-rank each Improve and each proxy update trains fresh adapters, merged at its
end. Under torchrun every rank grows, labels and evaluates alike; fit() shards each batch (DDP).
No FSDP: sampling between training steps needs the whole policy on every rank.
"""

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorlhf import distributed, lora
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.data import read_prompts
from nanorlhf.distributed import print0
from nanorlhf.errors import NonFiniteLogits, UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, resume_run, run_dir, save_state,
                          seed_everything, state_dir)
from nanorlhf.step import (batch_logps, clip_grad_norm, collate, pair_batch, reference_logps,
                           response_logps, response_logps_batched)
from nanorlhf.model import autocast, device
from nanorlhf.reward import (bradley_terry_sum, make_gold_scorer, pair_ids, reward_model_from_lm,
                             save_reward_model, score_texts)
from nanorlhf.sampling import SAMPLER_HELP, SAMPLERS, Sampler, generate_batched, sample_responses
from nanorlhf.svg import line_plots
from nanorlhf.tasks.pink import DATA_DIR
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (the embedded "
                               "SmolLM2-135M)")
    prompts: str = flag(str(DATA_DIR / "rest_prompts.jsonl"),
                        "jsonl of {\"prompt\": str}; the last --eval-prompts rows are held out")
    gold: str = flag("vader", "gold scorer: vader (VADER sentiment) | rm:PATH[@TEMPLATE] (a reward "
                              "model)")
    out_dir: str = flag("out/rest_loop", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (empty: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    mode: str = flag("iterated", "iterated (fresh gold labels each iteration) | oneshot (all from "
                                 "π_0)", choices=("iterated", "oneshot"))
    improve: str = flag("bc", "bc (NLL on kept samples, ReST) | dpo (best-vs-worst pairs, "
                              "ReST+DPO)", choices=("bc", "dpo"))
    iterations: int = flag(3, "grow/label/improve rounds T", min=1)
    prompts_per_iter: int = flag(48, "prompts in each iteration's chunk (the pool is cycled)",
                                 min=1)
    k: int = flag(4, "responses sampled per prompt in Grow (>= 2: pairs to label)", min=2)
    max_new_tokens: int = flag(40, "response length cap", min=1)
    temperature: float = flag(1.0, "Grow sampling temperature (evaluation always uses 1)", min=0)
    gold_pairs: int = flag(32, "gold labels bought per iteration (oneshot: T·this in iteration 1)",
                           min=1)
    quantiles: str = flag("0.7,0.85", "Improve thresholds: rising quantiles of the grow set's "
                                      "proxy rewards")
    lr: float = flag(2e-5, "AdamW lr of the first Improve step", gt=0)
    lr_decay: float = flag(0.5, "Improve step i uses lr · lr_decay^i", gt=0)
    beta: float = flag(0.1, "DPO beta (--improve dpo)", gt=0)
    rm_lr: float = flag(2e-5, "proxy RM backbone lr", gt=0)
    rm_head_lr: float = flag(1e-3, "proxy RM head lr (the head is fresh, the backbone pretrained)",
                             gt=0)
    rm_epochs: int = flag(1, "Bradley-Terry passes over each batch of new gold pairs", min=0)
    rm_center: float = flag(0.01, "BT centering coefficient c·(r_w + r_l)² (arXiv 2312.09244)",
                            min=0)
    batch_size: int = flag(8, "sequences (or pairs) per optimizer step, over all torchrun ranks",
                           min=1)
    gen_batch_size: int = flag(48, "sampling batch size (--sampler stream: rows decoding at once)",
                               min=1)
    sampler: str = flag("batch", SAMPLER_HELP, choices=SAMPLERS)
    eval_prompts: int = flag(24, "held-out prompts (the last rows of --prompts)", min=1)
    eval_n: int = flag(2, "samples per held-out prompt (>= 2: pairs for the proxy accuracy)", min=2)
    seed: int = flag(0, "seed for sampling, shuffling and the proxy head")
    # scale: LoRA (nanorlhf/lora.py), gradient checkpointing, oneDNN (nanorlhf/fast/packed.py)
    lora_rank: int = flag(0, "LoRA rank r: each Improve step and proxy update trains fresh rank-r "
                             "adapters on --lora-targets, merged at its end (0 = full "
                             "fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS),
                             "comma-separated projections that get adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less "
                                           "memory, ~1/3 more compute")
    onednn: bool = flag(False, "CPU matmuls (training and sampling) through oneDNN with packed "
                               "weights: ~1.9x faster steps on AMD CPUs, where MKL runs AVX2 "
                               "kernels; equal to MKL's up to rounding, so not bit-equal to a "
                               "run without it")
    threads: int = flag(0, THREADS_HELP, min=0)

    def check(self) -> None:
        """The rules between flags, before any work (parse_config calls this)."""
        lora.parse_targets(self.lora_targets)
        if self.gold != "vader" and not (self.gold.startswith("rm:") and len(self.gold) > 3):
            raise UserError(f"--gold {self.gold!r}: choose vader or rm:PATH (a reward-model "
                            "checkpoint)")
        parse_quantiles(self.quantiles)
        per_call = self.gold_pairs * (self.iterations if self.mode == "oneshot" else 1)
        if per_call > self.prompts_per_iter * (self.k // 2):
            raise UserError(f"--gold-pairs: {per_call} labels in one iteration ({self.mode}), but "
                            f"one grow step has only {self.prompts_per_iter * (self.k // 2)} "
                            "disjoint pairs (--prompts-per-iter x --k/2)")


def parse_quantiles(text: str) -> list[float]:
    try:
        qs = [float(q) for q in text.split(",") if q.strip()]
    except ValueError:
        qs = []
    if not qs or any(not 0 <= q < 1 for q in qs) or any(b <= a for a, b in zip(qs, qs[1:])):
        raise UserError(f"--quantiles {text!r}: expected strictly rising numbers in [0, 1), "
                        "e.g. 0.7,0.85")
    return qs


def prompt_chunk(pool: list[str], t: int, n: int) -> list[str]:
    """Iteration t's prompts (t = 1..T): the next n of the pool, wrapping around."""
    return [pool[((t - 1) * n + j) % len(pool)] for j in range(n)]


# --- ReST pieces: grow, thresholds, improve ---

def grow(policy, tok: Tokenizer, prompts: list[str], k: int, temperature: float,
         max_new_tokens: int, batch_size: int, seed: int, desc: str = "grow",
         sampler: Sampler = generate_batched) -> list[dict]:
    """k samples per prompt -> [{prompt, prompt_ids, ids, text}], prompt-major (sample j of prompt
    i: i*k+j). `sampler`: generate_batched, or fast/decode.py's continuous batching."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    prompt_ids, ids, texts = sample_responses(policy, tok, chats, k, temperature, seed,
                                              max_new_tokens, batch_size, desc=desc,
                                              sampler=sampler)
    return [{"prompt": prompts[i // k], "prompt_ids": p, "ids": r, "text": t}
            for i, (p, r, t) in enumerate(zip(prompt_ids, ids, texts))]


def thresholds(rewards: list[float], quantiles: list[float]) -> list[float]:
    """τ_i = the q_i quantile of the grow set's rewards (linear interpolation between order
    statistics), but never below their mean: ReST's Alg. 1 takes τ_1 ≥ the grow set's mean reward.
    A quantile can sit below the mean when the rewards are right-skewed (q = 0.7 of
    [0]*7 + [1, 2, 9] is 0.3, the mean 1.2); every τ_i is floored at the mean, so the thresholds
    still never fall."""
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = float(r.mean())
    return [max(float(torch.quantile(r, q)), mean) for q in quantiles]


def keep_above(rewards: list[float], tau: float) -> list[int]:
    """ReST's filter F(x, y; τ) = 1[R(x, y) > τ]: strictly above, so ties at τ are dropped."""
    return [i for i, r in enumerate(rewards) if r > tau]


def best_worst_pairs(samples: list[dict], rewards: list[float], k: int) -> list[dict]:
    """Each prompt's highest- vs lowest-reward response (RLHFlow max_min); prompts whose K tie are
    dropped."""
    pairs = []
    for i in range(0, len(samples), k):
        group = list(range(i, i + k))
        best, worst = max(group, key=lambda j: rewards[j]), min(group, key=lambda j: rewards[j])
        if rewards[best] > rewards[worst]:
            pairs.append({"prompt": samples[best]["prompt_ids"], "chosen": samples[best]["ids"],
                          "rejected": samples[worst]["ids"], "reward": rewards[best]})
    return pairs


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor, reference_rejected_logps: Tensor,
             beta: float) -> Tensor:
    """DPO's loss per pair (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), nothing reduced:

        -log σ(β·h),   h = (log π(y_w) - log π(y_l)) - (log π_ref(y_w) - log π_ref(y_l))

    Inputs (B,) summed response log-probs -> (B,). train_dpo.py's dpo_loss with its defaults
    (sigmoid, no label smoothing), to the last bit (tests/test_rest.py compares the two)."""
    h = ((policy_chosen_logps - policy_rejected_logps)
         - (reference_chosen_logps - reference_rejected_logps))
    # -log σ(x) as -logsigmoid(x), never -log(sigmoid(x)): sigmoid(-200) underflows to 0 and log
    # gives inf
    return -F.logsigmoid(beta * h)


def fit(model, items: list, loss_fn, optimizer, batch_size: int, seed: str, what: str, hint: str,
        grad_clip: float = 1.0) -> float | None:
    """One shuffled pass over `items`, one optimizer step per batch -> mean loss (None for no
    items). A NaN or inf gradient norm stops the run before its step, in one line naming the step
    (of `what`) and `hint`.

    loss_fn(batch) -> (summed loss, count): a step minimises the batch's sum / count. Under torchrun
    every rank takes rank 0's items (so all take the same steps) and its shard of each batch; the
    count is the whole batch's, and x world_size because DDP averages gradients over ranks.
    """
    order, losses = distributed.broadcast(items)[:], []
    random.Random(seed).shuffle(order)
    model.train()
    for i in range(0, len(order), batch_size):
        mine, real = distributed.shard(order[i:i + batch_size])
        total, count = loss_fn(mine)
        # this rank's part of the batch mean: its sum over the count of the whole batch, on every
        # rank
        loss = total * real / distributed.all_reduce_sum(count * real)
        # DDP averages gradients over ranks; x world_size turns that average back into the batch's
        # sum
        (loss * distributed.world_size()).backward()
        grad_norm = clip_grad_norm(model.parameters(), grad_clip)
        check_finite(f"step {i // batch_size + 1} of {what}", hint, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    model.eval()
    return distributed.all_reduce_sum(torch.stack(losses)).mean().item() if losses else None


def bc_loss(model, samples: list[dict], pad_id: int, dev) -> tuple[Tensor, Tensor]:
    """ReST's BC: negative log-likelihood of the kept samples' response tokens -> (sum, token
    count)."""
    batch = collate([s["prompt_ids"] for s in samples], [s["ids"] for s in samples], pad_id)
    batch = {k: v.to(dev) for k, v in batch.items()}
    with autocast(dev):
        logps = response_logps(model, batch)  # (B,) summed over each response
    return -logps.sum(), batch["loss_mask"][:, 1:].sum()


def dpo_batch_loss(model, pairs: list[dict], pad_id: int, dev, beta: float) -> tuple[Tensor, int]:
    chosen, rejected = batch_logps(model, pair_batch(pairs, pad_id), dev, average=False)
    ref_chosen = torch.tensor([p["ref_chosen"] for p in pairs], device=dev)
    ref_rejected = torch.tensor([p["ref_rejected"] for p in pairs], device=dev)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).sum(), len(pairs)


# (model, seed, *parameters that also train) -> the net to train through; see preparer()
Prepare = Callable[..., nn.Module]


def improve(cfg: Config, policy, prepare: Prepare, samples: list[dict], rewards: list[float],
            quantiles: list[float], pad_id: int, dev, seed: str) -> dict:
    """The Improve steps of one Grow step: thresholds rise, kept sets shrink, each step continues
    the last. prepare(policy, seed) gives the net they train through; with LoRA its fresh adapters
    (seeded by `seed`) are merged at the end: π_t is a plain model again."""
    taus = thresholds(rewards, quantiles)
    net = prepare(policy, seed)
    if cfg.improve == "dpo":
        items = best_worst_pairs(samples, rewards, cfg.k)
        batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
        # ref = π_{t-1}, frozen: once, up front
        reference_logps(policy, batches, pad_id, dev, average=False)
        kept_of = lambda tau: [p for p in items if p["reward"] > tau]
        loss_fn = lambda batch: dpo_batch_loss(net, batch, pad_id, dev, cfg.beta)
    else:
        kept_of = lambda tau: [samples[i] for i in keep_above(rewards, tau)]
        loss_fn = lambda batch: bc_loss(net, batch, pad_id, dev)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=0.0)
    stats = {"thresholds": taus, "kept": [], "improve_loss": []}
    for i, tau in enumerate(taus):
        # Filter F(x, y; τ_i) = 1[R > τ_i]: the same grow set each step, a smaller and better
        # subset of it (τ_i rises), so later steps imitate only the best samples. Nothing is
        # re-sampled here.
        kept = kept_of(tau)
        # ReST lowers the lr as the filtered sets shrink: fewer samples, smaller steps.
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_decay ** i
        # Fine-tune on the kept set, continuing from the previous Improve step (weights and AdamW
        # moments).
        stats["kept"].append(len(kept))
        stats["improve_loss"].append(fit(policy, kept, loss_fn, optimizer, cfg.batch_size,
                                         f"{seed}:improve{i}", f"Improve {i + 1}", "lower --lr"))
    lora.merge(policy)  # without adapters: nothing to merge
    return stats


# --- the proxy reward model and its gold labels ---

def label_pairs(samples: list[dict], k: int, n: int, gold, tok: Tokenizer) -> list[dict]:
    """Buy n gold labels on disjoint pairs of one prompt's samples, (0,1) of every prompt before
    (2,3) of any. -> RM pairs {prompt, chosen, rejected} as token ids; gold ties are dropped (the
    label was still spent)."""
    order = [(i + 2 * j, i + 2 * j + 1) for j in range(k // 2)
             for i in range(0, len(samples), k)][:n]
    scores = gold.score([samples[a]["prompt"] for pair in order for a in pair],
                        [samples[a]["text"] for pair in order for a in pair])
    pairs = []
    for (a, b), sa, sb in zip(order, scores[0::2], scores[1::2]):
        if sa == sb:
            continue
        win, lose = (a, b) if sa > sb else (b, a)
        prompt, chosen = pair_ids(tok, samples[win]["prompt"], samples[win]["text"])
        rejected = pair_ids(tok, samples[lose]["prompt"], samples[lose]["text"])[1]
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def train_proxy(cfg: Config, rm, prepare: Prepare, pairs: list[dict], pad_id: int, dev,
                seed: str) -> float | None:
    """--rm-epochs passes of Bradley-Terry; with LoRA, fresh backbone adapters merged at the end
    (the head trains whole)."""
    net = prepare(rm, seed + ":rm", rm.score.weight)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in rm.model.parameters() if p.requires_grad], "lr": cfg.rm_lr},
         {"params": [rm.score.weight], "lr": cfg.rm_head_lr}], weight_decay=0.0)
    loss_fn = lambda b: bradley_terry_sum(net, b, pad_id, dev, cfg.rm_center)
    losses = [fit(rm, pairs, loss_fn, optimizer, cfg.batch_size, f"{seed}:rm{e}",
                  f"the proxy RM's epoch {e + 1}", "lower --rm-lr or --rm-head-lr")
              for e in range(cfg.rm_epochs)]
    lora.merge(rm)  # without adapters: nothing to merge
    return losses[-1] if losses else None


def preparer(cfg: Config) -> Prepare:
    """-> prepare(model, seed, *also_train): in place on `model`, fresh LoRA adapters drawn from
    `seed` (--lora-rank 0: none, everything trains; the parameters in `also_train`, e.g. the fresh
    RM head, train whole too), gradient checkpointing and oneDNN matmuls as the flags say; it
    returns the net to train through: DDP under torchrun, else the model itself."""
    pack = lambda model: None
    if cfg.onednn:  # the optional speed layer, imported only where its flag is read
        from nanorlhf.fast.packed import pack_linears as pack

    def prepare(model: nn.Module, seed: str, *also_train: nn.Parameter) -> nn.Module:
        lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed)
        for p in also_train:
            p.requires_grad_(True)
        model.model.grad_checkpointing = cfg.grad_checkpointing  # the Backbone of an LM or an RM
        pack(model)  # after LoRA: adapted projections keep their own forward
        return distributed.wrap(model)
    return prepare


# --- evaluation ---

def evaluate(cfg: Config, policy, ref, proxy, gold, tok: Tokenizer, prompts: list[str], dev,
             sampler: Sampler = generate_batched) -> dict:
    samples = grow(policy, tok, prompts, cfg.eval_n, 1.0, cfg.max_new_tokens, cfg.gen_batch_size,
                   cfg.seed + 7, "eval", sampler)
    texts, asked = [s["text"] for s in samples], [s["prompt"] for s in samples]
    prompt_ids, ids = [s["prompt_ids"] for s in samples], [s["ids"] for s in samples]
    logps = lambda model: response_logps_batched(model, prompt_ids, ids, tok.pad_id)
    # log π(y|x) - log π_0(y|x) with y ~ π: its mean estimates KL(π‖π_0)
    kl = [a - b for a, b in zip(logps(policy), logps(ref))]
    gold_scores = gold.score(asked, texts)
    proxy_scores = score_texts(proxy, tok, asked, texts, 2 * cfg.batch_size)
    correct = labelled = 0
    # samples (0, 1) of every prompt: a fresh gold-labelled pair
    for i in range(0, len(samples), cfg.eval_n):
        g, p = gold_scores[i] - gold_scores[i + 1], proxy_scores[i] - proxy_scores[i + 1]
        if g != 0:
            labelled += 1
            correct += (p > 0) if g > 0 else (p < 0)
    mean = lambda xs: sum(xs) / len(xs)
    return {"gold": mean(gold_scores), "proxy": mean(proxy_scores),
            "proxy_acc": correct / labelled if labelled else None, "kl": mean(kl),
            "sqrt_kl": math.sqrt(max(mean(kl), 0.0)), "eval_pairs": labelled}


# --- resumable state: RUN/state/ through nanorlhf/run.py (safetensors + json, never pickle) ---

def weights(policy, proxy) -> dict[str, Tensor]:
    """Every weight of the policy and the proxy, by name: all that a resume needs besides the
    iteration (AdamW starts afresh each iteration; every seed derives from (--seed, iteration))."""
    return {**{f"policy.{k}": v for k, v in policy.named_parameters()},
            **{f"proxy.{k}": v for k, v in proxy.named_parameters()}}


# --- the run ---

FIELDS = [("iter", "iteration", "{}"), ("gold", "gold", "{:+.3f}"), ("proxy", "proxy", "{:+.3f}"),
          ("proxy acc", "proxy_acc", "{:.2f}"), ("KL", "kl", "{:.3f}"),
          ("√KL", "sqrt_kl", "{:.3f}"), ("gold labels", "gold_labels", "{}"),
          ("kept", "kept", "{}")]


def table_row(m: dict) -> str:
    return "| " + " | ".join("-" if m.get(key) is None else fmt.format(m[key])
                             for _, key, fmt in FIELDS) + " |"


def main() -> None:
    cfg = parse_config(Config, __doc__)  # every flag checked (Config.check) before any work
    if cfg.resume:
        if state_dir(cfg.resume) is None and (Path(cfg.resume) / "proxy_rm").is_dir():
            raise UserError(f"--resume {cfg.resume}: that run is complete (model/ and proxy_rm/ "
                            "are written)")
        # the interrupted run's own config, the iteration of its state and its metrics up to it
        cfg, start, history = resume_run(Config, cfg.resume, "rest_loop", step_key="iteration")
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
        start, history = 0, []
    threads = choose_threads(cfg.threads)
    quantiles = parse_quantiles(cfg.quantiles)
    distributed.init()  # torchrun: every rank grows and evaluates alike; training is sharded (fit)
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    prompts = read_prompts(cfg.prompts)  # validate every input before any work
    if len(prompts) <= cfg.eval_prompts:
        raise UserError(f"{cfg.prompts}: {len(prompts)} prompts, but --eval-prompts "
                        f"{cfg.eval_prompts} holds out that many")
    pool, eval_prompts = prompts[:-cfg.eval_prompts], prompts[-cfg.eval_prompts:]
    # an RM gold is frozen: bf16 on CUDA (reward.scorer_dtype)
    gold = make_gold_scorer(cfg.gold, device=dev)
    model_dir = resolve_model(cfg.model)
    tok, ref = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()  # ref: π_0, frozen
    for p in ref.parameters():
        p.requires_grad_(False)
    policy = load_model(model_dir, device=dev).eval()
    proxy = reward_model_from_lm(policy, seed=cfg.seed).eval()
    if cfg.resume:  # the weights after the state's iteration, and the RNG
        _, tensors, _ = load_state(cfg.resume)
        with torch.no_grad():
            for name, p in weights(policy, proxy).items():
                p.copy_(tensors[name])
        print0(f"resuming {cfg.resume} after iteration {start}")
    # What each Improve step and proxy update trains through (LoRA, checkpointing, oneDNN, DDP),
    # and the sampler of Grow and evaluation: chosen here, once.
    prepare = preparer(cfg)
    sampler = generate_batched
    if cfg.sampler == "stream":  # continuous batching, the optional fast layer: imported if asked
        from nanorlhf.fast.decode import generate_streamed as sampler
    run = Run("rest_loop", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    run.rewrite(history)  # what the state had seen
    print0(f"{cfg.mode} RLHF, ReST improve={cfg.improve}, gold={cfg.gold}: {cfg.iterations} "
           f"iterations x {cfg.prompts_per_iter} prompts x K={cfg.k}; {len(eval_prompts)} held-out "
           f"prompts x {cfg.eval_n}; torch threads: {threads}")
    print0("| " + " | ".join(name for name, _, _ in FIELDS) + " |\n" + "|---" * len(FIELDS) + "|")
    for m in history:
        print0(table_row(m))

    def save() -> Path:  # the policy and the proxy RM (rank 0 writes)
        save_model(policy, run.dir / "model", copy_from=model_dir)
        save_reward_model(proxy, run.dir / "proxy_rm", copy_from=model_dir)
        return run.dir

    try:
        # iteration 0: π_0 and the untrained proxy, the baseline every iteration is read against
        if not history:
            m = {"iteration": 0, "gold_labels": 0,
                 **evaluate(cfg, policy, ref, proxy, gold, tok, eval_prompts, dev, sampler)}
            run.log(**m)
            history.append(m)
            print0(table_row(m))
        for t in range(start + 1, cfg.iterations + 1):
            t0, seed = time.perf_counter(), f"{cfg.seed}:{t}"
            # Grow: K samples per prompt from the current policy π_{t-1}, on the next chunk of
            # prompts. Fresh on-policy samples are the point of iterating: the proxy is then taught,
            # and queried, where the policy now puts its mass, not where π_0 did.
            samples = grow(policy, tok, prompt_chunk(pool, t, cfg.prompts_per_iter), cfg.k,
                           cfg.temperature, cfg.max_new_tokens, cfg.gen_batch_size,
                           cfg.seed + 1000 * t, f"grow {t}", sampler)
            # Label (iterated RLHF): gold labels on pairs of these samples -> the proxy RM continues
            # Bradley-Terry on them. oneshot spends the whole budget now, in iteration 1, on π_0's
            # samples, and never again.
            n_labels = (cfg.gold_pairs if cfg.mode == "iterated"
                        else cfg.gold_pairs * cfg.iterations * (t == 1))
            m = {"iteration": t, "new_labels": n_labels,
                 "gold_labels": history[-1]["gold_labels"] + n_labels}
            if n_labels:
                pairs = label_pairs(samples, cfg.k, n_labels, gold, tok)
                m.update(rm_pairs=len(pairs),
                         rm_loss=train_proxy(cfg, proxy, prepare, pairs, tok.pad_id, dev, seed))
            # The policy is trained on the *proxy's* scores, never the gold's: the gold reward at
            # evaluation then shows whether optimising the proxy helps or games it (Gao et al.
            # 2022).
            rewards = score_texts(proxy, tok, [s["prompt"] for s in samples],
                                  [s["text"] for s in samples], 2 * cfg.batch_size)
            # a proxy whose last step overflowed scores NaN: stop here, before π trains on it
            check_finite(f"iteration {t}", "lower --rm-lr or --rm-head-lr",
                         proxy_reward=torch.tensor(rewards))
            best_of_k = [max(rewards[i:i + cfg.k]) for i in range(0, len(rewards), cfg.k)]
            m.update(grow_proxy=sum(rewards) / len(rewards),
                     grow_best_of_k=sum(best_of_k) / cfg.prompts_per_iter)
            # Improve: filter the grow set by rising thresholds (τ_1 ≥ its mean reward) and
            # fine-tune π on what passes, one step per threshold (improve()); π_t is the result.
            m.update(improve(cfg, policy, prepare, samples, rewards, quantiles, tok.pad_id, dev,
                             seed))
            # Evaluate π_t on held-out prompts with the same seed every iteration: gold, proxy,
            # KL(π_t‖π_0).
            m.update(evaluate(cfg, policy, ref, proxy, gold, tok, eval_prompts, dev, sampler))
            m["seconds"] = time.perf_counter() - t0
            run.log(**m)
            history.append(m)
            # a resume needs only t and these weights
            if distributed.is_main():
                save_state(run.dir, t, weights(policy, proxy))
            print0(table_row(m))
    except NonFiniteLogits as e:  # an Improve step overflowed the policy's weights: nothing saved
        raise UserError(f"iteration {len(history)}: {e} — lower --lr") from None
    except KeyboardInterrupt:  # Ctrl-C: the current policy and proxy are saved; one line, 130
        exit_interrupted(run, max(len(history) - 1, 0), "the current policy (model/) and proxy RM "
                         "(proxy_rm/)", save, unit="iteration")  # history[0]: iteration 0
    if not distributed.is_main():
        return
    save()
    # complete: model/ and proxy_rm/ are the final state
    shutil.rmtree(run.dir / "state", ignore_errors=True)
    series = lambda key: [(m["iteration"], m[key]) for m in history if m[key] is not None]
    line_plots([("gold reward, held-out prompts", {"gold": series("gold")}),
                ("proxy reward, held-out prompts", {"proxy": series("proxy")}),
                ("√KL(π‖π₀)", {"√KL": series("sqrt_kl")}),
                ("proxy accuracy on fresh gold-labelled pairs", {"accuracy": series("proxy_acc")})],
               run.dir / "rest_loop.svg", xlabel="iteration")
    print0(f"policy in {run.dir / 'model'}, proxy RM in {run.dir / 'proxy_rm'}, metrics and plot "
           f"in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
