"""Checkpoints written atomically and loaded safely, resuming, run directories, phase-2 samples."""
