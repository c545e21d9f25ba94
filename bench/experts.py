"""Per-expert throughput: images/s, forward vs pre/post-processing time per image, peak memory.

Each expert is loaded through its normal path (``build_expert`` with a ``weights`` option) from weights
written to a temporary directory, then labels synthetic 480×640 / 640×480 images in batches, as the
runner calls it. The network forward is timed by wrapping the expert's model (CUDA-synchronised);
everything else in ``expert(images)`` (resize, normalisation, transfers, label post-processing) is
reported as pre+post.

* Default: tiny networks from ``tests/tiny_experts.py`` at the real input geometry (480² inputs, OWLv2 at
  960², CharNet at 480², all candidate boxes kept), so pre/post-processing costs are realistic (detection
  and OCR at their worst case: every candidate kept) and the forward is cheap. Meant for CPU.
* ``--full-size``: the real architectures with random weights, built in code (no download), and two
  settings per expert: a Prismer-style baseline (fp16 autocast, Prismer's batch sizes: 64 depth / normal
  / edge, 32 detection / OCR, 4 segmentation; contiguous layout, no compile) and ours (the expert's own
  settings: bf16 autocast on CUDA, channels_last where the expert uses it, its batch size, cudnn
  autotuning; plus ``torch.compile`` when enabled, kept only if it is faster). The speed-up column is
  ours ÷ baseline. On CPU both use fp32 (CPU autocast in fp16 is no baseline anyone runs).

    python bench/experts.py                                   # CPU, tiny configs, all six experts
    python bench/experts.py --experts edge,ocr_detection --images 8 --out /tmp/experts.md
    python bench/experts.py --full-size --device cuda         # real sizes, baseline vs ours
    python bench/experts.py --full-size --device cpu --batch 1 --images 1 --experts edge

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed pass (weights + activations); on
CPU the peak resident set over the timed pass (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident set before the expert was loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expert_zoo import torch_utils
from expert_zoo.base import Expert, Label
from expert_zoo.registry import build_expert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_experts  # noqa: E402 - the tiny builders live with the tests that also use them

logger = logging.getLogger("bench.experts")

TASKS = ("depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection")
PRISMER_BATCH = {
    "depth": 64,
    "normal": 64,
    "edge": 64,
    "seg_coco": 4,
    "obj_detection": 32,
    "ocr_detection": 32,
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# -- weights ----------------------------------------------------------------------------------------------
# What the tiny networks make the post-processing do (their random or biased heads fire everywhere).
TINY_NOTES = {
    "obj_detection": "tiny head, worst case: all 3600 boxes pass, top 1000 to NMS",
    "ocr_detection": "tiny biased head, worst case: every 4×4 cell a word and a char candidate",
}


def tiny_entry(task: str, directory: Path) -> dict[str, Any]:
    """Tiny networks at the real geometry: OWLv2 sees 960² (3600 boxes), CharNet 480² (120² cells)."""
    if task == "obj_detection":
        return tiny_experts.tiny_detection(directory, image_size=960, box_size=0.1)
    if task == "ocr_detection":
        return tiny_experts.tiny_ocr(directory, input_size=480)
    return tiny_experts.TINY_EXPERTS[task](directory)


def full_size_entry(task: str, directory: Path) -> dict[str, Any]:
    """The real architecture with random weights, saved where the expert loads it from."""
    builders: dict[str, Callable[[Path], dict[str, Any]]] = {
        "depth": _full_dpt_hybrid,
        "normal": _full_nll_angmf,
        "edge": _full_dexined,
        "seg_coco": _full_mask2former,
        "obj_detection": _full_owlv2,
        "ocr_detection": _full_charnet,
    }
    with tiny_experts.seeded(0):
        return builders[task](directory)


def _full_dpt_hybrid(directory: Path) -> dict[str, Any]:
    from transformers import DPTForDepthEstimation

    from expert_zoo.convert_dpt import hybrid_config

    path = directory / "dpt_hybrid"
    DPTForDepthEstimation(hybrid_config()).save_pretrained(path)
    return {"name": "depth:dpt_hybrid", "options": {"weights": str(path)}}


def _full_nll_angmf(directory: Path) -> dict[str, Any]:
    from expert_zoo.nets.nll_angmf import NLLAngMF

    path = directory / "nll_angmf_b5.pt"
    torch.save({"model": NLLAngMF().state_dict()}, path)
    return {"name": "normal:nll_angmf", "options": {"weights": str(path), "arch": "b5"}}


def _full_dexined(directory: Path) -> dict[str, Any]:
    from expert_zoo.nets.dexined import DexiNed

    path = directory / "dexined.pth"
    torch.save(DexiNed().state_dict(), path)
    return {"name": "edge:dexined", "options": {"weights": str(path)}}


def _full_mask2former(directory: Path) -> dict[str, Any]:
    """Mask2Former with a Swin-L (IN-21k, 384, window 12) backbone, 200 queries, 133 COCO-panoptic classes."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        image_size=384,
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=200, num_labels=133)
    path = directory / "mask2former_swin_large"
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    return {"name": "seg_coco:mask2former", "options": {"weights": str(path)}}


