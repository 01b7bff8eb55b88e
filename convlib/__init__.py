"""convlib: a JAX functional research library for convolutional networks."""
