"""From records to a verdict: the gate, thresholds and noise, baselines, A/B runs, merging, deploy history."""
