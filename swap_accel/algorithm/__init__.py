"""SWAP itself: the epoch loop, phase 1, the workers of phase 2, phase 3's average, BatchNorm recomputation,
evaluation, schedules, the greedy soup and the gradient noise scale.
"""
