"""OCR reward (FlowGRPO): how much of the prompt's quoted text an OCR engine reads in the image.

The score of one image is a pure function of its prompt and the recognised text (`text_reward`):

    target     = the text between the first pair of ASCII double quotes of the prompt
    normalise  = remove ASCII spaces (U+0020 only), lowercase (both target and recognised text)
    distance   = 0 if target is a substring of recognised, else Levenshtein(recognised, target)
    reward     = 1 - min(distance, len(target)) / len(target)          (in [0, 1])

The recognised text comes from an OCR engine behind one small protocol (`OCREngine.recognize`):
each engine turns its library's own output into `OCRLine`s with a pure adapter function
(`lines_from_rapidocr`, `lines_from_paddleocr`, `lines_from_tesseract`), then `recognized_text`
puts the lines in reading order and joins those with confidence > 0.

Engines:
    rapidocr   (default) PP-OCR ONNX det + rec models shipped inside the `rapidocr` wheel, run by
               onnxruntime; fully offline. `pip install 'flowrl[ocr]'`.
    paddleocr  PaddleOCR 2.x with en_PP-OCRv3 det + en_PP-OCRv4 rec, angle classifier off (what
               FlowGRPO used). `pip install 'flowrl[paddleocr]'` plus paddlepaddle.
    tesseract  Tesseract through pytesseract. `pip install 'flowrl[tesseract]'` and
               `apt install tesseract-ocr`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
from pydantic import Field
from rapidfuzz.distance import Levenshtein
from torch import Tensor

from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.registry import register
from flowrl.rewards.base import as_float_images, check_batch
from flowrl.rewards.models import ModelRewardConfig, RewardInfo, resolve_device, shared
from flowrl.types import RewardOutput

QUOTE_HINT = (
    'quote the text the image should show with ASCII double quotes, e.g. `a sign that says "OPEN"` '
    "(curly quotes \u201c\u201d and single quotes do not count)"
)


# --------------------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Remove the ASCII space U+0020 and lowercase, exactly as FlowGRPO compares texts
    (``text.replace(' ', '').lower()``): tabs, newlines, NBSP (U+00A0) and the ideographic space
    (U+3000) are kept and count as characters of the edit distance."""
    return text.replace(" ", "").lower()


def _short(prompt: str, limit: int = 160) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


def _quote_problem(prompt: str) -> str | None:
    """Why `prompt` has no usable quoted target, or None when it has one."""
    start = prompt.find('"')
    end = prompt.find('"', start + 1) if start >= 0 else -1
    if start < 0:
        curly = any(q in prompt for q in "\u201c\u201d\u201e")
        return "has no ASCII double quote" + (" (only curly quotes)" if curly else "")
    if end < 0:
        return "has an opening double quote but no closing one"
    if not normalize_text(prompt[start + 1 : end]):
        return "has an empty quoted text"
    return None


def quoted_target(prompt: str) -> str:
    """The text between the first pair of ASCII double quotes, as written (not normalised).

    Example: ``quoted_target('a sign that says "Open Late" in neon') == "Open Late"``.

    Raises:
        FlowrlError: no pair of double quotes, or only spaces between them; the message names
            the prompt and how to fix it.
    """
    problem = _quote_problem(prompt)
    if problem is not None:
        raise FlowrlError(
            f"the ocr reward cannot score prompt {_short(prompt)!r}: it {problem}, so there is no "
            f"target text to compare the OCR output with; {QUOTE_HINT}"
        )
    start = prompt.index('"')
    return prompt[start + 1 : prompt.index('"', start + 1)]


def target_reward(target: str, recognized: str) -> float:
    """1 - min(distance, len) / len for an already extracted (not necessarily normalised) target.

    Raises:
        FlowrlError: the target is empty after removing spaces.
    """
    goal, seen = normalize_text(target), normalize_text(recognized)
    if not goal:
        raise FlowrlError(f"the ocr reward's target {target!r} is empty after removing spaces; {QUOTE_HINT}")
    distance = 0 if goal in seen else Levenshtein.distance(seen, goal)
    return 1.0 - min(distance, len(goal)) / len(goal)


