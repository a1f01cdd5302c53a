"""Export a checkpoint to ONNX, with everything needed to decode in its metadata.

    python -m captcha_lit.export ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt

Writes ``model.onnx`` (dynamic batch) into the run directory, then checks it against
PyTorch on freshly generated CAPTCHAs drawn like the checkpoint's training data: the
largest absolute logit difference and whether the decoded texts agree. The report
goes to ``model.parity.json`` next to the model. A model whose texts disagree beyond
``parity.max_mismatch_rate`` is renamed to ``*.failed.onnx`` and the export fails.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from captcha_lit import __version__
from captcha_lit.training.checkpoints import checkpoint_data_config, load_module
from captcha_lit.deploy.folding import fold_pool_first, temporal_convs_as_2d
from captcha_lit.deploy.quantize import compare_texts, int8_path, quantize_int8
from captcha_lit.deploy.runtime import Solver
from captcha_lit.training.inference import read_images
from captcha_lit.utils import output_dir, require_extra, write_json

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ParityError(ValueError):
    """The exported model does not reproduce PyTorch's predictions."""


def _to_onnx(module, path: Path, opset: int, temporal_2d: bool = True) -> None:
    """``temporal_2d``: write the temporal convolutions as 2-D ones, the faster form in fp32 (the
    int8 export quantizes a graph without it; see ``captcha_lit.deploy.folding``)."""
    import copy

    import onnx

    # The graph computes the checkpoint's function with foldable stages fused (the parity check
    # compares it with the module as trained).
    exported = copy.deepcopy(module).eval()
    exported.net, folded = fold_pool_first(module.net)
    if folded:
        log.info("folded %d batch norm(s) into the convolution before their max-pool", folded)
    if temporal_2d:
        exported.net, _ = temporal_convs_as_2d(exported.net)
    module = exported
    height, width = module.spec.input_size
    # Batch 2, not 1, so that no batch-sized dimension is mistaken for a constant.
    sample = torch.zeros(2, module.spec.channels, int(height), int(width))
    with warnings.catch_warnings():
        # The TorchScript exporter warns about itself, about assertions inside torch.nn (RNN
        # and attention input checks) and about GRU batch sizes; the parity check below
        # verifies the result at several batch sizes instead.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (sample,), str(path), dynamo=False, opset_version=int(opset), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as exc:  # torch raises RuntimeError, ValueError or its own SymbolicValueError here
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"opset={opset}: torch cannot export this {module.spec.arch!r} model at that opset "
                             f"({reason}); use opset=17, the default") from None
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in module.spec.replace(version=__version__).to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "captcha_lit", __version__
    model.doc_string = (f"captcha_lit {module.spec.arch} CAPTCHA solver; decode with captcha_lit.deploy.runtime.Solver "
                        "or read the metadata_props")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


PARITY_SPLITS = ("generated", "test")


def _parity_images(state: dict, count: int | None, seed: int | str, split: str = "generated",
                   ) -> tuple[list[str], np.ndarray]:
    """The images of the parity check, at the model's input size: ``generated`` draws fresh
    CAPTCHAs like the checkpoint's training data; ``test`` takes the checkpoint's own fixed
    test split (from the data cache), the images its test accuracy was measured on."""
    if split not in PARITY_SPLITS:
        raise ValueError(f"parity.split={split!r}: use one of {', '.join(PARITY_SPLITS)}")
    data = checkpoint_data_config(state)
    if split == "test":
        from captcha_lit.training.builders import build_datamodule

        if not state.get("datamodule_hyper_parameters"):
            raise ValueError("parity.split=test needs the checkpoint's data config, and this checkpoint has none; "
                             "use parity.split=generated")
        datamodule = build_datamodule(data)
        datamodule.setup("test")  # builds the test split alone, if it is not cached
        test = datamodule.datasets["test"]
        n = len(test) if count is None else min(int(count), len(test))
        return test.texts[:n], np.stack([np.asarray(test.images[i]) for i in range(n)])

    from captcha_lit.data.synthetic import GeneratorSpec, generate, resolve_fonts

    try:
        fonts = resolve_fonts(data.get("fonts"))
    except ValueError as exc:  # the training fonts may live on another machine
        log.warning("parity check uses the default font: %s", exc)
        fonts = None
    spec = GeneratorSpec(
        charset=data["charset"], min_length=int(data["min_length"]), max_length=int(data["max_length"]),
        width=int(data.get("width", 160)), height=int(data.get("height", 60)),
        input_size=tuple(int(v) for v in data["input_size"]), channels=1 if data["grayscale"] else 3,
        fonts=tuple(fonts) if fonts else None,
        font_sizes=tuple(int(s) for s in data["font_sizes"]) if data.get("font_sizes") else None,
    )
    return generate(spec, seed, "export_parity", int(count or 100), workers=1)


