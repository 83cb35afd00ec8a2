"""Crash safety and hostile inputs through the real scripts (issue 25): train_dpo.py, train_rm.py
and train_ppo.py run as processes of their own on a tiny random model, 3 steps each, RUN/state
every step.

Faults come through atomic.fault_point, the test hook: NANORLHF_FAULT=NAME:N:ACTION strikes the
N-th write to a file named NAME halfway through it, with a SIGKILL (kill), a full disk (enospc)
or a SIGSTOP (stop: a run still going). Every probe asserts the exit status, one line on stderr
(progress bars aside), and that nothing changed outside the run dir: the whole pytest temporary
tree, which holds the model, the data, the cache and the HOME the scripts are given, is compared
before and after. A crashed run resumed with --resume must equal the uninterrupted run of the
same flags: weights byte for byte, metrics.jsonl and eval.json less their wall times."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SMOLLM2_TEMPLATE, build_tiny_tokenizer, make_hf_model
from nanorlhf.checkpoint import load_model
from nanorlhf.reward import reward_model_from_lm, save_reward_model
from nanorlhf.run import state_dir
from nanorlhf.tasks import human_ratings
from test_train_dpo import write_pairs
from test_train_ppo import write_prompts
from test_train_rm import fake_ratings

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_dpo", "train_rm", "train_ppo")
WEIGHTS = {"train_dpo": "model", "train_rm": "rm", "train_ppo": "model"}  # the trained result
TIMING = {"seconds", "rollout_s", "train_s"}  # wall times: all that two equal runs may differ in

# Every write point of each script (NAME:N, the N-th write to RUN/NAME), in the order a run
# reaches them. "resume/" points strike in a resumed run (its rewrite of metrics.jsonl).
POINTS = {
    "train_dpo": ["config.json:1", "metrics.jsonl:2", "state:2", "model:1", "training.svg:1",
                  "eval.json:1", "resume/metrics.jsonl:1"],
    "train_rm": ["config.json:1", "eval.json:1", "metrics.jsonl:2", "state:2", "rm:1",
                 "training.svg:1", "eval.json:2", "resume/metrics.jsonl:1"],
    "train_ppo": ["config.json:1", "eval.json:1", "metrics.jsonl:2", "state:2", "model:1",
                  "eval.json:3", "training.svg:1", "resume/metrics.jsonl:1"],
}
# the points before a run's first complete RUN/state: a crash there leaves nothing to resume
EARLY = {"train_dpo": {"config.json:1"}, "train_rm": {"config.json:1", "eval.json:1"},
         "train_ppo": {"config.json:1", "eval.json:1"}}


# --- running a script: forked from a process that has imported torch once ---

# Each probe runs a script as `python SCRIPT.py ARGV` would, in a process of its own (its exit
# status, signals, stderr and atexit as usual), forked from this server, which has already
# imported what the scripts import: ~80 runs would otherwise spend ~2 s each importing torch.
# The reference runs are plain `python SCRIPT.py` processes, and the forked runs must equal them.
FORK_SERVER = textwrap.dedent("""
    import atexit, json, os, runpy, select, sys, traceback
    import train_dpo, train_rm, train_ppo  # every module the scripts import, imported once

    def child(request):  # in the forked process: run the script, exit as python would
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.argv = request["argv"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    running = set()
    while True:  # one request at a time; each child's end (or stop) is reported as it happens
        if select.select([sys.stdin], [], [], 0.01 if running else None)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            pid = os.fork()
            if pid == 0:
                child(json.loads(line))
            running.add(pid)
            print(json.dumps({"started": pid}), flush=True)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            if not pid:
                break
            if os.WIFSTOPPED(status):
                print(json.dumps({"stopped": pid}), flush=True)
            else:
                running.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                print(json.dumps({"ended": pid, "rc": code}), flush=True)
""")


@dataclass
class Done:
    rc: int
    out: str
    err: str


class Forks:
    """The client of FORK_SERVER: start(argv) -> pid, then wait(pid) -> its exit status."""

    def __init__(self, env: dict, cwd: Path):
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], env=env, cwd=cwd,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.events: list[dict] = []

    def _next(self, key: str, pid: int | None = None) -> dict:
        """The first event `key` (for `pid`) reported, waiting for it if need be."""
        while True:
            for event in self.events:
                if key in event and pid in (None, event[key]):
                    self.events.remove(event)
                    return event
            line = self.server.stdout.readline()
            assert line, "the fork server died"
            self.events.append(json.loads(line))

    def start(self, request: dict) -> int:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return self._next("started")["started"]

    def wait(self, pid: int) -> int:
        """Its exit status (-N: killed by signal N)."""
        return self._next("ended", pid)["rc"]

    def wait_stopped(self, pid: int) -> None:
        self._next("stopped", pid)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@dataclass
class World:
    """The inputs every probe shares, the environment the scripts run in, the fork server."""
    base: Path  # the pytest temporary tree: nothing outside a run dir may change in it
    dir: Path
    env: dict
    model: Path
    args: dict  # script -> its tiny run's flags, less --out-dir and --run
    forks: Forks
    logs: Path  # the runs' stdout and stderr, outside the tree compared


@pytest.fixture(scope="module")
def world(tiny_chat_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("probe-inputs")
    (d / "home").mkdir()
    (d / "cache").mkdir()
    fake_ratings(d / "cache" / human_ratings.DATA_NAME)  # train_rm's human ratings, offline
    gold = save_reward_model(reward_model_from_lm(load_model(tiny_chat_model), seed=3), d / "gold")
    (d / "eval.jsonl").write_text('{"pink": "Paris", "grey": "elephant", "prompt": "Capital?"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "NANORLHF_CACHE": str(d / "cache"), "HOME": str(d / "home"),
           "XDG_CACHE_HOME": str(d / "home" / ".cache")}
    env.pop("NANORLHF_FAULT", None)
    common = ["--model", str(tiny_chat_model), "--save-every", "1", "--warmup-steps", "1"]
    args = {  # 3 optimizer steps each
        "train_dpo": [*common, "--data", str(write_pairs(d / "pairs.jsonl", 6)), "--eval-data",
                      str(d / "eval.jsonl"), "--eval-n", "1", "--eval-max-new-tokens", "4",
                      "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3"],
        "train_rm": [*common, "--train-pairs", "12", "--batch-size", "4", "--eval-pairs", "4",
                     "--eval-texts", "4", "--lr", "1e-3", "--head-lr", "1e-2"],
        "train_ppo": [*common, "--prompts", str(write_prompts(d / "prompts.jsonl", 6)),
                      "--reward", f"rm:{gold}", "--steps", "3", "--batch-size", "2",
                      "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
                      "--eval-prompts", "2", "--eval-n", "1", "--eval-every", "2", "--lr", "3e-3"],
    }
    logs = Path(tempfile.mkdtemp(prefix="probe-logs-"))
    forks = Forks(env, logs)
    yield World(tmp_path_factory.getbasetemp(), d, env, tiny_chat_model, args, forks, logs)
    forks.close()
    shutil.rmtree(logs)


RUN_NUMBER = itertools.count()


@dataclass
class Started:
    pid: int
    logs: tuple[Path, Path]


def start(world: World, script: str, *argv, fault: str = "") -> Started:
    env = {**world.env, "NANORLHF_FAULT": fault} if fault else world.env
    n = next(RUN_NUMBER)
    logs = world.logs / f"{n}.out", world.logs / f"{n}.err"
    pid = world.forks.start({"argv": [str(ROOT / f"{script}.py"), *map(str, argv)], "env": env,
                             "cwd": str(world.dir / "home"), "stdout": str(logs[0]),
                             "stderr": str(logs[1])})
    return Started(pid, logs)


def finish(world: World, started: Started) -> Done:
    rc = world.forks.wait(started.pid)
    out, err = (path.read_bytes().decode(errors="replace") for path in started.logs)
    return Done(rc, out, err)


def run(world: World, script: str, *argv, fault: str = "") -> Done:
    return finish(world, start(world, script, *argv, fault=fault))


def run_python(world: World, script: str, *argv) -> Done:
    """`python SCRIPT.py ARGV`, not forked."""
    done = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *map(str, argv)],
                          env=world.env, cwd=world.dir / "home", capture_output=True, text=True,
                          timeout=600)
    return Done(done.returncode, done.stdout, done.stderr)


def fresh(world: World, script: str, run_dir: Path, *extra) -> list:
    """The tiny run's command line into run_dir (its parent made: the out dir exists)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return [*world.args[script], "--out-dir", run_dir.parent, "--run", run_dir.name, *extra]


BAR = re.compile(r"[^\r\n]*?\d+%\|[^|\n]*\|[^\[\n]*\[[^\]\n]*\]")  # one tqdm progress bar
CURSOR_UP = "\x1b[A"  # how tqdm returns to a bar above a nested one


def lines(stderr: str) -> list[str]:
    """What stderr shows on a terminal, progress bars left out."""
    segments = re.split(r"[\r\n]", BAR.sub("", stderr).replace(CURSOR_UP, ""))
    return [s.strip() for s in segments if s.strip()]


def one_error(done: Done, *fragments: str, rc: int = 2, notices: tuple = ()) -> str:
    """Exit status rc and one line on stderr: the error, holding every fragment. `notices`: lines
    a script may print on the way (a killed run's lock taken over), left out."""
    shown = [line for line in lines(done.err) if not any(n in line for n in notices)]
    assert done.rc == rc, done.err[-3000:]
    assert len(shown) == 1 and shown[0].startswith("error: "), shown
    assert all(f in shown[0] for f in fragments), shown[0]
    return shown[0]


# --- what a run left ---

def snapshot(root: Path, skip: tuple = ()) -> dict[str, tuple]:
    """Every path under root but `skip` (run dirs) -> (type, size, mtime; a link's target)."""
    out, skip = {}, {str(p) for p in skip}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if path in skip:
                continue
            st = os.lstat(path)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path))
            else:  # a directory's mtime changes with its entries, which are listed anyway
                out[path] = ("dir",) if name in dirs else ("file", st.st_size, st.st_mtime_ns)
    return out


