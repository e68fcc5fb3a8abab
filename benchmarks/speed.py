"""Apply throughput, training time and peak memory of every architecture, measured against
a naive PyTorch loop, the Keras peer and the published figure, in one run.

    python benchmarks/speed.py [--depth 32] [--xy 1024] [--threads 1 2]
                               [--architectures tomoseg-cnn unet unet-lite]
                               [--train-target 0.5] [--train-steps 400] [--no-training]
                               [--quick] [--json FILE]

Rows (each measured in a fresh process, which gives its peak resident memory):

* ``apply_file``: the package's whole apply path, as ``tomoseg apply`` runs it: an MRC file
  in (memory-mapped), tiled inference with the default :class:`ApplySettings`, the mask
  and the probability map written as MRC files.
* ``apply_network``: the same on a tomogram already in memory, outputs in memory.
* ``naive``: a plain PyTorch loop over whole slices, one at a time, float32, no batching,
  no tiling: ``sigmoid(model(torch.from_numpy(slice)[None, None]))``.
* ``Keras peer``: the network of Chen et al. built with Keras 3 / TensorFlow with the same
  layer shapes and the weights of our ``tomoseg-cnn`` copied in, applied with
  ``model.predict`` on one whole slice at a time, which is how EMAN2's
  ``e2tomoseg_convnet.py`` applies a trained network.  Its output is checked against ours
  (the largest probability difference is printed).  Skipped when TensorFlow is not
  installed (``pip install napari-tomoseg[benchmark]``).
* ``seed``: Chen et al. report ~0.24 CPU-hours for one 4096 x 4096 slice.

The tomogram is random float32 (``--depth`` x ``--xy`` x ``--xy``) and the networks are
untrained: the weights do not change the cost.  Every row's voxels per second are divided
by the Keras peer's with the same number of threads.  The floating-point work of each
network (multiply-adds x 2 of its convolutions per output voxel, counted with hooks on the
torch modules) turns voxels per second into GFLOP/s, reported as a fraction of the
machine's peak, estimated by a large float32 matrix product timed in the same run.  Where
CUDA is available the apply and naive rows are repeated on the GPU (mixed precision on, as
by default), with a 512 x 1024 x 1024 tomogram for the default network; otherwise the
report says why they are missing.

Training: each architecture is trained on the simulator's single-membrane task (seed 0,
10 positive and 100 negative boxes, ``TrainSettings`` defaults) until the validation Dice
reaches ``--train-target``, evaluating every ``--eval-every`` mini-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    binary_trainset,
    command_line,
    describe_machine,
    fmt,
    machine_info,
    markdown_table,
    module_version,
    peak_rss_mib,
    run_child,
)

SCRIPT = str(Path(__file__).resolve())
#: Chen et al. 2017: applying the network to one 4096 x 4096 slice takes ~0.24 CPU-hours.
SEED_CPU_HOURS_PER_SLICE = 0.24
SEED_SLICE_PIXELS = 4096 * 4096
#: Voxels per second of the published figure (one CPU core).
SEED_VOXELS_PER_SECOND = SEED_SLICE_PIXELS / (SEED_CPU_HOURS_PER_SLICE * 3600.0)
#: The GPU target: this tomogram in under GPU_TARGET_SECONDS with the default network.
GPU_TARGET_SHAPE = (512, 1024, 1024)
GPU_TARGET_SECONDS = 10.0
#: Throughput targets against the Keras peer (same machine, same run).
TARGET_CNN_RATIO = 1.3
TARGET_DEFAULT_RATIO = 3.0
NORMALISATION = {"mode": "tomogram", "clamp_sigma": 5.0}


# -- floating-point work ----------------------------------------------------------------------
def conv_flops_per_voxel(model: Any, in_channels: int = 1, size: int = 256) -> float:
    """Floating-point operations per output voxel of ``model``'s convolutions.

    Counted with forward hooks on every ``Conv2d`` / ``ConvTranspose2d`` during one pass
    over a ``size`` x ``size`` image: 2 x (multiply-adds), i.e. for a convolution
    ``2 * out_elements * in_channels / groups * kh * kw`` (a transposed one counts its input
    elements).  Biases, batch norm, pooling, upsampling and activations are memory-bound
    and not counted.  ``size`` should be a multiple of the network's pooling factor.
    """
    import torch
    from torch import nn

    total = 0.0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        if isinstance(module, nn.ConvTranspose2d):
            n = inputs[0].numel() / inputs[0].shape[1] * module.out_channels
            per = module.in_channels / module.groups * kh * kw
        else:
            n = output.numel()
            per = module.in_channels / module.groups * kh * kw
        total += 2.0 * n * per

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, in_channels, size, size)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total / (size * size)


def measure_peak_gflops(threads: int, device: str = "cpu") -> float:
    """Achievable GFLOP/s of this machine: the faster of a large matrix product and a large
    3x3 convolution (256 -> 256 channels, counted as direct convolution), best of ten runs.

    float32 on the CPU with ``threads`` torch threads (torch's matrix product may use an
    older instruction set than its convolutions, so both are tried); on CUDA float16,
    which mixed precision runs the convolutions in.  A practical peak (what tuned kernels
    reach here), not the datasheet's.
    """
    import torch
    import torch.nn.functional as F

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if device == "cuda":
            opts = {"device": "cuda", "dtype": torch.float16}
            n, side = 8192, 256
        else:
            opts = {"dtype": torch.float32}
            n, side = 2048, 128
        a, b = torch.randn(n, n, **opts), torch.randn(n, n, **opts)
        x = torch.randn(1, 256, side, side, **opts).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3, **opts).contiguous(memory_format=torch.channels_last)
        work = {
            "matmul": (lambda: torch.mm(a, b), 2.0 * n**3),
            "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2.0 * 256 * 256 * 9 * side * side),
        }
        best = 0.0
        with torch.no_grad():
            for run, flops in work.values():
                run()
                for _ in range(10):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    best = max(best, flops / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


# -- the Keras peer ---------------------------------------------------------------------------
def tensorflow_available() -> bool:
    """Whether TensorFlow (and so Keras 3 on it) can be imported."""
    return module_version("tensorflow") is not None


def build_keras_twin(model: Any) -> Any:
    """Chen et al.'s network in Keras 3 with the weights of our :class:`TomosegCNN` ``model``.

    Layer for layer as EMAN2 builds it: 'same'-padded convolutions (ReLU after all but the
    last), a 2x2 max-pool after the first; then, as our network does, a bilinear 2x
    upsampling of the output and a sigmoid.  Kernels are copied from torch's (out, in, kh,
    kw) to Keras's (kh, kw, in, out); both frameworks compute a cross-correlation.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    from keras import layers

    convs = list(model.convs)
    if model.n_outputs != 1:
        raise ValueError("the Keras twin is built for binary networks (one output)")
    inputs = keras.Input(shape=(None, None, convs[0].in_channels))
    x = inputs
    keras_convs = []
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        layer = layers.Conv2D(
            conv.out_channels,
            conv.kernel_size[0],
            padding="same",
            activation=None if last else "relu",
        )
        x = layer(x)
        keras_convs.append(layer)
        if i == 0:
            x = layers.MaxPooling2D(2)(x)
    x = layers.UpSampling2D(2, interpolation="bilinear")(x)
    outputs = layers.Activation("sigmoid")(x)
    twin = keras.Model(inputs, outputs)
    for layer, conv in zip(keras_convs, convs):
        weight = conv.weight.detach().cpu().numpy().transpose(2, 3, 1, 0)
        layer.set_weights([weight, conv.bias.detach().cpu().numpy()])
    return twin