def check_parity(module, state: dict, solver: Solver, *, num_images: int | None, seed: int | str = 0,
                 split: str = "generated", batch_size: int = 32) -> dict:
    """Compare PyTorch and the ONNX runtime on the same images (see ``_parity_images``)."""
    labels, images = _parity_images(state, num_images, seed, split)
    module = module.to("cpu").eval()
    # The runtime decodes greedily, so that is what it is compared with.
    reference = read_images(module, images, beam_width=1, batch_size=batch_size, keep_logits=True)
    torch_texts, torch_conf = reference.texts, [s.confidence for s in reference.solutions]
    # The runtime runs in its own batches (solver.batch_size), so the dynamic batch axis is exercised too.
    onnx_logits = np.concatenate([solver.logits(images[s:s + solver.batch_size])
                                  for s in range(0, len(images), solver.batch_size)])
    solutions = solver.solve_arrays(images)
    onnx_texts = [s.text for s in solutions]
    mismatched = [{"index": i, "label": labels[i], "torch": t, "onnx": o}
                  for i, (t, o) in enumerate(zip(torch_texts, onnx_texts)) if t != o]
    return {
        "num_images": len(images),
        "split": split,
        "max_abs_logit_diff": float(np.abs(onnx_logits - reference.logits).max()),
        "max_confidence_diff": float(max(abs(a - s.confidence) for a, s in zip(torch_conf, solutions))),
        "text_agreement": 1.0 - len(mismatched) / len(images),
        "text_mismatches": len(mismatched),
        "mismatched": mismatched[:20],
        "torch_seq_acc": float(np.mean([t == y for t, y in zip(torch_texts, labels)])),
        "onnx_seq_acc": float(np.mean([t == y for t, y in zip(onnx_texts, labels)])),
    }


def export_onnx(module, state: dict, path: str | os.PathLike, *, opset: int = 17, parity_images: int | None = 100,
                parity_seed: int | str = 0, max_mismatch_rate: float = 0.01, max_logit_diff: float = 1e-3,
                ckpt_path: str | None = None, parity_split: str = "generated") -> dict:
    """Write ``path`` and ``<stem>.parity.json``; raise ParityError if the model disagrees with PyTorch."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"output={str(path)!r}: the ONNX file name must end in .onnx")
    if parity_images is not None and parity_images < 1:
        raise ValueError(f"parity.num_images={parity_images} must be at least 1 (or null: the whole test split "
                         "with parity.split=test): an export is always checked")
    if parity_images is None and parity_split != "test":
        raise ValueError("parity.num_images=null (every image) needs parity.split=test")
    if parity_split not in PARITY_SPLITS:
        raise ValueError(f"parity.split={parity_split!r}: use one of {', '.join(PARITY_SPLITS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.to("cpu").eval()
    if module.spec.beam_width > 1:
        log.warning("the checkpoint decodes with CTC beam search (beam_width=%s); captcha_lit.deploy.runtime decodes the "
                    "exported model greedily", module.spec.beam_width)
    _to_onnx(module, path, opset)
    solver = Solver(path)
    report = {
        "model": str(path.resolve()), "ckpt_path": str(Path(ckpt_path).resolve()) if ckpt_path else None,
        "model_id": solver.model_id, "opset": int(opset),
        **check_parity(module, state, solver, num_images=parity_images, seed=parity_seed, split=parity_split),
        "max_mismatch_rate": float(max_mismatch_rate), "max_logit_diff_allowed": float(max_logit_diff),
        "metadata": solver.spec.to_metadata(),
    }
    problems = []
    if report["text_mismatches"] > max_mismatch_rate * report["num_images"]:
        problems.append(f"{report['text_mismatches']} of {report['num_images']} decoded texts differ "
                        f"(allowed: {max_mismatch_rate:.1%})")
    if not report["max_abs_logit_diff"] <= max_logit_diff:  # also catches NaN
        problems.append(f"largest logit difference {report['max_abs_logit_diff']:.3g} exceeds {max_logit_diff:g}")
    report["passed"] = not problems
    return _settle(path, report, lambda failed, details: (
        f"the ONNX export does not match PyTorch: {'; '.join(problems)}. The model was moved to {failed} so that it "
        f"is not served by mistake; details in {details}"))


def _settle(path: Path, report: dict, refusal) -> dict:
    """Write ``report`` as ``<stem>.parity.json`` beside the model. A model that failed its check
    (``report["passed"]`` false) is first renamed ``<stem>.failed.onnx``, so that nothing serves it
    by mistake, and ParityError says ``refusal(failed_path, report_path)``."""
    report_path = path.with_name(f"{path.stem}.parity.json")
    if not report["passed"]:
        failed = path.with_name(f"{path.stem}.failed.onnx")
        os.replace(path, failed)
        report["model"] = str(failed.resolve())
        write_json(report_path, report)
        raise ParityError(refusal(failed, report_path))
    write_json(report_path, report)
    report["parity_report"] = str(report_path)
    return report


QUANTIZATIONS = (None, "int8")


def export_int8(module, state: dict, fp32_path: Path, fp32_solver: Solver, *, calibration_images: int = 512,
                parity_split: str = "test", parity_images: int | None = None, parity_seed: int | str = 0,
                min_text_agreement: float = 0.999, opset: int = 17) -> dict:
    """Write ``<stem>.int8.onnx`` (see ``captcha_lit.deploy.quantize``) and ``<stem>.int8.parity.json``;
    raise ParityError if its texts agree with the fp32 model's on fewer than ``min_text_agreement``."""
    if not 0 <= min_text_agreement <= 1:
        raise ValueError(f"int8.min_text_agreement={min_text_agreement}: use a fraction in [0, 1], e.g. 0.999")
    if parity_split == "test" and not state.get("datamodule_hyper_parameters"):
        log.warning("the checkpoint has no data config, so int8 parity uses generated images, not its test split")
        parity_split, parity_images = "generated", parity_images or 2000
    _, calibration = _parity_images(state, int(calibration_images), "int8_calibration", "generated")
    with tempfile.TemporaryDirectory(prefix="captcha_lit_int8_source_") as tmp:
        source = Path(tmp) / "model.onnx"  # the fp32 function, temporal convolutions 1-D
        _to_onnx(module, source, opset, temporal_2d=False)
        path = quantize_int8(source, int8_path(fp32_path), calibration, module.spec.mean, module.spec.std)
    labels, images = _parity_images(state, parity_images, parity_seed, parity_split)
    report = {"model": str(path.resolve()), "fp32_model": str(fp32_path.resolve()), "split": parity_split,
              "calibration_images": int(calibration_images), "min_text_agreement": float(min_text_agreement),
              **compare_texts(fp32_solver, Solver(path), images, labels)}
    report["passed"] = report["text_agreement"] >= min_text_agreement
    return _settle(path, report, lambda failed, details: (
        f"the int8 model's texts agree with the fp32 model's on {report['text_agreement']:.2%} of "
        f"{report['num_images']} {parity_split} images, below int8.min_text_agreement={min_text_agreement:g}. "
        f"It was moved to {failed}; serve {fp32_path} instead, or calibrate on more images "
        f"(int8.calibration_images); details in {details}"))


