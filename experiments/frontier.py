"""The reward-vs-KL frontier: every method against one gold scorer, from the same π₀ and the same
gold labels.

    python experiments/frontier.py --gold rm:out/train_rm/RUN/rm   # every method, seeds 0,1,2
    python experiments/frontier.py --gold vader --seeds 0 --methods bon,dpo,ppo   # VADER gold
    python experiments/frontier.py --gold rm:out/train_rm/RUN/rm --report-only true

The DPO paper's Figure 2 (Rafailov et al. 2023) in the setup of Gao, Schulman & Hilton 2022 (arXiv
2210.10760): a fixed gold scorer plays the human. It labels --gold-pairs pairs of π₀'s samples, and
that is each method's whole gold budget; a method that optimises a reward optimises a proxy RM
learned from those labels. Per seed, in OUT_DIR/s{seed}/:
  labels/     pairs.jsonl (TRL preference rows: two samples of a train prompt, ordered by the gold;
              ties dropped but paid for), proxy_rm/ (Bradley-Terry on those pairs with
              rest_loop.py's recipe, a copy of π₀'s backbone) and base.json (π₀ evaluated: the
              KL = 0 point)
  bon.json    best-of-n by the proxy for each --bon-n, from --bon-samples samples per held-out
              prompt split into disjoint groups of n; KL = log n - (n-1)/n (Stiennon et al. 2020; an
              upper bound, Beirami et al. 2024)
  dpo-b{β}/   train_dpo.py on pairs.jsonl for each --dpo-betas (DPO's data are the labels: no proxy)
  rest/       rest_loop.py --gold GOLD --gold-pairs budget/T (iterated ReST buys its labels as it
              goes)
  ppo/ grpo/  train_ppo.py --reward rm:labels/proxy_rm --gold GOLD --eval-every --eval-every
Each point is one evaluation protocol (nanorlhf/tasks/policy_eval.py; rest_loop.py evaluates the
same way): the held-out prompts (the last --eval-prompts of --prompts), --eval-n samples each at
temperature 1 from seed + 7, up to --max-new-tokens, scored by the gold, and KL(π‖π₀) estimated on
those samples. π₀'s samples are the same ones in every run of a seed (base.json, ReST's iteration 0
and PPO's step 0 agree).

Outputs in OUT_DIR/: frontier.json (every point), frontier.md (gold and KL per method and setting,
mean ± SE over seeds; with one seed the SE is over samples) and frontier.svg: gold - gold(π₀)
against d = √KL, with Gao's fits, R(d) = d(α - βd) for best-of-n and R(d) = d(α - β log d) for the
others (Gao fit that form to RL; for DPO and ReST it is only a description). A finished part is
kept: re-running the command continues. The scripts run as subprocesses, as a user would run them;
this file imports none of them.
"""

import json
import math
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanorlhf.atomic import atomic_dir, atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import THREADS_HELP, choose_threads, flag, parse_config, seed_everything
from nanorlhf.model import device
from nanorlhf.reward import (bradley_terry_sum, load_reward_model, make_gold_scorer, pair_ids,
                             reward_model_from_lm, save_reward_model, score_texts)
from nanorlhf.sampling import sample_responses
from nanorlhf.svg import line_plots
from nanorlhf.tasks.pink import DATA_DIR
from nanorlhf.tasks.policy_eval import evaluate_policy, prompt_rows, row_scorer
from nanorlhf.tasks.stats import mean_se
from nanorlhf.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]  # the repository: the scripts it runs
METHODS = ("bon", "dpo", "rest", "ppo", "grpo")


