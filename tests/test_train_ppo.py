"""train_ppo.py beyond the math: the rollout layout, ratio = 1, the frozen reference, EOS handling,
bad input, resume and whole runs (PPO, GRPO, RLOO), and 2 gloo ranks against 1 process."""

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_ppo
from conftest import crash_at_step
from nanorlhf.checkpoint import load_model
from nanorlhf.tasks import verify
from nanorlhf.tasks.policy_eval import paired_gain
from nanorlhf.reward import reward_model_from_lm, save_reward_model
from nanorlhf.sampling import generate_batched
from nanorlhf.tokenizer import Tokenizer
from test_distributed import assert_same_weights, launch, metrics

CPU = torch.device("cpu")


def write_prompts(path, n=10):
    rows = (json.dumps({"prompt": f"Describe place number {i}."}) + "\n" for i in range(n))
    path.write_text("".join(rows))
    return path


@pytest.fixture(scope="module")
def gold_rm(tiny_chat_model, tmp_path_factory):
    """A random-head RM on the tiny model: a reward that differs between responses."""
    return save_reward_model(reward_model_from_lm(load_model(tiny_chat_model), seed=3),
                             tmp_path_factory.mktemp("gold") / "rm")


def networks(model_dir, critic="shared", algo="ppo"):
    policy = load_model(model_dir).eval()
    backbone = policy.model if critic == "separate" else None
    critic_net = None if algo != "ppo" else train_ppo.Critic(backbone, policy.cfg.hidden_size)
    ref = load_model(model_dir).eval().requires_grad_(False)
    return train_ppo.ActorCritic(policy, critic_net), ref


def toy_batch(tok):
    prompts = [tok.chat_prompt("Hi"),
               tok.chat_prompt("A longer question about the pink elephant?")] * 2
    responses = [[5, 6, tok.eos_id], [7], [8, 9, 10, 11], [12, tok.eos_id]]
    return train_ppo.rollout_batch(prompts, responses, tok.pad_id), prompts, responses


def test_rollout_layout_aligns_responses_and_masks_padding(tiny_chat_model):
    tok = Tokenizer(tiny_chat_model)
    batch, prompts, responses = toy_batch(tok)
    P = batch["P"]
    assert P == max(map(len, prompts)) and batch["mask"].sum(-1).tolist() == [3, 1, 4, 2]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert batch["ids"][i, P - len(p):P].tolist() == p
        assert batch["ids"][i, P:P + len(r)].tolist() == r
        assert batch["attn"][i].sum() == len(p) + len(r)  # left and right pads are both masked out
    # the layout's log-probs equal those of the plain unpadded sequence, token by token
    ac, _ = networks(tiny_chat_model)
    with torch.no_grad():
        logp, values, _ = ac(batch["ids"], batch["attn"], P, 1.0)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = torch.tensor([p + r])
            logps = ac.policy(full).log_softmax(-1)[0, len(p) - 1:-1]
            alone = logps.gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logp[i, :len(r)], alone, atol=1e-5, rtol=1e-5)
    assert values.abs().sum() == 0  # the zero-initialised head: V = 0 before training


@pytest.mark.parametrize("critic, algo",
                         [("shared", "ppo"), ("separate", "ppo"), ("shared", "grpo")])
def test_ratio_is_exactly_one_on_the_first_minibatch(tiny_chat_model, critic, algo):
    tok = Tokenizer(tiny_chat_model)
    batch, _, _ = toy_batch(tok)
    ac, ref = networks(tiny_chat_model, critic, algo)
    parts = train_ppo.minibatches(4, 2, "0:0:0")
    cfg = train_ppo.Config(algo=algo, group_size=2 if algo == "grpo" else 1)
    old = train_ppo.old_forward(cfg, ac, ref, batch, parts)
    # π = π_ref at the start: KL exactly 0 (the same arithmetic)
    assert old["ref_logp"].equal(old["logp"])
    ac.train()
    ids, attn = batch["ids"][parts[0]], batch["attn"][parts[0]]
    logp, values, _ = ac(ids, attn, batch["P"], cfg.temperature)
    assert logp.requires_grad and logp.equal(old["logp"][parts[0]])  # bit for bit: ρ = 1 exactly


