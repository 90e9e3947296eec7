"""The figures' sizes and defaults (tools/figures.py draws them, tools/visualize.py offers them
as flags): here, so that the command line reads them without importing matplotlib or torch."""
DEFAULT_OUT_DIR = 'fig'         # where the PNGs go
DEFAULT_QUERIES = 5             # test images drawn as queries
DEFAULT_TOPK = 10               # retrievals per query
CELL = 64                       # retrieval grid: image side after nearest-neighbour upscaling
FRAME = 4                       # retrieval grid: frame width around every image
LABEL_WIDTH = 120               # retrieval grid: the label strip on the left
TSNE_PERPLEXITY = 30.0          # scikit-learn's default; clipped below the number of points