def _full_owlv2(directory: Path) -> dict[str, Any]:
    """OWLv2 base/16 at 960² (CLIP ViT-B/16 image tower, 12-layer 512-wide text tower).

    CLIP's BPE tokenizer cannot be fetched offline; a word-level tokenizer over the 722 class prompts
    stands in. It only changes the text tower's input ids, which run once at load time, not per image.
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    tokenizer = tiny_experts.prismer_prompt_tokenizer()
    config = Owlv2Config(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 960,
            "patch_size": 16,
        },
        projection_dim=512,
    )
    path = directory / "owlv2_base_patch16"
    Owlv2ForObjectDetection(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"name": "obj_detection:owlv2", "options": {"weights": str(path)}}


def _full_charnet(directory: Path) -> dict[str, Any]:
    from expert_zoo.nets.charnet import CharNet

    path = directory / "charnet_hourglass88.pth"
    torch.save(CharNet().state_dict(), path)
    return {"name": "ocr_detection:charnet", "options": {"weights": str(path)}}


# -- settings and measurements ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """How one timed pass configures an expert."""

    label: str
    batch: int | None  # None: the expert's own default for the device
    dtype: str  # autocast dtype forced on the forward; "auto" = the expert's choice
    contiguous: bool  # undo channels_last (Prismer's layout) on the model and its inputs
    compile: bool
    cudnn_benchmark: bool


@dataclasses.dataclass
class Result:
    task: str
    setting: Setting
    weights: str
    batch: int = 0
    dtype: str = ""
    images: int = 0
    seconds: float = 0.0
    forward_s: float = 0.0
    warmup_s: float = 0.0
    peak_mib: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    failed: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class ForwardClock:
    """Accumulates time spent in network forwards (CUDA-synchronised on both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._active = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self._active:  # a timed call inside another: count it once
            yield
            return
        self._sync()
        started = time.perf_counter()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._sync()
            self.seconds += time.perf_counter() - started


class TimedModel(torch.nn.Module):
    """Stands in for ``expert.model``: times each call, optionally feeding contiguous (NCHW) inputs."""

    def __init__(self, model: torch.nn.Module, clock: ForwardClock, contiguous: bool) -> None:
        super().__init__()
        self.eager = model
        self.runner: Callable[..., Any] = model
        self.clock = clock
        self.contiguous = contiguous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.contiguous:
            args = tuple(_contiguous(a) for a in args)
            kwargs = {k: _contiguous(v) for k, v in kwargs.items()}
        with self.clock.measure():
            return self.runner(*args, **kwargs)


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.contiguous_format)
    return value


