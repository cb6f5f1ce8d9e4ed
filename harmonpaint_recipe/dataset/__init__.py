"""Benchmark data: a Stylized-COCO-like manifest builder and an offline sample set.

- :mod:`.stylize` - fast color-statistics style transfer (an approximation of StyleID).
- :mod:`.masks` - segmentation masks from PNGs, COCO polygons or RLE; bounding-box masks.
- :mod:`.annotations` - the annotation file format accepted by ``attnctl dataset stylize``.
- :mod:`.manifest` - builds ``items.jsonl`` plus images and masks.
- :mod:`.sample` - a ready sample from scikit-image's bundled public-domain/CC0 images.
"""
