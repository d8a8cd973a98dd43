"""The search stage: the Tune/Optuna study (tune), one trial (trial), search spaces, preflight checks, reports."""