@contextmanager
def nothing_outside(world: World, *runs: Path):
    """Nothing in the pytest temporary tree changes during the block, except inside `runs`."""
    before = snapshot(world.base, runs)
    yield
    after = snapshot(world.base, runs)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"written outside the run dir: {changed[:5]}"


def temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp-*"))


def untimed(obj):
    """A JSON value without its wall times."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    return [untimed(v) for v in obj] if isinstance(obj, list) else obj


def metrics(run_dir: Path) -> tuple[list, bytes]:
    """metrics.jsonl's complete lines, each as its bytes or, if it holds wall times, as the row
    without them; and a torn last line (b"" if none)."""
    data = (run_dir / "metrics.jsonl").read_bytes()
    cut = data.rfind(b"\n") + 1
    rows = [(line, json.loads(line)) for line in data[:cut].splitlines()]
    return [untimed(row) if TIMING & row.keys() else line for line, row in rows], data[cut:]


def outputs(run_dir: Path, script: str) -> dict:
    """What a finished run produced, for comparison with another run."""
    complete, torn = metrics(run_dir)
    return {"files": sorted(p.name for p in run_dir.iterdir()),
            "weights": (run_dir / WEIGHTS[script] / "model.safetensors").read_bytes(),
            "metrics": complete, "torn": torn,
            "eval": untimed(json.loads((run_dir / "eval.json").read_text())),
            "svg": (run_dir / "training.svg").read_bytes()}


@pytest.fixture(scope="module")
def reference(world):
    """script -> the outputs of its uninterrupted tiny run (made once, on first use)."""
    made = {}

    def get(script: str) -> dict:
        if script not in made:
            run_dir = world.dir / "reference" / script / "r"
            done = run_python(world, script, *fresh(world, script, run_dir))
            assert done.rc == 0, done.err[-3000:]
            made[script] = outputs(run_dir, script)
        return made[script]
    return get


@pytest.fixture(scope="module")
def crashed_run(world):
    """script -> a run killed while saving its trained weights: a complete RUN/state to resume
    (made once; copy it before use)."""
    made = {}

    def get(script: str) -> Path:
        if script not in made:
            run_dir = world.dir / "crashed" / script / "r"
            done = run(world, script, *fresh(world, script, run_dir),
                       fault=f"{WEIGHTS[script]}:1:kill")
            assert done.rc == -signal.SIGKILL and state_dir(run_dir), done.err[-3000:]
            made[script] = run_dir
        return made[script]
    return get


def copy_run(source: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(source, to, symlinks=True))


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> its bytes (None: a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def assert_previous_version(run_dir: Path, name: str, n: int, before: dict | None, ref: dict):
    """RUN/name as it was before the write that failed: what it held before this process
    (`before`, a resumed run), nothing (its first write), or its (n-1)-th version, whole."""
    path = run_dir / name
    if before is not None:
        assert tree(run_dir).get(name) == before.get(name), name
    elif name == "metrics.jsonl":  # append-only: the lines before, then a torn half line
        complete, torn = metrics(run_dir)
        assert complete == ref["metrics"][:n - 1] and torn
    elif n == 1:
        assert not path.exists() and not path.is_symlink(), sorted(os.listdir(run_dir))
    elif name == "state":
        assert json.loads((path / "state.json").read_text())["step"] == n - 1
    else:  # eval.json: a whole earlier version, every value as in the finished run
        def within(small, big) -> bool:
            if isinstance(small, dict):
                return all(k in big and within(v, big[k]) for k, v in small.items())
            return small == big
        assert within(untimed(json.loads(path.read_text())), ref["eval"])


# --- a full disk or a crash at each write point ---

@pytest.mark.slow
@pytest.mark.parametrize("script, point", [(s, p) for s in SCRIPTS for p in POINTS[s]])
def test_a_full_disk_or_a_crash_at_each_write_point(world, reference, crashed_run, tmp_path,
                                                    script, point):
    """ENOSPC there: exit 2, one line, the previous version kept, no temporary left. SIGKILL
    there: the previous version kept; --resume then completes as the uninterrupted run did, or
    (before the first state) says in one line that there is nothing to resume."""
    resuming = point.startswith("resume/")
    name, n = point.removeprefix("resume/").rsplit(":", 1)
    full, killed = tmp_path / "full" / "r", tmp_path / "killed" / "r"
    if resuming:  # the fault strikes in a resumed run: start from copies of a crashed run
        argv = {run_dir: ["--resume", copy_run(crashed_run(script), run_dir)]
                for run_dir in (full, killed)}
    else:
        argv = {run_dir: fresh(world, script, run_dir) for run_dir in (full, killed)}
    before = tree(full) if resuming else None
    ref = reference(script)
    with nothing_outside(world, full, killed):  # the two at once: two cores
        procs = [start(world, script, *argv[full], fault=f"{name}:{n}:enospc"),
                 start(world, script, *argv[killed], fault=f"{name}:{n}:kill")]
        on_full_disk, on_kill = (finish(world, proc) for proc in procs)

    notices = ("taking over the lock",) if resuming else ()
    one_error(on_full_disk, str(full / name), "No space left on device", notices=notices)
    left = [p for p in temporaries(full) if str(p.relative_to(full)) not in (before or {})]
    assert not left and not (full / ".lock").exists()  # (a crashed run's are its next save's)
    assert_previous_version(full, name, int(n), before, ref)

    assert on_kill.rc == -signal.SIGKILL, on_kill.err[-3000:]
    struck = temporaries(killed) if name != "metrics.jsonl" or resuming else metrics(killed)[1]
    assert struck  # the kill came halfway: a temporary (or an appended line) partly written
    assert_previous_version(killed, name, int(n), before, ref)

    snapshot_killed = tree(killed)
    with nothing_outside(world, killed):
        resumed = run(world, script, "--resume", killed)
    if point in EARLY[script]:  # nothing to resume yet: one line, nothing written
        what = "no config.json there" if name == "config.json" else "no resumable state"
        one_error(resumed, f"--resume {killed}: {what}")
        with nothing_outside(world):  # and the name stays taken: another --run is needed
            again = run(world, script, *argv[killed])
        one_error(again, f"{killed} already holds a run: choose another --run")
        assert tree(killed) == snapshot_killed
        return
    assert resumed.rc == 0, resumed.err[-3000:]
    assert "taking over the lock" in resumed.err  # of the killed pid
    assert outputs(killed, script) == ref
    assert not temporaries(killed) and not (killed / ".lock").exists()


# --- two runs on one dir ---

@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_run_or_a_resume_of_a_live_run_is_one_line(world, reference, tmp_path, script):
    """A run stopped (SIGSTOP) inside its first state save is still going: a second run with
    its --run, and a --resume of it, are refused in one line naming its pid and change nothing;
    continued, it finishes as if alone."""
    run_dir = tmp_path / "out" / "r"
    ref = reference(script)
    first = start(world, script, *fresh(world, script, run_dir), fault="state:1:stop")
    try:
        world.forks.wait_stopped(first.pid)
        while_stopped = tree(run_dir)
        with nothing_outside(world):
            second = run(world, script, *fresh(world, script, run_dir))
            resumed = run(world, script, "--resume", run_dir)
        for done in (second, resumed):
            one_error(done, str(run_dir), f"in use by a running process (pid {first.pid})")
        assert tree(run_dir) == while_stopped
        os.kill(first.pid, signal.SIGCONT)
        done, first = finish(world, first), None
    finally:
        if first is not None:  # a failed assertion: end the stopped run
            os.kill(first.pid, signal.SIGKILL)
            finish(world, first)
    assert done.rc == 0, done.err[-3000:]
    assert outputs(run_dir, script) == ref


# --- hostile inputs through the command line ---

def put(name: str, content: str | bytes):
    """A damage: FOLDER/name := content."""
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return damage


def truncate(name: str, size: int):
    """A damage: FOLDER/name cut to its first `size` bytes."""
    return lambda folder: put(name, (folder / name).read_bytes()[:size])(folder)


def edit_config(**changes):
    """A damage: config.json with these keys changed (None: deleted)."""
    def damage(folder: Path) -> None:
        config = {**json.loads((folder / "config.json").read_text()), **changes}
        (folder / "config.json").write_text(
            json.dumps({k: v for k, v in config.items() if v is not None}))
    return damage


def model_with(damage):
    """--model: a copy of the tiny model with one damage."""
    def flags(world: World, tmp: Path) -> list:
        damage(Path(shutil.copytree(world.model, tmp / "hostile-model")))
        return ["--model", tmp / "hostile-model"]
    return flags


def file_flag(flag: str, text: str):
    """flag FILE, FILE holding `text`."""
    return lambda world, tmp: [flag, put("hostile.txt", text)(tmp) or tmp / "hostile.txt"]


def small_vocab_model(world: World, tmp: Path) -> list:
    """--model: 128 token ids, with the tiny tokenizer's 300: they do not belong together."""
    make_hf_model("llama-gqa-tied", vocab_size=128).save_pretrained(tmp / "small-vocab")
    build_tiny_tokenizer(tmp / "small-vocab", chat_template=SMOLLM2_TEMPLATE)
    return ["--model", tmp / "small-vocab"]