def keras_twin_difference(model: Any, twin: Any, image: np.ndarray) -> float:
    """Largest |probability difference| between ``model`` (torch) and its Keras ``twin`` on
    one (H, W) image (H and W even)."""
    import torch

    from napari_tomoseg.learning.models import predict_proba

    ours = predict_proba(model, torch.from_numpy(image[None, None]))[0, 1].numpy()
    theirs = twin.predict(image[None, :, :, None], verbose=0)[0, :, :, 0]
    return float(np.abs(ours - theirs).max())


#: ``ONEDNN_MAX_CPU_ISA`` values of CPUs without VNNI instructions.
NO_VNNI_ISAS = ("SSE41", "AVX", "AVX2")


def tensorflow_as_on_the_emulated_cpu(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Where ``ONEDNN_MAX_CPU_ISA`` emulates a CPU without VNNI, give TensorFlow the default
    it has on such a CPU, and say so (None when nothing was changed).

    TensorFlow's Linux build turns its oneDNN operations on only for CPUs with AVX512_VNNI,
    AVX512_BF16, AVX_VNNI or AMX (``IsMklEnabled`` in ``tensorflow/core/util/util.cc``); on
    an AVX2 CPU the peer runs Eigen's kernels.  An ISA limit alone would leave oneDNN on
    with only AVX2 kernels, a configuration no real CPU gets by default (and one whose
    15x15 convolutions are far slower than either).
    """
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa not in NO_VNNI_ISAS or "TF_ENABLE_ONEDNN_OPTS" in env:
        return None
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    return (
        f"ONEDNN_MAX_CPU_ISA={isa} emulates a CPU without VNNI, where TensorFlow leaves "
        "oneDNN off by default: the Keras peer ran with TF_ENABLE_ONEDNN_OPTS=0 (Eigen)"
    )


def _set_tensorflow_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# -- one measurement (run in a child process) -------------------------------------------------
def _load_volume(path: str) -> np.ndarray:
    from napari_tomoseg.data.io import read_tomogram

    return np.array(read_tomogram(path).data, dtype=np.float32)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec`` in this process and return its numbers.

    ``spec["mode"]``: ``file``, ``memory``, ``naive``, ``keras`` or ``train``.  Times cover
    the work on the tomogram (the first slice included: a user pays it), not starting
    Python, importing or loading the network.
    """
    import torch

    threads = int(spec.get("threads") or torch.get_num_threads())
    torch.set_num_threads(threads)
    device = spec.get("device", "cpu")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mode = spec["mode"]
    out: dict[str, Any] = {}
    if mode == "train":
        out = _measure_training(spec)
    else:
        from napari_tomoseg.learning.model_file import load_network

        net = load_network(spec["network"])
        if mode == "file":
            from napari_tomoseg.applying.inference import ApplySettings, apply_file

            work = Path(spec["workdir"])
            t0 = time.perf_counter()
            result = apply_file(
                net,
                spec["tomogram"],
                work / "mask.mrc",
                work / "prob.mrc",
                settings=ApplySettings(device=device),
                overwrite=True,
            )
            seconds = time.perf_counter() - t0
            out["notes"] = result.notes
            voxels = int(np.prod(result.mask.shape))
        elif mode == "memory":
            from napari_tomoseg.applying.inference import ApplySettings, apply_network

            vol = _load_volume(spec["tomogram"])
            t0 = time.perf_counter()
            settings = ApplySettings(device=device)
            if spec.get("tile_size"):
                settings.tile_size = int(spec["tile_size"])
                settings.batch_size = int(spec["batch_size"])
            result = apply_network(net, vol, voxel_size=10.0, settings=settings)
            seconds = time.perf_counter() - t0
            voxels = vol.size
        elif mode == "naive":
            vol = _load_volume(spec["tomogram"])
            model = net.model.to(device).eval()
            probs = np.empty(vol.shape, dtype=np.float32)
            t0 = time.perf_counter()
            context = int(net.meta.in_channels) // 2  # 2.5D: neighbouring slices as channels
            with torch.inference_mode():
                for z in range(vol.shape[0]):
                    near = np.clip(np.arange(z - context, z + context + 1), 0, vol.shape[0] - 1)
                    x = torch.from_numpy(vol[near])[None].to(device)
                    probs[z] = torch.sigmoid(model(x))[0, 0].cpu().numpy()
            _sync(device)
            seconds = time.perf_counter() - t0
            voxels = vol.size
        elif mode == "keras":
            _set_tensorflow_threads(threads)
            vol = _load_volume(spec["tomogram"])
            twin = build_keras_twin(net.model)
            out["max_difference"] = keras_twin_difference(net.model, twin, vol[0])
            probs = np.empty(vol.shape, dtype=np.float32)
            t0 = time.perf_counter()
            for z in range(vol.shape[0]):
                probs[z] = twin.predict(vol[z][None, :, :, None], verbose=0)[0, :, :, 0]
            seconds = time.perf_counter() - t0
            voxels = vol.size
        else:
            raise ValueError(f"unknown mode {mode!r}")
        out.update(seconds=seconds, voxels=voxels, voxels_per_second=voxels / seconds)
    out["peak_rss_mib"] = peak_rss_mib()
    out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    out["threads"] = threads
    return out


def _measure_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one architecture on the single-membrane task until the target validation Dice."""
    from napari_tomoseg.learning.training import TrainSettings, iter_train
    from napari_tomoseg.progress import drive
    from napari_tomoseg.simulator.synthetic import SimulationSettings, simulate_tomogram

    sim = simulate_tomogram(SimulationSettings(shape=tuple(spec["shape"]), seed=0))
    trainset = binary_trainset(
        sim, spec.get("feature", "single_membrane"), spec["n_positive"], spec["n_negative"]
    )
    settings = TrainSettings(
        architecture=spec["architecture"],
        iterations=int(spec["max_steps"]),
        eval_every=int(spec["eval_every"]),
        device=spec.get("device", "cpu"),
        seed=0,
    )
    target = float(spec["target"])
    state: dict[str, Any] = {"reached": None, "best": 0.0, "best_step": 0, "steps": 0}
    t0 = time.perf_counter()

    def watch(event: Any) -> None:
        state["steps"] = event.step
        dice = event.metrics.get("val_mean_dice")
        if dice is None:
            return
        if dice > state["best"]:
            state["best"], state["best_step"] = float(dice), event.step
        if dice >= target and state["reached"] is None:
            state["reached"] = (event.step, time.perf_counter() - t0)

    drive(
        iter_train(trainset, settings, should_stop=lambda: state["reached"] is not None),
        watch,
    )
    seconds = time.perf_counter() - t0
    reached = state["reached"]
    return {
        "reached_step": reached[0] if reached else None,
        "reached_seconds": reached[1] if reached else None,
        "steps": state["steps"],
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, state["steps"]),
        "best_dice": state["best"],
        "best_step": state["best_step"],
        "n_samples": int(trainset.images.shape[0]),
    }


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the throughput table."""

    name: str
    architecture: str
    device: str
    threads: int | str
    voxels_per_second: float | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    gpu_peak_mib: float | None = None
    gflops: float | None = None
    fraction_of_peak: float | None = None
    ratio_to_peer: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _default_context() -> int:
    """The context slices a network trained with the package's defaults takes."""
    from napari_tomoseg.learning.trainset import TrainsetSettings

    return int(TrainsetSettings.context_slices)


@dataclass
class SpeedOptions:
    """What :func:`run_speed` measures (the command-line options)."""

    depth: int = 32
    xy: int = 1024
    threads: list[int] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    training: bool = True
    apply: bool = True
    train_target: float = 0.5
    train_steps: int = 400
    eval_every: int = 20
    train_shape: tuple[int, int, int] = (96, 256, 256)
    n_positive: int = 10
    n_negative: int = 100
    gpu: bool = True
    gpu_target: bool = True
    in_process: bool = False
    tilings: list[tuple[int, int]] = field(default_factory=list)
    context_slices: int = field(default_factory=_default_context)


def quick_options() -> SpeedOptions:
    """A very small run that checks the script end to end (seconds, not minutes)."""
    return SpeedOptions(
        depth=2,
        xy=128,
        threads=[1],
        architectures=["tomoseg-cnn", "unet-lite"],
        train_steps=4,
        eval_every=2,
        train_shape=(48, 128, 128),
        n_positive=4,
        n_negative=12,
        gpu_target=False,
    )


def _measure(options: SpeedOptions, spec: dict[str, Any]) -> dict[str, Any]:
    if options.in_process:
        result = measure(spec)
        result["peak_rss_mib"] = None  # the whole run's peak, not this row's
        return result
    return run_child(SCRIPT, spec, threads=spec.get("threads"))


def untrained_network(arch: str, context_slices: int) -> Any:
    """A seeded, untrained binary network of ``arch`` at 10 A (speed does not need weights)."""
    import torch

    from napari_tomoseg.learning.model_file import Network

    torch.manual_seed(0)
    return Network.create(
        arch,
        2 * context_slices + 1,
        2,
        voxel_size=10.0,
        box_size=64,
        normalisation=NORMALISATION,
        context_slices=context_slices,
    )


def run_speed(options: SpeedOptions) -> dict[str, Any]:
    """Measure everything; returns a dict with the machine, rows, FLOPs and training."""
    import torch

    from napari_tomoseg.data.io import write_mrc
    from napari_tomoseg.learning.model_file import save_network
    from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE, available

    archs = options.architectures or available()
    cpus = os.cpu_count() or 1
    threads = sorted(set(options.threads or [1, cpus]))
    info = machine_info()
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": info,
        "options": asdict(options),
        "rows": [],
        "skipped": [],
        "notes": [],
    }
    emulated = tensorflow_as_on_the_emulated_cpu()
    if emulated:
        report["notes"].append(emulated)
    flops: dict[str, float] = {}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tomoseg-speed-") as tmp:
        work = Path(tmp)
        nets: dict[str, str] = {}
        for arch in archs:
            net = untrained_network(arch, options.context_slices)
            flops[arch] = conv_flops_per_voxel(net.model, net.meta.in_channels)
            params[arch] = sum(p.numel() for p in net.model.parameters())
            nets[arch] = str(save_network(net, work / f"{arch}.tsnet"))
        peer = untrained_network("tomoseg-cnn", 0)  # EMAN2's network: one slice in
        nets["peer"] = str(save_network(peer, work / "peer.tsnet"))
        flops["peer"] = conv_flops_per_voxel(peer.model)
        params["peer"] = sum(p.numel() for p in peer.model.parameters())
        tomo = work / "tomogram.mrc"
        rng = np.random.default_rng(0)
        write_mrc(
            tomo,
            rng.standard_normal((options.depth, options.xy, options.xy), dtype=np.float32),
            10.0,
        )
        base = {"tomogram": str(tomo), "workdir": str(work)}
        peaks = {t: measure_peak_gflops(t) for t in threads}
        report["peak_gflops"] = {str(t): v for t, v in peaks.items()}
        rows: list[Row] = []
        have_tf = tensorflow_available()
        for t in threads if options.apply else []:
            if have_tf:
                r = _measure(
                    options,
                    {**base, "mode": "keras", "network": nets["peer"], "threads": t},
                )
                rows.append(
                    _row("Keras peer (model.predict, whole slices)", "tomoseg-cnn", "cpu", t, r)
                )
                rows[-1].note = f"max |p - ours| = {r['max_difference']:.1e}"
                rows[-1].extra["max_difference"] = r["max_difference"]
            elif t == threads[0]:
                report["skipped"].append(
                    "Keras peer: TensorFlow is not installed "
                    "(pip install 'napari-tomoseg[benchmark]')"
                )
            for arch in archs:
                for mode, label in (
                    ("naive", "naive PyTorch (whole slices, float32)"),
                    ("memory", "apply_network (in memory)"),
                    ("file", "apply_file (MRC in, MRC out)"),
                ):
                    spec = {**base, "mode": mode, "network": nets[arch], "threads": t}
                    rows.append(_row(label, arch, "cpu", t, _measure(options, spec)))
                for tile, batch in options.tilings:
                    spec = {
                        **base,
                        "mode": "memory",
                        "network": nets[arch],
                        "threads": t,
                        "tile_size": tile,
                        "batch_size": batch,
                    }
                    label = f"apply_network, {tile}-px tiles, batch {batch}"
                    rows.append(_row(label, arch, "cpu", t, _measure(options, spec)))
        if options.apply and options.gpu and torch.cuda.is_available():
            gpu_peak = measure_peak_gflops(1, "cuda")
            report["peak_gflops"]["cuda"] = gpu_peak
            for arch in archs:
                for mode, label in (
                    ("naive", "naive PyTorch (whole slices, float32)"),
                    ("memory", "apply_network (in memory)"),
                    ("file", "apply_file (MRC in, MRC out)"),
                ):
                    spec = {**base, "mode": mode, "network": nets[arch], "device": "cuda"}
                    rows.append(_row(label, arch, "cuda", "-", _measure(options, spec)))
            if options.gpu_target:
                big = work / "target.mrc"
                _write_large(big, GPU_TARGET_SHAPE)
                arch = DEFAULT_ARCHITECTURE
                if arch not in nets:
                    net = untrained_network(arch, options.context_slices)
                    nets[arch] = str(save_network(net, work / f"{arch}.tsnet"))
                    flops[arch] = conv_flops_per_voxel(net.model, net.meta.in_channels)
                spec = {
                    **base,
                    "tomogram": str(big),
                    "mode": "file",
                    "network": nets[arch],
                    "device": "cuda",
                }
                r = _measure(options, spec)
                shape = "x".join(str(s) for s in GPU_TARGET_SHAPE)
                row = _row(f"apply_file, {shape} target", arch, "cuda", "-", r)
                ok = r["seconds"] < GPU_TARGET_SECONDS
                row.note = f"{r['seconds']:.1f} s: {'meets' if ok else 'misses'} the < 10 s target"
                rows.append(row)
                big.unlink()
        else:
            why = (
                "not asked for (--no-apply)"
                if not options.apply
                else "disabled (--no-gpu)"
                if not options.gpu
                else "CUDA is not available here"
            )
            report["skipped"].append(f"GPU rows: {why}")
        training: list[dict[str, Any]] = []
        if options.training:
            for arch in archs:
                spec = {
                    "mode": "train",
                    "architecture": arch,
                    "target": options.train_target,
                    "max_steps": options.train_steps,
                    "eval_every": options.eval_every,
                    "shape": list(options.train_shape),
                    "n_positive": options.n_positive,
                    "n_negative": options.n_negative,
                    "threads": threads[-1],
                }
                training.append({"architecture": arch, **_measure(options, spec)})
    _finish_rows(rows, flops, peaks, report["peak_gflops"].get("cuda"))
    report["rows"] = [asdict(r) for r in rows]
    report["flops_per_voxel"] = flops
    report["parameters"] = params
    report["seed_voxels_per_second"] = SEED_VOXELS_PER_SECOND
    report["training"] = training
    report["default_architecture"] = DEFAULT_ARCHITECTURE
    return report


