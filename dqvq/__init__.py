"""dqvq: dynamic vector quantization (DQ-VAE, DQ-Transformer) in JAX/Flax."""