class Instrumented:
    """An expert with its forward timed and, when asked, compiled; ``uncompile`` falls back to eager."""

    # OWLv2's expert calls these model methods per batch (the text tower runs once, at load time).
    _OWL_METHODS = ("image_embedder", "class_predictor", "box_predictor")

    def __init__(self, expert: Expert, setting: Setting, clock: ForwardClock) -> None:
        self.expert = expert
        self.owl = expert.spec.task == "obj_detection"
        model = expert.model
        if setting.contiguous:
            model.to(memory_format=torch.contiguous_format)
        if self.owl:
            self.vision = model.owlv2.vision_model
            for name in self._OWL_METHODS:
                setattr(model, name, _timed(getattr(model, name), clock))
            if setting.compile:
                model.owlv2.vision_model = torch.compile(self.vision)
        else:
            self.timed = TimedModel(model, clock, setting.contiguous)
            if setting.compile:
                self.timed.runner = torch.compile(model)
            expert.model = self.timed

    def uncompile(self) -> None:
        if self.owl:
            self.expert.model.owlv2.vision_model = self.vision
        else:
            self.timed.runner = self.timed.eager


def _timed(method: Callable[..., Any], clock: ForwardClock) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with clock.measure():
            return method(*args, **kwargs)

    return call


@contextlib.contextmanager
def forced_autocast(expert: Expert, dtype: str) -> Iterator[None]:
    """Make the expert's forward run at ``dtype`` (a neural expert's ``inference()`` reads ``dtype``)."""
    if dtype == "auto":
        yield
        return
    original = expert.dtype
    expert.dtype = dtype
    try:
        yield
    finally:
        expert.dtype = original


class PeakMemory:
    """CUDA: peak allocated; CPU: peak resident set (VmHWM) minus the resident set at ``mark_baseline``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_mib = 0.0
        self.resettable = device.type == "cuda" or _reset_hwm()

    def mark_baseline(self) -> None:
        if self.device.type != "cuda":
            self.baseline_mib = _proc_status_mib("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_hwm()

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.resettable:
            return None
        return _proc_status_mib("VmHWM") - self.baseline_mib


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


# -- one timed pass ---------------------------------------------------------------------------------------
def bench_images(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Deterministic photos-ish images (gradients, a square, noise), alternating landscape and portrait."""
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        height, width = size if index % 2 == 0 else size[::-1]
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y + 40 * index) % 256], axis=-1)
        base[height // 4 : height // 2, width // 4 : width // 2] = 230
        images.append(np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8))
    return images


