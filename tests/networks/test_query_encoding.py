"""Encode each query slice once (issue 14): the ``encode_query`` / ``segment_encoded`` pair of every method
and the evaluator's shared pass, against the per-(class, support group) ``segment`` path on real CHAOS
scans (small encoder, slices subsampled to 64 x 64), with the encoder's forwards counted by a hook."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis_monai.data.datalist import pair_scans
from fsmis_monai.data.registry import get_dataset
from fsmis_monai.evaluation import evaluate
from fsmis_monai.evaluation.evaluator import load_scan, predict_query, to_channels
from fsmis_monai.evaluation.inferer import FewShotSliceInferer
from fsmis_monai.evaluation.protocols import PROTOCOLS, make_plan, merge_requests
from fsmis_monai.networks.encoders import SmallEncoder
from fsmis_monai.networks.methods import METHODS, build_method
from fsmis_monai.networks.methods.base import FewShotSegmenter, QueryFeatures

SIZE = 64  # 256^2 CHAOS slices subsampled by 4
CLASSES = (1, 4)  # liver, spleen
#: senet's 200-pixel organ threshold, scaled to the 16x smaller slices
OPTIONS = {"senet": {"min_pixels": 200 // 16}}
#: small settings where a method's default is costly on a CPU (GMRD's 600 background descriptors, Q-Net's
#: 7 refinement steps per query slice and support state)
SMALL = {"gmrd": {"image_size": SIZE, "n_fg": 8, "n_bg": 12}, "qnet": {"refine_steps": 2}}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_method(name: str) -> FewShotSegmenter:
    torch.manual_seed(0)
    return build_method(name, encoder=SmallEncoder(channels=32, width=16), **SMALL.get(name, {})).eval()


@functools.lru_cache(maxsize=1)
def _scans(chaos_dir: Path):
    """CHAOS query scan 1 and support scan 3 (fold 0 of the Q-Net family), every 4th pixel in-plane."""
    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(chaos_dir, require_pseudolabels=False)}
    step = 256 // SIZE
    out = []
    for scan_id in (1, 3):
        scan = load_scan(files[scan_id], desc)
        out.append((to_channels(scan.image[::step, ::step]), scan.label[::step, ::step]))
    return out


def _requests(query_label: np.ndarray, support_label: np.ndarray) -> dict:
    requests = {}
    for c in CLASSES:
        plans = [make_plan(p, query_label == c, support_label == c, **OPTIONS.get(p, {})) for p in PROTOCOLS]
        requests.update({(c, g): zs for g, zs in merge_requests(plans).items()})
    return requests


class EncoderCount:
    """Forward hook on an encoder: calls and images (batch rows) it was run on."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.calls, self.images = 0, 0
        self.handle = encoder.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])


def test_every_method_encodes_queries_on_their_own():
    for name in METHODS:
        assert small_method(name).splits_query(), name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shared_pass_equals_segment_per_support_group(chaos_dir, name):
    """Every (class, support group, query slice) of all five protocols: the logits of the shared pass are
    bit-identical to ``segment`` run per support group as the evaluator did before, one slice per call
    (``sw_batch_size=1``: with larger batches the old path itself depends on the batch composition in the
    last float bits, e.g. the threshold head's matrix product), and the encoder runs once per distinct query
    slice and once per support group. In batches of 4 the logits agree to float rounding."""
    (query, query_label), (support, support_label) = _scans(chaos_dir)
    requests = _requests(query_label, support_label)
    model = small_method(name)
    inferer = FewShotSliceInferer(sw_batch_size=1, device="cpu")

    def support_set(key):
        c, group = key
        images = torch.stack([support[..., z] for z in group])
        masks = torch.as_tensor(np.stack([support_label[..., z] == c for z in group]).astype(np.float32))
        return images, masks

    # the path before issue 14, written out: per (class, group), segment its own slices (query re-encoded)
    expected = {}
    with inferer_context(model):
        for key, zs in requests.items():
            state = model.encode_support(*support_set(key))
            expected[key] = torch.cat([model.segment(query[..., z][None], state) for z in zs])

    count = EncoderCount(model.encoder)
    states = {}

    def state_of(key):
        if key not in states:
            states[key] = inferer.encode(model, *support_set(key))
        return states[key]

    shared = inferer.segment_shared(model, query, requests, state_of)
    count.handle.remove()
    for key in requests:
        assert torch.equal(shared[key], expected[key]), (name, key)
    distinct = len({z for zs in requests.values() for z in zs})
    support_images = sum(len(g) for _, g in requests)
    assert count.images == distinct + support_images
    assert distinct == query.shape[-1]  # whole and ep2 predict every slice
    assert sum(len(zs) for zs in requests.values()) > 2 * distinct  # the old path encoded that many

    batched = FewShotSliceInferer(sw_batch_size=4, device="cpu").segment_shared(model, query, requests, state_of)
    for key in requests:
        torch.testing.assert_close(batched[key], expected[key], rtol=1e-4, atol=1e-3)