@dataclass
class Config:
    gold: str = flag("", "the gold scorer: rm:PATH (e.g. train_rm.py's RUN/rm) | vader")
    model: str = flag("llama", "π₀: checkpoint dir, local HF cache id, or 'llama' (the embedded "
                               "SmolLM2-135M)")
    prompts: str = flag(str(DATA_DIR / "rest_prompts.jsonl"),
                        "jsonl of {\"prompt\"}; the last --eval-prompts held out")
    out_dir: str = flag("out/frontier", "everything is written here (one folder per seed)")
    seeds: str = flag("0,1,2", "comma-separated seeds")
    methods: str = flag(",".join(METHODS), f"comma-separated, from {','.join(METHODS)}")
    report_only: bool = flag(False, "only read what the runs wrote: table, plot, fits")
    gold_pairs: int = flag(96, "gold labels per seed, the budget of every method", min=2)
    bon_n: str = flag("1,2,4,8,16", "best-of-n: the n to evaluate")
    bon_samples: int = flag(16, "best-of-n: samples per held-out prompt (a multiple of every n)",
                            min=1)
    dpo_betas: str = flag("0.5,0.1", "DPO: one run per β (smaller β: further from π₀)")
    dpo_epochs: int = flag(2, "DPO: passes over the pairs", min=1)
    rl_steps: int = flag(12, "PPO and GRPO steps", min=1)
    eval_every: int = flag(4, "PPO and GRPO: evaluate every N steps (the points of their curves)",
                           min=1)
    rest_iterations: int = flag(3, "ReST iterations T (each buys --gold-pairs / T labels)", min=1)
    eval_prompts: int = flag(24, "held-out prompts (the last rows of --prompts)", min=1)
    eval_n: int = flag(2, "samples per held-out prompt in every evaluation", min=1)
    max_new_tokens: int = flag(40, "response length cap, everywhere", min=1)
    gen_batch_size: int = flag(48, "sampling batch size (it fixes the samples of a seed)", min=1)
    threads: int = flag(0, THREADS_HELP, min=0)

    def check(self) -> None:
        if not (self.gold == "vader" or (self.gold.startswith("rm:") and len(self.gold) > 3)):
            raise UserError(f"--gold {self.gold!r}: choose rm:PATH (a reward-model checkpoint) "
                            "or vader")
        unknown = [m for m in self.method_list() if m not in METHODS]
        if unknown or not self.method_list():
            raise UserError(f"--methods {self.methods!r}: unknown method {(unknown or [''])[0]!r}; "
                            f"choose from {','.join(METHODS)}")
        for name in ("seeds", "bon_n", "dpo_betas"):
            numbers(self, name)
        if any(n < 1 or self.bon_samples % n for n in numbers(self, "bon_n")):
            raise UserError(f"--bon-n {self.bon_n}: every n must be >= 1 and divide --bon-samples "
                            f"{self.bon_samples}")
        if any(b <= 0 for b in numbers(self, "dpo_betas")):
            raise UserError(f"--dpo-betas {self.dpo_betas}: every β must be > 0")
        if self.gold_pairs % self.rest_iterations and "rest" in self.method_list():
            raise UserError(f"--gold-pairs {self.gold_pairs}: must split evenly over "
                            f"--rest-iterations {self.rest_iterations}")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def numbers(cfg: Config, name: str) -> list:
    text, kind = getattr(cfg, name), int if name == "seeds" else (int if name == "bon_n" else float)
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--{name.replace('_', '-')} {text!r}: expected comma-separated "
                        f"{kind.__name__}s")
    return values


# --- the gold labels, the proxy, best-of-n: what this file computes itself ---

# rest_loop.py's proxy recipe at its defaults: one Bradley-Terry pass in batches of 8, AdamW (lr
# 2e-5 on the backbone, 1e-3 on the fresh head, no weight decay), centering 0.01, clipping at 1
PROXY_LR, PROXY_HEAD_LR, PROXY_CENTER, PROXY_BATCH, PROXY_CLIP = 2e-5, 1e-3, 0.01, 8, 1.0


def train_proxy(rm, pairs: list[dict], pad_id: int, dev, seed: int) -> float | None:
    """rest_loop.train_proxy at rest_loop's defaults, in one process: one shuffled pass of
    Bradley-Terry over `pairs`, one AdamW step per batch -> the pass's mean loss (None without
    pairs). tests/test_frontier.py checks that both give the same RM, bit for bit."""
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in rm.model.parameters() if p.requires_grad], "lr": PROXY_LR},
         {"params": [rm.score.weight], "lr": PROXY_HEAD_LR}], weight_decay=0.0)
    order, losses = pairs[:], []
    random.Random(f"{seed}:rm0").shuffle(order)
    rm.train()
    for i in range(0, len(order), PROXY_BATCH):
        # each step minimises the mean loss of its batch
        total, count = bradley_terry_sum(rm, order[i:i + PROXY_BATCH], pad_id, dev, PROXY_CENTER)
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.grad is not None],
                                       PROXY_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    rm.eval()
    return torch.stack(losses).mean().item() if losses else None


