"""ssl3d_jax: the five 3D self-supervised pretext tasks of Taleb et al. (NeurIPS 2020) in JAX/Flax.

Axis convention everywhere: channels-last, volumes `[D, H, W, C]`, batches `[B, D, H, W, C]`.
"""

__version__ = "0.1.0"
