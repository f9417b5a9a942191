"""``fsmis freeze``: a trained few-shot bundle + one annotated support scan -> a new single-input MONAI bundle.

The support slices are picked from the annotated scan as the evaluation protocols pick them
(:func:`fsmis_monai.engines.inference.load_support`, i.e. :func:`fsmis_monai.evaluation.protocols.fraction_picks`
over the slices holding the class: ``ep1`` and ``alp`` take the three slices at 1/6, 1/2, 5/6 of the organ,
``ep2`` the middle one) and encoded once, together as one k-shot support: a frozen network sees single slices
without their position, so the protocols' slice-position-to-support assignment does not apply. The new
bundle holds :class:`fsmis_monai.export.FrozenFewShotSegmenter` (``image -> pred``), which MONAI's
``verify_net_in_out``, ``ckpt_export`` and ``onnx_export`` accept (``--use_trace True``), and an
``inference.json`` that segments query volumes slice by slice with MONAI's ``SliceInferer`` and writes NIfTI
predictions on the query's grid. The support's prior (organ position and size,
:class:`fsmis_monai.transforms.whole_scan.SupportPrior`) is stored in that config as plain numbers, so the
frozen bundle applies the same oracle-free whole-scan steps (``whole_scan_steps``) as the source bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

HELP = "freeze a bundle's network and one encoded support set into a new single-input bundle (image -> pred)"

#: support slices per protocol (positions from fraction_picks over the class's slices)
PROTOCOL_SLICES = {"ep1": 3, "alp": 3, "ep2": 1}
#: bundle files copied unchanged into the frozen bundle
COPIED = ("LICENSE", "configs/logging.conf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="source bundle folder (bundles/<method>)")
    parser.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", type=Path, default=None,
                        help="trained weights (default: <bundle>/models/model.pt)")
    parser.add_argument("--support-image", required=True, type=Path, help="annotated support scan (NIfTI)")
    parser.add_argument("--support-label", required=True, type=Path, help="its label volume (NIfTI)")
    parser.add_argument("--class", dest="support_class", required=True,
                        help="label value, or class name of the bundle's dataset (e.g. liver)")
    parser.add_argument("--dataset", default=None,
                        help="dataset whose label map reads --support-label (default: the bundle's dataset_name; "
                             "'none' for your own masks, any raw value)")
    parser.add_argument("--output", required=True, type=Path, help="new bundle folder (must not exist)")
    parser.add_argument("--protocol", default="ep1", choices=sorted(PROTOCOL_SLICES), help="support slice picks")
    parser.add_argument("--no-refinement", action="store_true",
                        help="drop test-time refinement that uses autograd (Q-Net), so the network can be exported")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the source inference.json (JSON value, e.g. encoder=\"small\")")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def method_definition(bundle: Path, overrides: dict[str, Any]) -> tuple[dict, Any]:
    """The source bundle's ``network_def`` with every argument resolved to a literal (and its parser)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[k] = v
    definition = {"_target_": parser["network_def"]["_target_"]}
    for key in parser["network_def"]:
        if key != "_target_":
            definition[key] = parser.get_parsed_content(f"network_def#{key}", instantiate=False)
    definition["pretrained_weights"] = None  # the frozen weights come from models/model.pt
    json.dumps(definition)  # fails early if an argument is not a literal
    return definition, parser


