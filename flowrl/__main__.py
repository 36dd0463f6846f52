"""`python -m flowrl ...` is the `flowrl` command (what `accelerate launch -m flowrl` and `torchrun -m flowrl` run)."""

from flowrl.cli import main

if __name__ == "__main__":
    main()
