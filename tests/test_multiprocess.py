"""Real two-process runs on one machine: jax.distributed, per-process data, one checkpoint,
a preemption notice that every process obeys at the same step, and a process that dies."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest
from helpers import (
    PAUSED_TRAIN,
    REPO,
    TINY,
    config_flags,
    free_port,
    load_recipe,
    make_folder,
    random_params,
    run_two_processes,
    simulated_devices_env,
    wait_until_paused,
)

from vit_jax.checkpoint import load_params, save_npz
from vit_jax.data.folder import FolderSource
from vit_jax.evaluators.classification import ClassificationEvaluator
from vit_jax.metrics import read_records
from vit_jax.models import build_model
from vit_jax.parallel import make_mesh
from vit_jax.preemption import PREEMPTED_EXIT_STATUS, StopRequests
from vit_jax.trainer import Trainer

RECIPE = "local.py:steps=30,dataset=digits,batch=32"
SIGTERM_NOTIFIER_INTERVAL_S = 1  # kListenInterval, xla/tsl/.../preemption_notifier.cc
OVERRIDES = TINY | {
    "eval_batch_size": 64,
    "log_every": 10,
    "eval_every": 30,
    "checkpoint_every": 10,
}


def _launch(
    tmp_path,
    workdir,
    *flags,
    pause_at: int | None = None,
    cwds: tuple = (REPO, REPO),
    own_flags: tuple = ((), ()),
    processes: int = 2,
    devices: int = 4,
) -> list[subprocess.Popen]:
    """`processes` processes of one run (one alone runs without a coordinator), `devices`
    simulated devices each, started in `cwds` with `flags` and their `own_flags`; paused
    before step `pause_at` + 1 (tests/paused_train.py) until a line arrives on their stdin."""
    port = free_port()
    overrides = config_flags(OVERRIDES)
    env = simulated_devices_env(devices)
    main = ["-m", "vit_jax.main"] if pause_at is None else [PAUSED_TRAIN, str(pause_at)]
    cwds = cwds + (REPO,) * (processes - len(cwds))
    own_flags = own_flags + ((),) * (processes - len(own_flags))
    procs = []
    for i in range(processes):
        distributed = [
            "--coordinator_address", f"localhost:{port}", "--num_processes", str(processes),
            "--process_id", str(i),
        ] if processes > 1 else []  # fmt: skip
        command = [
            sys.executable, *main, "--config", f"{REPO}/configs/{RECIPE}",
            f"--config.data_dir={tmp_path}/tfds{i}", "--workdir", workdir,
            *distributed, *overrides, *flags, *own_flags[i],
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                command,
                cwd=cwds[i],
                env=env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def _ended(procs: list[subprocess.Popen], statuses: tuple = (2, 2)) -> list[str]:
    """Each process's stderr once both have ended, which must be with `statuses` (a
    refusal's by default; both are killed if they have not ended in 600 s: such runs never
    ended before the refusal)."""
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    stderrs = [stderr for _, stderr in outputs]
    assert tuple(p.returncode for p in procs) == statuses, stderrs[0][-3000:] + stderrs[1][-3000:]
    return stderrs


def _last_lines(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's last line once both have been refused (`_ended`)."""
    return [stderr.strip().splitlines()[-1] for stderr in _ended(procs)]


def _hosts(tmp_path) -> tuple:
    """Two hosts' own directories, which each process starts in (its /proc/self/cwd)."""
    hosts = (tmp_path / "host0", tmp_path / "host1")
    for host in hosts:
        host.mkdir()
    return hosts


def _save_init(path, seed: int = 0) -> None:
    """Random weights of the recipe's tiny model at `path`, for `model_init`."""
    config = load_recipe(*RECIPE.split(":"))
    config.update_from_flattened_dict(TINY)
    save_npz(random_params(build_model(config.model, 10), (8, 8), seed=seed), path)


def _wait_for_line(process: subprocess.Popen, text: str) -> str:
    seen = []
    for line in process.stderr:
        seen.append(line)
        if text in line:
            break
    return "".join(seen)