def test_the_shared_value_loss_trains_the_head_alone(tiny_chat_model):
    """--critic shared reads the policy's features detached: a value loss reaches the head, never
    the policy (with a random head; the zero-initialised one would pass this without the detach)."""
    tok = Tokenizer(tiny_chat_model)
    batch, _, _ = toy_batch(tok)
    ac, _ = networks(tiny_chat_model, "shared")
    torch.nn.init.normal_(ac.critic.head.weight)
    _, values, _ = ac(batch["ids"], batch["attn"], batch["P"], 1.0)
    (values ** 2).sum().backward()
    assert ac.critic.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ac.policy.parameters())


def test_paired_gain_by_hand():
    """Prompt means before (1, 2, 3) and after (2, 2, 5): gains (1, 0, 2), mean 1, SE = sd/√3."""
    assert paired_gain([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx((1.0, 1 / math.sqrt(3)),
                                                                          abs=1e-15)
    with pytest.raises(ValueError):
        paired_gain([1.0], [1.0, 2.0])  # not the same prompts


def run_cli(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["train_ppo.py", *map(str, args)])
    train_ppo.main()


def common(model, prompts, gold, out, *extra):
    return ["--model", model, "--prompts", prompts, "--reward", f"rm:{gold}", "--out-dir", out,
            "--batch-size", 4, "--minibatch-size", 2, "--max-new-tokens", 6, "--eval-prompts", 2,
            "--eval-n", 2, "--lr", 3e-3, "--warmup-steps", 1, *extra]


def test_one_update_moves_the_policy_but_never_the_reference(tiny_chat_model, gold_rm, tmp_path):
    tok = Tokenizer(tiny_chat_model)
    ac, ref = networks(tiny_chat_model)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = [p.detach().clone() for p in ac.policy.parameters()]
    cfg = train_ppo.Config(reward=f"rm:{gold_rm}", batch_size=4, minibatch_size=2, max_new_tokens=6,
                           lr=1e-2, warmup_steps=0)
    pool, _, scorers = train_ppo.make_task(train_ppo.Config(**{**cfg.__dict__, "prompts": str(
        write_prompts(tmp_path / "p.jsonl")), "eval_prompts": 2}), CPU)
    run = type("NoRun", (), {"log": lambda self, **kw: None, "dir": tmp_path})()
    optimizer = torch.optim.AdamW([p for p in ac.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    history = train_ppo.train(cfg, ac, ac, ref, optimizer, generate_batched, tok, pool,
                              scorers["reward"], run, 0, [], lambda step: None)
    assert history[0]["ratio_dev_first"] == 0.0  # the first minibatch of the step saw ρ = 1 exactly
    assert all(p.grad is None for p in ref.parameters())  # no gradient reached the reference
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, ac.policy.parameters()))


def test_missing_eos_is_penalised_and_scores_are_raw_otherwise(tiny_chat_model):
    tok = Tokenizer(tiny_chat_model)
    policy = load_model(tiny_chat_model).eval()
    rows = [{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}] * 2
    cfg = train_ppo.Config(group_size=4, max_new_tokens=3, missing_eos_penalty=-1.0)

    # a random tiny model almost never emits the EOS in 3 tokens: most responses are cut
    def score(rs, texts):
        return [0.25] * len(texts)

    out = train_ppo.rollout(cfg, policy, tok, rows, score, seed=0, dev=CPU,
                            sampler=generate_batched)
    lengths = out["mask"].sum(-1)
    ended = torch.tensor([bool(out["ids"][i, out["P"] + n - 1] == tok.eos_id)
                          for i, n in enumerate(lengths)])
    assert out["ended"].bool().tolist() == ended.tolist()
    torch.testing.assert_close(out["scores"], 0.25 - 1.0 * (1 - out["ended"]))
    assert (out["raw_scores"] == 0.25).all()
    assert ((lengths == 3) | out["ended"].bool()).all()  # no EOS means the cap was reached

    # the EOS ends a response: what was sampled after it is padding (mask 0); EOS is the last token
    batch = train_ppo.rollout_batch([[1, 2]], [[5, tok.eos_id]], tok.pad_id)
    rewards = train_ppo.per_token_rewards(torch.tensor([1.0]), torch.zeros(1, 2), batch["mask"],
                                          0.1)
    assert rewards.tolist() == [[0.0, 1.0]]


def test_advantages_for_each_algorithm(tiny_chat_model):
    """ppo: whitened GAE; grpo/rloo: the group formula on every token of a sample, 0 on padding."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    batch = {"mask": mask, "scores": torch.tensor([1.0, 0.0, 3.0, 3.0])}
    old = {"logp": torch.zeros(4, 3), "ref_logp": torch.zeros(4, 3), "values": torch.zeros(4, 3)}
    adv, _, _ = train_ppo.advantages_of(train_ppo.Config(algo="rloo", group_size=2), batch, old)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 0], [-1.0, 0, 0], [0.0, 0.0, 0.0],
                                                  [0.0, 0.0, 0]]))
    dr_grpo = train_ppo.Config(algo="grpo", group_size=2, dr_grpo=True)
    adv, _, _ = train_ppo.advantages_of(dr_grpo, batch, old)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0], [-0.5, 0, 0], [0.0, 0.0, 0.0],
                                                  [0.0, 0.0, 0]]))
    adv, returns, _ = train_ppo.advantages_of(train_ppo.Config(kl_coef=0.0, lam=1.0), batch, old)
    # V = 0, γ = λ = 1, no KL: each token's return is its response's score; advantages: whitened
    torch.testing.assert_close(returns, batch["scores"][:, None] * mask)
    torch.testing.assert_close(adv, train_ppo.masked_whiten(batch["scores"][:, None] * mask.float(),
                                                            mask))


def test_grpo_token_weights_average_each_sequence():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    w = train_ppo.token_weights(train_ppo.Config(algo="grpo", group_size=2), mask)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.25, 0, 0], [0.125] * 4]))
    dr_grpo = train_ppo.Config(algo="grpo", group_size=2, dr_grpo=True, max_new_tokens=4)
    w = train_ppo.token_weights(dr_grpo, mask)
    torch.testing.assert_close(w, mask / 8)
    torch.testing.assert_close(train_ppo.token_weights(train_ppo.Config(), mask), mask / 6)


@pytest.mark.parametrize("algo, extra", [
    ("ppo", ["--critic", "separate", "--kl-estimator", "k3"]),
    ("grpo", ["--group-size", 2]), ("rloo", ["--group-size", 2]),
    ("ppo", ["--lora-rank", 4, "--whiten-rewards", "true"]),
    ("ppo", ["--critic", "separate", "--onednn", "true", "--sampler", "stream"]),
], ids=["ppo-separate-k3", "grpo", "rloo", "ppo-lora", "ppo-onednn-stream"])
def test_cli_run_writes_everything(tiny_chat_model, gold_rm, tmp_path, monkeypatch, capsys, algo,
                                   extra):
    prompts = write_prompts(tmp_path / "p.jsonl")
    run_cli(monkeypatch, *common(tiny_chat_model, prompts, gold_rm, tmp_path / "out", "--run", "r",
                                 "--steps", 2, "--algo", algo, *extra))
    run = tmp_path / "out" / "r"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    # ρ = 1 and π = π_ref at the start
    assert lines[0]["ratio_dev_first"] == 0.0 and lines[0]["kl"] == 0.0
    assert ("loss/value" in lines[0]) == (algo == "ppo")
    assert ("loss/kl" in lines[0]) == (algo == "grpo")
    assert lines[1]["kl"] != 0.0  # the first step moved the policy
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"before", "after", "steps"} and results["before"]["kl"] == 0.0
    assert results["steps"] == {"0": results["before"], "2": results["after"]}
    assert results["after"]["samples"] == 4 and results["after"]["kl"] != 0.0
    assert (run / "training.svg").read_text().startswith("<svg") and not (run / "state").exists()
    transformers.AutoModelForCausalLM.from_pretrained(run / "model")  # HF layout (LoRA merged)
    assert "held-out" in capsys.readouterr().out


def test_verify_reward_run_reports_pass_at_1_and_greedy(tiny_chat_model, tmp_path, monkeypatch,
                                                        capsys):
    """--reward verify: the held-out add1 problems (26), each asked --eval-n times at T = 1 and
    once greedily; the reward is the checker's 1/0, so its mean is pass@1, per problem a multiple
    of 1/n (what pass@k is computed from). A second run, with the reward patched to the answer's
    parity, shows each reply is graded against its own problem's answer."""
    args = ["--model", tiny_chat_model, "--reward", "verify", "--out-dir", tmp_path, "--steps", 1,
            "--batch-size", 4, "--minibatch-size", 2, "--max-new-tokens", 4, "--eval-n", 2]
    run_cli(monkeypatch, *args, "--run", "checked")
    results = json.loads((tmp_path / "checked" / "eval.json").read_text())
    for r in (results["before"], results["after"]):
        assert r["samples"] == 26 * 2 and len(r["reward_by_prompt"]) == 26
        assert all(2 * v in (0, 1, 2) for v in r["reward_by_prompt"])
        assert r["reward"] == pytest.approx(sum(r["reward_by_prompt"]) / 26, abs=1e-12)
        assert len(r["reward_greedy_by_prompt"]) == 26
        assert set(r["reward_greedy_by_prompt"]) <= {0.0, 1.0} and "reward_greedy_se" in r
        assert r["examples"][0]["prompt"].startswith("What is ")
    printed = capsys.readouterr().out  # the report: a greedy column and its paired gain
    assert "reward (greedy) ± SE" in printed and "reward_greedy gain" in printed
    monkeypatch.setattr(verify, "reward", lambda reply, answer: float(answer % 2))
    run_cli(monkeypatch, *args, "--run", "parity")
    after = json.loads((tmp_path / "parity" / "eval.json").read_text())["after"]
    parity = [float(r["answer"] % 2) for r in verify.chat_rows("add1")[1]]
    assert after["reward_by_prompt"] == after["reward_greedy_by_prompt"] == parity


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_chat_model, gold_rm, tmp_path,
                                                          monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl")
    args = common(tiny_chat_model, prompts, gold_rm, tmp_path / "out", "--steps", 4,
                  "--save-every", 2, "--critic", "separate", "--eval-every", 1)
    run_cli(monkeypatch, *args, "--run", "straight")
    crash_at_step(monkeypatch, 4, lambda: run_cli(monkeypatch, *args, "--run", "broken"))
    broken = tmp_path / "out" / "broken"
    assert json.loads((broken / "state" / "state.json").read_text())["step"] == 2
    assert not (broken / "model").exists()
    run_cli(monkeypatch, "--resume", broken, "--lr", 5)  # flags other than --resume are ignored
    straight = tmp_path / "out" / "straight"
    strip = lambda run: [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in strip(broken)] == [1, 2, 3, 4]
    assert strip(broken) == strip(straight)
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads((run / "eval.json").read_text()) for run in (straight, broken)]
    assert evals[0] == evals[1] and sorted(evals[0]["steps"], key=int) == ["0", "1", "2", "3", "4"]


def test_eval_every_and_gold_score_the_same_samples(tiny_chat_model, gold_rm, tmp_path,
                                                    monkeypatch):
    """--gold scores the evaluation samples a second way: with the training RM itself as gold the
    two columns are equal to the bit; with VADER they are VADER's compound of those very samples."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    prompts = write_prompts(tmp_path / "p.jsonl")
    for gold in (f"rm:{gold_rm}", "vader"):
        run_cli(monkeypatch, *common(tiny_chat_model, prompts, gold_rm, tmp_path / "out", "--run",
                                     gold[:2], "--steps", 3, "--eval-every", 2, "--gold", gold))
    same, vader = (json.loads((tmp_path / "out" / name / "eval.json").read_text())
                   for name in ("rm", "va"))
    assert sorted(same["steps"], key=int) == ["0", "2", "3"]  # every 2 steps, and the end (once)
    assert all(r["gold"] == r["reward"] and r["gold_se"] == r["reward_se"]
               for r in same["steps"].values())
    analyzer = SentimentIntensityAnalyzer()
    # examples hold the first 8 samples: all 4 here (2 prompts x --eval-n 2)
    compound = [analyzer.polarity_scores(e["response"])["compound"]
                for e in vader["after"]["examples"]]
    assert vader["after"]["gold"] == pytest.approx(sum(compound) / len(compound), abs=1e-12)
    assert vader["after"]["reward"] == same["after"]["reward"]  # the gold does not change training


@pytest.mark.parametrize("args, message", [
    (["--reward", "gpt4"], "--reward 'gpt4': choose vader, pink, verify or rm:PATH"),
    (["--reward", "verify", "--tasks", "add1,add9"], "--tasks 'add1,add9': unknown task 'add9'"),
    (["--gold", "gpt4"], "--gold 'gpt4': choose vader or rm:PATH"),
    (["--gold", "rm:/no/such/rm"], "/no/such/rm"),
    (["--algo", "grpo"], "--algo grpo compares samples of one prompt: --group-size must be >= 2"),
    (["--algo", "rloo", "--group-size", "3"],
     "--batch-size 4: must be a multiple of --group-size 3"),
    (["--dr-grpo", "true"], "--dr-grpo applies to --algo grpo only"),
    (["--fsdp", "true"], "unrecognized arguments: --fsdp true"),  # no flag only to be refused
    (["--kl-estimator", "k2"], "--kl-estimator 'k2': choose one of k1, k3"),
    (["--missing-eos-penalty", "1"], "--missing-eos-penalty 1.0: must be <= 0"),
    (["--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--eval-prompts", "10"], "p.jsonl: 10 prompts, but --eval-prompts 10 holds out that many"),
    (["--reward", "rm:nowhere"], "--model nowhere: no such directory"),
    (["--resume", "nowhere"], "--resume nowhere: no config.json there"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_chat_model, gold_rm, tmp_path, monkeypatch,
                                                  capsys, args, message):
    write_prompts(tmp_path / "p.jsonl")
    monkeypatch.chdir(tmp_path)
    flags = common(tiny_chat_model, "p.jsonl", gold_rm, tmp_path / "out")
    monkeypatch.setattr("sys.argv", ["train_ppo.py", *map(str, flags), *args])
    with pytest.raises(SystemExit) as info:
        train_ppo.run_cli(train_ppo.main)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_ranks_reproduce_one(tiny_chat_model, gold_rm, tmp_path, algo):
    """Both ranks sample the same rollouts; each trains on its shard of every minibatch (3 rows over
    2 ranks: uneven shards), the token weights make each step's loss the minibatch's mean.
    Tolerances: test_distributed."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    args = common(tiny_chat_model, prompts, gold_rm, tmp_path, "--steps", 3, "--minibatch-size", 3,
                  "--algo", algo, "--group-size", 2 if algo == "grpo" else 1)
    launch("train_ppo.py", [*args, "--run", "one"])
    launch("train_ppo.py", [*args, "--run", "two"], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("score", "kl", "loss/policy", "grad_norm", "entropy", "clipfrac", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert one[-1]["kl"] != 0.0  # the runs trained
    assert_same_weights(tiny_chat_model, tmp_path / "one" / "model", tmp_path / "two" / "model")


def test_stream_sampler_reaches_rollouts_and_evaluation(tiny_chat_model, gold_rm, tmp_path,
                                                        monkeypatch):
    from nanorlhf.fast import decode as stream

    calls, real = [], stream.generate_stream
    monkeypatch.setattr(stream, "generate_stream",
                        lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    prompts = write_prompts(tmp_path / "p.jsonl")
    run_cli(monkeypatch, *common(tiny_chat_model, prompts, gold_rm, tmp_path / "out", "--run", "r",
                                 "--steps", 2, "--sampler", "stream"))
    assert calls == [4, 4, 4, 4]  # before, 2 rollouts of --batch-size 4, after (2 prompts x 2)
