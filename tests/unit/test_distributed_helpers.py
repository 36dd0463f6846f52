"""Which images each rank takes, how rank rows are put back, and the launcher commands."""

from __future__ import annotations

import sys

import torch

from flowrl.cli.pipeline import launch_command
from flowrl.distributed import World, assemble, launched_world_size, rank_positions, shard_problems


def test_rank_positions_split_each_step_contiguously():
    order = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11])
    # 2 steps of 8 images; each of 2 ranks takes 4 consecutive images of every step
    assert rank_positions(order, 2, 2, 0).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert rank_positions(order, 2, 2, 1).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert rank_positions(order, 1, 1, 0).tolist() == order.tolist()
    union = torch.cat([rank_positions(order, 1, 4, r) for r in range(4)])
    assert sorted(union.tolist()) == list(range(16))  # every image exactly once


def test_assemble_puts_rank_rows_back_in_epoch_order():
    parts = [torch.tensor([10.0, 12.0]), torch.tensor([11.0, 13.0])]
    positions = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    assert assemble(parts, positions).tolist() == [10.0, 11.0, 12.0, 13.0]


def test_shard_problems_name_the_fix():
    assert shard_problems(1152, 1, 18, 8, 24) == []
    assert shard_problems(1152, 2, 9, 8, 24) == []
    (msg,) = shard_problems(16, 1, 4, 3, 4)
    assert "cannot be split evenly over 3 processes" in msg and "global batch" in msg
    (msg,) = shard_problems(16, 1, 8, 4, 4)
    assert "micro_batch 8 does not divide" in msg and "[1, 2, 4]" in msg


def test_world_size_comes_from_the_launcher_environment():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4
    single = World.single(torch.device("cpu"))
    assert single.is_main and single.gather_objects("x") == ["x"] and single.any(True) and not single.any(False)


def test_launch_commands():
    torchrun = launch_command("torchrun", 2, ["p.yaml", "train.epochs=1"], port=1234)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node" in torchrun and torchrun[torchrun.index("--nproc-per-node") + 1] == "2"
    assert torchrun[-5:] == ["-m", "flowrl", "train", "p.yaml", "train.epochs=1"]
    acc = launch_command("accelerate", 8, ["p.yaml"], port=1234)
    assert acc[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert acc[acc.index("--num_processes") + 1] == "8" and "--multi_gpu" in acc
    assert acc[-4:] == ["-m", "flowrl", "train", "p.yaml"]


def test_train_refuses_a_world_size_that_cannot_share_the_batch_before_launching():
    from pathlib import Path

    from click.testing import CliRunner

    from flowrl.cli import main

    recipe = str(Path(__file__).resolve().parents[2] / "pipelines" / "sd35m-geneval.yaml")
    res = CliRunner().invoke(main, ["train", recipe, "--launcher", "torchrun", "--num-processes", "3"])
    assert res.exit_code == 2 and "micro_batch 18 does not divide" in res.output
    res = CliRunner().invoke(main, ["train", recipe, "--num-processes", "3"])
    assert res.exit_code == 2 and "--launcher accelerate" in res.output


def test_world_close_leaves_the_process_group():
    # A finished run must destroy its group, or gloo's threads can abort the process at exit.
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        World(0, 2, 0, torch.device("cpu")).close()
        assert not torch.distributed.is_initialized()
        World(0, 2, 0, torch.device("cpu")).close()  # a second close is harmless
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    World.single().close()  # one process: nothing to leave
