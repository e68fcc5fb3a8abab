"""Starting networks trained on simulated tomograms, shipped inside the package.

``scripts/pretrain.py`` trains them on many simulated tomograms whose imaging, specimen and
feature sizes are drawn at random (:func:`napari_tomoseg.simulator.synthetic.random_settings`); the
files sit in ``napari_tomoseg/learning/networks/`` and are listed with how they were made and how
well they do in ``docs/models.md``.  Nothing is ever downloaded.

They are used in two ways:

- **zero-shot**: applied to a tomogram as they are, without any boxes
  (``tomoseg apply --pretrained NAME``, or the Apply widget);
- **fine-tuning** (the default start of training): when the features of a training set
  match shipped networks by name, training starts from one instead of from random weights
  (:func:`starting_network`).  A network with other classes takes over everything but the
  output layer, whose rows are copied for the classes both share
  (:func:`transfer_weights`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import TomosegError
from .model_file import Network, load_network, read_network_meta

#: Folder of the shipped network files (package data).
PRETRAINED_DIR = Path(str(resources.files("napari_tomoseg.learning") / "networks"))
#: Name of the shipped network that knows every feature at once.
MULTICLASS = "all_features"
#: Words a user may give a feature, by the name of the simulator's class they mean.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "single_membrane": (
        "membrane",
        "single_membrane",
        "plasma_membrane",
        "cell_membrane",
        "vesicle",
        "er",
        "endoplasmic_reticulum",
        "lipid_bilayer",
        "bilayer",
    ),
    "double_membrane": (
        "double_membrane",
        "mitochondrion",
        "mitochondria",
        "mito",
        "nuclear_envelope",
        "envelope",
    ),
    "microtubule": ("microtubule", "mt", "tubulin"),
    "ribosome": ("ribosome", "80s", "70s", "polysome"),
    "carbon_edge": ("carbon_edge", "carbon", "carbon_film", "support_film", "film_edge"),
}
#: ``start_from`` values that are not a network name.
AUTO, SCRATCH = "auto", "scratch"


def pretrained_dir() -> Path:
    """The folder of the starting networks: the package's, or ``$TOMOSEG_PRETRAINED_DIR``
    (e.g. a facility's own networks made with ``scripts/pretrain.py``)."""
    return Path(os.environ.get("TOMOSEG_PRETRAINED_DIR") or PRETRAINED_DIR)


def available() -> dict[str, Path]:
    """The shipped networks by name (file stem), sorted."""
    folder = pretrained_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.tsnet"))}


def shipped_file(name: str) -> Path:
    """The file of the shipped network ``name``; an unknown name raises, naming those
    there are.

    Parameters
    ----------
    name
        A name from :func:`available` (the file's stem, e.g. ``"all_features"``).
    """
    files = available()
    if name not in files:
        known = ", ".join(files) or "none (this installation has no shipped networks)"
        raise TomosegError(f"There is no shipped network {name!r}; available: {known}.")
    return files[name]


def load_pretrained(name: str, device: str | torch.device = "cpu") -> Network:
    """Load the shipped network ``name`` (see :func:`available`).

    Parameters
    ----------
    name
        A name from :func:`available`.
    device
        A torch device or its name, as for :func:`~.model_file.load_network`.
    """
    return load_network(shipped_file(name), device=device)


def feature_of(name: str) -> str | None:
    """The simulator class a user's feature name means (``"Membranes"`` -> single
    membrane, ``"MT"`` -> microtubule), or None when it matches no shipped feature.

    Parameters
    ----------
    name
        A class name as a user gives it (case, spaces, hyphens and plural ``s`` ignored).
    """
    word = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    candidates = {word, word.removesuffix("s"), word.removesuffix("es")}
    for feature, words in SYNONYMS.items():
        if candidates & set(words):
            return feature
    return None


def match(class_names: Sequence[str]) -> str | None:
    """The shipped network to start training from for these classes (background first):
    a binary network of the same feature for one feature, the multi-class network when every
    feature of several is known to it; None when nothing fits.

    Parameters
    ----------
    class_names
        The training set's class names, background first.

    Returns
    -------
    str or None
        The name of a shipped network (a key of :func:`available`), or None.
    """
    files = available()
    features = [feature_of(n) for n in class_names[1:]]
    if len(features) == 1:
        return features[0] if features[0] in files else None
    if features and all(features) and MULTICLASS in files:
        known = read_network_meta(files[MULTICLASS]).class_names
        if all(f in known for f in features):
            return MULTICLASS
    return None


def transfer_weights(source: Network, target: Network) -> dict[str, Any]:
    """Copy ``source``'s weights into ``target`` (same architecture).

    Every layer but the input and output layers must have the same shape.  The input layers
    may differ in context slices (:func:`input_fits`): a wider target (2.5D from 2D) gets
    the source's weights on its central channels and zeros on the others, so it computes
    what the source does until training teaches it to use the context; a narrower one gets
    each outer channel's weights added to its nearest channel, which computes the same on
    a volume that does not change along Z.  Output rows are matched by feature
    (:func:`feature_of`); a binary target taking a feature from a multi-class source gets
    the difference of that feature's and the background's rows (the logit of feature
    against background).  Unmatched output rows keep their initial values.

    Parameters
    ----------
    source
        The network to copy from (e.g. a shipped one, :func:`load_pretrained`).
    target
        The new network, changed in place.

    Returns
    -------
    dict
        What was copied: ``layers`` (the number of state-dict entries besides the output
        layer's) and ``output_classes_matched`` (the classes, by feature, whose output rows
        were copied).
    """
    src, dst = source.model.state_dict(), target.model.state_dict()
    head = _head_prefix(dst)
    body = {k: v for k, v in src.items() if not k.startswith(head)}
    n_src, n_dst = source.meta.in_channels, target.meta.in_channels
    if n_src != n_dst and input_fits(n_src, n_dst):
        _fit_input(body, dst, n_src, n_dst)
    mismatched = [k for k, v in body.items() if k not in dst or dst[k].shape != v.shape]
    if mismatched:
        raise TomosegError(
            f"Cannot start from the {source.meta.architecture!r} network with "
            f"{n_src} input channel(s): its layers do not fit this "
            f"{target.meta.architecture!r} network with {n_dst} "
            "(choose the same architecture and parameters, or start from scratch)."
        )
    new = dict(dst)
    new.update(body)
    matched = _copy_head(source, target, src, new, head)
    target.model.load_state_dict(new)
    return {"layers": len(body), "output_classes_matched": matched}


def input_fits(n_src: int, n_dst: int) -> bool:
    """Whether a network of ``n_src`` input channels can start one of ``n_dst``: the same
    number, or other context slices (odd numbers both, see :func:`transfer_weights`)."""
    return n_src == n_dst or (n_src % 2 == 1 and n_dst % 2 == 1)


def _fit_input(
    body: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], n_src: int, n_dst: int
) -> None:
    """The source's input-layer weights moved to the target's context slices (in place):
    each source slice onto the same offset from the centre, or the nearest one there is."""
    key = next(k for k, v in body.items() if v.ndim == 4)  # the first convolution
    if key not in dst or dst[key].shape[1] != n_dst or body[key].shape[1] != n_src:
        return  # not an input layer of these widths: the shape check reports it
    fitted = torch.zeros_like(dst[key])
    c_src, c_dst = n_src // 2, n_dst // 2
    for i in range(n_src):
        j = min(max(i - c_src, -c_dst), c_dst) + c_dst
        fitted[:, j] += body[key][:, i].to(fitted.dtype)
    body[key] = fitted