def buy_labels(cfg: Config, seed: int, policy, tok: Tokenizer, train: list[str], gold,
               held: list[dict], out: Path, dev) -> None:
    """labels/: --gold-pairs gold comparisons of two π₀ samples of a train prompt, the proxy RM they
    train, and π₀'s evaluation."""
    if len(train) < cfg.gold_pairs:
        raise UserError(f"{cfg.prompts}: {len(train)} train prompts, fewer than --gold-pairs "
                        f"{cfg.gold_pairs} (one pair per prompt)")
    prompts = random.Random(f"{seed}:labels").sample(train, cfg.gold_pairs)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    # prompt-major: responses 2i and 2i+1 answer prompt i
    _, _, texts = sample_responses(policy, tok, chats, 2, 1.0, seed * 1000 + 1, cfg.max_new_tokens,
                                   cfg.gen_batch_size, desc="labels")
    scores = gold.score([p for p in prompts for _ in range(2)], texts)
    rows, pairs = [], []
    for prompt, a, b, sa, sb in zip(prompts, texts[0::2], texts[1::2], scores[0::2], scores[1::2]):
        if sa == sb:  # no preference: paid for, not usable
            continue
        win, lose = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": win,
                     "rejected": lose, "gold_margin": abs(sa - sb)})
        prompt_ids, chosen = pair_ids(tok, prompt, win)
        pairs.append({"prompt": prompt_ids, "chosen": chosen,
                      "rejected": pair_ids(tok, prompt, lose)[1]})
    proxy = reward_model_from_lm(policy, seed=seed)
    loss = train_proxy(proxy, pairs, tok.pad_id, dev, seed)
    base = evaluate_policy(policy, policy, tok, held, {"gold": row_scorer(gold)}, cfg.eval_n,
                           seed + 7, cfg.max_new_tokens, cfg.gen_batch_size, "eval π₀")
    # all or nothing: a crash here leaves no labels/ to be mistaken for done
    with atomic_dir(out) as tmp:
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        save_reward_model(proxy.eval(), tmp / "proxy_rm")
        (tmp / "base.json").write_text(json.dumps({**base, "labels": cfg.gold_pairs,
                                                   "ties": cfg.gold_pairs - len(rows),
                                                   "proxy_loss": loss}, indent=1) + "\n")