def _write_large(path: Path, shape: tuple[int, int, int]) -> None:
    """A random float32 MRC of ``shape`` written slice by slice (never whole in memory)."""
    from napari_tomoseg.data.io import new_mrc_mmap

    rng = np.random.default_rng(1)
    with new_mrc_mmap(path, shape, np.float32) as (mrc, data):
        for z in range(shape[0]):
            data[z] = rng.standard_normal(shape[1:], dtype=np.float32)
        mrc.voxel_size = 10.0
        mrc.flush()


def _row(name: str, arch: str, device: str, threads: int | str, r: dict[str, Any]) -> Row:
    return Row(
        name=name,
        architecture=arch,
        device=device,
        threads=threads,
        voxels_per_second=r["voxels_per_second"],
        seconds=r["seconds"],
        peak_rss_mib=r.get("peak_rss_mib"),
        gpu_peak_mib=r.get("gpu_peak_mib"),
        extra={k: v for k, v in r.items() if k in ("notes",)},
    )


def _finish_rows(
    rows: list[Row], flops: dict[str, float], peaks: dict[int, float], gpu_peak: float | None
) -> None:
    """Add GFLOP/s, the fraction of peak, the seed row and the ratios to the Keras peer."""
    for r in rows:
        if r.voxels_per_second is None:
            continue
        per_voxel = flops["peer"] if r.name.startswith("Keras peer") else flops[r.architecture]
        r.gflops = per_voxel * r.voxels_per_second / 1e9
        peak = gpu_peak if r.device == "cuda" else peaks.get(r.threads)  # type: ignore[call-overload]
        r.fraction_of_peak = r.gflops / peak if peak else None
    seed = Row(
        name="seed figure (0.24 CPU-h per 4096x4096 slice)",
        architecture="tomoseg-cnn",
        device="cpu",
        threads=1,
        voxels_per_second=SEED_VOXELS_PER_SECOND,
        note="Chen et al. 2017, other hardware",
    )
    seed.gflops = flops["peer"] * SEED_VOXELS_PER_SECOND / 1e9
    rows.insert(0, seed)
    peer = {
        r.threads: r.voxels_per_second
        for r in rows
        if r.name.startswith("Keras peer") and r.voxels_per_second
    }
    best_peer = max(peer.values()) if peer else None
    for r in rows:
        ref = best_peer if r.device == "cuda" else peer.get(r.threads)
        if ref and r.voxels_per_second:
            r.ratio_to_peer = r.voxels_per_second / ref


