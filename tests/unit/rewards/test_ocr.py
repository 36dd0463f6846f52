"""OCR reward: the FlowGRPO formula on hand-computed cases (REWARDS.md, section "OCR reward"), the
engine-output adapters on each library's documented output, the stage's checks, and real OCR with
rapidocr on rendered text (prompts from ../shared/data/ocr/test.txt)."""

from __future__ import annotations

import socket
import sys
import time
import types
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from flowrl import registry
from flowrl.errors import FlowrlError, ModelNotFoundError
from flowrl.rewards import ocr
from flowrl.rewards.models import clear_shared
from flowrl.rewards.ocr import (
    OCRLine,
    OCRReward,
    lines_from_paddleocr,
    lines_from_rapidocr,
    lines_from_tesseract,
    quoted_target,
    reading_order,
    recognized_text,
    text_reward,
)

# ---------------------------------------------------------------------------------------------- formula


@pytest.mark.parametrize(
    ("prompt", "recognized", "expected"),
    [
        ('a sign that says "OPEN"', "OPEN", 1.0),
        # substring after normalisation: case and spaces do not matter, extra text is free
        ('a shop window with "Open Late" in neon', "WELCOME! open  late 24h", 1.0),
        ('"Open Late"', "OpenLate", 1.0),
        ('"Open Late"', "O P E N L A T E", 1.0),
        # FlowGRPO removes the ASCII space U+0020 only: a tab, newline, NBSP or ideographic space
        # stays a character, so "open\tlate" is one deletion from "openlate" (1 - 1/8)
        ('"Open Late"', "O P E N\tL A T E", 0.875),
        ('"open late"', "OPEN\nLATE", 0.875),
        ('"open late"', "open\u00a0late", 0.875),
        ('"open late"', "open\u3000late", 0.875),
        # ... and inside the target too: "open\u00a0late" has 9 characters, OCR read 8 of them
        ('"open\u00a0late"', "openlate", 1 - 1 / 9),
        # one substitution in 4 characters
        ('"OPEN"', "OPFN", 0.75),
        # not a substring: "cart" -> "cat" is one deletion, target length 3
        ('"cat"', "cart", 1 - 1 / 3),
        # "xstqp" -> "stop": delete x, q -> o; 2 edits over 4 characters
        ('"stop"', "xstqp", 0.5),
        # "openxxlate" -> "openlate": delete two x; length 8 without the space
        ('"Open Late"', "open xx late", 0.75),
        # distance capped at len(target): 9 edits on a 3-character target give 0, not -2
        ('"abc"', "xyzxyzxyz", 0.0),
        ('"abc"', "", 0.0),
        # the first pair of quotes is the target; the second quoted span is ignored
        ('a "ab" and a "cd"', "ab", 1.0),
        ('a "ab" and a "cd"', "cd", 0.0),
        # spaces inside the target are removed before its length is taken: "ab c" has length 3
        ('"ab c"', "abx", 1 - 1 / 3),
    ],
)
def test_text_reward_hand_computed(prompt, recognized, expected):
    assert text_reward(prompt, recognized) == pytest.approx(expected, abs=1e-12)


def test_quoted_target_first_pair_as_written():
    assert quoted_target('a sign that says "Open Late" and "Closed"') == "Open Late"
    assert quoted_target('"Hi"') == "Hi"


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        ("a red sign with no text", "no ASCII double quote"),
        ("a sign that says \u201cOPEN\u201d", "only curly quotes"),
        ('a sign that says "OPEN', "no closing"),
        ('an empty sign ""', "empty quoted text"),
        ('a blank sign "   "', "empty quoted text"),
    ],
)
def test_missing_target_is_a_clear_error(prompt, why):
    with pytest.raises(FlowrlError) as err:
        text_reward(prompt, "OPEN")
    msg = str(err.value)
    assert prompt in msg and why in msg
    assert 'a sign that says "OPEN"' in msg  # how to fix it


