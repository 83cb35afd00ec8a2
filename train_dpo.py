"""DPO on the pink-elephant task: teach a chat model not to mention what it was told to avoid.

    python train_dpo.py --model llama            # the embedded SmolLM2-135M-Instruct, CPU, ~10 minutes
    torchrun --nproc_per_node 2 train_dpo.py -- --model llama --lora-rank 16   # DDP + LoRA (nanorlhf/scale.py)
    torchrun --nproc_per_node 8 train_dpo.py -- --model BIG --fsdp true        # FSDP2, loaded straight into shards

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) fits the policy to preference
pairs with a classification loss on implicit rewards r = β·log(π/π_ref): no reward model, no
sampling during training. Variants: conservative DPO (label smoothing), robust DPO, hinge (SLiC), IPO.

The run, top to bottom: read TRL-format pairs -> tokenise prompt and responses separately -> one
forward over the reference for all pairs, cached (it never changes) -> mention rate of the base model
on held-out entity pairs -> DPO steps (AdamW, warmup, clipping, accumulation), metrics.jsonl and a
tqdm bar -> the same evaluation for the trained model, side by side -> checkpoint in HF layout + SVG.
"""

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nanorlhf import distributed, lora, scale
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.run import Run, flag, parse_config, run_dir, seed_everything
from nanorlhf.model import device
from nanorlhf.data import check_vocab, epoch_batches, fit_to_length, read_preferences
from nanorlhf.logprobs import batch_logps, pair_batch, reference_logps
from nanorlhf.errors import UserError, run_cli
from nanorlhf.tasks.pink import DATA_DIR, load_eval_rows
from nanorlhf.tasks.pink_eval import EvalConfig, evaluate_as, format_table
from nanorlhf.schedule import lr_at
from nanorlhf.svg import line_plots
from nanorlhf.tokenizer import Tokenizer


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


