"""``attnctl app``: a web page to inpaint, switch strategies and compare, on one pipeline.

Modules: ``service`` (recipes and runs, no web code), ``controls`` (controls generated
from parameter dataclasses), ``compare`` (compare modes), ``editor`` (image and mask from
the page), ``messages`` (status box), ``page`` (the Gradio page), ``probe_tab`` (the tab with the
last run's probe pictures) and ``server`` (start it). Only ``page``, ``probe_tab`` and
``server`` import Gradio, an optional extra:
``pip install -e ".[app]"``.
"""
