"""Save a CLIP ViT-B/32 with random weights (openai/clip-vit-base-patch32's architecture, so the same compute) as a
save_pretrained folder the app can load with --model: speed measurements without the hub download.

Usage: python benchmarks/make_clip_b32.py /tmp/clip-b32
"""
import sys

from fashion_search import backbones


def main(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = backbones.char_tokenizer()
    config = CLIPConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        projection_dim=512)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False, image_mean=list(backbones.CLIP_MEAN),
                       image_std=list(backbones.CLIP_STD)).save_pretrained(folder)
    print(f"saved random ViT-B/32 CLIP to {folder}")


if __name__ == "__main__":
    main(sys.argv[1])
