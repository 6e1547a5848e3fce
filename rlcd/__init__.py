"""RLCD: contrastive preference data, preference model, PPO."""
