"""What the command-line tests of launch/infer.py share (serving: test_serve_cli.py; its benchmark modes:
test_bench_model.py, test_bench_serving.py): small random exports with a real tokenizer, so text goes in and comes
out, and the launchers run as a user would run them.
"""

import os
import subprocess
import sys
from pathlib import Path

from random_exports import random_export_config, write_random_export

from pipeline.platform.device import free_port
from pipeline.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEXT = (REPO / "pipeline/data/fixtures/shakespeare/macbeth.md").read_text().splitlines()[:1500]
PROMPTS = ["Fair is foul", "When shall we three meet again", "Macbeth", "The thane of Cawdor lives"]
SOURCES = ["So foul and fair a day", "Double, double toil and trouble"]
GENERATE = ["--max-new-tokens", "6", "--quiet"]


def write_export(path: Path, config: dict, tokenizer: Tokenizer, seed: int = 0) -> str:
    """A random export whose tokenizer is a real one of the same vocabulary."""
    config["model"]["vocab_size"] = config["tokenizer"]["vocab_size"] = tokenizer.vocab_size
    return str(write_random_export(path, config, seed, tokenizer.model_proto))


def make_cli_exports(root: Path) -> dict:
    """Small random exports with a real tokenizer (trained here on play text), and request files, under `root`."""
    tok = train_tokenizer(TEXT, TokenizerConfig(vocab_size=400), root / "tokenizers")
    varied = dict(tie_embeddings=False, norm="rmsnorm", activation="swiglu")  # outputs that differ by prompt
    exports = {
        "lm": write_export(root / "lm", random_export_config("decoder", **varied), tok),
        "mt": write_export(root / "mt", random_export_config("encoder-decoder", lm_head_bias=False, **varied), tok),
        "lm3": write_export(root / "lm3", random_export_config("decoder", num_experts=3, topk=1), tok),
    }
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "sources.txt").write_text("\n".join(SOURCES) + "\n")
    (root / "refs.txt").write_text("Si laid et si beau un jour\nDouble, double peine et trouble\n")
    return {"root": root, "tok": tok, **exports}


def env(**extra) -> dict:
    # One thread per rank: the two ranks share a small machine. W&B stays off unless a test turns it on.
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def run(
    args: list[str], launcher: list[str] | None = None, timeout: int = 120, **variables
) -> subprocess.CompletedProcess:
    """launch/infer.py with `args`, alone or under `launcher`, with these environment variables added."""
    command = [*(launcher or [sys.executable]), str(REPO / "launch/infer.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(**variables), cwd=REPO)


def torchrun(ranks: int) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc-per-node={ranks}", f"--master-port={free_port()}"]


def deepspeed(ranks: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
