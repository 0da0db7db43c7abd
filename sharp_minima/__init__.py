"""sharp_minima: the geometry of neural-network loss surfaces in JAX.

Core modules (`hessian`, `tree_util`) import only jax, numpy and scipy, so
``import sharp_minima.hessian`` never pulls in flax, TFDS or TensorFlow.
"""

__version__ = "0.1.0"
