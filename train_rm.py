"""A reward model learned from real human judgments: the VADER paper's sentiment ratings, offline.

    python train_rm.py --model llama   # the embedded SmolLM2-135M-Instruct, 2 CPU cores, ~19 min
    python train_rm.py --resume out/train_rm/RUN   # continue an interrupted run
    python train_rm.py --model llama --lora-rank 16 --grad-checkpointing true
    torchrun --nproc_per_node 2 train_rm.py -- --model llama   # DDP (FSDP is not supported here)

Each of 23,703 short texts (tweets, movie and Amazon review snippets, NYT editorials) was rated on
[-4, 4] by ~20 people (Hutto & Gilbert, ICWSM 2014; nanorlhf/tasks/human_ratings.py). "A is more
positive than B" when the raters' means differ beyond their standard errors: preference pairs, as in
RLHF's reward modelling (Stiennon et al. 2020, arXiv 2009.01325; Ouyang et al. 2022), fit with the
Bradley-Terry loss -log σ(r_A - r_B - m), optionally with a margin m (Llama 2, arXiv 2307.09288) and
reward centering (Eisenstein et al. 2023, arXiv 2312.09244).

The run, top to bottom: ratings split by text (NYT held out whole) -> --train-pairs pairs from the
train split, each text as the chat-formatted (prompt "", response = text) input that
reward.score_texts and `rest_loop.py --gold rm:PATH` score, its text cut to --max-len tokens -> the
RM is the LM's backbone with a fresh scalar head (reward_model_from_lm) -> evaluation of VADER and
the untrained RM on the in-domain test split and the held-out source -> Bradley-Terry steps (AdamW,
warmup + linear decay, clipping, accumulation), metrics.jsonl and a tqdm bar -> the same evaluation
for the trained RM, side by side -> RUN/rm in the LlamaForSequenceClassification layout, eval.json,
training.svg.

Evaluation, per split: pairwise accuracy on --eval-pairs fixed pairs (a tie counts 1/2: VADER gives
many), SE = sqrt(p(1-p)/n); Pearson and Spearman correlation of the score with the raters' mean on
--eval-texts texts, SE = (1-r²)/sqrt(n-1) (the large-sample SE of Pearson's r, used for Spearman's
as an approximation). Pairs and texts are drawn independently, so a few texts are in both. VADER
reads each whole text, the RM its first --max-len tokens (the same cut as in training).

Resume: RUN/state/ (the trainable weights, AdamW's moments, the RNG; nanorlhf/run.py) every
--save-every steps, swapped in whole; the pairs, their order and the evaluation sets come from
--seed alone, so the step is all a resumed run needs, and it keeps the baseline rows already in
RUN/eval.json. RUN/rm/config.json records the prompt "" as nanorlhf_fixed_prompt: the RM learned the
sentiment of a text alone, so reward.RMScorer (rest_loop's --gold rm:PATH, qdaif's --fitness
rm:PATH) scores responses under that prompt and ignores the request.
"""

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from nanorlhf import distributed, lora
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.data import check_vocab, epoch_batches, fit_to_length
from nanorlhf.errors import run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, read_results, resume_run, run_dir, save_state,
                          seed_everything)
from nanorlhf.step import clip_grad_norm, lr_at, mean_metrics, pair_batch
from nanorlhf.model import autocast, device
from nanorlhf.reward import (VaderScorer, bradley_terry_loss, pair_ids, reward_model_from_lm,
                             save_reward_model, score_texts)
from nanorlhf.svg import line_plots
from nanorlhf.tasks import human_ratings
from nanorlhf.tasks.stats import corr_se, pairwise_accuracy, pearson, spearman
from nanorlhf.tokenizer import Tokenizer

