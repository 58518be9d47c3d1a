"""Tools beside the verbs: ahead-of-time compilation for a topology and the
entropy-threshold table of a dataset."""
