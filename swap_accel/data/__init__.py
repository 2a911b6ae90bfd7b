"""Data sources (in memory and streaming), augmentation on the device, and the orders and seeds every phase
draws from.
"""
