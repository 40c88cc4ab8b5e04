"""Hand-run tools: cost breakdown (perf), the GPU check, policy-gradient diagnostics, the base model's quality."""