@pytest.mark.slow
def test_two_processes_stop_together_resume_and_evaluate_the_whole_split_once(tmp_path):
    workdir = str(tmp_path / "run")
    procs = _launch(tmp_path, workdir, pause_at=10)
    paused = [wait_until_paused(p, 10) for p in procs]
    assert all(paused), [p.stderr.read()[-3000:] for p in procs]
    # SIGTERM to process 1 only (one VM of a slice being preempted) while both wait before
    # step 11: JAX's preemption sync tells process 0, and both save the same step and exit
    # "resume me". JAX's notifier (TSL's SigtermNotifier) looks for the signal once a
    # second, so the pause outlasts two looks: the notice arrives right after the step-10
    # checkpoint, where Orbax's own question to the sync point once made it unanswerable.
    procs[1].send_signal(signal.SIGTERM)
    time.sleep(2 * SIGTERM_NOTIFIER_INTERVAL_S)
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_STATUS] * 2, errors[1][-3000:]
    stops = [int(re.search(r"Stopped at step (\d+)", e).group(1)) for e in errors]
    assert stops[0] == stops[1] and 10 < stops[0] < 30, stops
    assert str(stops[0]) in os.listdir(os.path.join(workdir, "checkpoints"))

    procs = _launch(tmp_path, workdir)
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "step 30/30" in errors[0] and "step 30/30" not in errors[1]  # Process 0 reports.

    lines = read_records(workdir)
    assert [x["step"] for x in lines] == [10, 20, 30]
    assert "30" in os.listdir(os.path.join(workdir, "checkpoints"))

    # The two processes' padded, masked eval shards add up to the whole split exactly once:
    # the same loss and top-1 as evaluating the saved parameters here, in one process.
    config = load_recipe(*RECIPE.split(":"))
    config.update_from_flattened_dict(OVERRIDES)
    config.data_dir = str(tmp_path / "tfds0")
    trainer = Trainer(
        config, make_mesh(config.mesh, config.dcn_mesh), num_classes=10, total_steps=30
    )
    params = jax.device_put(load_params(workdir), trainer.param_shardings)
    local = ClassificationEvaluator(trainer).run(params, StopRequests())
    assert local["eval/top1"] == pytest.approx(lines[-1]["eval/top1"], abs=1e-6)
    assert local["eval/loss"] == pytest.approx(lines[-1]["eval/loss"], rel=1e-5)


def _train(tmp_path, workdir: str, processes: int, devices: int, *flags: str) -> str:
    """One run of `processes` processes with `devices` simulated devices each, to its end;
    process 0's stderr."""
    procs = _launch(tmp_path, workdir, *flags, processes=processes, devices=devices)
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, errors[0][-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "across, inside, shares",
    [
        # Tensor over two processes: both hold every row of each batch.
        ((2, 4, "--config.dcn_mesh.data=1", "--config.dcn_mesh.tensor=2"),
         (1, 8, "--config.mesh.tensor=2"), 1),
        # Tensor over pairs of four processes, as over pairs of TPU hosts on a v6e-64 with
        # tensor 4: each pair holds a part of each batch's rows of its own.
        ((4, 2, "--config.mesh.data=2", "--config.dcn_mesh.data=2", "--config.dcn_mesh.tensor=2"),
         (2, 4, "--config.mesh.data=2", "--config.mesh.tensor=2", "--config.dcn_mesh.data=2"), 2),
    ],
)  # fmt: skip
def test_tensor_parallelism_across_processes_trains_as_it_does_inside_them(
    tmp_path, across, inside, shares
):
    """Processes that hold the same rows of each batch load the same rows, with the same
    augmentation: the run learns what the same mesh learns with tensor parallelism inside
    each process, where as many processes load the same shares."""
    tensor = ("--config.sharding_rules=tp", "--config.total_steps=6", "--config.log_every=2",
              "--config.eval_every=6", "--config.checkpoint_every=6")  # fmt: skip
    log = _train(tmp_path, str(tmp_path / "across"), *across, *tensor)
    assert f"the processes load each batch in {shares} share(s)." in log
    _train(tmp_path, str(tmp_path / "inside"), *inside, *tensor)
    spanning, contained = (
        read_records(str(tmp_path / "across")),
        read_records(str(tmp_path / "inside")),
    )
    assert [r["step"] for r in spanning] == [r["step"] for r in contained] == [2, 4, 6]
    learnt = ("train/loss", "train/grad_norm", "eval/loss", "eval/top1", "fewshot/digits_5shot")
    for a, b in zip(spanning, contained, strict=True):
        got, expected = ({k: r[k] for k in learnt if k in r} for r in (a, b))
        assert got == pytest.approx(expected, rel=1e-4), b["step"]  # Up to float32 sums.
    assert "eval/top1" in contained[-1]


