"""Whole-slide inference: tissue tiles, the network, seam-free stitching and slide-wide cleanup."""
