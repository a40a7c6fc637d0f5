"""Stride-1 'same'-padded 2D convolution whose kernel gradient is fast on XLA:CPU.

XLA:CPU computes the gradient of a large convolution with respect to its kernel several
times slower than the forward pass. On CPU this convolution's backward instead builds the
kernel gradient from one matrix product per kernel tap,
dW[i, j] = sum_{b,h,w} x_padded[b, h + i, w + j, :]^T dy[b, h, w, :], and takes the input
gradient from XLA's own convolution transpose. Other backends keep XLA's gradient. The
forward is `lax.conv_general_dilated` everywhere, so results differ only by float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel: jnp.ndarray) -> list[tuple[int, int]]:
  """Symmetric zero padding that keeps H, W for an odd [kh, kw, C_in, C_out] kernel."""
  return [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]


def _conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), _same_padding(kernel),
                                      dimension_numbers=_NHWC_HWIO)


@jax.custom_vjp
def conv2d_same(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, C_in] conv [kh, kw, C_in, C_out] (odd kh, kw; stride 1; zero 'same' padding;
  no bias) -> [B, H, W, C_out]."""
  return _conv(x, kernel)


def _conv2d_same_fwd(x: jnp.ndarray, kernel: jnp.ndarray):
  return _conv(x, kernel), (x, kernel)


def _conv2d_same_bwd(residuals, dy: jnp.ndarray):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel), x)
  (dx,) = input_vjp(dy)
  dkernel = jax.lax.platform_dependent(x, dy, kernel, cpu=_kernel_grad_per_tap,
                                       default=_kernel_grad_xla)
  return dx, dkernel


conv2d_same.defvjp(_conv2d_same_fwd, _conv2d_same_bwd)


def _kernel_grad_xla(x: jnp.ndarray, dy: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k), kernel)
  return kernel_vjp(dy)[0]


def _kernel_grad_per_tap(x: jnp.ndarray, dy: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """One [N, C_in]^T @ [N, C_out] product per tap, N = B * H * W."""
  kh, kw, c_in, c_out = kernel.shape
  _, height, width, _ = x.shape
  x_padded = jnp.pad(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)])
  dy_rows = dy.reshape(-1, c_out)  # [N, C_out]
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = x_padded[:, i:i + height, j:j + width, :].reshape(-1, c_in)  # [N, C_in]
      taps.append(jnp.einsum("nc,nd->cd", window, dy_rows,
                             preferred_element_type=jnp.float32))  # [C_in, C_out]
  return jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


def conv_general_dilated_same(x: jnp.ndarray, kernel: jnp.ndarray,
                              window_strides: Sequence[int], padding: Any,
                              lhs_dilation: Sequence[int] | None = None,
                              rhs_dilation: Sequence[int] | None = None,
                              dimension_numbers: Any = None, feature_group_count: int = 1,
                              precision: Any = None, **kwargs: Any) -> jnp.ndarray:
  """`lax.conv_general_dilated`'s signature (`nnx.Conv(conv_general_dilated=...)`): calls
  `conv2d_same` for a 2D NHWC/HWIO, stride-1, undilated, ungrouped convolution with
  'same' zero padding ('SAME' or explicit), and `lax.conv_general_dilated` for anything
  else."""
  dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
  nhwc = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC_HWIO)
  is_same = (x.ndim == 4 and dims == nhwc and tuple(window_strides) == (1, 1)
             and all(tuple(d or (1, 1)) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and feature_group_count == 1 and precision is None
             and all(v is None for v in kwargs.values())
             and kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1
             and (padding == "SAME" if isinstance(padding, str)
                  else [tuple(p) for p in padding] == _same_padding(kernel)))
  if is_same:
    return conv2d_same(x, kernel)
  return jax.lax.conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)
