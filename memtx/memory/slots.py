"""Right-aligned slot buffers, the layout the XL, LaMemo and Compressive memories share: a
buffer of S slots per row whose newest `length[b]` slots (the last ones) hold the row's current
document. Appending keeps the newest S slots of [buffer ; new], so a write is one per-row window
and a reset only sets a length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def valid(length_B: jax.Array, size: int) -> jax.Array:
    """[B, size] bool: slot s of row b is valid iff s >= size - length[b]."""
    return jnp.arange(size)[None, :] >= size - length_B[:, None]


def window(x: jax.Array, start_B: jax.Array, size: int, batch_axis: int, axis: int) -> jax.Array:
    """Per row b, the `size` entries of `x` along `axis` starting at start_B[b] (rows along
    `batch_axis`)."""
    in_row = axis - (axis > batch_axis)
    return jax.vmap(lambda row, start: lax.dynamic_slice_in_dim(row, start, size, axis=in_row),
                    in_axes=(batch_axis, 0), out_axes=batch_axis)(x, start_B)


def append(old: jax.Array, new: jax.Array, num_valid_B: jax.Array, batch_axis: int, axis: int) -> jax.Array:
    """The newest S slots of [old ; each row's first num_valid[b] entries of new] along `axis`."""
    joined = jnp.concatenate([old, new.astype(old.dtype)], axis=axis)
    return window(joined, num_valid_B, old.shape[axis], batch_axis, axis)