def best_of_n(group_proxy: np.ndarray, group_gold: np.ndarray, n: int) -> np.ndarray:
    """(prompts, S) proxy and gold scores of S samples per prompt -> the gold of the proxy's pick
    in each of the S/n disjoint groups of n consecutive samples, (prompts · S/n,). Disjoint groups:
    every value is a real best-of-n draw, so their mean is unbiased and their SE honest."""
    P, S = group_proxy.shape
    proxy, gold = group_proxy.reshape(P, S // n, n), group_gold.reshape(P, S // n, n)
    pick = proxy.argmax(-1)  # (P, S/n): the first of equal proxy scores
    return np.take_along_axis(gold, pick[..., None], -1).reshape(-1)


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ π₀) = log n - (n-1)/n (Stiennon et al. 2020, appendix; an upper bound:
    Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def run_bon(cfg: Config, seed: int, policy, tok: Tokenizer, held: list[dict], gold,
            labels: Path, dev) -> list[dict]:
    proxy = load_reward_model(labels / "proxy_rm", device=dev).eval()
    _, _, texts = sample_responses(policy, tok, [r["messages"] for r in held], cfg.bon_samples,
                                   1.0, seed * 1000 + 2, cfg.max_new_tokens, cfg.gen_batch_size,
                                   desc="best-of-n samples")
    asked = [r["prompt"] for r in held for _ in range(cfg.bon_samples)]
    shape = (len(held), cfg.bon_samples)
    proxy_scores = np.array(score_texts(proxy, tok, asked, texts, 16)).reshape(shape)
    gold_scores = np.array(gold.score(asked, texts)).reshape(shape)
    points = []
    for n in numbers(cfg, "bon_n"):
        picked = best_of_n(proxy_scores, gold_scores, n)
        g, se = mean_se(picked.tolist())
        best_proxy = float(best_of_n(proxy_scores, proxy_scores, n).mean())
        points.append({"label": f"n={n}", "n": n, "gold": g, "gold_se": se, "kl": bon_kl(n),
                       "kl_se": 0.0, "proxy": best_proxy, "samples": len(picked)})
    return points


# --- the other methods: their own scripts, run as a user would ---

def script(name: str, args: list) -> None:
    cmd = [sys.executable, str(ROOT / name), *map(str, args)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode:
        raise UserError(f"{name} failed (its output is above); fix it and re-run frontier.py: "
                        "finished parts are kept")


def fresh(run: Path, done: bool) -> bool:
    """True when `run` must be (re)made: not done yet. An unfinished one without resumable state is
    removed."""
    if done:
        return False
    if run.exists() and not (run / "state").exists():
        shutil.rmtree(run)
    return True


def common(cfg: Config, seed: int) -> list:
    return ["--model", cfg.model, "--prompts", cfg.prompts, "--seed", seed,
            "--max-new-tokens", cfg.max_new_tokens, "--eval-prompts", cfg.eval_prompts,
            "--eval-n", cfg.eval_n, "--gen-batch-size", cfg.gen_batch_size]


def run_methods(cfg: Config, seed: int, out: Path) -> None:
    """The runs of one seed that other scripts make (skipping what is finished; resuming what can
    be)."""
    proxy = out / "labels" / "proxy_rm"
    for method in cfg.method_list():
        if method == "rest":
            run = out / "rest"
            done = (run / "model").is_dir() and not (run / "state").exists()
            if fresh(run, done):
                script("rest_loop.py", ["--resume", run] if (run / "state").exists() else
                       [*common(cfg, seed), "--gold", cfg.gold,
                        "--iterations", cfg.rest_iterations,
                        "--gold-pairs", cfg.gold_pairs // cfg.rest_iterations,
                        "--out-dir", out, "--run", "rest"])
        elif method in ("ppo", "grpo"):
            run = out / method
            evals = run / "eval.json"
            done = "after" in (json.loads(evals.read_text()) if evals.is_file() else {})
            if fresh(run, done):
                group = ["--group-size", 4] if method == "grpo" else []
                script("train_ppo.py", ["--resume", run] if (run / "state").exists() else
                       [*common(cfg, seed), "--algo", method, *group, "--reward", f"rm:{proxy}",
                        "--gold", cfg.gold, "--steps", cfg.rl_steps,
                        "--eval-every", cfg.eval_every, "--out-dir", out, "--run", method])
        elif method == "dpo":
            for beta in numbers(cfg, "dpo_betas"):
                run = out / f"dpo-b{beta:g}"
                if fresh(run, (run / "model").is_dir()):
                    script("train_dpo.py",
                           ["--model", cfg.model, "--data", out / "labels" / "pairs.jsonl",
                            "--beta", beta, "--epochs", cfg.dpo_epochs, "--seed", seed,
                            "--eval-data", "", "--out-dir", out, "--run", run.name])


# --- collecting the points, the table, the fits, the plot ---

def points_of(cfg: Config, seed: int, out: Path) -> list[dict]:
    """Every measured point of one seed: {method, label, gold, gold_se, kl, kl_se}."""
    base = json.loads((out / "labels" / "base.json").read_text())
    points = [{"method": "π₀", "label": "", "gold": base["gold"], "gold_se": base["gold_se"],
               "kl": 0.0, "kl_se": 0.0}]
    read = lambda path: json.loads(path.read_text()) if path.is_file() else None
    for method in cfg.method_list():
        if method == "bon" and (bon := read(out / "bon.json")):
            points += [{"method": "bon", **p} for p in bon]
        for beta in numbers(cfg, "dpo_betas") if method == "dpo" else []:
            if r := read(out / f"dpo-b{beta:g}" / "frontier_eval.json"):
                points.append({"method": "dpo", "label": f"β={beta:g}", **pick(r)})
        if method in ("ppo", "grpo") and (r := read(out / method / "eval.json")):
            points += [{"method": method, "label": f"step {s}", **pick(e)}
                       for s, e in r["steps"].items() if s != "0"]
        if method == "rest" and (out / "rest" / "metrics.jsonl").is_file():
            for line in (out / "rest" / "metrics.jsonl").read_text().splitlines():
                m = json.loads(line)
                if m["iteration"] > 0:
                    points.append({"method": "rest", "label": f"iter {m['iteration']}",
                                   "gold": m["gold"], "gold_se": math.nan, "kl": m["kl"],
                                   "kl_se": math.nan})
    return [{**p, "seed": seed, "d": math.sqrt(max(p["kl"], 0.0)), "gain": p["gold"] - base["gold"]}
            for p in points]


def pick(r: dict) -> dict:
    return {k: r[k] for k in ("gold", "gold_se", "kl", "kl_se")}


def gao_fit(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[float, float]:
    """Least squares for Gao et al.'s forms, linear in (α, β): bon R = αd - βd², rl
    R = αd - β·d·log d. -> (α, β). Points at d = 0 carry no information (R(0) = 0 in both forms)
    and are dropped."""
    keep = d > 0
    d, gain = d[keep], gain[keep]
    if len(d) < 2:
        return math.nan, math.nan
    X = np.stack([d, -(d ** 2 if form == "bon" else d * np.log(d))], 1)
    (alpha, beta), *_ = np.linalg.lstsq(X, gain, rcond=None)
    return float(alpha), float(beta)


def gao_curve(alpha: float, beta: float, form: str, d: np.ndarray) -> np.ndarray:
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * (alpha - beta * (d if form == "bon" else np.log(safe))), 0.0)


def report(cfg: Config, points: list[dict], out: Path) -> str:
    """frontier.md, frontier.svg, frontier.json from the points of every seed; -> the markdown."""
    seeds = sorted({p["seed"] for p in points})
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["label"]), []).append(p)
    lines = [f"gold: {cfg.gold}; seeds {','.join(map(str, seeds))}; {cfg.gold_pairs} gold labels "
             f"per seed; held-out {cfg.eval_prompts} prompts x {cfg.eval_n} samples (best-of-n: "
             f"x {cfg.bon_samples})", "",
             "| method | setting | seeds | gold ± SE | gain over π₀ ± SE | KL(π‖π₀) ± SE | √KL |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for (method, label), ps in groups.items():
        if len(ps) > 1:  # the SE over seeds: what another seed would do
            (gold, gold_se), (gain, gain_se), (kl, kl_se) = (mean_se([p[k] for p in ps])
                                                             for k in ("gold", "gain", "kl"))
        else:  # one seed: the SE over its samples (the gain's SE then ignores π₀'s own noise)
            gold, gold_se, gain, gain_se, kl, kl_se = (
                ps[0][k] for k in ("gold", "gold_se", "gain", "gold_se", "kl", "kl_se"))
        rows.append({"method": method, "label": label, "seeds": len(ps), "gold": gold,
                     "gold_se": gold_se, "gain": gain, "gain_se": gain_se, "kl": kl,
                     "kl_se": kl_se, "d": math.sqrt(max(kl, 0.0))})
        f = lambda v, sign="+": "–" if v is None or math.isnan(v) else f"{v:{sign}.3f}"
        lines.append(f"| {method} | {label} | {len(ps)} | {f(gold)} ± {f(gold_se, '')} | "
                     f"{f(gain)} ± {f(gain_se, '')} | {f(kl, '')} ± {f(kl_se, '')} | "
                     f"{math.sqrt(max(kl, 0.0)):.2f} |")
    fits, series = {}, {}
    for method in cfg.method_list():
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        form = "bon" if method == "bon" else "rl"
        alpha, beta = gao_fit(np.array([p["d"] for p in mine]),
                              np.array([p["gain"] for p in mine]), form)
        fits[method] = {"form": form, "alpha": alpha, "beta": beta, "points": len(mine)}
        means = sorted((r["d"], r["gain"]) for r in rows if r["method"] == method)
        series[method] = [(0.0, 0.0), *means]
        # drawn over the measured range only: outside it the form is a guess
        if not math.isnan(alpha):
            measured = [d for d, _ in means if d > 0]
            grid = np.linspace(min(measured), max(measured), 24)
            series[f"{method} fit"] = list(zip(grid.tolist(),
                                               gao_curve(alpha, beta, form, grid).tolist()))
    lines += ["", "Gao et al. fits of the gain R(d), d = √KL (every seed's points): best-of-n "
              "R = d(α - βd), the others R = d(α - β log d)", "",
              "| method | form | α | β | peak d* | peak R* |", "|---|---|---|---|---|---|"]
    for method, fit in fits.items():
        a, b = fit["alpha"], fit["beta"]
        if not b > 0:  # no overoptimisation within the measured range: the curve still rises
            peak = "none (β ≤ 0) | –"
        elif fit["form"] == "bon":  # dR/dd = α - 2βd = 0
            peak = f"{a / (2 * b):.2f} | {a * a / (4 * b):+.3f}"
        elif a / b < 20:  # dR/dd = α - β log d - β = 0
            peak = f"{math.exp(a / b - 1):.2f} | {b * math.exp(a / b - 1):+.3f}"
        else:
            peak = "beyond e^19 | –"
        lines.append(f"| {method} | {fit['form']} | {a:+.3f} | {b:+.3f} | {peak} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "frontier.md", table)
    atomic_write_text(out / "frontier.json",
                      json.dumps({"points": points, "rows": rows, "fits": fits}, indent=1) + "\n")
    line_plots([(f"gold gain over π₀ vs √KL(π‖π₀) (dashed: Gao et al.'s fit), gold {cfg.gold}",
                 series)],
               out / "frontier.svg", xlabel="√KL(π‖π₀)", width=720, panel_height=360, markers=True)
    return table


def main() -> None:
    cfg = parse_config(Config, __doc__)
    threads = choose_threads(cfg.threads)
    out = Path(cfg.out_dir)
    seeds = numbers(cfg, "seeds")
    if not cfg.report_only:
        # a bad --gold fails before any work
        gold, dev = make_gold_scorer(cfg.gold, device=device()), device()
        train_rows, held = prompt_rows(cfg.prompts, cfg.eval_prompts)  # the last ones held out
        train = [r["prompt"] for r in train_rows]
        model_dir = resolve_model(cfg.model)
        tok = Tokenizer(model_dir)
        print(f"frontier: seeds {cfg.seeds}, methods {cfg.methods}; torch threads: {threads}")
        for seed in seeds:
            seed_everything(seed)
            seed_dir = out / f"s{seed}"
            seed_dir.mkdir(parents=True, exist_ok=True)
            policy = load_model(model_dir, device=dev).eval()  # π₀
            if not (seed_dir / "labels" / "base.json").is_file():
                buy_labels(cfg, seed, policy, tok, train, gold, held, seed_dir / "labels", dev)
            if "bon" in cfg.method_list() and not (seed_dir / "bon.json").is_file():
                points = run_bon(cfg, seed, policy, tok, held, gold, seed_dir / "labels", dev)
                atomic_write_text(seed_dir / "bon.json", json.dumps(points, indent=1) + "\n")
            run_methods(cfg, seed, seed_dir)
            for beta in numbers(cfg, "dpo_betas") if "dpo" in cfg.method_list() else []:
                run = seed_dir / f"dpo-b{beta:g}"
                if not (run / "frontier_eval.json").is_file():
                    trained = load_model(run / "model", device=dev).eval()
                    r = evaluate_policy(trained, policy, tok, held, {"gold": row_scorer(gold)},
                                        cfg.eval_n, seed + 7, cfg.max_new_tokens,
                                        cfg.gen_batch_size, f"eval dpo β={beta:g}")
                    atomic_write_text(run / "frontier_eval.json", json.dumps(r, indent=1) + "\n")
            del policy
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    done = [s for s in seeds if (out / f"s{s}" / "labels" / "base.json").is_file()]
    if not done:
        raise UserError(f"{out}: no finished seed to report (run without --report-only first)")
    print("\n" + report(cfg, [p for s in done for p in points_of(cfg, s, out / f"s{s}")], out))
    print(f"table, points and fits in {out}/frontier.md, frontier.json; the plot in "
          f"{out}/frontier.svg")


if __name__ == "__main__":
    run_cli(main)
