"""Counting the multiply-adds of a forward pass, and the machine's matmul rate to compare with.

Papers quote a network's cost as "FLOPs" but count **multiply-adds** (MACs): EfficientNet-B0's
"0.39 B FLOPs" are 0.39 G multiply-adds of its convolutions and classifier at 224 x 224.
:func:`count_macs` counts them the same way, from the graph TensorFlow traces for
``model(x, training=False)``: the ``Conv2D``, ``DepthwiseConv2dNative``, ``MatMul`` and
``BatchMatMulV2`` ops, whose float operations TensorFlow's profiler computes from their static
shapes (two per multiply-add, so the total is halved). Everything else -- batch norm, activations,
additions, pooling, resizing -- is left out, as in the papers; it is a few percent of the total.

:func:`matmul_rate` measures how many float32 multiply-adds per second this machine does in its
best case, a large square ``tf.matmul``: ``count_macs(...) / matmul_rate()`` is the time a forward
pass would take if every op ran at that rate, a floor to compare a measured time with.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence

import tensorflow as tf

__all__ = ["MAC_OPS", "count_macs", "matmul_rate"]

#: The op types whose multiply-adds :func:`count_macs` counts.
MAC_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2")


def _profiler_options():
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = (
        builder(builder.float_operation())
        .with_empty_output()  # the profiler prints nothing
        .account_displayed_op_only(True)
        .select(["float_ops"])
        .with_node_names(show_name_regexes=[".*"])
        .build()
    )
    options["account_type_regexes"] = list(MAC_OPS)
    return options


def count_macs(model: Callable, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass ``model(x, training=False)``.

    Args:
        model: a Keras model or layer (called with ``training=False``), or any function of one
            tensor that TensorFlow can trace.
        input_shape: the full static input shape, batch included, e.g. ``(1, 224, 224, 3)``.

    Returns:
        The multiply-adds of the convolutions, depthwise convolutions and matrix products of the
        traced graph (:data:`MAC_OPS`), for the whole batch.

    Raises:
        ValueError: if ``input_shape`` has an unknown (None) or non-positive dimension: the
            count needs static shapes.
    """
    shape = tuple(input_shape)
    if not shape or any(d is None or int(d) <= 0 for d in shape):
        raise ValueError(
            f"count_macs: input_shape must be a full static shape with the batch size, e.g. "
            f"(1, 224, 224, 3); got {input_shape!r}."
        )

    def forward(x):
        try:
            return model(x, training=False)
        except TypeError:  # a plain function without a `training` argument
            return model(x)

    graph = (
        tf.function(forward)
        .get_concrete_function(tf.TensorSpec([int(d) for d in shape], tf.float32))
        .graph
    )
    # The profiler's shape helper logs a deprecation warning: keep it out of the user's output.
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        profile = tf.compat.v1.profiler.profile(
            graph=graph,
            run_meta=tf.compat.v1.RunMetadata(),
            cmd="op",
            options=_profiler_options(),
        )
    finally:
        logger.setLevel(level)
    return int(profile.total_float_ops) // 2


def matmul_rate(sizes: Sequence[int] = (1024, 2048), repeats: int = 5) -> float:
    """Measured float32 multiply-adds per second of this machine: the best, over square
    ``tf.matmul`` products of the given sizes, of ``size**3 / median time`` in a ``tf.function``.
    A measurement: it changes with the machine, its load and the thread settings."""
    rates = []
    for size in sizes:
        a = tf.random.normal((size, size))
        product = tf.function(lambda a: tf.matmul(a, a))
        product(a).numpy()  # trace and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product(a).numpy()
            times.append(time.perf_counter() - start)
        rates.append(size**3 / statistics.median(times))
    return max(rates)
