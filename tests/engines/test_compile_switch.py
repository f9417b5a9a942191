"""The bundles' ``compile`` switch (issue 20 part 4): the encoder compiled with ``torch.compile`` trains with the
losses of today's step to float tolerance, and its checkpoint loads into an uncompiled network.

On 2 CPU cores the ``inductor`` backend takes minutes to compile even the small encoder, so the test traces with
``aot_eager`` (the same Dynamo graph capture and AOT autograd, PyTorch's kernels); the GPU speed of ``inductor``
is to be measured on a device (bench/RESULTS.md, "GPU training")."""

from __future__ import annotations

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from fsmis_monai.io import torch_load
from fsmis_monai.networks.methods import build_method

from _training_run import REPO, prepare_run_data, train_overrides


def _losses(root, out, **extra) -> tuple[list[float], ConfigWorkflow]:
    configs = REPO / "bundles" / "adnet" / "configs"
    wf = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                        workflow_type="train", bundle_root=str(configs.parent),
                        **train_overrides(root / "data", root / "supervoxels", out, max_iterations=3, **extra))
    wf.initialize()
    losses: list[float] = []
    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    wf.run()
    wf.finalize()
    return losses, wf


def test_compiled_encoder_trains_with_the_same_losses(chaos_dir, tmp_path):
    torch.set_num_threads(1)
    root = prepare_run_data(chaos_dir, tmp_path)
    plain, _ = _losses(root, tmp_path / "plain")
    torch._dynamo.reset()
    compiled, wf = _losses(root, tmp_path / "compiled", compile=True, compile_backend="aot_eager")
    assert wf.parser.get_parsed_content("network").encoder._compiled_call_impl is not None  # really compiled
    assert len(plain) == len(compiled) == 3
    assert torch.allclose(torch.tensor(compiled), torch.tensor(plain), rtol=1e-4, atol=1e-5), (plain, compiled)
    state = torch_load(tmp_path / "compiled" / "model.pt")
    build_method("adnet", encoder="small").load_state_dict(state)  # strict: the parameter names are unchanged
    reference = torch_load(tmp_path / "plain" / "model.pt")
    for key in reference:
        assert torch.allclose(state[key].float(), reference[key].float(), atol=1e-5), key
