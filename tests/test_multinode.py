"""More than one machine, as far as one machine can show it: two launcher processes of one rank each on 127.0.0.1 form
one job, exactly as two machines would (each launcher knows only the rendezvous address and its node rank).

- torchrun with a c10d rendezvous (--rdzv-backend c10d --rdzv-endpoint HOST:PORT): training gives the per-step losses
  of the one-node 2-rank run;
- torchrun with a static master (--master-addr/--master-port --node-rank): serving answers with the one-process text;
- the deepspeed launcher with a hostfile and --no_ssh --node_rank (one launcher per node, nothing started over ssh):
  serving again.
What one machine cannot show: separate filesystems (the run directory is shared here; README "More than one machine"
says what must be shared) and a network interface per node.
"""

import subprocess
from pathlib import Path

import pytest
from cli_exports import BIN, GENERATE, env, make_cli_exports, run
from test_train import LM_TINY, _losses

from pipeline.platform.device import free_port

REPO = Path(__file__).resolve().parent.parent
TRAIN = [*LM_TINY, "train.steps=8", "train.eval_interval=8", "train.save_interval=8", "model.dropout=0.1"]
TIMEOUT_S = 300


def _train_args(run_dir: Path) -> list[str]:
    args = [str(REPO / "launch/train.py"), "--config", "lm-tiny", "--run-dir", str(run_dir)]
    for item in TRAIN:
        args += ["--set", item]
    return args


def _both(commands: list[list[str]], stdin: str | None = None) -> list[subprocess.CompletedProcess]:
    """Start every node's launcher at once (each waits at the rendezvous for the others), then wait for all."""
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env(WANDB_MODE="offline"),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(input=stdin if stdin is not None else None, timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:  # a launcher left waiting for a node that failed: its ranks end with it (watch_launcher)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
def test_two_torchrun_nodes_train_with_the_losses_of_one_node(tmp_path):
    one = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *_train_args(tmp_path / "one")],
        cwd=REPO,
        env=env(WANDB_MODE="offline"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
        + ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "pytest-2node"]
        + _train_args(tmp_path / "two")
        for node in (0, 1)
    ]
    for result in _both(nodes):
        assert result.returncode == 0, result.stderr[-3000:]
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two_losses) == list(range(1, 9))
    worst = max(abs(one_losses[s] - two_losses[s]) for s in one_losses)
    print(f"2 nodes x 1 rank vs 1 node x 2 ranks, 8 steps: max |loss difference| {worst:.1e}")
    assert worst <= 1e-4
    assert (tmp_path / "two/checkpoints/step_000008/meta.json").is_file()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("cli"))


def _serve_args(exports) -> list[str]:
    return [str(REPO / "launch/infer.py"), "--export", exports["lm"], "--input", str(exports["root"] / "prompts.txt")]


@pytest.mark.slow
def test_two_torchrun_nodes_with_a_static_master_serve_the_one_process_text(exports):
    single = run([*_serve_args(exports)[1:], *GENERATE])
    assert single.returncode == 0, single.stderr
    master = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    nodes = [
        [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", *master]
        + [*_serve_args(exports), *GENERATE]
        for node in (0, 1)
    ]
    first, second = _both(nodes)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert first.stdout == single.stdout  # node 0 holds rank 0, which prints; 2 experts on each node
    assert second.stdout == ""


@pytest.mark.slow
def test_two_deepspeed_nodes_from_a_hostfile_serve_the_one_process_text(exports, tmp_path):
    single = run([*_serve_args(exports)[1:], *GENERATE])
    assert single.returncode == 0, single.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    nodes = [
        [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node)]
        + ["--master_addr", "127.0.0.1", "--master_port", str(port)]
        + [*_serve_args(exports), *GENERATE]
        for port in [free_port()]
        for node in (0, 1)
    ]
    first, second = _both(nodes)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert single.stdout in first.stdout  # among the launcher's own log lines
