"""Benchmarks: layers and training steps, convlib against autodiff and PyTorch, timed side by side."""
