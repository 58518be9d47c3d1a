"""CPU-only code: convolution gradient kernels and process tuning, used only
when the mesh's platform is CPU (`dqvq.cpu.tuning`)."""
