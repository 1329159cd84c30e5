"""Glue to other people's trainers: on-policy capture inside TRL / HF `Trainer` (trl.py), cross-rank sums
(distributed.py), the callback's actions (actions.py), and reading an HF/TRL output dir written without our
callback (hf_output.py)."""
