"""formerlab's shared code: what two or more projects use (blocks, kernels, data, metrics, the Lightning runner)."""