@dataclass
class Config(EvalConfig, scale.ScaleConfig):  # + the --eval-* flags and the scale flags (--lora-rank, ...)
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (embedded SmolLM2-135M-Instruct)")
    data: str = flag(str(DATA_DIR / "pink_dpo_train.jsonl"), "TRL preference jsonl: prompt, chosen, rejected")
    out_dir: str = flag("out/train_dpo", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (default: a timestamp)")
    loss_type: str = flag("sigmoid", "sigmoid (DPO) | robust | hinge | ipo", choices=LOSS_TYPES)
    beta: float = flag(0.1, "DPO beta: strength of the pull toward the reference", gt=0)
    label_smoothing: float = flag(0.0, "cDPO/robust: assumed fraction of flipped labels", min=0, max=0.5)
    lr: float = flag(1e-4, "AdamW peak learning rate", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(4, "linear warmup steps, then linear decay to 0", min=0)
    epochs: int = flag(1, "passes over the pairs", min=1)
    batch_size: int = flag(4, "pairs per forward pass, summed over torchrun's ranks (chosen and rejected together)",
                           min=1)
    grad_accum: int = flag(2, "forward passes per optimizer step: batch_size x grad_accum pairs per step", min=1)
    max_pairs: int = flag(0, "use only the first N pairs (0 = all)", min=0)
    max_len: int = flag(192, "max prompt+response tokens (see data.fit_to_length)", min=2)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    seed: int = flag(0, "seed for shuffling, init and sampling")

    def check(self) -> None:
        """Rules that tie two flags together (each flag's own range is in its flag() above)."""
        super().check()
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing != 0:
            raise UserError(f"--label-smoothing {self.label_smoothing}: applies to sigmoid and robust only, "
                            f"not to --loss-type {self.loss_type}")
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise UserError(f"--label-smoothing {self.label_smoothing}: robust DPO needs < 0.5 (it divides by 1-2ε)")


# --- the DPO family of losses ---


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and implicit rewards. Nothing is reduced: the caller takes the mean.

    Inputs are (B,) log-probs of each completion (prompt tokens excluded), as made by sequence_logps.
    With h = (logπ(y_w) - logπ(y_l)) - (logπ_ref(y_w) - logπ_ref(y_l)), ε = label_smoothing:

        sigmoid  -log σ(βh)                                   DPO paper eq. 7
                 (1-ε)·(-log σ(βh)) + ε·(-log σ(-βh))         with ε > 0: conservative DPO (cDPO),
                                                              ε = the assumed fraction of flipped labels
        robust   [(1-ε)·(-log σ(βh)) - ε·(-log σ(-βh))]/(1-2ε)  rDPO (Chowdhury et al. 2024): unbiased
                                                              under label flips, ε in [0, 0.5)
        hinge    max(0, 1 - βh)                               SLiC / RSO; 1/β is the margin
        ipo      (h - 1/(2β))²                                IPO (Azar et al. 2023, eq. 17)

    IPO: the paper and TRL use *per-token-averaged* log-probs (sequence_logps(..., average=True)), so
    h is a difference of mean token log-probs and the target 1/(2β) does not depend on length. This
    function uses whatever it is given; the summed log-probs (as in the DPO reference code) make the
    target a total over the sequence instead.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,). The rewards are the implicit DPO
    rewards β·(logπ - logπ_ref), detached: they are for logging, never for the gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid ones are {', '.join(LOSS_TYPES)}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for sigmoid (cDPO), got {label_smoothing}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:  # refuse rather than silently ignore it
        raise ValueError(f"label_smoothing applies only to sigmoid and robust, not to {loss_type}")

    # The reference is frozen by definition; detaching here means no gradient can reach it even if the
    # caller forgot torch.no_grad() around the reference forward.
    reference_chosen_logps = reference_chosen_logps.detach()
    reference_rejected_logps = reference_rejected_logps.detach()
    h = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)

    # -log σ(x) as -logsigmoid(x), never -log(sigmoid(x)): sigmoid(-200) underflows to 0 and log gives inf.
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, float]:
    """Batch means of the per-pair (B,) tensors, under TRL's metric names."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        # strict >, as in TRL and the DPO reference: exactly 0.0 at init, when policy == reference
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


# --- data: pairs -> token ids -> batches ---

def tokenize_pairs(rows: list[dict], tok: Tokenizer, max_len: int, vocab_size: int) -> tuple[list[dict], int]:
    """-> [{prompt, chosen, rejected} as id lists], number of pairs that had to be truncated.

    Prompt and responses are encoded separately (no merge across the boundary); each response ends
    with the end-of-turn token. Both responses share one prompt cut so the pair stays comparable.
    """
    pairs, truncated = [], 0
    for row in rows:
        prompt = tok.chat_prompt(row["prompt"])
        chosen, rejected = tok.response_ids(row["chosen"]), tok.response_ids(row["rejected"])
        longer = chosen if len(chosen) >= len(rejected) else rejected
        cut_prompt, _, was_cut = fit_to_length(prompt, longer, max_len)
        room = max_len - len(cut_prompt)
        pairs.append({"prompt": cut_prompt, "chosen": chosen[:room], "rejected": rejected[:room]})
        truncated += was_cut
        check_vocab(prompt + chosen + rejected, vocab_size, row["where"])
    return pairs, truncated


# --- the run ---

def train(cfg: Config, model, pairs: list[dict], pad_id: int, dev, run: Run) -> list[dict]:
    """DPO steps on `model` (prepared by scale.prepare: with LoRA only the adapters train). Under torchrun
    every rank builds the same micro-batches and trains on its shard of each (distributed.shard)."""
    average = cfg.loss_type == "ipo"  # IPO is defined on per-token mean log-probs, the others on sums
    epochs = epoch_batches(pairs, cfg.batch_size, cfg.epochs, cfg.seed)  # per epoch, its micro-batches
    micro_batches = [b for epoch in epochs for b in epoch]
    if cfg.fsdp:  # FSDP, the optional scale layer: imported only when asked
        from nanorlhf.fast import fsdp
        net = fsdp.wrap(model)
    else:
        net = distributed.wrap(model)  # DDP under torchrun, else model itself
    # π_ref never changes, so every pair is scored once, before the first step (the first epoch holds each
    # pair once). With LoRA the reference is the base network itself: adapters off, no second copy.
    with lora.disabled(model):
        reference_logps(net, epochs[0], pad_id, dev, average)
    model.train()
    optimizer = torch.optim.AdamW(scale.trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    history, bar = [], distributed.bar(total=total_steps, desc="DPO", unit="step")
    for step in range(total_steps):
        lr = cfg.lr * lr_at(step, total_steps, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_batches = micro_batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        n_pairs = sum(map(len, step_batches))  # the pairs of this optimizer step, over all ranks
        step_metrics = []
        for i, batch in enumerate(step_batches):
            batch_pairs, real = distributed.shard(batch)  # this rank's pairs (a weight-0 dummy if none)
            # DDP all-reduces gradients during backward; on all but the last micro-batch of the step they
            # only accumulate locally, and the last all-reduce carries the sum (nanoGPT's require_backward_grad_sync)
            with distributed.no_sync(net, skip=i < len(step_batches) - 1):
                # one forward over the chosen and the rejected rows: log π(y|x) over the response tokens only
                policy_chosen, policy_rejected = batch_logps(net, pair_batch(batch_pairs, pad_id), dev, average)
                # DPO eq. 7: -log σ(β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]),
                # with the cached π_ref; no reward model and no sampling anywhere in training
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen, policy_rejected,
                    torch.tensor([p["ref_chosen"] for p in batch_pairs], device=dev),
                    torch.tensor([p["ref_rejected"] for p in batch_pairs], device=dev),
                    cfg.beta, cfg.loss_type, cfg.label_smoothing)
                # The step's loss is the mean over its n_pairs pairs, however they are split into micro-batches
                # and ranks: each part contributes its sum / n_pairs. DDP averages gradients over ranks, so a rank
                # multiplies by world_size to get back the sum; a dummy pair weighs 0.
                weight = distributed.world_size() / n_pairs if real else 0.0
                (losses.sum() * weight).backward()
            step_metrics.append((len(batch_pairs) * real, dpo_metrics(losses, chosen_rewards, rejected_rewards,
                                                                      policy_chosen, policy_rejected)))
        grad_norm = distributed.clip_grad_norm(model.parameters(), cfg.grad_clip)  # before clipping, logged
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = distributed.mean_metrics(step_metrics)  # means over the step's pairs of every rank
        metrics.update(step=step + 1, grad_norm=grad_norm, lr=lr)
        run.log(**metrics)
        history.append(metrics)
        # the implicit rewards' margin and accuracy are DPO's progress signal; the loss alone says little
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['rewards/margins']:.2f}",
                        acc=f"{metrics['rewards/accuracies']:.2f}")
        bar.update()
    bar.close()
    model.eval()
    return history


def main() -> None:
    cfg = parse_config(Config, __doc__)  # every flag checked here, before any work
    run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    rows = read_preferences(cfg.data)[:cfg.max_pairs or None]
    eval_rows = load_eval_rows(cfg.eval_data) if cfg.eval_data else []  # validate inputs before any work
    if cfg.fsdp and eval_rows:  # generation would need every rank in lockstep; evaluate the saved model instead
        distributed.print0("--fsdp: no pink-elephant evaluation here; run python tools/pink_eval.py "
                           "on the saved model")
    eval_rows = [] if cfg.fsdp or not distributed.is_main() else eval_rows  # rank 0 evaluates
    model_dir = resolve_model(cfg.model)
    tok, prepare = Tokenizer(model_dir), lambda m: scale.prepare(m, cfg, cfg.seed)  # LoRA adapters, grad checkpointing
    if cfg.fsdp:  # every rank reads only its shard of each tensor: the model is never whole on one device
        from nanorlhf.fast import fsdp
        model = fsdp.load_model_sharded(model_dir, dev, prepare).eval()
    else:
        model = prepare(load_model(model_dir, device=dev).eval())
    pairs, truncated = tokenize_pairs(rows, tok, cfg.max_len, model.cfg.vocab_size)
    distributed.print0(f"{len(pairs)} pairs from {cfg.data}; {truncated} truncated to {cfg.max_len} tokens "
                       f"(response cut at the right first, then prompt from the left)")
    run = Run("train_dpo", cfg.out_dir, cfg.run, cfg)

    results = {}
    if eval_rows:  # the base model is the policy before its first step
        results["base"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, desc="eval base")
    try:
        history = train(cfg, model, pairs, tok.pad_id, dev, run)
    except KeyboardInterrupt:  # Ctrl-C: keep what the finished steps learned rather than lose it
        save_model(model.eval(), run.dir / "model", copy_from=model_dir)  # LoRA: merged weights
        print(f"\ninterrupted: model after the last finished step in {run.dir / 'model'}, metrics in "
              f"{run.dir / 'metrics.jsonl'}", file=sys.stderr)
        sys.exit(130)
    save_model(model, run.dir / "model", copy_from=model_dir)  # every rank calls it; rank 0 writes
    if not distributed.is_main():
        return
    line_plots([("DPO loss", {"loss": [(m["step"], m["loss"]) for m in history]}),
                ("implicit rewards", {name: [(m["step"], m[f"rewards/{name}"]) for m in history]
                                      for name in ("chosen", "rejected", "margins")}),
                ("reward accuracy", {"accuracy": [(m["step"], m["rewards/accuracies"]) for m in history]})],
               run.dir / "training.svg")
    if eval_rows:
        # NLL of the trained samples under the base: with LoRA the base is the model with adapters off
        base_model = lora.BaseView(model) if cfg.lora_rank else load_model(model_dir, device=dev).eval()
        results["DPO"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, base_model, desc="eval DPO")
        run.write_json("eval.json", results)
        print(f"\nheld-out pink-elephant eval: {len(eval_rows)} prompts x {cfg.eval_n} samples "
              f"(temperature {cfg.eval_temperature}, seed {cfg.seed})")
        print(format_table(results))
        base_rate, dpo_rate = results["base"]["pink_rate"], results["DPO"]["pink_rate"]
        if base_rate > 0:
            print(f"relative change in pink mention rate: {(dpo_rate - base_rate) / base_rate:+.0%}")
    print(f"model, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