def _head_prefix(state: dict[str, torch.Tensor]) -> str:
    """The name prefix of the last layer (the one that gives the logits)."""
    last = list(state)[-1]
    return last.rsplit(".", 1)[0] + "."


def _copy_head(
    source: Network,
    target: Network,
    src: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    head: str,
) -> list[str]:
    s_names = [feature_of(n) or n for n in source.meta.class_names]
    t_names = [feature_of(n) or n for n in target.meta.class_names]
    matched = []
    for key in (head + "weight", head + "bias"):
        if key not in src or key not in new:
            continue
        s_rows, t_rows = src[key], new[key].clone()
        if t_rows.shape[0] == 1:  # binary target: feature logit against background
            c = s_names.index(t_names[1]) if t_names[1] in s_names else None
            if c is not None and s_rows.shape[0] > 1:
                t_rows[0] = s_rows[c] - s_rows[0]
            elif c is not None:
                t_rows[0] = s_rows[0]
            if c is not None:
                matched = [t_names[1]]
        elif s_rows.shape[0] > 1:
            matched = []
            for i, name in enumerate(t_names):
                if name in s_names:
                    t_rows[i] = s_rows[s_names.index(name)]
                    matched.append(name)
        new[key] = t_rows
    return matched


def starting_network(
    start_from: str,
    class_names: Sequence[str],
    architecture: str,
    in_channels: int,
    model_params: dict[str, Any] | None = None,
) -> tuple[Network | None, str]:
    """The shipped network a training run starts from, and a sentence saying which.

    Parameters
    ----------
    start_from
        ``"auto"`` (the network :func:`match` finds, if its architecture, its parameters and
        input channels fit), ``"scratch"``, or the name of a shipped network (an error when
        it does not fit).
    class_names
        The training set's class names, background first.
    architecture, in_channels, model_params
        The network to be trained: architecture name, input channels (2 x context slices
        + 1) and architecture parameters (None: not compared).

    Returns
    -------
    tuple of (Network or None, str)
        The loaded network (None for random weights) and the sentence.
    """
    if start_from == SCRATCH:
        return None, "random weights (start from scratch)"
    name = match(class_names) if start_from == AUTO else start_from
    if name is None:
        return None, "random weights (no shipped network for these features)"
    meta = read_network_meta(shipped_file(name))
    fits = meta.architecture == architecture and input_fits(meta.in_channels, in_channels)
    fits = fits and (model_params is None or dict(meta.model_params) == dict(model_params))
    if not fits:
        if start_from == AUTO:
            return None, (
                f"random weights (the shipped {name!r} network is a {meta.architecture} "
                f"with {meta.in_channels} input channel(s) and parameters "
                f"{meta.model_params})"
            )
        raise TomosegError(
            f"The shipped network {name!r} is a {meta.architecture!r} network with "
            f"{meta.in_channels} input channel(s) and parameters {meta.model_params}; train "
            "such a network to start from it, or start from scratch."
        )
    said = f"the shipped network {name!r}"
    if meta.in_channels != in_channels:
        said += (
            f" (its input layer fitted from {meta.in_channels // 2} to "
            f"{in_channels // 2} context slice(s))"
        )
    return load_pretrained(name), said