@given(
    st.text(alphabet="abcAB C", min_size=1, max_size=8).filter(lambda s: s.strip()),
    st.text(alphabet="abcAB C\n", max_size=12),
)
def test_reward_range_and_substring_property(target, recognized):
    r = text_reward(f'a sign "{target}"', recognized)
    assert 0.0 <= r <= 1.0
    norm = lambda s: s.replace(" ", "").lower()  # noqa: E731  (FlowGRPO's normalisation)
    assert (r == 1.0) == (norm(target) in norm(recognized))


# ---------------------------------------------------------------------------------------------- adapters


def test_rapidocr_output_adapter():
    from rapidocr.utils.output import RapidOCROutput  # the class `RapidOCR()(img)` returns

    out = RapidOCROutput(
        boxes=np.array(
            [
                [[14.0, 231.0], [478.0, 228.0], [479.0, 279.0], [14.0, 282.0]],
                [[20.0, 300.0], [200.0, 300.0], [200.0, 340.0], [20.0, 340.0]],
            ],
            dtype=np.float32,
        ),
        txts=("Spring Collection", "2024"),
        scores=(0.999, 0.87),
    )
    lines = lines_from_rapidocr(out)
    assert lines == [
        OCRLine("Spring Collection", pytest.approx(0.999), (14.0, 228.0, 479.0, 282.0)),
        OCRLine("2024", pytest.approx(0.87), (20.0, 300.0, 200.0, 340.0)),
    ]
    assert lines_from_rapidocr(RapidOCROutput()) == []  # nothing found: boxes/txts/scores are None


def test_paddleocr_output_adapter():
    # PaddleOCR 2.x: ocr.ocr(img, cls=False) -> [[ [box_points, (text, confidence)], ... ]] for one image
    result = [
        [
            [[[10.0, 20.0], [110.0, 22.0], [110.0, 50.0], [10.0, 48.0]], ("OPEN", 0.98)],
            [[[120.0, 21.0], [200.0, 21.0], [200.0, 49.0], [120.0, 49.0]], ("LATE", 0.91)],
        ]
    ]
    assert lines_from_paddleocr(result[0]) == [
        OCRLine("OPEN", 0.98, (10.0, 20.0, 110.0, 50.0)),
        OCRLine("LATE", 0.91, (120.0, 21.0, 200.0, 49.0)),
    ]
    assert lines_from_paddleocr([None][0]) == []  # nothing found


def tesseract_dict(rows):
    """pytesseract Output.DICT from (level, block, par, line, word, left, top, w, h, conf, text) rows."""
    keys = ("level", "block_num", "par_num", "line_num", "word_num", "left", "top", "width", "height", "conf", "text")
    data = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    data["page_num"] = [1] * len(rows)
    return data


def test_tesseract_output_adapter():
    data = tesseract_dict(
        [
            (1, 0, 0, 0, 0, 0, 0, 512, 512, -1, ""),  # page
            (2, 1, 0, 0, 0, 20, 30, 300, 80, -1, ""),  # block
            (3, 1, 1, 0, 0, 20, 30, 300, 80, -1, ""),  # paragraph
            (4, 1, 1, 1, 0, 20, 30, 300, 30, -1, ""),  # line 1
            (5, 1, 1, 1, 2, 110, 31, 90, 29, "91.5", "Late"),  # words out of order: word_num sorts them
            (5, 1, 1, 1, 1, 20, 30, 80, 30, 96.25, "Open"),
            (5, 1, 1, 1, 3, 210, 30, 20, 30, 12.0, "~"),  # under min_confidence: dropped
            (4, 1, 1, 2, 0, 20, 80, 100, 30, -1, ""),  # line 2
            (5, 1, 1, 2, 1, 20, 80, 100, 30, 88, "Today"),
            (5, 1, 1, 2, 2, 130, 80, 10, 30, 95, " "),  # whitespace-only word: skipped
        ]
    )
    lines = lines_from_tesseract(data, min_confidence=0.5)
    assert [(ln.text, ln.box) for ln in lines] == [
        ("Open Late", (20.0, 30.0, 200.0, 60.0)),
        ("Today", (20.0, 80.0, 120.0, 110.0)),
    ]
    assert lines[0].confidence == pytest.approx((0.9625 + 0.915) / 2)
    assert [ln.text for ln in lines_from_tesseract(data, min_confidence=0.0)][0] == "Open Late ~"


