"""Acceleration for inference, optional and imported only where a job is big enough to repay it: Inductor graphs
with frozen weights, static int8 quantisation (torchao PT2E) and BatchNorm folding. Measured gains and costs are in
BENCHMARKS.md, section 1."""
from __future__ import annotations

import copy
import sys

import numpy as np
import torch
from torch import nn

from fashion_search.inference import embed_images, photos_224px
from fashion_search.runtime import autocast, cpu_supports_int8
from fashion_search.transforms import normalize


# A very big job also repays quantising to int8 on a CPU with int8 matrix units, once the setup (export, calibration,
# compile, check) is paid off: from about this many 224 px photos (BENCHMARKS.md, section 1).
INT8_FROM_224PX_IMAGES = 20_000


# The int8 graph is used only if every calibration photo's embedding keeps at least this cosine to the model's own
# (what that costs trained runs in precision@5: BENCHMARKS.md, section 1).
INT8_MIN_COSINE = 0.99


def worth_int8(model, images: int, image_size: int, device: torch.device) -> bool:
    return (device.type == "cpu" and cpu_supports_int8() and model.int8_worthwhile
            and photos_224px(images, image_size) >= INT8_FROM_224PX_IMAGES)


class CompiledEmbed:
    """model.embed compiled by Inductor at static batch shapes, with the weights frozen into the graph (constant-
    folded, and prepacked for oneDNN on CPU): for a big batch job (one shape, the last batch padded), or the app's
    queries (two shapes, kept for the server's life). A context manager: on exit every compiled graph is dropped,
    since frozen weights would go stale if the model changed afterwards. Should compiling fail (no C++ compiler,
    say), it says so once and the eager model does the job."""

    def __init__(self, model):
        from torch._inductor import config as inductor_config

        self.eager = model.embed
        # Compiling happens at the first call, inside this config switch: the switch, not torch.compile(options=
        # {"freezing": True}), is what freezes (with the option the graph ran unfrozen: BENCHMARKS.md, section 1).
        self.fn = inductor_config.patch(freezing=True)(torch.compile(self.eager, dynamic=False))

    def __call__(self, batch):
        if self.fn is not self.eager:
            try:
                return self.fn(batch)
            except Exception as exc:  # noqa: BLE001 - the eager model below is the fallback (and raises real errors)
                print(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:160]}); embedding without it",
                      file=sys.stderr)
                self.fn = self.eager
        return self.fn(batch)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        torch.compiler.reset()


def quantize_int8(module: nn.Module, calibration: list[torch.Tensor], dtype: torch.dtype | None):
    """Static int8 post-training quantisation for the CPU's int8 matrix units: PT2E (torch.export, then torchao's
    X86InductorQuantizer default config: activations per tensor, weights per channel, ranges observed on the
    calibration batches), compiled by Inductor with frozen weights, and run once under autocast to ``dtype`` (as
    embed_images will call it) so that it compiles here. The module must own its weights as parameters (weights a
    closure merely captures stay float). The graph takes the calibration batches' shape only: exported with a
    dynamic batch dimension it ran no faster than bf16 (BENCHMARKS.md section 1). It keeps the float module alive
    (BENCHMARKS.md, section 1; Inductor's freezing_discard_parameters freed little of it, so it is not used).
    Raises ImportError without torchao."""
    import warnings

    from torch._inductor import config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes on its own internals, once per quantised layer
        exported = torch.export.export(module.eval(), (calibration[0],)).module()
        # export turns each .float() / .to(dtype) into a dtype assertion, which bf16 autocast would then fail
        for node in list(exported.graph.nodes):
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                exported.graph.erase_node(node)
        exported.recompile()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in calibration:  # the observers record each activation's range
                prepared(batch)
        graph = inductor_config.patch(freezing=True)(torch.compile(convert_pt2e(prepared), dynamic=False))
        with torch.inference_mode(), autocast(calibration[0].device, dtype):
            graph(calibration[0].clone())  # an inference tensor, as embed_images passes: else it compiles twice
    return graph


def int8_embed_graph(model, photos: np.ndarray, batch_size: int, device, dtype):
    """An int8 graph of ``model.embed`` for batches of ``batch_size`` (quantize_int8 over an fp32 copy of the model,
    calibrated on ``photos``, uint8 [N, 3, S, S] with N a multiple of batch_size), or None where it cannot be had (no
    torchao, an export the quantizer refuses) or where it disagrees with the model on those photos (a cosine under
    INT8_MIN_COSINE), or on a device other than the CPU (the quantizer targets x86 CPUs). ``model`` is an Embedder:
    its float_embed_module() is what gets exported."""
    if device.type != "cpu":
        return None
    photos = np.array(photos, order="C")
    pixels = normalize(torch.from_numpy(photos), model.mean, model.std, device, model.channels_last)
    try:
        graph = quantize_int8(model.float_embed_module(), list(pixels.split(batch_size)), dtype)
        quantized = embed_images(model, photos, device, dtype, batch_size, progress=False, compiled=graph)
    except ImportError:
        print("int8 embedding skipped: torchao is not installed (pip install torchao)")
        return None
    except Exception as exc:  # noqa: BLE001 - the bf16 model does the job instead
        print(f"int8 embedding skipped: {type(exc).__name__}: {str(exc)[:160]}")
        return None
    reference = embed_images(model, photos, device, dtype, batch_size, progress=False)
    agreement = float(np.sum(quantized * reference, axis=1).min())
    if agreement < INT8_MIN_COSINE:
        print(f"int8 embedding not used: its embeddings of {len(photos)} photos differ from the model's "
              f"(lowest cosine {agreement:.4f} < {INT8_MIN_COSINE})")
        return None
    return graph


def fold_batchnorm(model):
    """For inference: a copy of ``model`` whose ``backbone`` (a torchvision ResNet) has each BatchNorm folded into the
    convolution before it (torch.fx fuse; the same function in eval mode, up to float rounding), which saves the
    BatchNorm passes (BENCHMARKS.md, section 1)."""
    from torch.fx.experimental.optimization import fuse

    folded = copy.deepcopy(model).eval()
    folded.backbone = fuse(folded.backbone)
    # torchvision calls one ReLU module up to three times per block; the int8 quantizer (int8_embed_graph) groups
    # the calls of one module together and refuses the group ("more than one output node"), so each call becomes
    # its own torch.relu node. The same function.
    graph = folded.backbone.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(folded.backbone.get_submodule(node.target), nn.ReLU):
            with graph.inserting_after(node):
                node.replace_all_uses_with(graph.call_function(torch.relu, node.args))
            graph.erase_node(node)
    folded.backbone.delete_all_unused_submodules()
    folded.backbone.recompile()
    return folded
