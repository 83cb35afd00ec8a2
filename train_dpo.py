"""DPO on the pink-elephant task: teach a chat model not to mention what it was told to avoid.

    python train_dpo.py --model llama               # embedded SmolLM2-135M-Instruct, CPU, ~10 min
    python train_dpo.py --resume out/train_dpo/RUN  # continue an interrupted run exactly
    torchrun --nproc_per_node 2 train_dpo.py -- --model llama --lora-rank 16   # DDP + LoRA
    torchrun --nproc_per_node 8 train_dpo.py -- --model BIG --fsdp true --save-every 0   # FSDP2

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) fits the policy to
preference pairs with a classification loss on implicit rewards r = β·log(π/π_ref): no reward
model, no sampling during training. Variants: cDPO (label smoothing), robust DPO, hinge (SLiC), IPO.

The run, top to bottom: tokenise TRL-format pairs -> the base model's mention rate on held-out
entity pairs -> π_ref's log-probs of every pair, once -> DPO steps (AdamW, warmup, clipping,
accumulation; RUN/state every --save-every) -> the trained model's evaluation -> HF checkpoint, SVG.
"""
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from nanorlhf import distributed, lora
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.data import check_vocab, epoch_batches, fit_to_length, read_preferences
from nanorlhf.distributed import print0
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, resume_run, run_dir, save_state,
                          seed_everything)
from nanorlhf.step import (batch_logps, clip_grad_norm, lr_at, mean_metrics, pair_batch,
                           reference_logps)
from nanorlhf.model import device
from nanorlhf.svg import line_plots
from nanorlhf.tasks.pink import DATA_DIR, HELDOUT_PATH, evaluate_as, format_table, load_eval_rows
from nanorlhf.tokenizer import Tokenizer


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (embedded "
                               "SmolLM2-135M-Instruct)")
    data: str = flag(str(DATA_DIR / "pink_dpo_train.jsonl"),
                     "TRL preference jsonl: prompt, chosen, rejected")
    out_dir: str = flag("out/train_dpo", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name ('' = a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    save_every: int = flag(8, "write RUN/state every N optimizer steps (0 = never)", min=0)
    threads: int = flag(0, THREADS_HELP, min=0)
    seed: int = flag(0, "seed for shuffling, init and sampling")
    loss_type: str = flag("sigmoid", "sigmoid (DPO) | robust | hinge | ipo", choices=LOSS_TYPES)
    beta: float = flag(0.1, "DPO beta: strength of the pull toward the reference", gt=0)
    label_smoothing: float = flag(0.0, "cDPO/robust: assumed fraction of flipped labels",
                                  min=0, max=0.5)
    lr: float = flag(1e-4, "AdamW peak learning rate", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(4, "linear warmup steps, then linear decay to 0", min=0)
    epochs: int = flag(1, "passes over the pairs", min=1)
    batch_size: int = flag(4, "pairs per forward pass, summed over torchrun's ranks (chosen and "
                              "rejected together)", min=1)
    grad_accum: int = flag(2, "forward passes per optimizer step: batch_size x grad_accum pairs "
                              "per step", min=1)
    max_pairs: int = flag(0, "use only the first N pairs (0 = all)", min=0)
    max_len: int = flag(192, "max prompt+response tokens (see data.fit_to_length)", min=2)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    eval_data: str = flag(str(HELDOUT_PATH), "pink-elephant eval jsonl ({pink, grey, prompt}); "
                                             "'' skips")
    eval_n: int = flag(2, "samples per eval prompt", min=1)
    eval_temperature: float = flag(0.7, "eval sampling temperature (0 = greedy)", min=0.0)
    eval_max_new_tokens: int = flag(80, "eval response length cap", min=1)
    eval_batch_size: int = flag(56, "eval generation batch size", min=1)
    lora_rank: int = flag(0, "LoRA rank r: train rank-r adapters on --lora-targets only (0 = full "
                             "fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS),
                             "comma-separated projections that get adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less "
                                           "memory, ~1/3 more compute")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                             "instead of DDP")
    onednn: bool = flag(False, "CPU matmuls (training and sampling) through oneDNN with packed "
                               "weights: ~1.9x faster steps on AMD CPUs, where MKL runs AVX2 "
                               "kernels; equal to MKL's up to rounding, so not bit-equal to a "
                               "default run")

    def check(self) -> None:
        """Rules that tie two flags together (each flag's own range is in its flag() above)."""
        lora.parse_targets(self.lora_targets)  # an unknown projection is one line too
        if self.onednn and self.fsdp:
            raise UserError("--onednn with --fsdp: FSDP's sharded weights cannot be packed for "
                            "oneDNN; use one of the two")
        if self.fsdp and not distributed.launched():
            raise UserError("--fsdp shards the model over processes: launch with torchrun "
                            "--nproc_per_node N")
        if self.fsdp and self.save_every:
            raise UserError("--save-every with --fsdp: RUN/state holds whole tensors, not FSDP's "
                            "shards; add --save-every 0")
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing != 0:
            raise UserError(f"--label-smoothing {self.label_smoothing}: applies to sigmoid and "
                            f"robust only, not to --loss-type {self.loss_type}")
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise UserError(f"--label-smoothing {self.label_smoothing}: robust DPO needs < 0.5 "
                            f"(it divides by 1-2ε)")


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


def dpo_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, float]:
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


# --- data: pairs -> token ids ---

def tokenize_pairs(rows: list[dict], tok: Tokenizer, max_len: int,
                   vocab_size: int) -> tuple[list[dict], int]:
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

def prepare(cfg: Config, net, model, pairs: list[dict], pad_id: int, dev):
    """main()'s work for train() once `net` is made: π_ref on every pair, the trainable tensors by
    name, AdamW over them, and per optimizer step this rank's micro-batches with their weights."""
    epochs = epoch_batches(pairs, cfg.batch_size, cfg.epochs, cfg.seed)  # each epoch's batches
    # π_ref never changes, so every pair is scored once, before the first step (the first epoch
    # holds each pair once). With LoRA the reference is the base network: adapters off, no copy.
    with lora.disabled(model):
        reference_logps(net, epochs[0], pad_id, dev, cfg.loss_type == "ipo")
    micro_batches, steps = [b for epoch in epochs for b in epoch], []
    for i in range(0, len(micro_batches), cfg.grad_accum):
        step_batches = micro_batches[i:i + cfg.grad_accum]
        n_pairs = sum(map(len, step_batches))  # the pairs of this optimizer step, over all ranks
        # Each rank trains on its shard of every micro-batch (distributed.py's rules). The step's
        # loss is the mean over its n_pairs pairs: each part adds its sum / n_pairs, times
        # world_size as DDP averages over ranks; a rank left without a pair runs a dummy weighing 0.
        steps.append([(mine, distributed.world_size() / n_pairs if real else 0.0)
                      for mine, real in map(distributed.shard, step_batches)])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}  # LoRA: A, B
    optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return trainable, optimizer, steps