def _metadata(source: dict, method: str, support_class: Any, protocol: str, picks: list[int], size: list[int],
              support_image: Path) -> dict:
    meta = {k: v for k, v in source.items() if k != "network_data_format"}
    channel_def = {"0": "image", "1": "image", "2": "image"}
    src_in = next(iter(source["network_data_format"]["inputs"].values()))
    meta.update(
        version="0.1.0",
        changelog={"0.1.0": f"frozen {method} network with an encoded support set (class {support_class}, "
                            f"{protocol} slices {picks} of {support_image.name}); from {source['name']} "
                            f"{source['version']}"},
        name=f"{source['name']} - frozen {support_class}",
        task=f"Segment class {support_class} with {method} against a fixed, pre-encoded support set",
        label_classes=f"1 = class {support_class} of the support label, 0 = background",
        pred_classes=f"0 = background, 1 = {support_class}",
        network_data_format={
            "inputs": {"image": {**src_in, "num_channels": 3, "spatial_shape": size, "channel_def": channel_def}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2, "spatial_shape": size,
                                 "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {"0": "background", "1": str(support_class)}}},
        },
    )
    return meta


def _inference_config(method_def: dict, spec: dict, refine: bool, size: list[int], prior: dict) -> dict:
    from fsmis_monai.transforms.whole_scan import DEFAULT_STEPS

    return {
        "imports": ["$import numpy", "$import torch", "$import fsmis_monai", "$import fsmis_monai.bundle_errors",
                    "$import fsmis_monai.export",
                    "$import fsmis_monai.data.contract", "$import fsmis_monai.engines.inference"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data/queries",
        "query_glob": "*.nii*",
        "output_dir": "$@bundle_root + '/predictions'",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "image_size": size,
        "sw_batch_size": 8,
        "write_overlays": True,
        "keep_largest_component": False,
        "whole_scan_steps": list(DEFAULT_STEPS),
        "support_prior": prior,
        "method_def": method_def,
        "network_def": {"_target_": "fsmis_monai.export.FrozenFewShotSegmenter", "method": "@method_def",
                        "support_spec": spec, "refine": refine},
        "network": "$@network_def.to(@device)",
        "datalist": "$fsmis_monai.engines.inference.query_datalist(@dataset_dir, @query_glob, @output_dir)",
        "contract": "$fsmis_monai.data.contract.load_contract(@ckpt_path)",
        "preprocessing": "$fsmis_monai.engines.inference.query_preprocessing(@contract, 3)",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SliceInferer", "spatial_dim": 2, "roi_size": "@image_size",
                    "sw_batch_size": "@sw_batch_size", "overlap": 0.0, "progress": False},
        "postprocessing": "$fsmis_monai.engines.inference.prediction_postprocessing(@preprocessing, @output_dir, "
                          "keep_largest=@keep_largest_component, write_overlays=@write_overlays, "
                          "data_root_dir=@dataset_dir, whole_scan_steps=@whole_scan_steps, support_prior=@support_prior)",
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


README = """# {name}

A frozen few-shot segmenter made by `fsmis freeze` from the `{method}` bundle: the network and one support set
encoded once (class **{cls}**, `{protocol}` support slices {picks} of `{support}`), so the network takes one input
`image` [N, 3, {h}, {w}] (axial slices of a volume z-scored per volume, repeated to 3 channels) and returns `pred`
logits [N, 2, {h}, {w}] (argmax: 1 = {cls}). Refinement at test time: {refine}.

```bash
# segment every NIfTI volume of QUERY_DIR: <name>_seg.nii.gz in the query's geometry + <name>_overlay.png
# (--query_glob '*/image.nii.gz' for one folder per patient: PRED_DIR keeps the sub-folders)
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir QUERY_DIR --output_dir PRED_DIR
# checks and export (tracing: the methods' support state is a dict torch.jit.script cannot type)
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json --bundle_root .
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root . \\
    --use_trace True --input_shape "[1, 3, {h}, {w}]"
python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root . \\
    --use_trace True --input_shape "[1, 3, {h}, {w}]" --converter_kwargs "{{'dynamo': False}}"
```

Query slices of another in-plane size are tiled by the `SliceInferer` in {h} x {w} windows. The traced
TorchScript/ONNX graphs fix the in-plane size; PAMI's also fixes the batch size (it refines per query).
ONNX export needs the `onnx` package (`pip install fsmis-monai[export]`). Model weights load with
`weights_only` semantics; bundle configs execute Python, so run only bundles you trust. License: see LICENSE.
"""


def freeze_bundle(bundle: Path, support_image: Path, support_label: Path, support_class: Any, output: Path,
                  ckpt_path: Path | None = None, protocol: str = "ep1", refine: bool = True,
                  overrides: dict[str, Any] | None = None, dataset: Any = "bundle") -> Path:
    """Write the frozen bundle to ``output``; returns it. See the module docstring.

    The source model's data contract (beside ``ckpt_path``; weights without one: the bundle's dataset and
    normalisation at the stored grid) prepares the support and is copied into ``output/models``, so the frozen
    bundle prepares its queries the same way. ``support_class``: a class name or raw label value of
    ``dataset`` (default: the bundle's ``dataset_name``; ``None``/``"none"``: own masks, any raw value)."""
    from monai.bundle import ConfigParser

    from fsmis_monai.data.contract import save_contract
    from fsmis_monai.engines.inference import load_support_prior, model_contract, support_slices
    from fsmis_monai.export import FrozenFewShotSegmenter
    from fsmis_monai.io import FsmisInputError, read_json, torch_save, write_json, write_text
    from fsmis_monai.networks.layout import load_weights

    bundle, output = Path(bundle), Path(output)
    if not (bundle / "configs" / "inference.json").is_file():
        raise FsmisInputError(f"{bundle}: not a bundle (configs/inference.json missing)")
    if output.exists():
        raise FsmisInputError(f"{output}: already exists; choose a new folder for the frozen bundle")
    if protocol not in PROTOCOL_SLICES:
        raise FsmisInputError(f"protocol {protocol!r}: choose one of {sorted(PROTOCOL_SLICES)}")
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else bundle / "models" / "model.pt"
    # the network in the layout the weights record (inference.json reads it from @ckpt_path), not the bundle's
    # own shipped model.pt's
    method_def, parser = method_definition(bundle, {"ckpt_path": str(ckpt_path), **(overrides or {})})
    if dataset == "bundle":
        dataset = parser.get_parsed_content("dataset_name")
    defaults = {k: parser[k] for k in ("normalization",) if k in parser}
    contract = model_contract(ckpt_path, dataset, **defaults)
    images, masks, picks = support_slices(support_image, support_label, support_class, PROTOCOL_SLICES[protocol],
                                          contract)

    method = ConfigParser({"net": method_def}).get_parsed_content("net")
    load_weights(method, ckpt_path)  # strict, layout record checked, errors name the file
    frozen = FrozenFewShotSegmenter.from_support(method, images, masks, refine=refine)
    size = [int(s) for s in images.shape[-2:]]

    meta = _metadata(read_json(bundle / "configs" / "metadata.json"), bundle.name, support_class, protocol, picks,
                     size, Path(support_image))
    prior = load_support_prior(support_image, support_label, support_class, contract)
    config = _inference_config(method_def, frozen.support_spec, refine, size, prior)
    refine_text = ("kept (eager only; exports need --no-refinement)" if not frozen.exportable
                   else "none" if refine else "dropped (--no-refinement)")
    staging = output.with_name(output.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    write_json(staging / "configs" / "metadata.json", meta)
    write_json(staging / "configs" / "inference.json", config)
    torch_save(frozen.state_dict(), staging / "models" / "model.pt")
    save_contract(contract, staging / "models" / "model.pt")
    write_text(staging / "docs" / "README.md", README.format(
        name=meta["name"], method=bundle.name, cls=support_class, protocol=protocol, picks=picks,
        support=Path(support_image).name, h=size[0], w=size[1], refine=refine_text))
    for name in COPIED:
        if (bundle / name).is_file():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(bundle / name, staging / name)
    staging.rename(output)  # the bundle appears complete or not at all
    logging.getLogger(__name__).info("frozen bundle written to %s (support slices %s)", output, picks)
    return output


def run(args: argparse.Namespace) -> int:
    from fsmis_monai.io import FsmisInputError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = freeze_bundle(args.bundle, args.support_image, args.support_label, args.support_class, args.output,
                            ckpt_path=args.ckpt_path, protocol=args.protocol, refine=not args.no_refinement,
                            overrides=_parse_overrides(args.overrides),
                            dataset="bundle" if args.dataset is None else args.dataset)
    except (FsmisInputError, KeyError) as e:  # KeyError: a class name the dataset does not know
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
