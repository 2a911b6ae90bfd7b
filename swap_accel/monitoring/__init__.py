"""What a run shows: the monitor, trackers (W&B, TensorBoard), progress, the Table-1 report, Figure 1."""
