"""``attnctl app``: a web page to inpaint, switch strategies and compare, on one pipeline.

Modules: ``service`` (recipes and runs, no web code), ``controls`` (controls generated
from parameter dataclasses), ``compare`` (compare modes), ``editor`` (image and mask from
the page), ``messages`` (status box), ``page`` (the Gradio page) and ``server`` (start
it). Only ``page`` and ``server`` import Gradio, an optional extra:
``pip install -e ".[app]"``.
"""