def format_report(report: dict[str, Any]) -> str:
    """The printed report: machine, command, throughput, FLOPs, training and verdicts."""
    lines = [
        "# speed: apply throughput, training time, peak memory",
        f"# command: {report['command']}",
        describe_machine(report["machine"]),
    ]
    opts = report["options"]
    lines.append(
        f"# tomogram: {opts['depth']} x {opts['xy']} x {opts['xy']} float32 (random), "
        "untrained networks, default ApplySettings"
    )
    context = opts.get("context_slices", 0)
    lines.append(
        f"# our networks take {2 * context + 1} slice(s) per output slice (context slices "
        f"{context}); the Keras peer takes 1"
    )
    peaks = ", ".join(
        f"{k} thread(s): {v:.0f}" if k != "cuda" else f"GPU float16: {v:.0f}"
        for k, v in report["peak_gflops"].items()
    )
    lines.append(
        "# measured peak GFLOP/s (faster of a 2048^2 matrix product and a 256-channel 3x3 "
        f"convolution, best of 10): {peaks}"
    )
    for s in report["skipped"]:
        lines.append(f"# skipped: {s}")
    for s in report.get("notes", []):
        lines.append(f"# note: {s}")
    lines.append("")
    table = []
    for r in report["rows"]:
        table.append(
            [
                r["name"],
                r["architecture"],
                r["device"],
                r["threads"],
                fmt(r["voxels_per_second"] / 1e6 if r["voxels_per_second"] else None, 3),
                fmt(r["ratio_to_peer"]),
                fmt(r["gflops"], 1),
                fmt(100 * r["fraction_of_peak"] if r["fraction_of_peak"] else None, 1),
                fmt(r["seconds"], 1),
                fmt(r["peak_rss_mib"], 0),
                fmt(r["gpu_peak_mib"], 0),
                r["note"],
            ]
        )
    lines.append(
        markdown_table(
            [
                "row",
                "network",
                "device",
                "threads",
                "Mvoxel/s",
                "x Keras peer",
                "conv GFLOP/s",
                "% of peak",
                "seconds",
                "peak RSS (MiB)",
                "GPU peak (MiB)",
                "note",
            ],
            table,
            align="lllrrrrrrrrl",
        )
    )
    lines.append(
        "# conv GFLOP/s = the network's convolution work per voxel (direct convolution, "
        "table below) x voxels/s; tiling overlap is not counted. The package computes "
        "large-kernel convolutions on a CPU by FFT (fewer operations), so its rows can "
        "exceed 100 % of the peak: read them as direct-convolution equivalents."
    )
    lines.append("")
    lines.append(
        markdown_table(
            ["network", "conv MFLOP per voxel", "parameters"],
            [
                [
                    "tomoseg-cnn, 1 slice (the Keras peer)" if a == "peer" else a,
                    f"{v / 1e6:.3f}",
                    f"{report['parameters'][a]:,}",
                ]
                for a, v in report["flops_per_voxel"].items()
            ],
        )
    )
    if report["training"]:
        o = report["options"]
        lines.append("")
        lines.append(
            f"# training to validation Dice >= {o['train_target']} on the single-membrane "
            f"task ({o['n_positive']} positive, {o['n_negative']} negative boxes of a "
            f"{'x'.join(map(str, o['train_shape']))} simulated tomogram), evaluated every "
            f"{o['eval_every']} mini-batches, at most {o['train_steps']}, "
            f"{report['training'][0]['threads']} thread(s)"
        )
        trows = []
        for t in report["training"]:
            reached = (
                f"step {t['reached_step']}, {t['reached_seconds']:.0f} s"
                if t["reached_step"]
                else f"not reached in {t['steps']} steps"
            )
            trows.append(
                [
                    t["architecture"],
                    reached,
                    f"{t['seconds_per_step']:.2f}",
                    f"{t['best_dice']:.3f} (step {t['best_step']})",
                    fmt(t["peak_rss_mib"], 0),
                ]
            )
        lines.append(
            markdown_table(
                ["network", "target reached", "s / mini-batch", "best val Dice", "peak RSS (MiB)"],
                trows,
                align="llrrr",
            )
        )
    lines.append("")
    lines.extend(verdicts(report))
    return "\n".join(lines)