def train(cfg: Config, net, trainable: dict[str, Tensor], optimizer: torch.optim.Optimizer,
          steps: list[list[tuple]], pad_id: int, dev, run: Run, history: list[dict]) -> list[dict]:
    """DPO steps on `net` from step len(history) on (a resumed run's history holds its finished
    steps). main() and prepare() made every argument: nothing here knows of LoRA or ranks."""
    average = cfg.loss_type == "ipo"  # IPO: on per-token mean log-probs; the others on sums
    bar = tqdm(total=len(steps), initial=len(history), desc="DPO", unit="step",
               disable=not run.writes)  # shown by the rank that writes the run
    net.train()
    for step in range(len(history), len(steps)):
        lr = cfg.lr * lr_at(step, len(steps), cfg.warmup_steps)  # warmup, then linear decay to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_metrics = []
        for i, (pairs, weight) in enumerate(steps[step]):
            # DDP all-reduces in the step's last backward only (nanoGPT's trick; not DDP: ignored)
            net.require_backward_grad_sync = i == len(steps[step]) - 1
            # one forward over the chosen, then the rejected rows: log π(y|x) of the response tokens
            batch = pair_batch(pairs, pad_id)
            policy_chosen, policy_rejected = batch_logps(net, batch, dev, average)
            # DPO eq. 7: -log σ(β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]),
            # with the cached π_ref; no reward model and no sampling anywhere in training
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected,
                torch.tensor([p["ref_chosen"] for p in pairs], device=dev),
                torch.tensor([p["ref_rejected"] for p in pairs], device=dev),
                cfg.beta, cfg.loss_type, cfg.label_smoothing)
            # the weight (world_size / the step's pairs) makes the step's gradient its mean loss's
            (losses.sum() * weight).backward()
            step_metrics.append((len(pairs) if weight else 0, dpo_metrics(
                losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)))
        grad_norm = clip_grad_norm(trainable.values(), cfg.grad_clip)  # before clipping, logged
        # a NaN or inf stops the run here, before the weights step on it: the last state stays
        check_finite(step + 1, "lower --lr or --beta", grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # means over the step's pairs of every rank (a dummy pair weighs 0)
        metrics = {**mean_metrics(step_metrics), "step": step + 1, "grad_norm": grad_norm, "lr": lr}
        run.log(**metrics)
        history.append(metrics)
        # the implicit rewards' margin and accuracy are DPO's progress signal; the loss says little
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['rewards/margins']:.2f}",
                        acc=f"{metrics['rewards/accuracies']:.2f}")
        bar.update()
        if (run.writes and cfg.save_every and (step + 1) % cfg.save_every == 0
                and step + 1 < len(steps)):  # after the last step, model/ is the state
            save_state(run.dir, step + 1, trainable, optimizer)  # what --resume continues from
    bar.close()
    net.eval()
    return history