# (script, probe, flags (a list, or (world, tmp) -> the list), what the one line says)
FRESH_PROBES = [
    ("train_dpo", "run-climbs-out", ["--run", "../x"], "--run '../x': a run name is one directory"),
    ("train_rm", "run-absolute", lambda world, tmp: ["--run", tmp / "abs"],
     "/abs': a run name is one directory name"),
    ("train_ppo", "out-dir-a-file", file_flag("--out-dir", "x"), "is a file, not a directory"),
    ("train_dpo", "beta-inf", ["--beta", "inf"], "--beta inf: must be a finite number"),
    ("train_rm", "head-lr-nan", ["--head-lr", "nan"], "--head-lr nan: must be a finite number"),
    ("train_ppo", "lr-inf", ["--lr", "inf"], "--lr inf: must be a finite number"),
    ("train_ppo", "truncated-safetensors", model_with(truncate("model.safetensors", 5000)),
     "model.safetensors: not a readable safetensors file"),
    ("train_dpo", "malformed-tokenizer", model_with(put("tokenizer.json", '{"model": ')),
     "tokenizer.json: not a readable tokenizer"),
    ("train_rm", "config-a-list", model_with(put("config.json", "[1, 2]")),
     "config.json: expected a JSON object"),
    ("train_ppo", "config-missing-key", model_with(edit_config(hidden_size=None)),
     "config.json: missing key 'hidden_size'"),
    ("train_dpo", "config-1e9-layers", model_with(edit_config(num_hidden_layers=1e9)),
     "num_hidden_layers is 1000000000.0; expected an int"),
    ("train_dpo", "malformed-data-row", file_flag("--data", '{"prompt": "hi", "chosen": "a"}\n'),
     "hostile.txt:1: missing field 'rejected'"),
    ("train_ppo", "malformed-prompt-row", file_flag("--prompts", '{"prompt": 3}\n' * 6),
     "hostile.txt:1: "),
    ("train_rm", "vocab-smaller-than-tokenizer", small_vocab_model,
     "tokenizer.json: token id 299 is outside the model's vocabulary (128)"),
    ("train_ppo", "vocab-smaller-than-tokenizer", small_vocab_model,
     "tokenizer.json: token id 299 is outside the model's vocabulary (128)"),
]


