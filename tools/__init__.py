"""The commands beside main.py, each run as `python -m tools.<name>`: embed (a folder's
embeddings), retrieve (nearest images), linear_probe, export (a split's embeddings) and
visualize (figures, drawn by tools/figures.py). They build on lib/; nothing in lib/ imports
them."""
