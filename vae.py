"""The Stable Diffusion VAE encoder (stabilityai/sd-vae-ft-mse, diffusers AutoencoderKL) fine-tuned with a classifier
on its latents. The posterior mean [B, 4, S/8, S/8] is average-pooled to a 4x4 grid and projected to the embedding;
the decoder is dropped (not needed to embed). It is by far the slowest backbone per image: its first stage runs
128 channels at full resolution, so the default input is 128 px and training uses bf16 autocast where available.

Usage: python vae.py [--from-scratch --image-size 64] [--output-dir runs/vae]
The code is fashion_search/cli/vae.py; installed, the same command is `fashion-vae`.
"""
from fashion_search.cli.vae import command

if __name__ == "__main__":
    command()
