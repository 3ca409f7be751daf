"""Post-training: dialog / preference data, SFT, reward model, rejection sampling, DPO, model averaging."""
