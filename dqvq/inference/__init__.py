"""Inference objects built from models: the tokenizer, the generator, their
bundles and the image codec. They import models, never trainers."""