@pytest.mark.slow
def test_a_dead_process_stops_the_other_with_a_clear_error(tmp_path):
    workdir = str(tmp_path / "run")
    procs = _launch(tmp_path, workdir, "--config.total_steps=100000", "--heartbeat_timeout=5")
    _wait_for_line(procs[0], "step 10/")
    procs[1].kill()  # SIGKILL: no chance to say goodbye.
    killed = time.perf_counter()
    stderr = procs[0].communicate(timeout=300)[1]  # Bounded by the heartbeat timeout.
    print(f"survivor exited {time.perf_counter() - killed:.1f} s after the kill")
    assert procs[0].returncode not in (0, PREEMPTED_EXIT_STATUS)
    assert "another task died" in stderr and "stopped sending heartbeats" in stderr


@pytest.mark.slow
def test_a_workdir_on_each_hosts_own_disk_is_refused_before_anything_is_written(tmp_path):
    """`--workdir /tmp/run` on each VM of a slice: every host writes its shards of a
    checkpoint on its own disk, and the run waited forever for the others' at the first
    save. Here the same path is another directory for each process: /proc/self/cwd is the
    process's own working directory, and each starts in its own."""
    hosts = _hosts(tmp_path)
    for refusal in _last_lines(_launch(tmp_path, "/proc/self/cwd/run", cwds=hosts)):
        assert refusal.startswith(
            "vit-train: The workdir /proc/self/cwd/run is not one storage for every process: "
            "process(es) 1 of 2 do not see the lock file process 0 wrote there"
        ), refusal
    assert [sorted(p.name for p in host.rglob("*")) for host in hosts] == [["run"], []]


# One process of two making one start-up exchange. Process 1 arrives once process 0 has
# waited a whole round (`_WAIT_MS`) and fails right after the exchange; process 0's look for
# failures returns only once that failure is announced: the moment a loaded machine once
# chose, where a look after a wait that ran out gave up on a completed exchange.
EXCHANGE_THEN_FAIL = """
import sys, time
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax._src import distributed
from vit_jax import processes
client = distributed.global_state.client
if jax.process_index() == 0:
    look = processes._another_failed
    def late_look(client):
        client.blocking_key_value_get(processes._FAILED + "/1", 60_000)
        return look(client)
    processes._another_failed = late_look
    print(processes.allgather_text("zero"))
else:
    client.blocking_key_value_get(processes._EXCHANGES + "/0/text/0", 60_000)
    time.sleep(3 * processes._WAIT_MS / 1000)
    with processes.failures_told():
        processes.allgather_text("one")
        raise RuntimeError("a refusal of its own after the exchange")
"""


