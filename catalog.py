"""Add products to, or remove them from, the catalog a clip.py run serves, without rebuilding its index. A running
app sees the change at its next query (the FAISS store: a new version on disk; Milvus: within the server's
staleness bound, seconds). It works on the catalog the app serves: the run's own, or the app's --dataset (given
here too, or read from the index); an index that holds another catalog is refused, and nothing is written.

Usage: python catalog.py {add,remove,count,duplicates} --run runs/clip ... (--help for each)
The code is fashion_search/cli/catalog_admin.py; installed, the same command is `fashion-catalog`.
"""
from fashion_search.cli.catalog_admin import command

if __name__ == "__main__":
    command()
