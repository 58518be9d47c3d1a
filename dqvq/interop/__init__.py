"""Weights from elsewhere: PyTorch checkpoints, the official DQ-VAE and
DQ-Transformer, the pretrained VGG16 (LPIPS) and InceptionV3 (FID)."""
