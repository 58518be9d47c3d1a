"""Evaluation metrics (FID / IS statistics, reconstruction, coding), one module each."""
