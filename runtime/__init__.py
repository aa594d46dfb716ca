"""moeperf's runtime: executes a plan as real distributed MoE training (torchrun)."""