def text_reward(prompt: str, recognized: str) -> float:
    """FlowGRPO's OCR reward of one image, in [0, 1].

    Args:
        prompt: the prompt; its first double-quoted span is the target text.
        recognized: the text the OCR engine read in the image (lines already joined).

    Returns:
        1 when the normalised target is a substring of the normalised recognised text, else
        1 - min(Levenshtein(recognised, target), len(target)) / len(target), lengths counted after
        removing ASCII spaces.

    Raises:
        FlowrlError: the prompt has no (non-empty) quoted target.
    """
    return target_reward(quoted_target(prompt), recognized)


# --------------------------------------------------------------------------------------------------
# Engine output -> lines -> text (pure functions, tested on each library's documented output)
# --------------------------------------------------------------------------------------------------


class OCRLine(NamedTuple):
    """One recognised text line.

    Attributes:
        text: the line's text.
        confidence: the engine's confidence in [0, 1].
        box: (left, top, right, bottom) in pixels of the input image.
    """

    text: str
    confidence: float
    box: tuple[float, float, float, float]


def _box_from_points(points: Any) -> tuple[float, float, float, float]:
    """[[x, y], ...] (4 corner points, any order) -> (left, top, right, bottom)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def lines_from_rapidocr(output: Any) -> list[OCRLine]:
    """Lines of one rapidocr 3.x result (`RapidOCR()(image)`).

    Args:
        output: a `RapidOCROutput` (or anything with the same attributes): ``boxes`` float [N, 4, 2]
            corner points, ``txts`` N strings, ``scores`` N floats; each is None when nothing was
            found. Lines under the engine's ``text_score`` are already dropped by rapidocr.
    """
    boxes, txts, scores = getattr(output, "boxes", None), getattr(output, "txts", None), getattr(output, "scores", None)
    if boxes is None or txts is None or scores is None:
        return []
    return [OCRLine(str(t), float(s), _box_from_points(b)) for b, t, s in zip(boxes, txts, scores, strict=True)]


def lines_from_paddleocr(page: Sequence[Any] | None) -> list[OCRLine]:
    """Lines of one image of a PaddleOCR 2.x result.

    ``PaddleOCR.ocr(img, cls=False)`` returns one entry per image: ``result[0]`` is either None
    (nothing found) or a list of ``[box_points, (text, confidence)]`` with box_points four [x, y]
    corners. Lines under ``drop_score`` are already dropped by PaddleOCR.

    Args:
        page: ``result[0]`` for a single image.
    """
    if not page:
        return []
    return [OCRLine(str(rec[0]), float(rec[1]), _box_from_points(points)) for points, rec in page]


def lines_from_tesseract(data: Mapping[str, Sequence[Any]], min_confidence: float) -> list[OCRLine]:
    """Lines of a pytesseract ``image_to_data(..., output_type=Output.DICT)`` result.

    The dict holds parallel lists, one item per layout element (page, block, paragraph, line,
    word); only words have text and a confidence in [0, 100] (other levels have conf -1). Words are
    grouped into lines by (page_num, block_num, par_num, line_num). Tesseract has no drop
    threshold of its own, so words under `min_confidence` are dropped here.

    Args:
        data: the dict (keys text, conf, left, top, width, height, page_num, block_num, par_num,
            line_num, word_num; values may be str or numbers depending on the pytesseract version).
        min_confidence: in [0, 1]; words with conf / 100 below it are dropped.

    Returns:
        One line per tesseract line with words joined by spaces, its confidence the mean of its
        words' and its box their union.
    """
    words: dict[tuple[int, ...], list[tuple[int, str, float, tuple[float, float, float, float]]]] = defaultdict(list)
    for i, text in enumerate(data["text"]):
        text = str(text).strip()
        conf = float(data["conf"][i]) / 100.0
        if not text or conf < 0 or conf < min_confidence:
            continue
        key = tuple(int(data[k][i]) for k in ("page_num", "block_num", "par_num", "line_num") if k in data)
        left, top = float(data["left"][i]), float(data["top"][i])
        box = (left, top, left + float(data["width"][i]), top + float(data["height"][i]))
        words[key].append((int(data["word_num"][i]) if "word_num" in data else i, text, conf, box))
    lines = []
    for group in words.values():
        group.sort()
        boxes = np.array([w[3] for w in group])
        box = (float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max()))
        lines.append(OCRLine(" ".join(w[1] for w in group), float(np.mean([w[2] for w in group])), box))
    return lines


def reading_order(lines: Sequence[OCRLine]) -> list[OCRLine]:
    """Lines top to bottom, and left to right within a row.

    Sorted by the box's top, then left; a line whose top lies less than half a line height below
    the first line of the current row joins that row (detectors rarely give two boxes of one row
    the same top pixel, and "OPEN" + "LATE" must not come out as "LATE" + "OPEN").
    """
    rows: list[list[OCRLine]] = []
    for line in sorted(lines, key=lambda ln: (ln.box[1], ln.box[0])):
        if rows:
            first = rows[-1][0]
            height = min(first.box[3] - first.box[1], line.box[3] - line.box[1])
            if line.box[1] - first.box[1] < 0.5 * height:
                rows[-1].append(line)
                continue
        rows.append([line])
    return [line for row in rows for line in sorted(row, key=lambda ln: ln.box[0])]


def recognized_text(lines: Sequence[OCRLine]) -> str:
    """The lines with confidence > 0 in reading order, joined by spaces (spaces do not matter to
    the reward; they keep the text readable in logs)."""
    return " ".join(line.text for line in reading_order(lines) if line.confidence > 0)


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------


class OCREngine(Protocol):
    """What the reward needs from an OCR library."""

    name: str

    def recognize(self, images: Sequence[np.ndarray]) -> list[list[OCRLine]]:
        """Lines per image for uint8 RGB images, each [H, W, 3]."""
        ...


def _onnx_pair(folder: Path, what: str) -> tuple[Path, Path]:
    """The one detection and one recognition ONNX file in `folder` (names containing det / rec)."""
    det = sorted(p for p in folder.glob("*.onnx") if "det" in p.name.lower())
    rec = sorted(p for p in folder.glob("*.onnx") if "rec" in p.name.lower())
    if len(det) != 1 or len(rec) != 1:
        found = ", ".join(p.name for p in sorted(folder.glob("*.onnx"))) or "no .onnx files"
        raise ModelNotFoundError(
            f"reward 'ocr' (rapidocr): {what} {folder} must hold exactly one detection model "
            f"(*det*.onnx) and one recognition model (*rec*.onnx), found: {found}. Set `model:` to a "
            "folder with one of each (RapidOCR-format ONNX files, recognition dictionary embedded)"
        )
    return det[0], rec[0]


class RapidOCREngine:
    """rapidocr 3.x on onnxruntime, with the PP-OCR det/rec ONNX models its wheel ships.

    The model files are passed to rapidocr by path, so it never looks for (or downloads) its
    default models; the angle classifier is off, as in FlowGRPO.
    """

    name = "rapidocr"

    #: Detector input size rule of PaddleOCR 2.x (longest side at most 960 px), which FlowGRPO's
    #: scores were computed with; rapidocr's own default upsamples every image to 736 px on its
    #: shortest side, which is slower on 512 px samples and changes nothing on clean text.
    DET_LIMIT = {"Det.limit_type": "max", "Det.limit_side_len": 960}

    def __init__(self, model: str | None, min_confidence: float, device: str, threads: int):
        try:
            import onnxruntime
            import rapidocr
            from rapidocr import RapidOCR
        except ImportError as err:
            raise FlowrlError(
                f"the ocr reward's rapidocr engine needs the rapidocr and onnxruntime packages ({err}); "
                "install them with `pip install 'flowrl[ocr]'`, or choose `engine: tesseract` / `engine: paddleocr`"
            ) from None
        if model is None:
            folder, what = Path(rapidocr.__file__).parent / "models", f"rapidocr {_version('rapidocr')}'s model folder"
        else:
            folder, what = Path(model).expanduser(), "the folder"
            if not folder.is_dir():
                raise ModelNotFoundError(
                    f"reward 'ocr' (rapidocr): model {model!r} is not a folder; set `model:` to a folder holding "
                    "one *det*.onnx and one *rec*.onnx file, or leave it unset for the models shipped with rapidocr"
                )
        self.det_path, self.rec_path = _onnx_pair(folder, what)
        use_cuda = self._use_cuda(device, onnxruntime.get_available_providers())
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.use_cls": False,
            "Global.text_score": float(min_confidence),
            "Det.model_path": str(self.det_path),
            "Rec.model_path": str(self.rec_path),
            "EngineConfig.onnxruntime.intra_op_num_threads": threads if threads > 0 else -1,
            "EngineConfig.onnxruntime.use_cuda": use_cuda is not None,
            **self.DET_LIMIT,
        }
        if use_cuda is not None:
            params["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] = use_cuda
        self.device = f"cuda:{use_cuda}" if use_cuda is not None else "cpu"
        self.ocr = RapidOCR(params=params)

    @staticmethod
    def _use_cuda(device: str, providers: Sequence[str]) -> int | None:
        """The CUDA device index to run on, or None for the CPU."""
        dev = resolve_device(device)
        if dev.type != "cuda":
            return None
        if "CUDAExecutionProvider" in providers:
            return dev.index or 0
        if device == "auto":
            return None  # 'auto' means "the best this install can do": CPU onnxruntime runs on the CPU
        raise FlowrlError(
            f"the ocr reward was asked to run rapidocr on {device!r}, but this onnxruntime has no CUDA provider "
            f"(available: {', '.join(providers)}); `pip install onnxruntime-gpu` in place of onnxruntime, or set "
            "the reward's `device: cpu` (OCR on CPU is what FlowGRPO does)"
        )

    def recognize(self, images: Sequence[np.ndarray]) -> list[list[OCRLine]]:
        # rapidocr reads numpy input as OpenCV's BGR
        return [lines_from_rapidocr(self.ocr(np.ascontiguousarray(im[..., ::-1]))) for im in images]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


class PaddleOCREngine:
    """PaddleOCR 2.x, English det (en_PP-OCRv3) + rec (en_PP-OCRv4), angle classifier off.

    PaddleOCR downloads missing models on construction; flowrl checks they are present first and
    refuses with instructions instead, so nothing is fetched behind the user's back.
    """

    name = "paddleocr"
    DET_URL = "https://paddleocr.bj.bcebos.com/PP-OCRv3/english/en_PP-OCRv3_det_infer.tar"
    REC_URL = "https://paddleocr.bj.bcebos.com/PP-OCRv4/english/en_PP-OCRv4_rec_infer.tar"

    def __init__(self, model: str | None, min_confidence: float, device: str, threads: int):
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError as err:
            raise FlowrlError(
                f"the ocr reward's paddleocr engine needs PaddleOCR 2.x and PaddlePaddle ({err}); install them "
                "with `pip install 'flowrl[paddleocr]' paddlepaddle`, or use the default `engine: rapidocr`"
            ) from None
        found = getattr(paddleocr, "__version__", _version("paddleocr"))
        if not str(found).startswith("2."):
            raise FlowrlError(
                f"the ocr reward's paddleocr engine needs PaddleOCR 2.x (the `ocr()` API FlowGRPO used), found "
                f"{found}; install it with `pip install 'paddleocr>=2.7,<3'`"
            )
        self.det_dir, self.rec_dir = self.model_dirs(model)
        logging.getLogger("ppocr").setLevel(logging.ERROR)
        dev = resolve_device(device)
        self.ocr = PaddleOCR(
            lang="en",
            ocr_version="PP-OCRv4",
            use_angle_cls=False,
            det_model_dir=str(self.det_dir),
            rec_model_dir=str(self.rec_dir),
            # PaddleOCR downloads a classifier even when it is off; point it at a folder that has
            # model files so it does not (use_angle_cls=False means it is never loaded)
            cls_model_dir=str(self.det_dir),
            drop_score=float(min_confidence),
            use_gpu=dev.type == "cuda",
            gpu_id=dev.index or 0,
            show_log=False,
            **({"cpu_threads": threads} if threads > 0 else {}),
        )

    @classmethod
    def model_dirs(cls, model: str | None) -> tuple[Path, Path]:
        """(det, rec) inference folders: `<model>/det` and `<model>/rec`, or PaddleOCR's own cache.

        Raises:
            ModelNotFoundError: a folder without inference.pdmodel + inference.pdiparams.
        """
        if model is not None:
            root = Path(model).expanduser()
            det, rec = root / "det", root / "rec"
            where = f"`model: {model}` (expects det/ and rec/ inside)"
        else:
            base = Path(os.environ.get("PADDLE_OCR_BASE_DIR", Path.home() / ".paddleocr"))
            det = base / "whl" / "det" / "en" / "en_PP-OCRv3_det_infer"
            rec = base / "whl" / "rec" / "en" / "en_PP-OCRv4_rec_infer"
            where = "PaddleOCR's model cache"
        missing = [d for d in (det, rec) if not all((d / f).is_file() for f in ("inference.pdmodel", "inference.pdiparams"))]
        if missing:
            raise ModelNotFoundError(
                f"reward 'ocr' (paddleocr): no PaddleOCR inference model (inference.pdmodel + inference.pdiparams) in "
                f"{', '.join(map(str, missing))} ({where}). flowrl never downloads weights implicitly. On a machine with "
                f"network, download {cls.DET_URL} and {cls.REC_URL}, extract them into {det} and {rec} (or into "
                "<folder>/det and <folder>/rec and set the reward's `model: <folder>`), or use the default "
                "`engine: rapidocr`, whose models ship with the package"
            )
        return det, rec

    def recognize(self, images: Sequence[np.ndarray]) -> list[list[OCRLine]]:
        # PaddleOCR reads numpy input as OpenCV's BGR; one image per call (a list means "no det")
        return [lines_from_paddleocr(self.ocr.ocr(np.ascontiguousarray(im[..., ::-1]), cls=False)[0]) for im in images]


class TesseractEngine:
    """Tesseract (English) through pytesseract; CPU only. `model` is a tessdata folder, if given."""

    name = "tesseract"

    def __init__(self, model: str | None, min_confidence: float, device: str, threads: int):
        try:
            import pytesseract
        except ImportError:
            raise FlowrlError(
                "the ocr reward's tesseract engine needs pytesseract and the tesseract program; install them with "
                "`pip install 'flowrl[tesseract]'` and `apt install tesseract-ocr` (or use the default `engine: rapidocr`)"
            ) from None
        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError:
            raise FlowrlError(
                "the ocr reward's tesseract engine cannot find the `tesseract` program; install it with "
                "`apt install tesseract-ocr` (Debian/Ubuntu) or your system's package manager, and put it on PATH"
            ) from None
        self.config = ""
        if model is not None:
            tessdata = Path(model).expanduser()
            if not tessdata.is_dir():
                raise ModelNotFoundError(
                    f"reward 'ocr' (tesseract): model {model!r} is not a folder; set `model:` to a tessdata folder "
                    "holding eng.traineddata, or leave it unset for the system's tessdata"
                )
            self.config = f'--tessdata-dir "{tessdata}"'
        self.pytesseract = pytesseract
        self.min_confidence = min_confidence

    def recognize(self, images: Sequence[np.ndarray]) -> list[list[OCRLine]]:
        from PIL import Image

        out = []
        for im in images:
            data = self.pytesseract.image_to_data(
                Image.fromarray(im), lang="eng", config=self.config, output_type=self.pytesseract.Output.DICT
            )
            out.append(lines_from_tesseract(data, self.min_confidence))
        return out


ENGINES: dict[str, type] = {"rapidocr": RapidOCREngine, "paddleocr": PaddleOCREngine, "tesseract": TesseractEngine}


def load_engine(engine: str, model: str | None, min_confidence: float, device: str, threads: int) -> OCREngine:
    """One engine instance per process and setting (`flowrl.rewards.models.shared`)."""
    key = ("ocr", engine, model, float(min_confidence), device, threads)
    return shared(key, lambda: ENGINES[engine](model, min_confidence, device, threads))


# --------------------------------------------------------------------------------------------------
# The reward stage
# --------------------------------------------------------------------------------------------------


def to_uint8_hwc(images: Tensor) -> list[np.ndarray]:
    """float [B, 3, H, W] in [0, 1] -> B uint8 RGB arrays [H, W, 3]."""
    arr = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return list(arr)


@register("reward", "ocr")
class OCRReward:
    """FlowGRPO's text-rendering reward: 1 - capped normalised edit distance between the prompt's
    quoted text and what an OCR engine reads in the image (see `text_reward`)."""

    info = RewardInfo(
        measures="text rendering: the prompt's quoted text vs what OCR reads (1 - capped edit distance)",
        model="PP-OCR det+rec ONNX shipped in rapidocr (or PaddleOCR 2.x en_PP-OCRv3/v4, or Tesseract)",
        licence="Apache-2.0 (PP-OCR models, rapidocr, PaddleOCR, Tesseract)",
        extra="",  # the default backend/engine needs nothing beyond the default install
    )

    class Config(ModelRewardConfig):
        kind: Literal["ocr"] = "ocr"
        engine: Literal["rapidocr", "paddleocr", "tesseract"] = Field(
            "rapidocr", description="OCR library: rapidocr (default, offline, models in the wheel), paddleocr 2.x, tesseract."
        )
        model: str | None = Field(
            None,
            description=(
                "rapidocr: a folder with one *det*.onnx and one *rec*.onnx (default: the models shipped in the wheel); "
                "paddleocr: a folder with det/ and rec/ inference models (default: PaddleOCR's cache, never downloaded); "
                "tesseract: a tessdata folder (default: the system's)."
            ),
        )
        min_confidence: float = Field(
            0.5, ge=0.0, le=1.0, description="The engine's drop threshold: lines (tesseract: words) less confident are ignored."
        )
        threads: int = Field(0, ge=0, description="CPU threads of the engine (0: the library's default); tesseract ignores it.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        c = self.config
        self.engine = load_engine(c.engine, c.model, c.min_confidence, c.device, c.threads)

    def targets(self, prompts: Sequence[str]) -> list[str]:
        """The quoted target of every prompt.

        Raises:
            FlowrlError: listing every prompt without a usable quoted target (checked before any OCR).
        """
        bad = [(i, p, why) for i, p in enumerate(prompts) if (why := _quote_problem(p)) is not None]
        if bad:
            shown = "; ".join(f"[{i}] {_short(p, 120)!r} {why}" for i, p, why in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise FlowrlError(
                f"the ocr reward needs a quoted target text in every prompt, {len(bad)} of {len(prompts)} have none: "
                f"{shown}{more}. The reward compares the OCR output with the text between the first pair of double "
                f"quotes; {QUOTE_HINT}, or drop the ocr reward for this prompt set"
            )
        return [quoted_target(p) for p in prompts]

    def read(self, images: Any) -> list[str]:
        """The recognised text of each image (reading order, confidence > 0), for logs and debugging.

        Args:
            images: [B, 3, H, W] floats in [0, 1] (or any layout `as_float_images` takes).
        """
        return [recognized_text(lines) for lines in self.engine.recognize(to_uint8_hwc(as_float_images(images)))]

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[object] = ()) -> RewardOutput:
        """Scores float32 [B] in [0, 1] and details {'exact': [B] 1.0 where the whole target was read}.

        Args:
            images: [B, 3, H, W] floats in [0, 1] (or uint8 [B, H, W, 3], PIL images).
            prompts: B prompts, each with its target text in double quotes.
            metadata: unused (may be empty).

        Raises:
            FlowrlError: a prompt without a quoted target (all prompts are checked before OCR runs).
        """
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        targets = self.targets(prompts)
        texts = self.read(images)
        scores = torch.tensor([target_reward(t, r) for t, r in zip(targets, texts, strict=True)], dtype=torch.float32)
        return RewardOutput(scores=scores, details={"exact": (scores == 1.0).float()})

    @staticmethod
    def eval_summary(output: RewardOutput, metadata: Sequence[object]) -> dict[str, float]:
        """Headline ('' key) = mean OCR reward; `exact` = share of images with the whole text read."""
        return {"": float(output.scores.mean()), "exact": float(output.details["exact"].mean())}