def main() -> None:
    cfg, history = parse_config(Config, __doc__), []  # every flag checked here, before any work
    if cfg.resume:  # the interrupted run's own config, and its metrics up to its saved state
        cfg, _, history = resume_run(Config, cfg.resume, "train_dpo")
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    threads = choose_threads(cfg.threads)
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    rows = read_preferences(cfg.data)[:cfg.max_pairs or None]
    eval_rows = load_eval_rows(cfg.eval_data) if cfg.eval_data else []  # validated before any work
    if cfg.fsdp and eval_rows:  # generation would need every rank in lockstep
        print0("--fsdp: no evaluation here; run python tools/pink_eval.py on the saved model")
    eval_rows = [] if cfg.fsdp or not distributed.is_main() else eval_rows  # rank 0 evaluates
    model_dir = resolve_model(cfg.model)
    tok = Tokenizer(model_dir)

    def adapt(model):  # LoRA adapters (A drawn from --seed), gradient checkpointing, oneDNN
        lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)  # rank 0: none
        model.model.grad_checkpointing = cfg.grad_checkpointing
        if cfg.onednn:  # the optional speed layer, imported only where its flag is read
            from nanorlhf.fast.packed import pack_linears
            pack_linears(model)  # after LoRA: adapted projections keep their own forward
        return model
    if cfg.fsdp:  # each rank reads only its shard of each tensor, straight into FSDP2's shards
        from nanorlhf.fast import fsdp
        net = model = fsdp.load_model_sharded(model_dir, dev, adapt).eval()
    else:
        model = adapt(load_model(model_dir, device=dev).eval())
        net = distributed.wrap(model)  # DDP under torchrun, else the model itself
    pairs, truncated = tokenize_pairs(rows, tok, cfg.max_len, model.cfg.vocab_size)
    print0(f"torch threads: {threads}; {len(pairs)} pairs from {cfg.data}; {truncated} truncated "
           f"to {cfg.max_len} tokens (response cut at the right first, then prompt from the left)")
    run = Run("train_dpo", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    results = {}
    if eval_rows:  # the base model is the policy before its first step
        results["base"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, desc="eval base")
    trainable, optimizer, steps = prepare(cfg, net, model, pairs, tok.pad_id, dev)
    if cfg.resume:  # the trained tensors, AdamW's moments and the RNG as after the saved step
        saved = load_state(run.dir, optimizer)[1]
        model.load_state_dict({name: saved[name] for name in trainable}, strict=False)
        run.rewrite(history)  # metrics.jsonl back to the state's step, once that state has loaded
    try:
        history = train(cfg, net, trainable, optimizer, steps, tok.pad_id, dev, run, history)
    except KeyboardInterrupt:  # Ctrl-C: what the finished steps learned is saved; one line, 130
        exit_interrupted(run, len(history), "model",  # LoRA: merged
                         lambda: save_model(model.eval(), run.dir / "model", copy_from=model_dir))
    save_model(model, run.dir / "model", copy_from=model_dir)  # every rank calls it; rank 0 writes
    if not distributed.is_main():
        return
    curve = lambda key: [(m["step"], m[key]) for m in history]  # (step, value) points
    rewards = {name: curve(f"rewards/{name}") for name in ("chosen", "rejected", "margins")}
    line_plots([("DPO loss", {"loss": curve("loss")}), ("implicit rewards", rewards),
                ("reward accuracy", {"accuracy": curve("rewards/accuracies")})],
               run.dir / "training.svg")
    if eval_rows:
        # NLL of the trained samples under the base: with LoRA, the model with its adapters off
        base = lora.BaseView(model) if cfg.lora_rank else load_model(model_dir, device=dev).eval()
        results["DPO"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, base, desc="eval DPO")
        run.write_json("eval.json", results)
        print(f"\nheld-out pink-elephant eval: {len(eval_rows)} prompts x {cfg.eval_n} samples "
              f"(temperature {cfg.eval_temperature}, seed {cfg.seed})")
        print(format_table(results))
        before, after = results["base"]["pink_rate"], results["DPO"]["pink_rate"]
        if before > 0:
            print(f"relative change in pink mention rate: {(after - before) / before:+.0%}")
    # complete: model/ is the final state. RUN/state stays until the last write, so that a crash
    # in the writes above (the plot, eval.json) can still be resumed
    shutil.rmtree(run.dir / "state", ignore_errors=True)
    print(f"model, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