@pytest.mark.parametrize("script, probe, flags, says", FRESH_PROBES,
                         ids=[f"{s}-{p}" for s, p, *_ in FRESH_PROBES])
def test_hostile_input_is_one_line_and_writes_nothing(world, tmp_path, script, probe, flags,
                                                      says):
    """Exit 2, one line naming what is wrong, nothing written anywhere: no half-made run dir that
    would block the name."""
    run_dir = tmp_path / "out" / "r"
    argv = fresh(world, script, run_dir, *(flags(world, tmp_path) if callable(flags) else flags))
    with nothing_outside(world):
        done = run(world, script, *argv)
    one_error(done, says)
    assert not run_dir.exists()


def link_outside(name: str):
    """A tampering: RUN/name becomes a symbolic link to a file outside the run."""
    def tamper(run_dir: Path) -> None:
        outside = run_dir.parent.parent / "outside.json"
        outside.write_text('{"VADER": "not this run\'s", "before": {}}\n')
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(outside)
    return tamper


RESUME_PROBES = [
    ("train_dpo", "metrics-symlink", link_outside("metrics.jsonl"),
     "metrics.jsonl is a symbolic link"),
    ("train_rm", "eval-symlink", link_outside("eval.json"), "eval.json is a symbolic link"),
    ("train_ppo", "eval-symlink", link_outside("eval.json"), "eval.json is a symbolic link"),
    ("train_ppo", "eval-not-json", put("eval.json", '{"before": '), "eval.json: not valid JSON"),
    ("train_rm", "config-flag-out-of-range", edit_config(lr=-1.0), "--lr -1.0: must be > 0"),
    ("train_rm", "config-flag-wrong-type", edit_config(train_pairs="many"),
     "config.json: train_pairs is 'many', expected an int"),
    ("train_dpo", "state-truncated", truncate("state/state.safetensors", 100),
     "state.safetensors: not readable as safetensors"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, probe, tamper, says", RESUME_PROBES,
                         ids=[f"{s}-{p}" for s, p, *_ in RESUME_PROBES])
def test_a_tampered_resume_dir_is_one_line(world, crashed_run, tmp_path, script, probe, tamper,
                                           says):
    """--resume of a crashed run whose files were tampered with: exit 2, one line naming the
    file, nothing written outside the run, the run's results and state untouched."""
    run_dir = copy_run(crashed_run(script), tmp_path / "out" / "r")
    tamper(run_dir)
    before = tree(run_dir)
    with nothing_outside(world, run_dir):
        done = run(world, script, "--resume", run_dir)
    one_error(done, says, notices=("taking over the lock",))
    kept = lambda t: {k: v for k, v in t.items() if k not in ("config.json", ".lock")}
    assert kept(tree(run_dir)) == kept(before)


# (script, flags that make training diverge, what the line says)
DIVERGING = [("train_dpo", ["--beta", "1e308"], "— lower --lr or --beta"),
             ("train_rm", ["--lr", "1e30"], "— lower --lr"),
             ("train_ppo", ["--lr", "1e30"], "— lower --lr (steps count updates)")]


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, hint", DIVERGING, ids=[s for s, *_ in DIVERGING])
def test_a_diverging_run_stops_in_one_line_and_saves_no_weights(world, tmp_path, script, flags,
                                                                hint):
    run_dir = tmp_path / "out" / "r"
    argv = fresh(world, script, run_dir, *flags)
    with nothing_outside(world, run_dir):
        done = run(world, script, *argv)
    one_error(done, ": grad_norm is ", hint)  # nan or inf, at step 1 or 2
    assert not (run_dir / WEIGHTS[script]).exists() and not temporaries(run_dir)
    text = (run_dir / "metrics.jsonl").read_text()  # whole lines of strict JSON: no NaN in it
    assert not text or text.endswith("\n")
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda word: pytest.fail(f"{word} in metrics.jsonl"))
