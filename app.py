"""Find the five catalog items that look most like a photo: a Gradio page and a program API over a vector index
of CLIP embeddings (FAISS in the process by default, or Milvus). Queries: an uploaded photo, an image URL, a text
description (CLIP's text tower), or a click on a result. Optional filters (gender, masterCategory, articleType,
baseColour) are applied inside the search.

Usage: python app.py [--run runs/clip] [--dataset PATH] [--index faiss] [--host 127.0.0.1] [--port 7860]
The code is fashion_search/cli/app.py; installed, the same command is `fashion-app`.
"""
from fashion_search.cli.app import command

if __name__ == "__main__":
    command()
