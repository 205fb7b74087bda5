"""Backbone weights: initialisation, ``.weights.h5`` files with clear errors, copying by name.

Shared by every backbone family (ResNet, Darknet-53, ...):

* :func:`kernel_initializer` — He-normal on fan-out, torchvision's conv initialisation;
* :func:`load_weights_file` — ``model.load_weights`` that says *why* a file does not fit
  (another architecture or other knobs, conv biases of an older build, an unreadable file)
  instead of Keras' dump of one variable, and never leaves layers silently at random init;
* :func:`copy_weights_by_name` — copy weights between two models layer by layer name (how
  keras.applications' ImageNet weights reach dlnotes' backbones), folding conv biases exactly
  into the following BatchNorm when the target has none.
"""

from __future__ import annotations

import collections
import warnings

import h5py
import keras
import numpy as np
from keras import layers

__all__ = ["copy_weights_by_name", "kernel_initializer", "load_weights_file"]


def kernel_initializer():
    """torchvision's conv initialisation, ``kaiming_normal_(w, mode="fan_out",
    nonlinearity="relu")``: ``VarianceScaling(2.0, "fan_out", "untruncated_normal")``."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _saved_variables(path, owner):
    """``[(key, shape), ...]`` of every dataset in a ``.weights.h5`` file."""
    saved = []

    def collect(key, obj):  # must return None: h5py stops visiting at any other value
        if isinstance(obj, h5py.Dataset):
            saved.append((key, tuple(obj.shape)))

    try:
        with h5py.File(path, "r") as f:
            f.visititems(collect)
    except OSError as err:
        raise ValueError(f"{owner}: {path!r} is not a readable HDF5 file ({err})") from err
    return saved


def _conv_bias_surplus(model, saved):
    """Whether ``saved`` holds exactly one extra variable per conv of ``model``, all of them in
    conv groups: a file from the same backbone with conv biases."""
    # keys look like "layers/conv2d_7/vars/1"; Keras names the groups after the layer class
    saved_conv = sum(1 for key, _ in saved if key.split("/")[1].startswith("conv2d"))
    convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    model_conv = sum(len(layer.weights) for layer in convs)
    surplus = saved_conv - model_conv
    return surplus == len(saved) - len(model.weights) == len(convs) > 0, saved_conv, model_conv


def load_weights_file(model, path, knobs="", keras_app=None):
    """``model.load_weights(path)`` with a clear error when the file belongs to another model.

    Keras' ``.weights.h5`` stores variables by layer *position* (``layers/conv2d_7/vars/0``), not
    by layer name, so a file only fits a model built with the same architecture and knobs. The
    variable count and the multiset of variable shapes are compared first (Keras would skip
    surplus entries with warnings only, or dump one mismatching variable); a file with one
    surplus variable per conv comes from the same backbone with conv biases. Any layer Keras
    skips is an error, not a warning.

    Args:
        model: the backbone to load into.
        path: a ``.weights.h5`` file (``model.save_weights``).
        knobs: the constructor settings of ``model`` for the messages, e.g.
            ``"initial_filters=8, use_bias=True"``.
        keras_app: the keras.applications constructor of the same architecture, if any (the
            message tells how to load a file saved with conv biases).

    Raises:
        ValueError: the file is not HDF5, or its variables do not fit ``model``.
    """
    owner = f"{model.name} ({knobs})" if knobs else model.name
    saved = _saved_variables(path, owner)
    if len(saved) != len(model.weights):
        biased, saved_conv, model_conv = _conv_bias_surplus(model, saved)
        if biased:
            fix = (
                f"keras.applications.{keras_app}(include_top=False, weights=None)"
                if keras_app
                else "this backbone rebuilt with use_bias=True convs"
            )
            raise ValueError(
                f"{owner}: {path!r} was saved from a backbone with conv biases (an older "
                f"dlnotes build or use_bias=True: {saved_conv} conv variables, this backbone "
                f"has {model_conv}). Load it into {fix} and copy_weights_by_name() that into "
                "this backbone, which folds the biases into the BatchNorms."
            )
    found = collections.Counter(shape for _, shape in saved)
    expected = collections.Counter(tuple(w.shape) for w in model.weights)
    if found != expected:
        extra = sorted((found - expected).elements())[:3]
        missing = sorted((expected - found).elements())[:3]
        raise ValueError(
            f"{owner}: could not load {path!r}: it holds {len(saved)} variables, this backbone "
            f"{len(model.weights)}; shapes only in the file {extra}, only in the backbone "
            f"{missing}. It was saved from a backbone with another name or knobs."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{owner}: could not load {path!r} into this backbone; was it saved from a "
                f"backbone built with the same name and knobs? ({err})"
            ) from err
    # Keras only warns when it skips part of a file, leaving those layers at random init.
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise ValueError(f"{owner}: {path!r} did not fit every layer: {skipped[0]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _feeds(conv, bn):
    """Whether ``bn``'s input is ``conv``'s output itself (False if either is called twice)."""
    try:
        return bn.input is conv.output
    except (AttributeError, ValueError):  # a layer called more than once has no single tensor
        return False


def _batch_norm_after(model, conv):
    """The BatchNormalization of ``model`` applied directly to ``conv``'s output, or None.

    Found by keras.applications' naming, the ``_conv`` suffix replaced by ``_bn``
    (``conv1_conv`` -> ``conv1_bn``, ``conv2_block1_1_conv`` -> ``conv2_block1_1_bn``,
    ``conv2_block1_0_conv`` -> ``conv2_block1_0_bn``), else as the only BatchNormalization that
    consumes the conv's output. Either way it must consume that output directly, over the conv's
    channel axis, or a bias folded into it would not be exact.
    """
    candidates = []
    if conv.name.endswith("_conv"):
        try:
            candidates = [model.get_layer(conv.name[: -len("_conv")] + "_bn")]
        except ValueError:
            pass
    candidates = [c for c in candidates if isinstance(c, layers.BatchNormalization)]
    if not candidates or not _feeds(conv, candidates[0]):
        candidates = [
            layer
            for layer in model.layers
            if isinstance(layer, layers.BatchNormalization) and _feeds(conv, layer)
        ]
    if len(candidates) != 1:
        return None
    bn = candidates[0]
    rank = len(conv.output.shape)
    channel_axis = rank - 1 if conv.data_format == "channels_last" else 1
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in axes] != [channel_axis]:
        return None
    return bn


def copy_weights_by_name(source: keras.Model, target: keras.Model, *, strict: bool = True) -> int:
    """Copy layer weights from ``source`` into ``target`` for every layer name they share.

    Used to load keras.applications' ImageNet ResNets into :func:`build_backbone` models (the
    layer names and weight layouts are the same but for the conv biases); works for any pair of
    models.

    A conv that has a bias in ``source`` but none in ``target`` gets the kernel only, and its
    bias ``b`` is folded exactly into the BatchNorm that follows it: in inference mode
    ``BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta``, so the target
    BN's ``moving_mean`` becomes ``mean - b`` (gamma, beta and the variance unchanged); in
    training mode the batch mean absorbs ``b`` anyway. That BN is found by keras.applications'
    naming (``conv2_block1_1_conv`` -> ``conv2_block1_1_bn``, ``conv1_conv`` -> ``conv1_bn``)
    or else as the only BatchNormalization consuming the conv's output; in both models it must
    be applied directly to the conv's output, and it is copied from ``source`` too.

    Args:
        source: model to read from (e.g. ``keras.applications.ResNet50(include_top=False)``).
        target: model to write to.
        strict: if True, every layer with weights in ``target`` must exist in ``source`` and
            vice versa, and every dropped bias must be folded; if False, layers without a
            counterpart are skipped, and so (with a warning) is a conv whose bias has no
            BatchNorm to go to.

    Returns:
        The number of layers copied (a BatchNorm that received a bias counts once).

    Raises:
        ValueError: a layer is missing on one side (``strict``), a shared layer's weights differ
            in count or shape (other than a dropped conv bias), or a dropped conv bias has no
            BatchNorm to fold into (``strict``). Nothing is copied when this is raised.
    """
    src = {layer.name: layer for layer in source.layers if layer.weights}
    dst = {layer.name: layer for layer in target.layers if layer.weights}
    if strict:
        only_dst = sorted(set(dst) - set(src))
        only_src = sorted(set(src) - set(dst))
        if only_dst or only_src:
            raise ValueError(
                f"copy_weights_by_name: layers of {target.name!r} missing in {source.name!r}: "
                f"{only_dst[:5]}{' ...' if len(only_dst) > 5 else ''} ({len(only_dst)}); "
                f"layers of {source.name!r} missing in {target.name!r}: "
                f"{only_src[:5]}{' ...' if len(only_src) > 5 else ''} ({len(only_src)})"
            )
    planned = {}  # target layer name -> (layer, values to set)
    biases = []  # (target conv, source bias): biases to fold into the following BN
    for layer_name, layer in dst.items():
        if layer_name not in src:
            continue
        source_layer = src[layer_name]
        values = source_layer.get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        drops_bias = (
            isinstance(layer, layers.Conv2D)
            and isinstance(source_layer, layers.Conv2D)
            and source_layer.use_bias
            and not layer.use_bias
            and got[:-1] == expected  # Keras orders a conv's weights (kernel, bias)
        )
        if drops_bias:
            biases.append((layer, values.pop()))
        elif expected != got:
            raise ValueError(
                f"copy_weights_by_name: layer {layer_name!r} has weight shapes {expected} in "
                f"{target.name!r} but {got} in {source.name!r}"
            )
        planned[layer_name] = (layer, values)

    for conv, bias in biases:
        bn = _batch_norm_after(target, conv)
        ok = (
            bn is not None
            and bn.name in planned
            and _batch_norm_after(source, src[conv.name]) is src[bn.name]
            and tuple(bn.moving_mean.shape) == bias.shape
        )
        if not ok:
            message = (
                f"copy_weights_by_name: conv {conv.name!r} has a bias in {source.name!r} but "
                f"none in {target.name!r}, and no BatchNormalization copied from "
                f"{source.name!r} follows it directly in both models (expected "
                f"{conv.name.removesuffix('_conv') + '_bn'!r}) to fold the bias into"
            )
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; the conv is left unchanged", stacklevel=2)
            del planned[conv.name]
            continue
        values = planned[bn.name][1]
        i = next(k for k, w in enumerate(bn.weights) if w is bn.moving_mean)
        # BN(conv(x) + b) uses (conv(x) + b - mean): the same as conv(x) with mean - b.
        values[i] = (values[i].astype(np.float64) - bias).astype(values[i].dtype)

    for layer, values in planned.values():  # validate everything first so a failure copies nothing
        layer.set_weights(values)
    return len(planned)