def depth_labels(images: Sequence[np.ndarray]) -> list[Label]:
    """Stand-in depth labels for the detector (its instance map needs one per image)."""
    labels = []
    for image in images:
        height, width = image.shape[:2]
        ramp = np.linspace(0, 255, height, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
        labels.append(Label(map=ramp.astype(np.uint8)))
    return labels


def default_batch(expert: Expert) -> int:
    return int(getattr(expert, "batch_size", expert.spec.batch_size))


def set_batch(expert: Expert, batch: int) -> None:
    """Every expert reads ``config["batch_size"]`` or ``spec.batch_size``; set both."""
    expert.config["batch_size"] = batch
    expert.spec = dataclasses.replace(expert.spec, batch_size=batch)


def resolved_dtype(setting: Setting, device: torch.device) -> str:
    dtype = setting.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return _SHORT_DTYPE[dtype]


def run_setting(
    task: str,
    entry: dict[str, Any],
    setting: Setting,
    images: list[np.ndarray],
    device: torch.device,
    warmup: int,
    weights: str,
) -> Result:
    """Load the expert, apply ``setting``, warm up, then time one pass over ``images``."""
    result = Result(task, setting, weights, dtype=resolved_dtype(setting, device), images=len(images))
    if weights == "tiny" and task in TINY_NOTES:
        result.notes.append(TINY_NOTES[task])
    memory = PeakMemory(device)
    memory.mark_baseline()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    expert = build_expert(entry["name"], device=str(device), options=entry["options"])
    batch = min(setting.batch or default_batch(expert), len(images))
    set_batch(expert, batch)
    result.batch = batch
    clock = ForwardClock(device)
    instrumented = Instrumented(expert, setting, clock)
    deps = {"depth": depth_labels(images)} if "depth" in expert.spec.requires else {}
    with forced_autocast(expert, setting.dtype):
        result.warmup_s = _warm_up(expert, instrumented, setting, images[:batch], deps, warmup, result)
        clock.seconds = 0.0
        memory.reset()
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            chunk_deps = {k: v[start : start + batch] for k, v in deps.items()}
            expert(images[start : start + batch], chunk_deps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - started
    result.forward_s = clock.seconds
    result.peak_mib = memory.peak_mib()
    return result  # the caller releases memory once the expert is out of scope


def _warm_up(
    expert: Expert,
    instrumented: Instrumented,
    setting: Setting,
    images: list[np.ndarray],
    deps: dict[str, list[Label]],
    rounds: int,
    result: Result,
) -> float:
    """Untimed passes over one batch (compiles, autotunes); a failed compile falls back to eager."""
    chunk_deps = {k: v[: len(images)] for k, v in deps.items()}
    started = time.perf_counter()
    for _ in range(rounds):
        try:
            expert(images, chunk_deps)
        except Exception as exc:  # noqa: BLE001 - compilers fail in many ways; report it, run eager
            if not setting.compile:
                raise
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            logger.warning("torch.compile failed for %s (%s); timing eager", expert.spec.name, reason)
            result.notes.append(f"compile failed, eager: {reason}")
            instrumented.uncompile()
            expert(images, chunk_deps)
    return time.perf_counter() - started


def _release(device: torch.device) -> None:
    """Free the last expert, and hand freed heap back to the OS so the next CPU memory baseline is low."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the baseline is just higher
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- the benchmark ----------------------------------------------------------------------------------------
def settings_for(task: str, args: argparse.Namespace, device: torch.device) -> list[Setting]:
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and args.full_size)
    ours = Setting("ours", args.batch, args.dtype, False, False, cudnn_benchmark=True)
    if not args.full_size:
        return [dataclasses.replace(ours, compile=compile_on)]
    baseline = Setting(
        "Prismer-style",
        PRISMER_BATCH[task],
        "float16" if device.type == "cuda" else "float32",
        contiguous=True,
        compile=False,
        cudnn_benchmark=False,
    )
    settings = [baseline, ours]
    if compile_on:
        settings.append(dataclasses.replace(ours, label="ours+compile", compile=True))
    return settings


def bench_task(
    task: str, args: argparse.Namespace, device: torch.device, images: list[np.ndarray]
) -> list[Result]:
    weights = "full-size, random" if args.full_size else "tiny"
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix=f"bench_{task}_") as tmp:
        started = time.perf_counter()
        try:
            entry = full_size_entry(task, Path(tmp)) if args.full_size else tiny_entry(task, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - one expert's failure is reported in its row
            logger.exception("building %s weights failed", task)
            failed = Result(task, Setting("-", None, "auto", False, False, False), weights, failed=True)
            failed.notes.append(f"weights not built: {type(exc).__name__}: {exc}"[:160])
            return [failed]
        logger.info("%s: weights written in %.1f s", task, time.perf_counter() - started)
        for setting in settings_for(task, args, device):
            logger.info("%s: timing %s", task, setting.label)
            try:
                results.append(run_setting(task, entry, setting, images, device, args.warmup, weights))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at Prismer's batch size
                logger.exception("%s (%s) failed", task, setting.label)
                failed = Result(task, setting, weights, failed=True)
                failed.notes.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
                results.append(failed)
            finally:
                _release(device)
    return results


def speed_ups(results: list[Result]) -> dict[str, tuple[float, str]]:
    """Per task: best "ours*" images/s ÷ the Prismer-style baseline's, and which setting was best."""
    out = {}
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task and not r.failed]
        base = [r for r in rows if r.setting.label == "Prismer-style"]
        ours = [r for r in rows if r.setting.label.startswith("ours")]
        if base and ours and base[0].images_per_s > 0:
            best = max(ours, key=lambda r: r.images_per_s)
            out[task] = (best.images_per_s / base[0].images_per_s, best.setting.label)
    return out


def format_table(results: list[Result], args: argparse.Namespace, device: torch.device, command: str) -> str:
    import transformers

    lines = [
        "## Expert throughput",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {device_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} CPU threads. Images: {args.images} synthetic, "
        f"{args.size[0]}×{args.size[1]} and {args.size[1]}×{args.size[0]} alternating.",
        f"Weights: {'full-size architectures, random init' if args.full_size else 'tiny test networks'}. "
        "Forward = network calls (synchronised on CUDA); pre+post = the rest of the expert call.",
        f"Peak memory: {MEMORY_NOTE['cuda' if device.type == 'cuda' else 'cpu']}.",
        "",
        "| expert | setting | batch | autocast | compile | img/s | forward ms/img | pre+post ms/img "
        "| peak MiB | warm-up s | speed-up | notes |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    gains = speed_ups(results)
    for r in results:
        per_image = 1000 / r.images if r.images else 0.0
        gain = ""
        if r.task in gains and r.setting.label == gains[r.task][1]:
            gain = f"{gains[r.task][0]:.2f}×"
        cells = [
            r.task,
            r.setting.label,
            str(r.batch or "-"),
            r.dtype or "-",
            "yes" if r.setting.compile and not any("compile failed" in n for n in r.notes) else "no",
            f"{r.images_per_s:.2f}" if not r.failed else "failed",
            f"{r.forward_s * per_image:.1f}" if not r.failed else "-",
            f"{(r.seconds - r.forward_s) * per_image:.1f}" if not r.failed else "-",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
            f"{r.warmup_s:.1f}" if not r.failed else "-",
            gain,
            "; ".join(r.notes).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if gains:
        summary = ", ".join(f"{task} {gain:.2f}× ({label})" for task, (gain, label) in gains.items())
        lines += ["", f"Speed-up, ours ÷ Prismer-style: {summary}."]
        if device.type != "cuda":
            lines.append(
                "On CPU both settings run fp32, contiguous and eager: only the batch size differs, "
                "so the speed-up is mostly noise; the comparison is meant for CUDA."
            )
    return "\n".join(lines) + "\n"


MEMORY_NOTE = {
    "cuda": "torch.cuda.max_memory_allocated over the timed pass (weights + activations)",
    "cpu": "peak resident set over the timed pass minus the resident set before the expert was loaded",
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default=",".join(TASKS), help=f"comma-separated tasks of {TASKS}")
    parser.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N")
    parser.add_argument("--batch", type=int, help="batch size for 'ours' (default: each expert's own)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="autocast dtype for 'ours'")
    parser.add_argument("--images", type=int, help="images per timed pass (default: 8 CPU, 128 CUDA)")
    parser.add_argument("--size", type=parse_size, default=(480, 640), help="HxW; alternates with WxH")
    parser.add_argument("--full-size", action="store_true", help="real architectures, random weights")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the forward (auto: with --full-size on CUDA, as an extra 'ours+compile' row)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over one batch first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("expert_zoo").setLevel(logging.ERROR)  # e.g. per-image "too many words" warnings
    tasks = [t.strip() for t in args.experts.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown expert task(s) {unknown}; choose from {TASKS}")
    device = torch_utils.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.images is None:
        args.images = 128 if device.type == "cuda" else (2 if args.full_size else 8)
    images = bench_images(args.images, args.size)
    results: list[Result] = []
    for task in tasks:
        results += bench_task(task, args, device, images)
    command = shlex.join(["python", "bench/experts.py", *argv])
    table = format_table(results, args, device, command)
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
