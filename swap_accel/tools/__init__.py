"""The analysis and sharing commands: average, landscape, cosine, transition, export, and the checks run before any
process group (preflight).
"""