def verdicts(report: dict[str, Any]) -> list[str]:
    """One line per throughput target, saying whether this run met it."""
    out = []
    rows = report["rows"]
    default = report["default_architecture"]
    for arch, target in (("tomoseg-cnn", TARGET_CNN_RATIO), (default, TARGET_DEFAULT_RATIO)):
        for r in rows:
            if r["name"].startswith("apply_file (") and r["architecture"] == arch:
                if r["device"] != "cpu" or r["ratio_to_peer"] is None:
                    continue
                ok = "meets" if r["ratio_to_peer"] >= target else "misses"
                out.append(
                    f"# target: {arch} apply_file >= {target}x the Keras peer with "
                    f"{r['threads']} thread(s): {r['ratio_to_peer']:.2f}x, {ok} it"
                )
    for r in rows:
        if r["name"].startswith("apply_file,") and "target" in r["name"]:
            out.append(f"# target: GPU {r['name']}: {r['note']}")
    if not any(r["device"] == "cuda" for r in rows):
        out.append("# target: GPU 512x1024x1024 in < 10 s: not measured (no CUDA here)")
    return out


def parse_args(argv: list[str] | None = None) -> tuple[SpeedOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=32, help="slices of the test tomogram")
    parser.add_argument("--xy", type=int, default=1024, help="slice side in pixels")
    parser.add_argument(
        "--threads", type=int, nargs="+", help="CPU thread counts (default: 1 and all CPUs)"
    )
    parser.add_argument("--architectures", nargs="+", help="default: all registered")
    parser.add_argument("--no-training", action="store_true", help="skip the training rows")
    parser.add_argument(
        "--no-apply", action="store_true", help="skip the throughput rows (training only)"
    )
    parser.add_argument("--train-target", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=400, help="most mini-batches")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    parser.add_argument(
        "--context-slices",
        type=int,
        default=None,
        help="context slices of our networks (default: the package's default); the Keras "
        "peer always takes one slice, as EMAN2's network does",
    )
    parser.add_argument(
        "--tilings",
        nargs="+",
        default=[],
        metavar="TILExBATCH",
        help="extra in-memory apply rows with these tile sizes and batch sizes, e.g. 512x8",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (for checking the script; no per-row peak memory)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--json", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        options = quick_options()
    else:
        options = SpeedOptions(
            depth=args.depth,
            xy=args.xy,
            threads=args.threads or [],
            architectures=args.architectures or [],
            training=not args.no_training,
            train_target=args.train_target,
            train_steps=args.train_steps,
            eval_every=args.eval_every,
        )
    if args.quick and args.threads:
        options.threads = args.threads
    if args.quick and args.architectures:
        options.architectures = args.architectures
    options.training = options.training and not args.no_training
    options.apply = not args.no_apply
    options.gpu = not args.no_gpu
    options.in_process = args.in_process
    if args.context_slices is not None:
        if args.context_slices < 0:
            parser.error(f"--context-slices must be >= 0, got {args.context_slices}")
        options.context_slices = args.context_slices
    try:
        options.tilings = [tuple(int(v) for v in t.lower().split("x")) for t in args.tilings]
    except ValueError:
        parser.error("--tilings takes TILExBATCH values such as 512x8")
    return options, args


def main(argv: list[str] | None = None) -> int:
    options, args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    report = run_speed(options)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