def test_reading_order_rows_then_left_to_right():
    late = OCRLine("LATE", 0.9, (120.0, 18.0, 200.0, 48.0))  # top 2 px above OPEN's: same row
    open_ = OCRLine("OPEN", 0.9, (10.0, 20.0, 110.0, 50.0))
    below = OCRLine("today", 0.9, (5.0, 70.0, 100.0, 100.0))
    ghost = OCRLine("xx", 0.0, (0.0, 0.0, 10.0, 10.0))  # confidence 0 is not counted
    assert [ln.text for ln in reading_order([below, late, open_])] == ["OPEN", "LATE", "today"]
    assert recognized_text([below, ghost, late, open_]) == "OPEN LATE today"
    assert recognized_text([]) == ""


# ---------------------------------------------------------------------------------------------- stage


class FakeEngine:
    name = "fake"

    def __init__(self, text_of_image):
        self.text_of_image = text_of_image
        self.calls = 0

    def recognize(self, images):
        self.calls += 1
        return [[OCRLine(self.text_of_image(im), 0.9, (0.0, 0.0, 1.0, 1.0))] for im in images]


@pytest.fixture
def fake_reward(monkeypatch):
    engine = FakeEngine(lambda im: "OPEN" if im.mean() > 127 else "0PEN")
    monkeypatch.setattr(ocr, "load_engine", lambda *a, **k: engine)
    return OCRReward(OCRReward.Config()), engine


def test_stage_scores_and_details(fake_reward):
    reward, _ = fake_reward
    images = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8)])  # white -> "OPEN", black -> "0PEN"
    out = reward(images, ['a sign "open"', 'a sign "OPEN"'], [])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
    assert out.scores.tolist() == pytest.approx([1.0, 0.75])
    assert out.details["exact"].tolist() == [1.0, 0.0]
    assert OCRReward.eval_summary(out, []) == pytest.approx({"": 0.875, "exact": 0.5})


def test_stage_checks_every_prompt_before_ocr(fake_reward):
    reward, engine = fake_reward
    images = torch.ones(3, 3, 8, 8)
    with pytest.raises(FlowrlError) as err:
        reward(images, ['a sign "OPEN"', "a plain sign", "a \u201ccurly\u201d sign"], [])
    msg = str(err.value)
    assert "2 of 3" in msg and "[1] 'a plain sign'" in msg and "[2]" in msg and "[0]" not in msg
    assert 'a sign that says "OPEN"' in msg
    assert engine.calls == 0


def test_stage_is_registered_and_configurable():
    assert registry.lookup("reward", "ocr") is OCRReward
    cfg = OCRReward.Config(kind="ocr", engine="tesseract", min_confidence=0.3)
    assert cfg.label == "ocr" and cfg.min_confidence == 0.3
    with pytest.raises(ValueError):
        OCRReward.Config(engine="easyocr")
    with pytest.raises(ValueError):
        OCRReward.Config(min_confidence=1.5)
    assert OCRReward.info.extra == "" and "Apache-2.0" in OCRReward.info.licence


@pytest.mark.parametrize(
    ("engine", "module", "fix"),
    [
        ("rapidocr", "rapidocr", "pip install 'flowrl[ocr]'"),
        ("paddleocr", "paddleocr", "pip install 'flowrl[paddleocr]'"),
        ("tesseract", "pytesseract", "apt install tesseract-ocr"),
    ],
)
def test_missing_engine_package_names_the_extra(monkeypatch, engine, module, fix):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    clear_shared()
    with pytest.raises(FlowrlError) as err:
        OCRReward(OCRReward.Config(engine=engine, device="cpu"))
    assert fix in str(err.value)
    if engine == "tesseract":
        assert "pip install 'flowrl[tesseract]'" in str(err.value)


def test_tesseract_program_missing(monkeypatch):
    fake = types.ModuleType("pytesseract")

    class TesseractNotFoundError(OSError):
        pass

    def get_tesseract_version():
        raise TesseractNotFoundError()

    fake.TesseractNotFoundError, fake.get_tesseract_version = TesseractNotFoundError, get_tesseract_version
    monkeypatch.setitem(sys.modules, "pytesseract", fake)
    with pytest.raises(FlowrlError, match="apt install tesseract-ocr"):
        ocr.TesseractEngine(None, 0.5, "cpu", 0)