def inferer_context(model):
    from fsmis_monai.evaluation.inferer import inference_context

    return inference_context(model)


class SegmentOnly(FewShotSegmenter):
    """A method implementing only ``segment`` (the contract before the split): the base fallback."""

    def __init__(self, method: FewShotSegmenter) -> None:
        super().__init__()
        self.method = method

    def encode_support(self, support_images, support_masks):
        return self.method.encode_support(support_images, support_masks)

    def segment(self, query_images, state):
        return self.method.segment(query_images, state)


def test_method_without_the_split_falls_back_to_segment(chaos_dir):
    (query, query_label), (support, support_label) = _scans(chaos_dir)
    requests = _requests(query_label, support_label)
    model = small_method("adnet")
    inferer = FewShotSliceInferer(sw_batch_size=4, device="cpu")
    count = EncoderCount(model.encoder)
    fallback = predict_query(SegmentOnly(model), inferer, query, support, support_label, requests)
    assert count.images == sum(len(zs) for zs in requests.values()) + sum(len(g) for _, g in requests)
    count.images = 0
    shared = predict_query(model, inferer, query, support, support_label, requests)
    assert count.images == query.shape[-1] + sum(len(g) for _, g in requests)
    for key, zs in requests.items():
        for z in zs:  # the same foreground; the logit margins agree to float32 rounding
            assert np.array_equal(shared[key][z] > 0, fallback[key][z] > 0)
            np.testing.assert_allclose(shared[key][z], fallback[key][z], atol=1e-4, rtol=1e-4)
    assert not SegmentOnly.splits_query()


def test_neither_half_implemented_is_an_error():
    class Empty(FewShotSegmenter):
        pass

    with pytest.raises(NotImplementedError, match="neither segment nor encode_query"):
        Empty().segment(torch.zeros(1, 3, 8, 8), {})


def test_query_features_rows():
    features = QueryFeatures({"a": torch.arange(12.0).reshape(4, 3), "tau": torch.arange(4.0)}, (8, 8))
    picked = features.rows([2, 0])
    assert torch.equal(picked["a"], torch.tensor([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]))
    assert torch.equal(picked["tau"], torch.tensor([2.0, 0.0]))
    assert picked.image_size == (8, 8) and len(picked) == 2
    assert features.rows(range(4)) is features


def test_evaluate_encodes_each_query_slice_once(chaos_dir):
    """The public API on one real query scan, 4 classes x 5 protocols at full size: query slices are
    encoded once each (not once per class and support group), support groups once each."""
    model = small_method("prototype")
    count = EncoderCount(model.encoder)
    summary = evaluate(model, chaos_dir, fold=0, family="qnet", protocols=PROTOCOLS, query_ids=(1,),
                       device="cpu", sw_batch_size=8, progress=False)
    desc = get_dataset("chaos")
    files = {f.scan_id: f for f in pair_scans(chaos_dir, require_pseudolabels=False)}
    query, support = load_scan(files[1], desc), load_scan(files[3], desc)
    groups = set()
    for c in desc.test_classes:
        plans = [make_plan(p, query.label == c, support.label == c) for p in PROTOCOLS]
        groups |= {(c, g) for g in merge_requests(plans)}
    assert count.images == query.label.shape[-1] + sum(len(g) for _, g in groups)
    assert count.calls == -(-query.label.shape[-1] // 8) + len(groups)
    assert summary["config"]["protocols"] == list(PROTOCOLS)
