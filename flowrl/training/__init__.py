"""The training package: the trainer's rooms (DESIGN.md's layout; issue 19 moves flowrl/train.py
here step by step): checkpoint (atomic files, checkpoint discovery), resume (what a resume may
change), rollout (seeds, encoding, sampling with one weight set), schedule (lr, old-policy decay),
signals (SIGTERM / SIGINT)."""
