"""Backbones shared by several model scripts: torchvision ResNets and CLIP's towers, their input normalisation,
the loading of pretrained weights (one clear line offline), and a character tokenizer for CLIP from scratch."""
from __future__ import annotations

import argparse

import torch

from fashion_search.config import ModelConfig
from fashion_search.errors import UserError
from fashion_search.model import EmbeddingModel


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_HUB_MODEL = "openai/clip-vit-base-patch32"  # clip.py fine-tunes it; the app falls back to it zero-shot


RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")


def add_resnet_args(parser: argparse.ArgumentParser):
    parser.add_argument("--arch", choices=RESNET_ARCHS, default="resnet50",
                        help="ResNet depth (the original uses resnet50; a shallower one fits a CPU budget from scratch)")


class ResNetModel(EmbeddingModel):
    """Base of the networks on a torchvision ResNet ``backbone`` (resnet.py, siamese.py): ImageNet normalisation,
    channels-last inputs, and BatchNorm folded into the convolutions for inference."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels_last = True

    def for_inference(self):
        from fashion_search.accel import fold_batchnorm

        return fold_batchnorm(self)


def resnet_backbone(model: ModelConfig, backbone_config=None):
    """(backbone with fc = Identity, feature dim, backbone_config) for resnet.py and siamese.py.
    Default: torchvision ResNet-50 with ImageNet weights (IMAGENET1K_V2; other --arch: their DEFAULT weights);
    --model: a local torchvision state_dict file; --from-scratch: random weights; --tiny: ResNet with one
    BasicBlock per stage (tests)."""
    import torchvision

    arch = (backbone_config or {}).get("arch") or ("resnet-tiny" if model.tiny else model.arch or "resnet50")
    if arch == "resnet-tiny":
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    elif backbone_config is not None or model.from_scratch:
        net = torchvision.models.get_model(arch)
    elif model.weights:
        net = torchvision.models.get_model(arch)
        state = torch.load(model.weights, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError) as exc:
            raise UserError(f"--model {model.weights} is not a torchvision {arch} state_dict: {str(exc)[:200]}")
    else:
        weights = torchvision.models.get_model_weights(arch).DEFAULT  # resnet50: IMAGENET1K_V2
        net = load_pretrained(lambda _: torchvision.models.get_model(arch, weights=weights), f"{arch} {weights.name}",
                              "torchvision weights")
    dim = net.fc.in_features
    net.fc = torch.nn.Identity()
    return net, dim, {"arch": arch}


def load_pretrained(loader, name: str, what: str):
    """Call ``loader(name)``; offline or missing weights become one line naming --model and --from-scratch."""
    try:
        return loader(name)
    except (OSError, ConnectionError) as exc:  # URLError, HTTP errors and hub errors are OSErrors
        raise UserError(f"cannot load pretrained {what} {name!r} ({type(exc).__name__}); offline, pass a local "
                        f"copy with --model PATH, or train with --from-scratch") from None


def clip_image_features(clip, pixel_values):
    """Projected CLIP image embeddings [B, projection_dim] (transformers 5 returns them as the output's pooler
    output)."""
    size = clip.config.vision_config.image_size
    return clip.get_image_features(pixel_values=pixel_values,
                                   interpolate_pos_encoding=pixel_values.shape[-1] != size).pooler_output


def clip_text_features(clip, input_ids, attention_mask):
    """Projected CLIP text embeddings [B, projection_dim]."""
    return clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def char_tokenizer():
    """A character-level CLIPTokenizer (GPT-2 byte alphabet, no merges) for CLIP trained from scratch, where
    the hub's BPE vocabulary cannot be downloaded. Ids: 0 = start, 1 = end/pad, then one per byte (+ '</w>')."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])