EVAL_SPLITS = {"test": "in-domain test", "heldout_source": "held-out source (NYT)"}


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (the embedded "
                               "SmolLM2-135M-Instruct)")
    out_dir: str = flag("out/train_rm", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (empty: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    save_every: int = flag(24, "write RUN/state/ every N optimizer steps (and at the last; 0: only "
                               "the last)", min=0)
    train_pairs: int = flag(768, "preference pairs drawn from the train split", min=1)
    eval_pairs: int = flag(300, "fixed pairs per evaluation split (test, held-out source)", min=1)
    eval_texts: int = flag(300, "texts per evaluation split for the correlations (capped at the "
                                "split's size)", min=3)
    pair_z: float = flag(1.96, "a pair needs |mean_a - mean_b| > z·sqrt(se_a² + se_b²)", min=0)
    max_len: int = flag(64, "text tokens kept (cut at the right; 99% of the texts are shorter)",
                        min=16)
    margin_scale: float = flag(0.0, "BT margin m = scale × the raters' mean difference (0 = no "
                                    "margin)", min=0)
    center_coef: float = flag(0.0, "reward centering c·(r_w + r_l)² (0.01 in arXiv 2312.09244)",
                              min=0)
    lr: float = flag(2e-5, "AdamW peak learning rate of the backbone", gt=0)
    head_lr: float = flag(1e-3, "AdamW peak learning rate of the head (fresh, where the backbone "
                                "is pretrained)", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(8, "linear warmup steps, then linear decay to 0", min=0)
    epochs: int = flag(1, "passes over the training pairs", min=1)
    batch_size: int = flag(8, "pairs per forward pass, summed over torchrun's ranks", min=1)
    grad_accum: int = flag(1, "forward passes per optimizer step: batch_size x grad_accum pairs "
                              "per step", min=1)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    eval_batch_size: int = flag(32, "texts per scoring forward", min=1)
    eval_base: bool = flag(True, "also evaluate the untrained RM (the baseline row; costs one more "
                                 "evaluation)")
    seed: int = flag(0, "seed of the split, the pairs, the head's init and the shuffling")
    # scale: LoRA (nanorlhf/lora.py), gradient checkpointing, oneDNN (nanorlhf/fast/packed.py)
    lora_rank: int = flag(0, "LoRA rank r: train rank-r adapters on --lora-targets and the head "
                             "(0 = full fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS),
                             "comma-separated projections that get adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less "
                                           "memory, ~1/3 more compute")
    onednn: bool = flag(False, "CPU matmuls through oneDNN with packed weights: ~1.9x faster steps "
                               "on AMD CPUs, where MKL runs AVX2 kernels; equal to MKL's up to "
                               "rounding, so not bit-equal to a run without it")
    threads: int = flag(0, THREADS_HELP, min=0)

    def check(self) -> None:
        """The rules between flags, before any work (parse_config calls this)."""
        lora.parse_targets(self.lora_targets)


# --- evaluation (the statistics are nanorlhf/tasks/stats.py) ---

def eval_metrics(score: dict[str, float], pairs: list[dict], texts: list[dict]) -> dict[str, float]:
    """A scorer's text -> score map on one split's pairs and rated texts -> accuracy, pearson,
    spearman and their SEs."""
    acc, acc_se = pairwise_accuracy(np.array([score[p["chosen"]] for p in pairs]),
                                    np.array([score[p["rejected"]] for p in pairs]))
    s, m = np.array([score[t["text"]] for t in texts]), np.array([t["mean"] for t in texts])
    r, rho = pearson(s, m), spearman(s, m)
    return dict(accuracy=acc, accuracy_se=acc_se, pearson=r, pearson_se=corr_se(r, len(texts)),
                spearman=rho, spearman_se=corr_se(rho, len(texts)), pairs=len(pairs),
                texts=len(texts))


def eval_sets(splits: dict[str, list[dict]], cfg: Config) -> dict[str, tuple[list, list]]:
    """{split: (pairs, rated texts)}: the fixed evaluation data, seeded apart from the training
    pairs."""
    out = {}
    for k, split in enumerate(EVAL_SPLITS):
        pairs = human_ratings.preference_pairs(splits[split], cfg.eval_pairs, cfg.seed + 1 + k,
                                               cfg.pair_z)
        rated = splits[split]
        texts = random.Random(f"{cfg.seed}:{split}").sample(rated, min(cfg.eval_texts, len(rated)))
        out[split] = (pairs, texts)
    return out


def unique_texts(sets: dict) -> list[str]:
    """Every text an evaluation scores, once each, shortest first (less padding in a batch)."""
    texts = {t for pairs, rated in sets.values()
             for t in [p[k] for p in pairs for k in ("chosen", "rejected")]
             + [r["text"] for r in rated]}
    return sorted(texts, key=lambda t: (len(t), t))


def evaluate(score_fn, texts: list[str], sets: dict) -> dict[str, dict]:
    """Score each text once with score_fn (texts -> scores), then every split's metrics."""
    score = dict(zip(texts, score_fn(texts)))
    return {split: eval_metrics(score, pairs, rated) for split, (pairs, rated) in sets.items()}


def format_table(results: dict[str, dict]) -> str:
    """One row per scorer: value±SE of accuracy, Pearson and Spearman on each evaluation split."""
    cols = "".join(f" | {EVAL_SPLITS[s]:<41}" for s in EVAL_SPLITS)
    heads = " | accuracy      pearson       spearman     " * len(EVAL_SPLITS)
    lines = [f"{'scorer':<12}{cols}", f"{'':<12}{heads}"]
    for name, res in results.items():
        cells = "".join(" | " + "  ".join(f"{res[s][k]:6.3f}±{res[s][k + '_se']:.3f}"
                                          for k in ("accuracy", "pearson", "spearman"))
                        for s in EVAL_SPLITS)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


# --- the run ---

def tokenize_pairs(pairs: list[dict], tok: Tokenizer, max_len: int,
                   margin_scale: float) -> list[dict]:
    """Human pairs -> {prompt, chosen, rejected} ids (+ margin), each text cut as score_texts cuts
    it."""
    out = []
    for p in pairs:
        prompt, chosen = pair_ids(tok, "", p["chosen"])
        rejected = pair_ids(tok, "", p["rejected"])[1]
        # the prompt is never cut: fit_to_length cuts the response to max_len first (max_len >= 16)
        room = len(prompt) + max_len
        out.append({"prompt": prompt, "chosen": fit_to_length(prompt, chosen, room)[1],
                    "rejected": fit_to_length(prompt, rejected, room)[1],
                    "margin": margin_scale * p["margin"]})
    return out


def train(cfg: Config, net, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
          pairs: list[dict], pad_id: int, dev, run: Run, start: int = 0,
          history: list[dict] | None = None) -> list[dict]:
    """Bradley-Terry steps from step `start` on: `net` is the RM to train through (DDP under
    torchrun), `optimizer` steps what trains (with LoRA the adapters and the head), `weights` is
    what RUN/state/ keeps of the RM. Under torchrun every rank builds the same micro-batches and
    trains on its shard of each."""
    # the same order on every (re)start: a resume needs only the step number
    micro_batches = [b for epoch in epoch_batches(pairs, cfg.batch_size, cfg.epochs, cfg.seed)
                     for b in epoch]
    net.train()
    peaks = (cfg.lr, cfg.head_lr)  # the backbone's and the head's param group
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    history = [] if history is None else history  # main's list: Ctrl-C counts its finished steps
    bar = distributed.bar(total=total_steps, initial=start, desc="RM", unit="step")
    for step in range(start, total_steps):
        mult = lr_at(step, total_steps, cfg.warmup_steps)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * mult
        step_batches = micro_batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        n_pairs = sum(map(len, step_batches))  # the pairs of this optimizer step, over all ranks
        step_metrics = []
        for i, batch in enumerate(step_batches):
            # this rank's pairs (a weight-0 dummy if none)
            batch_pairs, real = distributed.shard(batch)
            # DDP all-reduces on the last backward of the step only; the others accumulate locally
            net.require_backward_grad_sync = i == len(step_batches) - 1
            # one forward over the chosen rows then the rejected rows: the head at each last
            # real token
            ids = pair_batch(batch_pairs, pad_id)
            with autocast(dev):
                scores = net(ids["input_ids"].to(dev), ids["attention_mask"].to(dev))
            chosen, rejected = scores.chunk(2)
            # Bradley-Terry: P(chosen ≻ rejected) = σ(r_c - r_r). The margin asks for a gap that
            # grows with how much more positive the raters found the chosen text; centering
            # pins the scores' offset, which BT alone leaves free. No margin at all (None) when
            # --margin-scale is 0.
            margin = (torch.tensor([p["margin"] for p in batch_pairs], device=dev)
                      if cfg.margin_scale else None)
            losses, accuracy = bradley_terry_loss(chosen, rejected, margin, cfg.center_coef)
            # The step's loss is the mean over its n_pairs pairs however they are split over
            # micro-batches and ranks; DDP averages over ranks, so a rank multiplies by
            # world_size; a dummy weighs 0.
            weight = distributed.world_size() / n_pairs if real else 0.0
            (losses.sum() * weight).backward()
            step_metrics.append((len(batch_pairs) * real, {
                "loss": losses.mean().item(), "accuracy": accuracy.mean().item(),
                "margin": (chosen - rejected).mean().item(),
                "reward": (chosen + rejected).mean().item() / 2}))
        # the norm before clipping, logged
        grad_norm = clip_grad_norm(net.parameters(), cfg.grad_clip)
        # a NaN or inf stops the run here, before the weights step on it: the last state stays
        check_finite(step + 1, "lower --lr", grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # means over the step's pairs of every rank
        metrics = mean_metrics(step_metrics)
        lr = optimizer.param_groups[0]["lr"]  # the backbone's; the head's is head_lr/lr times it
        metrics.update(step=step + 1, grad_norm=grad_norm, lr=lr)
        run.log(**metrics)
        history.append(metrics)
        # training accuracy is on pairs seen once: an honest running estimate of held-out accuracy
        # in epoch 1
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        bar.update()
        every = cfg.save_every and (step + 1) % cfg.save_every == 0
        if distributed.is_main() and (step + 1 == total_steps or every):
            save_state(run.dir, step + 1, weights, optimizer)  # RUN/state/, swapped in whole
    bar.close()
    net.eval()
    return history


def main() -> None:
    cfg = parse_config(Config, __doc__)  # every flag checked here, before any work
    if cfg.resume:  # the interrupted run's own config, and its metrics up to its state's step
        cfg, start, history = resume_run(Config, cfg.resume, "train_rm")
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
        start, history = 0, []
    threads = choose_threads(cfg.threads)
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    if cfg.resume:
        distributed.print0(f"resuming {cfg.resume} at step {start}")
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    splits = human_ratings.load_splits(cfg.seed)
    rows = human_ratings.preference_pairs(splits["train"], cfg.train_pairs, cfg.seed, cfg.pair_z)
    sets = eval_sets(splits, cfg)
    # before the model load: a missing vaderSentiment is one line, not a wasted minute
    vader = VaderScorer()
    model_dir = resolve_model(cfg.model)
    tok = Tokenizer(model_dir)
    rm = reward_model_from_lm(load_model(model_dir, device=dev), cfg.seed).eval()
    # the tokenizer's every id needs an embedding: a mismatch is one line now, not an IndexError
    # (and a run dir that blocks the name) later
    check_vocab([tok.tok.get_vocab_size() - 1], rm.cfg.vocab_size,
                str(model_dir / "tokenizer.json"))
    rm.fixed_prompt = ""  # trained and evaluated on ("", text): saved with the RM (reward.RMScorer)
    # What trains: LoRA adapters drawn from --seed (rank 0: none, everything trains) and, with LoRA
    # too, the fresh head whole; gradient checkpointing and oneDNN matmuls as the flags say.
    lora.adapt(rm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    rm.score.requires_grad_(True)
    rm.model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.onednn:  # the optional speed layer, imported only where its flag is read
        from nanorlhf.fast.packed import pack_linears
        pack_linears(rm)  # after LoRA: adapted projections keep their own forward
    pairs = tokenize_pairs(rows, tok, cfg.max_len, cfg.margin_scale)
    cut = sum(len(tok.encode(r[k])) > cfg.max_len for r in rows for k in ("chosen", "rejected"))
    distributed.print0(f"{len(pairs)} training pairs from {len(splits['train'])} train texts; "
                       f"{cut} texts cut to {cfg.max_len} tokens; torch threads: {threads}")
    run = Run("train_rm", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))

    texts = unique_texts(sets)
    prompt_len = len(pair_ids(tok, "", "")[0])
    # the cut of tokenize_pairs: score_texts' max_len covers prompt + text
    rm_scores = lambda ts: score_texts(rm, tok, [""] * len(ts), ts, cfg.eval_batch_size,
                                       prompt_len + cfg.max_len)
    # a resumed run keeps the baseline rows it already has
    results = read_results(run.dir) if cfg.resume else {}
    # rank 0 evaluates; the others wait at DDP's first sync
    if distributed.is_main() and "VADER" not in results:
        results["VADER"] = evaluate(lambda ts: vader.score([""] * len(ts), ts), texts, sets)
        if cfg.eval_base:
            results["RM untrained"] = evaluate(rm_scores, texts, sets)
        run.write_json("eval.json", results)

    net = distributed.wrap(rm)  # DDP under torchrun, else rm itself
    # The head is fresh and the backbone pretrained: the head gets a larger lr (as rest_loop's
    # proxy RM).
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in rm.model.parameters() if p.requires_grad], "lr": cfg.lr},
         {"params": [rm.score.weight], "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    # what a state keeps: all weights, or with LoRA the adapters and the head
    weights = {name: p for name, p in rm.named_parameters() if p.requires_grad}
    if cfg.resume:  # the weights, AdamW's moments and the RNG of the state's step
        _, tensors, _ = load_state(cfg.resume, optimizer)
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(tensors[name])
        run.rewrite(history)  # metrics.jsonl back to the state's step, once that state has loaded
    try:
        history = train(cfg, net, optimizer, weights, pairs, tok.pad_id, dev, run, start, history)
    except KeyboardInterrupt:  # Ctrl-C: what the finished steps learned is saved; one line, 130
        exit_interrupted(run, len(history), "RM",  # LoRA: merged
                         lambda: save_reward_model(rm.eval(), run.dir / "rm", copy_from=model_dir))
    if not distributed.is_main():
        return
    # LoRA: adapters merged into plain weights
    save_reward_model(rm, run.dir / "rm", copy_from=model_dir)
    line_plots([("Bradley-Terry loss", {"loss": [(m["step"], m["loss"]) for m in history]}),
                ("training pair accuracy",
                 {"accuracy": [(m["step"], m["accuracy"]) for m in history]}),
                ("score gap r_chosen - r_rejected",
                 {"margin": [(m["step"], m["margin"]) for m in history]})],
               run.dir / "training.svg")
    results["RM trained"] = evaluate(rm_scores, texts, sets)
    run.write_json("eval.json", results)
    print(f"\n{len(texts)} texts scored; per split {cfg.eval_pairs} pairs, up to {cfg.eval_texts} "
          "rated texts")
    print(format_table(results))
    print(f"RM, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