def fake_paddleocr(version="2.10.0"):
    """A stand-in `paddleocr` module that records PaddleOCR's arguments and answers `ocr()` in 2.x's format."""
    mod = types.ModuleType("paddleocr")
    mod.__version__ = version

    class PaddleOCR:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def ocr(self, img, cls=True):
            assert isinstance(img, np.ndarray) and cls is False
            if img.mean() > 250:
                return [None]
            return [[[[[10.0, 60.0], [90.0, 60.0], [90.0, 90.0], [10.0, 90.0]], ("LATE", 0.9)],
                     [[[10.0, 20.0], [90.0, 20.0], [90.0, 50.0], [10.0, 50.0]], ("OPEN", 0.95)]]]

    mod.PaddleOCR = PaddleOCR
    return mod


def test_paddleocr_engine_offline_models(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "paddleocr", fake_paddleocr())
    monkeypatch.setenv("PADDLE_OCR_BASE_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        ocr.PaddleOCREngine(None, 0.5, "cpu", 0)
    msg = str(err.value)
    assert "en_PP-OCRv3_det_infer" in msg and "en_PP-OCRv4_rec_infer.tar" in msg and "never downloads" in msg
    for sub in ("det", "rec"):
        (tmp_path / "m" / sub).mkdir(parents=True)
        for f in ("inference.pdmodel", "inference.pdiparams"):
            (tmp_path / "m" / sub / f).write_bytes(b"")
    engine = ocr.PaddleOCREngine(str(tmp_path / "m"), 0.4, "cpu", 2)
    kw = engine.ocr.kwargs
    assert kw["use_angle_cls"] is False and kw["lang"] == "en" and kw["drop_score"] == 0.4 and kw["use_gpu"] is False
    assert kw["det_model_dir"] == str(tmp_path / "m" / "det") and kw["cpu_threads"] == 2
    gray = np.full((100, 100, 3), 128, np.uint8)
    white = np.full((100, 100, 3), 255, np.uint8)
    assert [recognized_text(lines) for lines in engine.recognize([gray, white])] == ["OPEN LATE", ""]


def test_paddleocr_3_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", fake_paddleocr("3.2.0"))
    with pytest.raises(FlowrlError, match=r"PaddleOCR 2.x .* found 3.2.0"):
        ocr.PaddleOCREngine(None, 0.5, "cpu", 0)


def test_rapidocr_explicit_cuda_without_provider_is_refused():
    assert ocr.RapidOCREngine._use_cuda("cpu", ["CPUExecutionProvider"]) is None
    assert ocr.RapidOCREngine._use_cuda("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == 1
    with pytest.raises(FlowrlError, match="onnxruntime-gpu"):
        ocr.RapidOCREngine._use_cuda("cuda", ["CPUExecutionProvider"])


def test_rapidocr_model_folder_must_hold_det_and_rec(tmp_path):
    (tmp_path / "a_det.onnx").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"\*rec\*\.onnx.*found: a_det.onnx"):
        ocr.RapidOCREngine(str(tmp_path), 0.5, "cpu", 1)
    with pytest.raises(ModelNotFoundError, match="is not a folder"):
        ocr.RapidOCREngine(str(tmp_path / "nope"), 0.5, "cpu", 1)


# ---------------------------------------------------------------------------------------------- real OCR

N_PHRASES = 24
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def render(text: str, size: int = 448, font_px: int = 36) -> np.ndarray:
    """Black DejaVu Sans text on white, word-wrapped and centred: uint8 [size, size, 3]."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), font_px)
    rows, row = [], ""
    for word in text.split():
        wider = f"{row} {word}".strip()
        if row and draw.textlength(wider, font=font) > size - 32:
            rows.append(row)
            row = word
        else:
            row = wider
    rows.append(row)
    y = (size - len(rows) * font_px * 1.4) / 2
    for r in rows:
        draw.text(((size - draw.textlength(r, font=font)) / 2, y), r, fill="black", font=font)
        y += font_px * 1.4
    return np.asarray(img)


@pytest.fixture(scope="module")
def test_prompts(shared_dir) -> list[str]:
    """N_PHRASES prompts spread over the OCR test set, those whose target is plain ASCII letters,
    digits and spaces (the font and the test's expectations are about Latin text)."""
    prompts = (shared_dir / "data" / "ocr" / "test.txt").read_text(encoding="utf-8").splitlines()
    plain = [p for p in prompts if p.count('"') >= 2 and quoted_target(p).replace(" ", "").isascii()
             and quoted_target(p).replace(" ", "").isalnum()]
    assert len(plain) >= N_PHRASES * 10, f"expected hundreds of plain prompts in test.txt, found {len(plain)}"
    return plain[:: len(plain) // N_PHRASES][:N_PHRASES]


@pytest.fixture(scope="module")
def rapid_reward():
    """The default reward (rapidocr, shipped models), loaded and run with the network unreachable."""
    try:
        import rapidocr  # noqa: F401
    except ImportError:
        pytest.fail("rapidocr is not installed; the default OCR engine is tested for real: pip install -e '.[dev,ocr]'")
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise AssertionError(f"the OCR reward tried to reach the network: {args}")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    clear_shared()
    reward = OCRReward(OCRReward.Config(device="cpu", threads=1))
    yield reward
    mp.undo()


def test_rapidocr_uses_the_models_in_its_wheel(rapid_reward):
    import rapidocr

    shipped = Path(rapidocr.__file__).parent / "models"
    assert rapid_reward.engine.det_path.parent == shipped and rapid_reward.engine.rec_path.parent == shipped
    assert "det" in rapid_reward.engine.det_path.name and "rec" in rapid_reward.engine.rec_path.name


def test_real_ocr_on_rendered_text(rapid_reward, test_prompts):
    targets = [quoted_target(p) for p in test_prompts]
    images = np.stack([render(t) for t in targets])
    start = time.perf_counter()
    texts = rapid_reward.read(images)
    per_image = (time.perf_counter() - start) / len(images)
    right = [text_reward(p, t) for p, t in zip(test_prompts, texts, strict=True)]
    report = "; ".join(f"{g!r}->{t!r} {r:.2f}" for g, t, r in zip(targets, texts, right, strict=True))
    print(f"\nrapidocr on {len(images)} renders: min reward {min(right):.3f}, mean {np.mean(right):.3f}, "
          f"{per_image:.2f} s/image\n{report}")
    assert min(right) >= 0.9, report
    # each image scored against the prompt of another phrase: the image shows the wrong text.
    # Unrelated English phrases of similar length share letters, so even their exact texts score up
    # to about 0.35 under this formula (mean about 0.1); an offset of 8 pairs phrases whose exact texts
    # score at most 0.22, leaving room to catch OCR output that matches text not in the image.
    other = [(i + 8) % N_PHRASES for i in range(N_PHRASES)]
    wrong = [text_reward(test_prompts[j], t) for j, t in zip(other, texts, strict=True)]
    print(f"wrong prompts: max reward {max(wrong):.3f}, mean {np.mean(wrong):.3f}")
    assert max(wrong) <= 0.3, [f"{targets[i]!r} as {targets[j]!r}: {w:.2f}" for i, (j, w) in enumerate(zip(other, wrong))]


def test_real_ocr_through_the_stage(rapid_reward):
    # floats [B, 3, H, W] as the trainer passes them; a blank image reads nothing and scores 0
    images = np.stack([render("Open Late"), render("Fresh Coffee"), np.full((448, 448, 3), 255, np.uint8)])
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    prompts = ['a neon sign that says "OPEN LATE"', 'a chalkboard reading "Fresh Tea"', 'a poster with "Hello"']
    out = rapid_reward(floats, prompts, [])
    # "freshcoffee" -> "freshtea": not a substring; "coff"->"t" (4) + "e"->"a" (1) = 5 edits of 8
    assert out.scores.tolist() == pytest.approx([1.0, 1 - 5 / 8, 0.0])
    assert out.details["exact"].tolist() == [1.0, 0.0, 0.0]
