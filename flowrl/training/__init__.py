"""The training package: the trainer's rooms (DESIGN.md's layout; issue 19 moves flowrl/train.py
here step by step). `checkpoint` holds the files a resume reads: atomic writes, checkpoint discovery."""