def export(cfg: DictConfig) -> dict:
    quantize = cfg.get("quantize")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: use int8 (an int8 model beside the fp32 one), or null")
    require_extra("export", "deploy", "onnx", "onnxruntime")
    opset = cfg.get("opset", 17)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"opset={opset!r} must be a whole number, e.g. 17 (the default)")
    module, state = load_module(cfg.ckpt_path)
    path = Path(os.path.expanduser(str(cfg.output))) if cfg.get("output") else Path(output_dir(cfg)) / "model.onnx"
    parity = cfg.get("parity") or {}
    num_images = parity.get("num_images", 100)
    report = export_onnx(
        module, state, path, opset=int(cfg.get("opset", 17)),
        parity_images=None if num_images is None else int(num_images), parity_split=str(parity.get("split", "generated")),
        parity_seed=parity.get("seed", 0), max_mismatch_rate=float(parity.get("max_mismatch_rate", 0.01)),
        max_logit_diff=float(parity.get("max_logit_diff", 1e-3)), ckpt_path=str(cfg.ckpt_path),
    )
    if quantize == "int8":
        int8 = dict(cfg.get("int8") or {})
        images = int8.get("parity_images")
        report["int8"] = export_int8(
            module, state, Path(report["model"]), Solver(report["model"]),
            calibration_images=int(int8.get("calibration_images", 512)),
            parity_split=str(int8.get("parity_split", "test")), parity_images=None if images is None else int(images),
            parity_seed=parity.get("seed", 0), min_text_agreement=float(int8.get("min_text_agreement", 0.999)),
            opset=int(opset),
        )
    print("\n".join([
        "", f"exported {module.spec.arch} ({module.spec.decoder} decoder) to {report['model']}",
        f"  parity on {report['num_images']} {'test' if report['split'] == 'test' else 'generated'} images: texts agree {report['text_agreement']:.1%}, "
        f"largest logit difference {report['max_abs_logit_diff']:.2e}",
        f"  seq acc on them: torch {report['torch_seq_acc']:.3f}, onnx {report['onnx_seq_acc']:.3f}",
        f"  report: {report['parity_report']}",
    ] + ([
        f"int8 model {report['int8']['model']}",
        f"  texts agree with fp32 on {report['int8']['text_agreement']:.2%} of {report['int8']['num_images']} "
        f"{report['int8']['split']} images; seq acc fp32 {report['int8']['fp32_seq_acc']:.4f}, "
        f"int8 {report['int8']['int8_seq_acc']:.4f}",
        f"  report: {report['int8']['parity_report']}",
    ] if "int8" in report else [])))
    return report