@pytest.mark.slow
def test_a_process_that_fails_right_after_an_exchange_leaves_the_others_their_own_verdict():
    """The workdir refusal once ended process 0 with "process 1 failed" (status 1) instead
    of its own refusal (status 2): process 1 completed the exchange of what each saw and
    raised before process 0 noticed the exchange was complete."""
    first, second = run_two_processes(EXCHANGE_THEN_FAIL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() == "['zero', 'one']"
    assert "a refusal of its own after the exchange" in second.stderr


@pytest.mark.slow
@pytest.mark.parametrize("differs_in", ["config", "code"])
def test_processes_started_differently_are_refused_naming_the_difference(tmp_path, differs_in):
    """A host left on other flags or other code built other programs, and the run crashed
    in its first collective ("Is there a distributed collective mismatch?", status -6) or,
    on TPUs, hung there. Process 1 here gets another depth, or runs a copy of vit_jax with
    one line added (`python -m` finds the package in its working directory first)."""
    host1 = tmp_path / "host1"
    own_flags = ((), ())
    if differs_in == "config":
        host1.mkdir()
        own_flags = ((), ("--config.model.depth=2",))
    else:
        shutil.copytree(os.path.join(REPO, "vit_jax"), host1 / "vit_jax")
        with open(host1 / "vit_jax" / "train.py", "a") as f:
            f.write("# A local edit on one host.\n")
    procs = _launch(tmp_path, str(tmp_path / "run"), cwds=(REPO, host1), own_flags=own_flags)
    difference = "config model.depth: 1 -> 2" if differs_in == "config" else "vit_jax source: "
    for refusal in _last_lines(procs):
        assert refusal.startswith(
            "vit-train: The processes of this run were started differently: 1 of 2 differ "
            f"from process 0; process 1 in {difference}"
        ), refusal
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_processes_that_read_other_model_init_files_are_refused(tmp_path):
    """Each host's own copy of the pretrained file at one path, and process 1's holds other
    weights (another release): each process places its shards and replicas of the
    parameters from its own copy. JAX's `device_put` stopped that with an AssertionError
    that printed the arrays, naming neither the file nor the host (status 1). Here
    /proc/self/cwd is each process's own working directory."""
    hosts = _hosts(tmp_path)
    for seed, host in enumerate(hosts):
        _save_init(host / "init.npz", seed)
    flag = "--config.model_init=/proc/self/cwd/init.npz"
    for refusal in _last_lines(_launch(tmp_path, str(tmp_path / "run"), flag, cwds=hosts)):
        assert re.fullmatch(
            "vit-train: The processes of this run were started differently: 1 of 2 differ "
            "from process 0; process 1 in model_init weights: \\w+ -> \\w+. .*",
            refusal,
        ), refusal
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lacks", ["model_init", "image folder"])
def test_an_error_on_one_process_at_start_up_ends_every_process_saying_which(tmp_path, lacks):
    """One host lacks the pretrained file, or the image folder, the other has at the same
    path (/proc/self/cwd is each process's own working directory). Its process failed in
    one line, but the other waited in a collective: the first exchange, which on this CPU
    failed after 30 s with a traceback of Gloo's ("context initialization failed"), or the
    folder manifest's barrier, where both waited until JAX's shutdown barrier gave up
    (300 s) and aborted (status -6) with a C++ stack trace."""
    hosts = _hosts(tmp_path)
    if lacks == "model_init":
        _save_init(hosts[0] / "init.npz")
        flag = "--config.model_init=/proc/self/cwd/init.npz"
        said = "No checkpoint at /proc/self/cwd/init.npz: expected a vit_jax workdir, .*"
    else:
        make_folder(hosts[0] / "images", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
        flag = "--config.dataset=folder:/proc/self/cwd/images"
        said = "Image-folder root '/proc/self/cwd/images' is not a directory; expected .*"
    procs = _launch(tmp_path, str(tmp_path / "run"), flag, cwds=hosts)
    errors = _ended(procs, statuses=(1, 2))
    told, failed = (e.strip().splitlines()[-1] for e in errors)
    assert re.fullmatch(f"vit-train: {said}", failed), failed
    assert re.fullmatch(
        "vit-train: Process 1 of 2 failed, so this one stops too. Process 1: "
        f"FileNotFoundError: {said}",
        told,
    ), told
    assert "Shutdown barrier" not in errors[0] + errors[1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_error_on_one_process_before_the_run_starts_ends_the_other(tmp_path):
    """Process 1's host cannot import TensorFlow (a module of that name in its working
    directory raises), which vit-train imports once the processes have met, as it checks
    the accelerator: it failed before the run's start-up exchanges and never said so, and
    process 0 waited in the first of them until JAX's shutdown barrier gave up."""
    hosts = _hosts(tmp_path)
    broken = "a broken TensorFlow install on this host"
    (hosts[1] / "tensorflow.py").write_text(f"raise ImportError({broken!r})\n")
    errors = _ended(_launch(tmp_path, str(tmp_path / "run"), cwds=hosts), statuses=(1, 1))
    told, failed = (e.strip().splitlines()[-1] for e in errors)
    assert failed == f"ImportError: {broken}", errors[1][-3000:]
    assert told == (
        f"vit-train: Process 1 of 2 failed, so this one stops too. Process 1: ImportError: {broken}"
    ), told


@pytest.mark.slow
def test_an_error_on_one_process_mid_run_ends_every_process_saying_which(tmp_path):
    """Process 1's copy of the image folder (each host has its own, with one manifest in a
    shared data_dir) changes during the run: its next read fails. Its process ended in its
    own line, then waited in JAX's shutdown barrier while process 0 waited in the step's
    collectives (on a CPU too: Gloo did not give up); after 300 s both aborted (status -6)
    with a C++ stack trace about the barrier. In that shared data_dir both processes also
    prepared the few-shot probe's digits at once and one crashed at start-up ("Destination
    ... already exists"): process 0 prepares it first now."""
    hosts = _hosts(tmp_path)
    for host in hosts:
        make_folder(host / "images", {"train": {"a": 8, "b": 8}, "test": {"a": 2, "b": 2}})
    procs = _launch(
        tmp_path, str(tmp_path / "run"), "--config.dataset=folder:/proc/self/cwd/images",
        f"--config.data_dir={tmp_path}/shared", "--config.batch_size=8",
        "--config.total_steps=100000", "--heartbeat_timeout=5", pause_at=3, cwds=hosts,
    )  # fmt: skip
    assert all(wait_until_paused(p, 3) for p in procs), [p.communicate()[1][-1500:] for p in procs]
    for path in (hosts[1] / "images" / "train").rglob("*.*"):
        path.write_bytes(b"garbage")
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    errors = _ended(procs, statuses=(1, 1))
    told, failed = (e.strip().splitlines()[-1] for e in errors)
    undecodable = "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."
    assert failed.startswith(
        "vit-train: a file of the image folder /proc/self/cwd/images no longer reads as an "
        f"image ({undecodable}): it changed since"
    ), failed
    assert told == (
        "vit-train: Process 1 of 2 failed, so this one stops too. Process 1: "
        f"InvalidArgumentError: {undecodable}"
    ), told
    assert "Shutdown barrier" not in errors[0] + errors[1]


@pytest.mark.slow
@pytest.mark.parametrize("read_for", ["training", "fewshot"])
def test_processes_that_read_other_copies_of_a_dataset_are_refused(tmp_path, read_for):
    """Each process keeps an image folder's manifest in its own data_dir, and process 1's
    is an earlier run's, from before an image was added: it read that listing and trained
    on other examples than process 0's, and nothing said so. The same for a dataset the
    few-shot probe reads (the training data, digits, is the same copy on both)."""
    root = tmp_path / "images"
    make_folder(root, {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}})
    FolderSource(str(root), str(tmp_path / "tfds1"))  # The earlier run's manifest.
    shutil.copy(root / "train" / "a" / "img0.png", root / "train" / "a" / "added.png")
    dataset = f"folder:{root}"
    flags = [f"--config.dataset={dataset}"]
    if read_for == "fewshot":
        flags = [
            f"--config.fewshot.datasets.digits=('{dataset}', 'train', 'test')",
            "--config.fewshot.shots=(1,)",
        ]
    for refusal in _last_lines(_launch(tmp_path, str(tmp_path / "run"), *flags)):
        assert re.fullmatch(
            f"vit-train: The processes of this run read different copies of {dataset}: 1 of "
            f"2 differ from process 0; process 1 in {dataset} records: \\w+ -> \\w+; "
            f"{dataset} train examples: 13 -> 12. Every process must read the same records: .*",
            refusal,
        ), refusal
    assert not (tmp_path / "run").exists()
